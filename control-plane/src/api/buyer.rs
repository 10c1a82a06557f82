//! Self-service for buyers (account token): the account, its API keys, its wallet.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{double_option, ApiError, Body, Caller, Created, Page, PathParam, QueryParams};
use crate::store::{Account, ApiKey, KeyLimits, LedgerEntry};
use crate::App;

#[utoipa::path(get, path = "/v1/account", tag = "account", security(("account" = [])),
    responses((status = 200, description = "OK", body = Account), (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody)))]
pub async fn me(Caller(account): Caller) -> Json<Account> {
    Json(account)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// Your own name for the key, at most 128 characters; empty when absent.
    #[serde(default)]
    pub name: String,
    /// Catalog model ids this key may use; every model when absent.
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    /// Most this key may spend in total, micro-USD.
    #[serde(default)]
    pub spend_cap_micros: Option<i64>,
    /// Most requests the key may make a minute (1 to 1000000); the platform's
    /// `default_requests_per_minute` when absent.
    #[serde(default)]
    pub requests_per_minute: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: ApiKey,
    /// The key. Shown once: only its hash and lookup prefix are stored.
    pub secret: String,
}

/// Limits to change: absent fields stay, `null` removes the limit.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyChange {
    /// Catalog model ids the key may use; `null`: every model.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allowed_models: Option<Option<Vec<String>>>,
    /// Most the key may spend in total, micro-USD; `null`: no cap.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub spend_cap_micros: Option<Option<i64>>,
    /// Most requests the key may make a minute (1 to 1000000); `null`: no limit.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub requests_per_minute: Option<Option<i64>>,
}

async fn check_limits(app: &App, l: &KeyLimits) -> Result<(), ApiError> {
    if let Some(models) = &l.allowed_models {
        if models.len() > 1000 {
            return Err(ApiError::invalid("allowed_models: at most 1000 models"));
        }
        let catalog = app.store.prices().await.map_err(ApiError::store("model"))?;
        if let Some(m) = models
            .iter()
            .find(|m| !catalog.iter().any(|p| &p.model_id == *m))
        {
            return Err(ApiError::invalid(format!(
                "allowed_models: `{}` is not in the catalog",
                m.chars().take(256).collect::<String>()
            )));
        }
    }
    if l.spend_cap_micros.is_some_and(|c| c < 0) {
        return Err(ApiError::invalid("spend_cap_micros: must not be negative"));
    }
    if l.requests_per_minute
        .is_some_and(|r| !(1..=1_000_000).contains(&r))
    {
        return Err(ApiError::invalid(
            "requests_per_minute: must be between 1 and 1000000",
        ));
    }
    Ok(())
}

/// Creates a buyer API key (`tok_live_…`, checksummed). The key is in this response only.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", security(("account" = [])),
    request_body = NewKey,
    responses((status = 201, description = "Created", body = CreatedKey), (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 403, description = "Not allowed for this account", body = super::error::ErrorBody), (status = 409, description = "Conflicts with the current state", body = super::error::ErrorBody)))]
pub async fn create_key(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    Body(new): Body<NewKey>,
) -> Result<Created<CreatedKey>, ApiError> {
    Ok(Created(issue_key(&app, &account, new).await?))
}

/// Makes a key for `account` (the API's and the web app's): checked, within the account's cap,
/// announced to the proxies before the secret is handed out.
pub async fn issue_key(app: &App, account: &Account, new: NewKey) -> Result<CreatedKey, ApiError> {
    if !account.role.buys() {
        return Err(ApiError::forbidden("only buyer accounts hold API keys"));
    }
    if new.name.len() > 128 {
        return Err(ApiError::invalid("name: at most 128 characters"));
    }
    // Without a rate limit of its own, the key takes the settings' default (in the store).
    let limits = KeyLimits {
        allowed_models: new.allowed_models,
        spend_cap_micros: new.spend_cap_micros,
        requests_per_minute: new.requests_per_minute,
    };
    check_limits(app, &limits).await?;
    let secret = crate::ids::buyer_key();
    let prefix = tokn_config::keys::lookup_prefix(&secret).unwrap_or_default();
    let key = app
        .store
        .create_key(
            &account.id,
            &new.name,
            prefix,
            &crate::ids::sha256_hex(&secret),
            &limits,
        )
        .await
        .map_err(ApiError::store("key"))?;
    app.changed(std::slice::from_ref(&key.key_sha256)).await;
    Ok(CreatedKey { key, secret })
}

#[utoipa::path(get, path = "/v1/keys", tag = "keys", security(("account" = [])), params(Page),
    responses((status = 200, description = "OK", body = Vec<ApiKey>)))]
pub async fn list_keys(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Vec<ApiKey>>, ApiError> {
    let keys = app
        .store
        .keys(&account.id, page.limit(&app))
        .await
        .map_err(ApiError::store("key"))?;
    Ok(Json(keys))
}

#[utoipa::path(get, path = "/v1/keys/{key_id}", tag = "keys", security(("account" = [])),
    params(("key_id" = String, Path)),
    responses((status = 200, description = "OK", body = ApiKey), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn get_key(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
) -> Result<Json<ApiKey>, ApiError> {
    Ok(Json(
        app.store
            .key(&account.id, &id)
            .await
            .map_err(ApiError::store("key"))?,
    ))
}

/// Changes a key's limits; every proxy applies them within a second.
#[utoipa::path(patch, path = "/v1/keys/{key_id}", tag = "keys", security(("account" = [])),
    params(("key_id" = String, Path)), request_body = KeyChange,
    responses((status = 200, description = "OK", body = ApiKey), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn update_key(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
    Body(change): Body<KeyChange>,
) -> Result<Json<ApiKey>, ApiError> {
    let current = app
        .store
        .key(&account.id, &id)
        .await
        .map_err(ApiError::store("key"))?;
    let limits = KeyLimits {
        allowed_models: change.allowed_models.unwrap_or(current.allowed_models),
        spend_cap_micros: change.spend_cap_micros.unwrap_or(current.spend_cap_micros),
        requests_per_minute: change
            .requests_per_minute
            .unwrap_or(current.requests_per_minute),
    };
    check_limits(&app, &limits).await?;
    let key = app
        .store
        .set_key_limits(&account.id, &id, &limits)
        .await
        .map_err(ApiError::store("key"))?;
    app.changed(std::slice::from_ref(&key.key_sha256)).await;
    Ok(Json(key))
}

/// Revokes a key: every proxy refuses it within a second. Revoking twice is harmless.
#[utoipa::path(delete, path = "/v1/keys/{key_id}", tag = "keys", security(("account" = [])),
    params(("key_id" = String, Path)),
    responses((status = 200, description = "OK", body = ApiKey), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn revoke_key(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
) -> Result<Json<ApiKey>, ApiError> {
    Ok(Json(withdraw_key(&app, &account.id, &id).await?))
}

/// Revokes one of the account's keys and tells the proxies (404 for another account's key).
pub async fn withdraw_key(app: &App, account_id: &str, id: &str) -> Result<ApiKey, ApiError> {
    let key = app
        .store
        .revoke_key(account_id, id)
        .await
        .map_err(ApiError::store("key"))?;
    app.changed(std::slice::from_ref(&key.key_sha256)).await;
    Ok(key)
}

#[derive(Serialize, ToSchema)]
pub struct Wallet {
    /// The account whose wallet it is.
    pub account_id: String,
    /// The sum of this wallet's ledger postings, micro-USD.
    pub balance_micros: i64,
    /// What the account owes the platform: credit it had spent and a refund or dispute of its
    /// payment took back. Zero for most accounts.
    pub owed_micros: i64,
    /// Most recent postings first.
    pub entries: Vec<LedgerEntry>,
}

#[utoipa::path(get, path = "/v1/wallet", tag = "account", security(("account" = [])),
    params(Page), responses((status = 200, description = "OK", body = Wallet)))]
pub async fn wallet(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Wallet>, ApiError> {
    let balance_micros = app
        .store
        .balance(&account.id)
        .await
        .map_err(ApiError::store("wallet"))?;
    let owed_micros = -app
        .store
        .ledger_balance(&crate::payments::receivable_account(&account.id))
        .await
        .map_err(ApiError::store("wallet"))?;
    let entries = app
        .store
        .wallet_entries(&account.id, page.limit(&app))
        .await
        .map_err(ApiError::store("wallet"))?;
    Ok(Json(Wallet {
        account_id: account.id,
        balance_micros,
        owed_micros,
        entries,
    }))
}

#[derive(Deserialize, Clone, Copy, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StatementGrouping {
    Key,
    Model,
    Day,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatementQuery {
    /// `key`, `model` or `day` (UTC); `day` when absent.
    #[param(value_type = Option<String>)]
    pub group: Option<StatementGrouping>,
    /// Only this key's requests.
    pub key_id: Option<String>,
    /// Only this model's requests.
    pub model: Option<String>,
    /// Requests started at or after (Unix ms).
    pub from_ms: Option<i64>,
    /// Requests started before (Unix ms).
    pub to_ms: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct Statement {
    /// The buyer account the statement covers.
    pub account_id: String,
    /// `key`, `model` or `day`.
    pub group: String,
    /// One line a group, in group order.
    pub lines: Vec<crate::ledger::StatementLine>,
    /// The lines summed.
    pub requests: i64,
    /// What the requests cost the buyer, micro-USD.
    pub cost_micros: i64,
    /// What the same requests cost at list price, micro-USD.
    pub list_cost_micros: i64,
}

/// The account's usage statement: requests, tokens and cost per key, model or day, with what
/// the same requests cost at list price. Refunds appear in the wallet, not here.
#[utoipa::path(get, path = "/v1/usage", tag = "account", security(("account" = [])),
    params(StatementQuery), responses((status = 200, description = "OK", body = Statement)))]
pub async fn statement(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    QueryParams(q): QueryParams<StatementQuery>,
) -> Result<Json<Statement>, ApiError> {
    use crate::ledger::Grouping;
    let (grouping, group) = match q.group.unwrap_or(StatementGrouping::Day) {
        StatementGrouping::Key => (Grouping::Key, "key"),
        StatementGrouping::Model => (Grouping::Model, "model"),
        StatementGrouping::Day => (Grouping::Day, "day"),
    };
    let filter = crate::ledger::UsageFilter {
        account_id: Some(account.id.clone()),
        key_id: q.key_id,
        pool_id: None,
        model: q.model,
        from_ms: q.from_ms,
        to_ms: q.to_ms,
    };
    let lines = app
        .store
        .statement(&filter, grouping)
        .await
        .map_err(ApiError::store("usage"))?;
    Ok(Json(Statement {
        account_id: account.id,
        group: group.to_owned(),
        requests: lines.iter().map(|l| l.requests).sum(),
        cost_micros: lines.iter().map(|l| l.cost_micros).sum(),
        list_cost_micros: lines.iter().map(|l| l.list_cost_micros).sum(),
        lines,
    }))
}
