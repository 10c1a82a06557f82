//! The configuration watch proxies follow (proxy token).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, ProxyCaller, QueryParams};
use crate::App;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Watch {
    /// The version the proxy runs; the answer is the first newer one.
    #[serde(default)]
    pub after: u64,
    /// How long to wait for a newer version before answering 204 (capped by the service).
    #[serde(default)]
    pub wait_s: u64,
}

/// The configuration every proxy runs (`tokn_config::PushedConfig`: catalog with price
/// schedule, pools FIFO with their credentials, keys as hashes or in Redis), answered as soon
/// as its version is newer than `after`; 204 if none arrives within `wait_s`. Carries seller
/// credentials: proxy token only, serve over TLS outside one host.
#[utoipa::path(get, path = "/internal/v1/config", tag = "internal", security(("proxy" = [])),
    params(Watch),
    responses((status = 200, description = "A newer configuration (PushedConfig JSON)"),
        (status = 204, description = "Nothing newer within wait_s"),
        (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody)))]
pub async fn watch_config(
    _: ProxyCaller,
    State(app): State<Arc<App>>,
    QueryParams(w): QueryParams<Watch>,
) -> Result<Response, ApiError> {
    let wait = Duration::from_secs(w.wait_s.min(app.limits.watch_wait_s_max));
    match app.push.newer_than(w.after, wait).await {
        Some(published) => Ok((
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            published.body.clone(),
        )
            .into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}
