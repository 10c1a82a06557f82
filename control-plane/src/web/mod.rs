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
mod operator;
mod playground;
mod public;
mod session;
mod signin;

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::ApiError;
use crate::App;

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
        .route("/signout", post(signin::sign_out))
        .route("/app", get(buyer::home))
        .route("/app/keys", post(buyer::create_key))
        .route("/app/keys/{key_id}/revoke", post(buyer::revoke_key))
        .route("/app/playground", get(playground::show))
        .route("/app/playground/chat", post(playground::chat))
        .route("/operator", get(operator::home))
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
                secure_headers(&mut resp);
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
    secure_headers(&mut resp);
    resp
}

/// Every page: no framing, no sniffing, scripts and styles from this origin only, no
/// referrer beyond it (a sign-in link's token never leaves in a `Referer`), nothing cached.
fn secure_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
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

/// Micro-USD as dollars: `$1.234567` trimmed to cents when whole cents, else to the micro.
pub fn usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    let (dollars, frac) = (m / 1_000_000, m % 1_000_000);
    if frac % 10_000 == 0 {
        format!("{sign}${dollars}.{:02}", frac / 10_000)
    } else {
        let digits = format!("{frac:06}");
        format!("{sign}${dollars}.{}", digits.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::usd;

    #[test]
    fn dollars_are_exact() {
        assert_eq!(usd(10_000_000), "$10.00");
        assert_eq!(usd(1_500_000), "$1.50");
        assert_eq!(usd(1_234_567), "$1.234567");
        assert_eq!(usd(50), "$0.00005");
        assert_eq!(usd(-2_000_000), "-$2.00");
        assert_eq!(usd(0), "$0.00");
    }
}
