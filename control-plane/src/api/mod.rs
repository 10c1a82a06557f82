//! The HTTP API: routes, the OpenAPI document generated from the same handler annotations (so
//! the two cannot drift), authentication, and the JSON extractors that turn every bad input
//! into an `ApiError`.

pub(crate) mod admin;
pub(crate) mod buyer;
pub(crate) mod catalog;
pub mod error;
mod internal;
pub(crate) mod payments;
pub(crate) mod payouts;
pub(crate) mod seller;
pub(crate) mod waitlist;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::de::DeserializeOwned;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::ApiError;

use crate::store::{Account, AccountStatus};
use crate::App;

/// Path of the OpenAPI 3 document.
pub const OPENAPI_PATH: &str = "/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tokn$ control plane",
        description = "Accounts, buyer keys, wallets, seller credentials and pools, the model \
                       catalog and platform settings; the configuration watch proxies follow. \
                       Money is integer micro-USD; ratios are parts per million; times are Unix \
                       milliseconds. Errors are `{\"error\":{\"code\",\"message\"}}`."
    ),
    modifiers(&Security),
    components(schemas(error::ErrorBody))
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["admin", "account", "proxy"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
    }
}

/// The whole service: API routes plus `/openapi.json`, `/healthz` and `/metrics`.
pub fn router(app: Arc<App>) -> Router {
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(admin::create_account, admin::list_accounts))
        .routes(routes!(admin::get_account, admin::update_account))
        .routes(routes!(admin::list_account_keys))
        .routes(routes!(admin::revoke_account_key))
        .routes(routes!(admin::grant_credit))
        .routes(routes!(admin::get_settings, admin::put_settings))
        .routes(routes!(admin::ledger_check))
        .routes(routes!(admin::approve_credential))
        .routes(routes!(admin::update_pool))
        .routes(routes!(admin::refund_usage))
        .routes(routes!(admin::list_usage))
        .routes(routes!(admin::drain_status))
        .routes(routes!(catalog::list_catalog))
        .routes(routes!(catalog::add_model_price))
        .routes(routes!(catalog::list_aliases))
        .routes(routes!(catalog::put_alias, catalog::delete_alias))
        .routes(routes!(buyer::me))
        .routes(routes!(buyer::create_key, buyer::list_keys))
        .routes(routes!(
            buyer::get_key,
            buyer::update_key,
            buyer::revoke_key
        ))
        .routes(routes!(buyer::wallet))
        .routes(routes!(buyer::statement))
        .routes(routes!(seller::earnings))
        .routes(routes!(seller::create_credential, seller::list_credentials))
        .routes(routes!(
            seller::get_credential,
            seller::replace_credential,
            seller::delete_credential
        ))
        .routes(routes!(seller::verify_credential))
        .routes(routes!(seller::create_pool, seller::list_pools))
        .routes(routes!(seller::get_pool, seller::update_pool))
        .routes(routes!(payments::create_pack, payments::list_all_packs))
        .routes(routes!(payments::update_pack))
        .routes(routes!(payments::list_packs))
        .routes(routes!(payments::create_purchase, payments::list_purchases))
        .routes(routes!(payments::get_purchase))
        .routes(routes!(payments::webhook))
        .routes(routes!(payments::connect_webhook))
        .routes(routes!(payments::backfill))
        .routes(routes!(payouts::onboard, payouts::connect_account))
        .routes(routes!(payouts::my_payouts))
        .routes(routes!(payouts::all_payouts))
        .routes(routes!(payouts::run_payouts))
        .routes(routes!(payouts::reconcile))
        .routes(routes!(waitlist::join))
        .routes(routes!(waitlist::list))
        .routes(routes!(waitlist::export))
        .routes(routes!(admin::operator_signin_link))
        .routes(routes!(internal::watch_config))
        .routes(routes!(internal::watch_balances))
        .merge(
            // Usage batches are larger than any other body.
            OpenApiRouter::new()
                .routes(routes!(internal::ingest_usage))
                .layer(axum::extract::DefaultBodyLimit::max(
                    internal::USAGE_BATCH_BYTES_MAX,
                )),
        )
        .split_for_parts();
    let doc = Arc::new(doc.to_pretty_json().unwrap_or_default());
    let body_max = app.limits.request_body_bytes_max;
    let api = if app.web.enabled {
        api.merge(crate::web::router())
    } else {
        api
    };
    api.route(
        OPENAPI_PATH,
        get(move || {
            let doc = doc.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    doc.to_string(),
                )
            }
        }),
    )
    .route("/healthz", get(|| async { "ok\n" }))
    .route("/metrics", get(crate::metrics::render))
    .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
    .method_not_allowed_fallback(|| async {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not take that method",
        )
    })
    .layer(axum::middleware::from_fn(move |req, next| {
        refuse_oversized(body_max, req, next)
    }))
    .layer(axum::middleware::from_fn(count_requests))
    .layer(axum::extract::DefaultBodyLimit::max(body_max))
    .with_state(app)
}

/// How much of a declared-oversized body is read and dropped before the 413, and for how long:
/// a client still sending then reads the answer, where a connection closed on unread data would
/// reach it as a reset. Past these bounds the connection just closes.
const OVERSIZED_DRAIN_BYTES: u64 = 8 << 20;
const OVERSIZED_DRAIN_TIME: Duration = Duration::from_secs(5);

/// Refuses a body whose `Content-Length` is over `limit` before any handler runs (the usage
/// ingest, with its own larger limit, excepted), reading what the client sends first.
async fn refuse_oversized(limit: usize, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let over = declared.filter(|len| *len > u64::try_from(limit).unwrap_or(u64::MAX));
    match over {
        Some(len) if req.uri().path() != internal::USAGE_PATH => {
            if len <= OVERSIZED_DRAIN_BYTES {
                let mut body = req.into_body().into_data_stream();
                let drained = async {
                    while let Some(Ok(_)) = futures_util::StreamExt::next(&mut body).await {}
                };
                let _ = tokio::time::timeout(OVERSIZED_DRAIN_TIME, drained).await;
            }
            ApiError::too_large().into_response()
        }
        _ => next.run(req).await,
    }
}

/// Counts every request by route template (never by raw path: ids stay out of metrics).
async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let resp = next.run(req).await;
    crate::metrics::observe(&method, &route, resp.status().as_u16(), started.elapsed());
    resp
}

/// A JSON body; any failure to read or decode it is an `ApiError`.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(v) = axum::Json::<T>::from_request(req, state).await?;
        Ok(Self(v))
    }
}

/// Path parameters, decoded or refused with an `ApiError`.
pub struct PathParam<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(v) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(v))
    }
}

/// Query parameters, decoded or refused with an `ApiError`.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(v) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(v))
    }
}

/// The request's bearer token, unless its source is throttled for bad ones (429).
fn bearer_from<'p>(parts: &'p Parts, app: &App) -> Result<&'p str, ApiError> {
    if let Some(wait) = source(parts).and_then(|ip| app.auth_throttle.refused(ip)) {
        return Err(ApiError::throttled(wait));
    }
    // No token at all guesses nothing: 401, not counted.
    bearer(parts).ok_or_else(ApiError::unauthorized)
}

/// A bad token: 401, counted against its source.
fn refused(parts: &Parts, app: &App) -> ApiError {
    if let Some(ip) = source(parts) {
        app.auth_throttle.count(ip);
    }
    ApiError::unauthorized()
}

/// The client's address (absent when the router runs without connection info, as in tests).
pub(crate) fn source(parts: &Parts) -> Option<std::net::IpAddr> {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|c| c.0 .0.ip())
}

/// A connection's client address, over plain TCP or TLS (`serve` hands it to the handlers).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Equal digests compared without an early exit, so timing reveals nothing about a token.
fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The operator, authenticated by the admin token.
pub struct Admin;

impl FromRequestParts<Arc<App>> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let token = bearer_from(parts, app)?;
        if digest_eq(&tokn_config::hash_key(token), &app.admin_token_sha256) {
            Ok(Self)
        } else {
            Err(refused(parts, app))
        }
    }
}

/// A proxy, authenticated by the proxy token.
pub struct ProxyCaller;

impl FromRequestParts<Arc<App>> for ProxyCaller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let token = bearer_from(parts, app)?;
        if digest_eq(&tokn_config::hash_key(token), &app.proxy_token_sha256) {
            Ok(Self)
        } else {
            Err(refused(parts, app))
        }
    }
}

/// An active account, authenticated by its own token. Everything it reaches is scoped to it.
pub struct Caller(pub Account);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let token = bearer_from(parts, app)?;
        // Looked up by digest: the database compares hashes, never tokens.
        let account = app
            .store
            .account_by_token(&crate::ids::sha256_hex(token))
            .await
            .map_err(|e| match e {
                crate::store::StoreError::NotFound => refused(parts, app),
                other => ApiError::store("account")(other),
            })?;
        if account.status != AccountStatus::Active {
            return Err(ApiError::forbidden("this account is suspended"));
        }
        Ok(Self(account))
    }
}

/// A created resource: 201 with its JSON.
pub struct Created<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Created<T> {
    fn into_response(self) -> Response {
        (StatusCode::CREATED, axum::Json(self.0)).into_response()
    }
}

/// Common list paging.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// Items to return (at most the service's list limit).
    pub limit: Option<u32>,
    /// Return items whose id sorts after this one.
    pub after: Option<String>,
}

impl Page {
    pub fn limit(&self, app: &App) -> u32 {
        self.limit
            .unwrap_or(app.limits.list_items_max)
            .clamp(1, app.limits.list_items_max)
    }
}

/// For PATCH bodies: `Some(None)` for an explicit `null`, `None` when the field is absent.
pub fn double_option<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}
