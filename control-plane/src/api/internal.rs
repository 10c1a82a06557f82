//! The configuration watch proxies follow (proxy token).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, ProxyCaller, QueryParams};
use crate::push::{Answer, Deltas};
use crate::App;
use tokn_config::CONFIG_KIND_HEADER;

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
    /// The caller applies a `ConfigDelta` (the keys changed since `after`) when only keys
    /// changed: then it may get one, marked `x-tokn-config: delta`.
    #[serde(default)]
    pub delta: bool,
    /// With `delta`: the caller also applies pools and the catalog from a `ConfigDelta`, so
    /// changes to those travel as deltas too (a proxy of an earlier release gets them whole).
    #[serde(default)]
    pub pools: bool,
}

/// The configuration every proxy runs (`tokn_config::PushedConfig`: catalog with price
/// schedule, pools FIFO with their credentials, keys as hashes or in Redis), answered as soon
/// as its version is newer than `after` (never older than the last committed change); 204 if
/// none arrives within `wait_s`. With `delta=true`, a proxy behind by changes to keys alone gets
/// those keys (`ConfigDelta`, header `x-tokn-config: delta`) instead of everything (`full`);
/// with `pools=true` as well, changes to pools and the catalog travel the same way.
/// Carries seller credentials: proxy token only, serve over TLS outside one host.
#[utoipa::path(get, path = "/internal/v1/config", tag = "internal", security(("proxy" = [])),
    params(Watch),
    responses((status = 200, description = "A newer configuration (PushedConfig JSON), or what changed since `after` (ConfigDelta JSON); header x-tokn-config says which"),
        (status = 204, description = "Nothing newer within wait_s"),
        (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody)))]
pub async fn watch_config(
    _: ProxyCaller,
    State(app): State<Arc<App>>,
    QueryParams(w): QueryParams<Watch>,
) -> Result<Response, ApiError> {
    let wait = Duration::from_secs(w.wait_s.min(app.limits.watch_wait_s_max));
    // A change committed and not yet published (the publisher builds off the API's path) is
    // published now: a watch never answers with less than what is committed.
    if let Err(e) = app.push.catch_up(&app).await {
        tracing::warn!(message = "Configuration refresh failed.", error = %e);
    }
    let (kind, body) = match app
        .push
        .newer_than(w.after, wait, Deltas::of(w.delta, w.pools))
        .await
    {
        Some(Answer::Full(body)) => ("full", String::clone(&body)),
        Some(Answer::Delta(body)) => ("delta", body),
        None => return Ok(StatusCode::NO_CONTENT.into_response()),
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            (HeaderName::from_static(CONFIG_KIND_HEADER), kind),
        ],
        body,
    )
        .into_response())
}

/// Most records one ingest call applies (a proxy ships at most this many per batch).
pub const USAGE_BATCH_RECORDS_MAX: usize = 5_000;

/// Largest ingest body.
pub const USAGE_BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// What an ingest call did.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Ingested {
    /// Records applied now (each with its ledger postings).
    pub applied: usize,
    /// Records applied by an earlier delivery, skipped.
    pub duplicates: usize,
    /// Records that cannot be applied, with why: the proxy logs them and moves on.
    pub refused: Vec<RefusedRecord>,
    /// The balances of the wallets the batch touched, after it (for a proxy's own book).
    pub balances: Vec<crate::ledger::WalletBalance>,
    /// The consumption of the pools it touched, after it.
    pub pools: Vec<crate::ledger::PoolConsumption>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RefusedRecord {
    /// 1-based line of the batch.
    pub line: usize,
    /// Why the record was refused.
    pub reason: String,
}

/// Where proxies post their usage batches.
pub const USAGE_PATH: &str = "/internal/v1/usage";

/// The usage drain: a batch of a proxy's usage records (JSON lines, as the proxy wrote them),
/// each applied exactly once with its ledger postings in one database transaction. The proxy
/// advances its spool only after this answers 200; redelivering a batch is harmless.
#[utoipa::path(post, path = "/internal/v1/usage", tag = "internal", security(("proxy" = [])),
    request_body(content = String, content_type = "application/x-ndjson",
        description = "Usage records, one JSON object per line"),
    responses((status = 200, description = "Applied", body = Ingested),
        (status = 400, description = "Not a batch of usage records", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody)))]
pub async fn ingest_usage(
    _: ProxyCaller,
    State(app): State<Arc<App>>,
    body: axum::body::Bytes,
) -> Result<axum::Json<Ingested>, ApiError> {
    let mut records = Vec::new();
    let mut refused = Vec::new();
    let lines = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty());
    for (i, line) in lines.enumerate() {
        if i >= USAGE_BATCH_RECORDS_MAX {
            return Err(ApiError::invalid(format!(
                "at most {USAGE_BATCH_RECORDS_MAX} records per batch"
            )));
        }
        match serde_json::from_slice::<crate::ledger::UsageIn>(line) {
            Ok(r) => match r.problem() {
                None => records.push(r),
                Some(why) => refused.push(RefusedRecord {
                    line: i + 1,
                    reason: why.to_owned(),
                }),
            },
            Err(e) => refused.push(RefusedRecord {
                line: i + 1,
                reason: format!("not a usage record: {}", e.classify_name()),
            }),
        }
    }
    let (applied, balances, pools) = app.apply_usage(&records).await?;
    Ok(axum::Json(Ingested {
        applied: applied.applied.len(),
        duplicates: applied.duplicates,
        refused,
        balances,
        pools,
    }))
}

/// The kind of a JSON error, without the input it quotes.
trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "malformed JSON",
            serde_json::error::Category::Data => "missing or mistyped fields",
            serde_json::error::Category::Eof => "truncated JSON",
        }
    }
}

/// The balance feed proxies without Redis follow: wallet balances and pool consumption that
/// changed after version `after` (every one when `after` is 0 or too old: `complete`), as soon
/// as there are some; 204 if none within `wait_s`.
#[utoipa::path(get, path = "/internal/v1/balances", tag = "internal", security(("proxy" = [])),
    params(Watch),
    responses((status = 200, description = "Changes (or everything)", body = crate::feed::FeedAnswer),
        (status = 204, description = "Nothing changed within wait_s"),
        (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody)))]
pub async fn watch_balances(
    _: ProxyCaller,
    State(app): State<Arc<App>>,
    QueryParams(w): QueryParams<Watch>,
) -> Result<Response, ApiError> {
    let wait = Duration::from_secs(w.wait_s.min(app.limits.watch_wait_s_max));
    match app
        .feed
        .since(&app.store, w.after, wait)
        .await
        .map_err(ApiError::store("balances"))?
    {
        Some(answer) => Ok(axum::Json(answer).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}
