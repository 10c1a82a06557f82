//! The model catalog and its price versions.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Admin, ApiError, Body, Created, PathParam};
use crate::store::{ModelAlias, ModelPrice, Supply};
use crate::App;

/// A price version of a model, with what buyers can be served now.
#[derive(Serialize, ToSchema)]
pub struct CatalogEntry {
    #[serde(flatten)]
    pub price: ModelPrice,
    /// The pools selling the model now; absent when none does (a request would answer 503
    /// `no_capacity`).
    #[schema(inline)]
    pub supply: Option<Supply>,
    /// What a buyer pays per million input tokens at these list prices: list × the ratio of
    /// the pool first in the queue, micro-USD (absent without supply).
    pub buyer_input_price_micros_per_mtok: Option<i64>,
    /// The same for output tokens.
    pub buyer_output_price_micros_per_mtok: Option<i64>,
}

/// Every price version of every model, with each model's supply and the price buyers pay
/// (public: prices are no secret).
#[utoipa::path(get, path = "/v1/catalog", tag = "catalog",
    responses((status = 200, description = "OK", body = Vec<CatalogEntry>)))]
pub async fn list_catalog(
    State(app): State<Arc<App>>,
) -> Result<Json<Vec<CatalogEntry>>, ApiError> {
    Ok(Json(entries(&app).await?))
}

/// Every price version with its model's supply and buyer prices (the API's list, the web's
/// model page).
pub async fn entries(app: &App) -> Result<Vec<CatalogEntry>, ApiError> {
    let prices = app.store.prices().await.map_err(ApiError::store("model"))?;
    let supply = app
        .store
        .supply(crate::store::now_ms())
        .await
        .map_err(ApiError::store("pool"))?;
    Ok(prices
        .into_iter()
        .map(|price| {
            let supply = supply.get(&price.model_id).cloned();
            let buyer = |list: i64| {
                let ratio = supply.as_ref()?.price_ratio_ppm;
                i64::try_from(i128::from(list) * i128::from(ratio) / 1_000_000).ok()
            };
            CatalogEntry {
                buyer_input_price_micros_per_mtok: buyer(price.input_price_micros_per_mtok),
                buyer_output_price_micros_per_mtok: buyer(price.output_price_micros_per_mtok),
                supply,
                price,
            }
        })
        .collect())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewModelPrice {
    /// The catalog model id buyers name in `model`: 1 to 256 printable characters.
    pub model_id: String,
    /// openai, anthropic, bedrock, vertex, gemini, azure or mock.
    pub provider: String,
    /// The provider's name for the model; `model_id` when absent.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// List price of input tokens, micro-USD per million tokens.
    pub input_price_micros_per_mtok: i64,
    /// List price of output tokens, micro-USD per million tokens.
    pub output_price_micros_per_mtok: i64,
    /// The input price when absent.
    #[serde(default)]
    pub cached_input_price_micros_per_mtok: Option<i64>,
    /// Prompt tokens written to the provider's cache (Anthropic: 1.25× input for the 5-minute
    /// cache); the input price when absent.
    #[serde(default)]
    pub cache_write_price_micros_per_mtok: Option<i64>,
    /// Prompt tokens written to a cache that lives an hour (Anthropic: 2× input); the cache
    /// write price when absent.
    #[serde(default)]
    pub cache_write_1h_price_micros_per_mtok: Option<i64>,
    /// When the prices take effect; now when absent. Requests are priced by the version in
    /// force when they started.
    #[serde(default)]
    pub effective_at_ms: Option<i64>,
    /// The most output tokens one request can produce: what a reservation holds for a request
    /// without `max_tokens` (the proxies' default when absent).
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
}

/// Adds a price version for a model (or a new model). Versions never change once written.
#[utoipa::path(post, path = "/v1/admin/catalog", tag = "catalog", security(("admin" = [])),
    request_body = NewModelPrice,
    responses((status = 201, description = "Created", body = ModelPrice), (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 409, description = "Conflicts with the current state", body = super::error::ErrorBody)))]
pub async fn add_model_price(
    _: Admin,
    State(app): State<Arc<App>>,
    Body(new): Body<NewModelPrice>,
) -> Result<Created<ModelPrice>, ApiError> {
    let mut problems = Vec::new();
    if !model_id_ok(&new.model_id) {
        problems.push("model_id: 1 to 256 printable characters".to_owned());
    }
    if tokn_config::ProviderKind::parse(&new.provider).is_none() {
        problems.push("provider: not a known provider".to_owned());
    }
    if new
        .upstream_model
        .as_deref()
        .is_some_and(|u| !model_id_ok(u))
    {
        problems.push("upstream_model: 1 to 256 printable characters".to_owned());
    }
    let cached = new
        .cached_input_price_micros_per_mtok
        .unwrap_or(new.input_price_micros_per_mtok);
    let cache_write = new
        .cache_write_price_micros_per_mtok
        .unwrap_or(new.input_price_micros_per_mtok);
    let cache_write_1h = new
        .cache_write_1h_price_micros_per_mtok
        .unwrap_or(cache_write);
    for (name, v) in [
        (
            "input_price_micros_per_mtok",
            new.input_price_micros_per_mtok,
        ),
        (
            "output_price_micros_per_mtok",
            new.output_price_micros_per_mtok,
        ),
        ("cached_input_price_micros_per_mtok", cached),
        ("cache_write_price_micros_per_mtok", cache_write),
        ("cache_write_1h_price_micros_per_mtok", cache_write_1h),
    ] {
        // $10,000 per 1M tokens is far above any real model: a typo guard, not a policy.
        if !(0..=10_000_000_000).contains(&v) {
            problems.push(format!("{name}: must be between 0 and 10000000000"));
        }
    }
    let now = crate::store::now_ms();
    let effective = new.effective_at_ms.unwrap_or(now);
    if effective < now - 60_000 {
        problems.push("effective_at_ms: prices cannot take effect in the past".to_owned());
    }
    if new
        .max_output_tokens
        .is_some_and(|t| !(1..=10_000_000).contains(&t))
    {
        problems.push("max_output_tokens: must be between 1 and 10000000".to_owned());
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems.join("; ")));
    }
    let price = app
        .store
        .add_price(&ModelPrice {
            upstream_model: new.upstream_model.unwrap_or_else(|| new.model_id.clone()),
            model_id: new.model_id,
            version: 0,
            provider: new.provider,
            input_price_micros_per_mtok: new.input_price_micros_per_mtok,
            output_price_micros_per_mtok: new.output_price_micros_per_mtok,
            cached_input_price_micros_per_mtok: cached,
            cache_write_price_micros_per_mtok: cache_write,
            cache_write_1h_price_micros_per_mtok: cache_write_1h,
            effective_at_ms: effective.max(now),
            max_output_tokens: new.max_output_tokens,
        })
        .await
        .map_err(ApiError::store("model"))?;
    app.changed(&[]).await;
    Ok(Created(price))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AliasTarget {
    /// The catalog model the alias names.
    pub model_id: String,
}

/// Every model alias.
#[utoipa::path(get, path = "/v1/admin/catalog/aliases", tag = "catalog", security(("admin" = [])),
    responses((status = 200, description = "OK", body = Vec<ModelAlias>)))]
pub async fn list_aliases(
    _: Admin,
    State(app): State<Arc<App>>,
) -> Result<Json<Vec<ModelAlias>>, ApiError> {
    let aliases = app
        .store
        .aliases()
        .await
        .map_err(ApiError::store("alias"))?;
    Ok(Json(aliases))
}

/// Names a catalog model also as `alias` (replacing where the alias pointed): buyers may put
/// either in `model`, and Anthropic clients see `claude*` aliases in their model list. Claude
/// Code lists only `claude*` ids and sends the dated ids it knows.
#[utoipa::path(put, path = "/v1/admin/catalog/aliases/{alias}", tag = "catalog", security(("admin" = [])),
    params(("alias" = String, Path)), request_body = AliasTarget,
    responses((status = 200, description = "OK", body = ModelAlias),
        (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 404, description = "No such model", body = super::error::ErrorBody),
        (status = 409, description = "The alias is a model id", body = super::error::ErrorBody)))]
pub async fn put_alias(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(alias): PathParam<String>,
    Body(target): Body<AliasTarget>,
) -> Result<Json<ModelAlias>, ApiError> {
    if !model_id_ok(&alias) {
        return Err(ApiError::invalid("alias: 1 to 256 printable characters"));
    }
    let alias = app
        .store
        .set_alias(&alias, &target.model_id)
        .await
        .map_err(ApiError::store("model"))?;
    app.changed(&[]).await;
    Ok(Json(alias))
}

/// Removes an alias: requests naming it are answered `model_not_found` once proxies have the
/// change.
#[utoipa::path(delete, path = "/v1/admin/catalog/aliases/{alias}", tag = "catalog", security(("admin" = [])),
    params(("alias" = String, Path)),
    responses((status = 204, description = "Removed"),
        (status = 404, description = "No such alias", body = super::error::ErrorBody)))]
pub async fn delete_alias(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(alias): PathParam<String>,
) -> Result<StatusCode, ApiError> {
    app.store
        .remove_alias(&alias)
        .await
        .map_err(ApiError::store("alias"))?;
    app.changed(&[]).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A model id or alias: 1 to 256 printable ASCII characters, no quote or backslash.
fn model_id_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}
