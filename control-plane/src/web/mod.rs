//! The web app: server-rendered pages beside the API, on the same listener. Public pages (the
//! landing page with its savings estimate, models and prices, docs, the waitlist), sign-in by
//! one-time email link, the buyer's wallet, keys and playground, and the operator's view.
//!
//! Pages are HTML built by `maud` (checked at compile time, escaped by default); a small script
//! adds what must update live (the estimator, the playground's stream). Every form posts with
//! the session's CSRF token, and every page goes out with a strict content security policy.
//! Handlers call the same store and the same checks as the API; `ApiError` still owns the status
//! of every failure, `WebError` only draws it as a page.

mod buyer;
mod layout;
pub mod oauth;
mod operator;
mod playground;
pub(crate) mod public;
mod seller;
mod session;
mod signin;

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::ApiError;
use crate::App;

pub use crate::units::usd;
pub use session::Visit;
pub use signin::make_link as signin_link;

/// The pages and the forms they post to.
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(public::landing))
        .route("/models", get(public::models))
        .route("/docs", get(public::docs))
        .route(
            "/waitlist",
            get(public::waitlist).post(public::join_waitlist),
        )
        .route("/static/app.css", get(layout::css))
        .route("/static/app.js", get(layout::js))
        .route("/signin", get(signin::form).post(signin::send_link))
        .route("/signin/link", get(signin::confirm).post(signin::accept))
        .route("/signin/{provider}", post(oauth::start))
        .route("/signin/{provider}/callback", get(oauth::callback))
        .route("/signout", post(signin::sign_out))
        .route("/signout/everywhere", post(signin::sign_out_everywhere))
        .route("/app", get(buyer::home))
        .route("/app/keys", post(buyer::create_key))
        .route("/app/keys/{key_id}/revoke", post(buyer::revoke_key))
        .route("/app/packs/{pack_id}", post(buyer::buy_pack))
        .route("/app/purchases", get(buyer::purchases))
        .route("/app/usage", get(buyer::usage))
        .route("/app/playground", get(playground::show))
        .route("/app/playground/chat", post(playground::chat))
        .route("/sell", get(seller::home))
        .route("/sell/connect/{provider}", get(seller::connect_form))
        .route("/sell/credentials", post(seller::connect))
        .route(
            "/sell/credentials/{credential_id}/verify",
            post(seller::verify),
        )
        .route("/sell/pools/new/{credential_id}", get(seller::pool_form))
        .route("/sell/pools", post(seller::create_pool))
        .route("/sell/payouts/onboard", post(seller::onboard))
        .route("/operator", get(operator::home))
        .route(
            "/operator/credentials/{credential_id}/approve",
            post(operator::approve),
        )
        .route("/operator/payouts/run", post(operator::run_payouts))
}

/// A failure drawn as a page: the API's error (its status and message), or a visitor who must
/// sign in first (a redirect that remembers where they were going).
#[derive(Debug)]
pub enum WebError {
    Api(ApiError),
    SignIn { return_to: String },
}

impl From<ApiError> for WebError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        match self {
            Self::SignIn { return_to } => {
                let query: String = form_urlencoded::Serializer::new(String::new())
                    .append_pair("return_to", &return_to)
                    .finish();
                Redirect::to(&format!("/signin?{query}")).into_response()
            }
            Self::Api(e) => {
                let status = e.status;
                let body = layout::shell(
                    None,
                    "",
                    status.canonical_reason().unwrap_or("Error"),
                    layout::error_body(status, &e.message),
                );
                let mut resp = (status, axum::response::Html(body.into_string())).into_response();
                if let Some(s) = e.retry_after_s {
                    if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                        resp.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                }
                secure_headers(&mut resp, &content_security_policy(&[]));
                resp
            }
        }
    }
}

pub type WebResult<T = Response> = Result<T, WebError>;

/// A posted form, decoded or refused as a 400 page (unknown fields included).
pub struct WebForm<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for WebForm<T> {
    type Rejection = WebError;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, WebError> {
        let axum::Form(v) = axum::Form::<T>::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text()))?;
        Ok(Self(v))
    }
}

/// A page for `visit`: HTML, its cookies, never cached, the security headers.
pub fn page(visit: &Visit, title: &str, body: maud::Markup) -> Response {
    let html = layout::shell(Some(visit), visit.csrf(), title, body);
    let mut resp = (StatusCode::OK, axum::response::Html(html.into_string())).into_response();
    visit.set_cookies(&mut resp);
    secure_headers(&mut resp, &visit.csp);
    resp
}

/// Scripts, styles and fetches from this origin only; forms post here, and may lead on to
/// Stripe's hosted pages (Checkout, Connect onboarding: a form's redirect counts as its
/// action) and to the sign-in providers in `form_origins` (GitHub's, Google's, or the
/// configured Stripe's when it is not Stripe's own, as a test's fakes are).
pub fn content_security_policy(form_origins: &[String]) -> String {
    let mut forms = "'self' https://checkout.stripe.com https://connect.stripe.com".to_owned();
    for origin in form_origins {
        if !forms.split(' ').any(|o| o == origin) {
            forms.push(' ');
            forms.push_str(origin);
        }
    }
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; form-action {forms}; frame-ancestors 'none'; base-uri 'none'"
    )
}

/// Every page: the content security policy, no framing, no sniffing, no referrer beyond this
/// origin (a sign-in link's token never leaves in a `Referer`), nothing cached.
fn secure_headers(resp: &mut Response, csp: &str) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// After a form: see the result at `to` (303, so a reload never posts again).
pub fn see_other(visit: &Visit, to: &str) -> Response {
    let mut resp = Redirect::to(to).into_response();
    visit.set_cookies(&mut resp);
    resp
}

/// A posted form as its name–value pairs in order (a field may repeat, as checkboxes do).
pub struct FormPairs(pub Vec<(String, String)>);

impl FormPairs {
    /// The first value of `name`, or "".
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Every value of `name`.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for FormPairs {
    type Rejection = WebError;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, WebError> {
        let is_form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !is_form {
            return Err(
                ApiError::invalid("expected a form (application/x-www-form-urlencoded)").into(),
            );
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text()))?;
        Ok(Self(
            form_urlencoded::parse(&bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::content_security_policy;

    #[test]
    fn forms_may_lead_to_stripe_and_the_sign_in_providers_only() {
        let live = content_security_policy(&[]);
        assert!(live.contains(
            "form-action 'self' https://checkout.stripe.com https://connect.stripe.com;"
        ));
        let more = content_security_policy(&[
            "https://checkout.stripe.com".to_owned(),
            "https://github.com".to_owned(),
            "http://127.0.0.1:4242".to_owned(),
        ]);
        assert!(
            more.contains("https://connect.stripe.com https://github.com http://127.0.0.1:4242;"),
            "{more}"
        );
        assert!(live.contains("script-src 'self';"));
    }
}
