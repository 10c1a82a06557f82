//! Operator endpoints (admin token): accounts, credit grants, platform settings, the ledger
//! check, usage and refunds, approvals and pausing any pool.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Admin, ApiError, Body, Created, Page, PathParam, QueryParams};
use crate::ledger::{UsageFilter, UsageRow};
use crate::store::{Account, AccountStatus, ApiKey, Credential, Pool, PoolChange, Role, Settings};
use crate::App;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    /// The account's email address; stored trimmed and lowercase, unique.
    pub email: String,
    /// `buyer`, `seller` or `both`.
    pub role: Role,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedAccount {
    /// The account created.
    pub account: Account,
    /// The account's API token. Shown once: only its hash is stored.
    pub token: String,
}

#[derive(Serialize, ToSchema)]
pub struct AccountWithBalance {
    #[serde(flatten)]
    pub account: Account,
    /// The account's wallet balance, micro-USD.
    pub balance_micros: i64,
}

fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    email.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !email
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
}

/// Creates an account and returns its API token (once). Buyers get the welcome credit.
#[utoipa::path(post, path = "/v1/admin/accounts", tag = "admin",
    security(("admin" = [])), request_body = NewAccount,
    responses((status = 201, description = "Created", body = CreatedAccount), (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 409, description = "Conflicts with the current state", body = super::error::ErrorBody)))]
pub async fn create_account(
    _: Admin,
    State(app): State<Arc<App>>,
    Body(new): Body<NewAccount>,
) -> Result<Created<CreatedAccount>, ApiError> {
    let email = new.email.trim().to_ascii_lowercase();
    if !valid_email(&email) {
        return Err(ApiError::invalid("email: not an email address"));
    }
    let token = crate::ids::account_token();
    let account = app
        .store
        .create_account(&email, new.role, &crate::ids::sha256_hex(&token))
        .await
        .map_err(ApiError::store("account"))?;
    // The welcome credit reaches the proxies' books before the token is handed out.
    app.wallets_changed(std::slice::from_ref(&account.id)).await;
    Ok(Created(CreatedAccount { account, token }))
}

#[utoipa::path(get, path = "/v1/admin/accounts", tag = "admin", security(("admin" = [])),
    params(Page), responses((status = 200, description = "OK", body = Vec<Account>)))]
pub async fn list_accounts(
    _: Admin,
    State(app): State<Arc<App>>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Vec<Account>>, ApiError> {
    let list = app
        .store
        .accounts(page.after.as_deref(), page.limit(&app))
        .await
        .map_err(ApiError::store("account"))?;
    Ok(Json(list))
}

#[utoipa::path(get, path = "/v1/admin/accounts/{account_id}", tag = "admin",
    security(("admin" = [])), params(("account_id" = String, Path)),
    responses((status = 200, description = "OK", body = AccountWithBalance), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn get_account(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
) -> Result<Json<AccountWithBalance>, ApiError> {
    let account = app
        .store
        .account(&id)
        .await
        .map_err(ApiError::store("account"))?;
    let balance_micros = app
        .store
        .balance(&id)
        .await
        .map_err(ApiError::store("account"))?;
    Ok(Json(AccountWithBalance {
        account,
        balance_micros,
    }))
}

#[utoipa::path(get, path = "/v1/admin/accounts/{account_id}/keys", tag = "admin",
    security(("admin" = [])), params(("account_id" = String, Path), Page),
    responses((status = 200, description = "OK", body = Vec<ApiKey>), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
/// An account's API keys (their hashes and limits; never a secret).
pub async fn list_account_keys(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Vec<ApiKey>>, ApiError> {
    app.store
        .account(&id)
        .await
        .map_err(ApiError::store("account"))?;
    let keys = app
        .store
        .keys(&id, page.limit(&app))
        .await
        .map_err(ApiError::store("key"))?;
    Ok(Json(keys))
}

#[utoipa::path(delete, path = "/v1/admin/accounts/{account_id}/keys/{key_id}", tag = "admin",
    security(("admin" = [])), params(("account_id" = String, Path), ("key_id" = String, Path)),
    responses((status = 200, description = "OK", body = ApiKey), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
/// Revokes an account's key (a leaked one): every proxy refuses it within a second.
pub async fn revoke_account_key(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam((account_id, key_id)): PathParam<(String, String)>,
) -> Result<Json<ApiKey>, ApiError> {
    Ok(Json(
        super::buyer::withdraw_key(&app, &account_id, &key_id).await?,
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountChange {
    /// `suspended` suspends the account; `active` reactivates it.
    pub status: AccountStatus,
}

/// Suspends or reactivates an account: a suspended account's keys are refused and its pools
/// unused by every proxy within a second.
#[utoipa::path(patch, path = "/v1/admin/accounts/{account_id}", tag = "admin",
    security(("admin" = [])), params(("account_id" = String, Path)), request_body = AccountChange,
    responses((status = 200, description = "OK", body = Account), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn update_account(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
    Body(change): Body<AccountChange>,
) -> Result<Json<Account>, ApiError> {
    let account = app
        .store
        .set_account_status(&id, change.status)
        .await
        .map_err(ApiError::store("account"))?;
    let hashes = app
        .store
        .account_key_hashes(&id)
        .await
        .map_err(ApiError::store("account"))?;
    app.changed(&hashes).await;
    Ok(Json(account))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditGrant {
    /// Micro-USD, positive.
    pub amount_micros: i64,
    /// A note on the transaction, shown in the wallet's entries; at most 512 characters.
    pub memo: String,
    /// The operator's reference for this grant; repeating it repeats nothing.
    pub reference: String,
}

/// A grant or a refund: the transaction, and the wallet's balance after it.
#[derive(Serialize, ToSchema)]
pub struct WalletMove {
    /// The ledger transaction (`txn_…`); the earlier one when it was a repeat.
    pub transaction_id: String,
    /// False when the same grant (`reference`) or refund (request) was made before: nothing
    /// moved.
    pub created: bool,
    /// The wallet's balance after it.
    pub balance_micros: i64,
}

/// The answer to a grant or refund of `account`'s wallet (201 when it moved money, 200 when it
/// was a repeat); the proxies' books follow a new transaction.
async fn wallet_moved(
    app: &App,
    account: &str,
    transaction_id: String,
    created: bool,
) -> Result<Response, ApiError> {
    if created {
        app.wallets_changed(&[account.to_owned()]).await;
    }
    let balance_micros = app
        .store
        .balance(account)
        .await
        .map_err(ApiError::store("account"))?;
    let body = WalletMove {
        transaction_id,
        created,
        balance_micros,
    };
    Ok(if created {
        Created(body).into_response()
    } else {
        Json(body).into_response()
    })
}

/// Grants credit to a wallet (a balanced ledger transaction), idempotent per reference.
#[utoipa::path(post, path = "/v1/admin/accounts/{account_id}/credits", tag = "admin",
    security(("admin" = [])), params(("account_id" = String, Path)), request_body = CreditGrant,
    responses((status = 201, description = "Created", body = WalletMove), (status = 200, description = "OK", body = WalletMove),
        (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn grant_credit(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
    Body(grant): Body<CreditGrant>,
) -> Result<Response, ApiError> {
    if grant.amount_micros <= 0 || grant.amount_micros > 1_000_000_000_000 {
        return Err(ApiError::invalid(
            "amount_micros: must be between 1 and 1000000000000 ($1M)",
        ));
    }
    if grant.reference.is_empty() || grant.reference.len() > 128 || grant.memo.len() > 512 {
        return Err(ApiError::invalid(
            "reference: 1 to 128 characters; memo: at most 512",
        ));
    }
    let (transaction_id, created) = app
        .store
        .grant_credit(&id, grant.amount_micros, &grant.memo, &grant.reference)
        .await
        .map_err(ApiError::store("account"))?;
    wallet_moved(&app, &id, transaction_id, created).await
}

#[utoipa::path(get, path = "/v1/admin/settings", tag = "admin", security(("admin" = [])),
    responses((status = 200, description = "OK", body = Settings)))]
pub async fn get_settings(
    _: Admin,
    State(app): State<Arc<App>>,
) -> Result<Json<Settings>, ApiError> {
    Ok(Json(
        app.store
            .settings()
            .await
            .map_err(ApiError::store("settings"))?,
    ))
}

/// Replaces the platform settings.
#[utoipa::path(put, path = "/v1/admin/settings", tag = "admin", security(("admin" = [])),
    request_body = Settings,
    responses((status = 200, description = "OK", body = Settings), (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody)))]
pub async fn put_settings(
    _: Admin,
    State(app): State<Arc<App>>,
    Body(s): Body<Settings>,
) -> Result<Json<Settings>, ApiError> {
    let mut problems = Vec::new();
    if !(0..=1_000_000).contains(&s.fee_ratio_ppm) {
        problems.push("fee_ratio_ppm: must be between 0 and 1000000");
    }
    if !(0..=1_000_000_000).contains(&s.welcome_credit_micros) {
        problems.push("welcome_credit_micros: must be between 0 and 1000000000");
    }
    if !(1..=10_000).contains(&s.keys_per_account_max) {
        problems.push("keys_per_account_max: must be between 1 and 10000");
    }
    if s.default_requests_per_minute
        .is_some_and(|r| !(1..=1_000_000).contains(&r))
    {
        problems.push("default_requests_per_minute: must be between 1 and 1000000");
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems.join("; ")));
    }
    app.store
        .put_settings(&s)
        .await
        .map_err(ApiError::store("settings"))?;
    Ok(Json(s))
}

/// Checks the ledger's invariants: every transaction balanced (explicit ones and each usage
/// record), the sum of all postings zero, every running balance equal to the sum of its
/// postings, every pool's consumption equal to the list cost of the requests it served, every
/// request id once. Reads the whole ledger.
#[utoipa::path(get, path = "/v1/admin/ledger/check", tag = "admin", security(("admin" = [])),
    responses((status = 200, description = "OK", body = crate::ledger::LedgerCheck)))]
pub async fn ledger_check(
    _: Admin,
    State(app): State<Arc<App>>,
) -> Result<Json<crate::ledger::LedgerCheck>, ApiError> {
    Ok(Json(
        app.store
            .ledger_check()
            .await
            .map_err(ApiError::store("ledger"))?,
    ))
}

/// Approves a credential whose endpoint the seller chose (a base URL of their own): its
/// answers decide the usage billed through it, so its pools serve only from now on.
#[utoipa::path(post, path = "/v1/admin/credentials/{credential_id}/approve", tag = "admin",
    security(("admin" = [])), params(("credential_id" = String, Path)),
    responses((status = 200, description = "OK", body = Credential), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn approve_credential(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Credential>, ApiError> {
    Ok(Json(approve(&app, &id).await?))
}

/// Lets a credential with its seller's own endpoint serve (the API's and the operator page's).
pub async fn approve(app: &App, id: &str) -> Result<Credential, ApiError> {
    let cred = app
        .store
        .approve_credential(id)
        .await
        .map_err(ApiError::store("credential"))?;
    app.changed(&[]).await;
    Ok(cred)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperatorPoolChange {
    /// `paused` stops a pool whatever its seller does; `live` resumes it.
    #[schema(value_type = String)]
    pub status: tokn_config::PoolStatus,
}

/// Pauses (or resumes) any seller's pool; every proxy applies it within a second.
#[utoipa::path(patch, path = "/v1/admin/pools/{pool_id}", tag = "admin", operation_id = "pause_any_pool",
    security(("admin" = [])), params(("pool_id" = String, Path)), request_body = OperatorPoolChange,
    responses((status = 200, description = "OK", body = Pool), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody),
        (status = 409, description = "Conflicts with the current state", body = super::error::ErrorBody)))]
pub async fn update_pool(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
    Body(change): Body<OperatorPoolChange>,
) -> Result<Json<Pool>, ApiError> {
    let owner = app
        .store
        .pool_owner(&id)
        .await
        .map_err(ApiError::store("pool"))?;
    let pool = app
        .store
        .change_pool(
            &owner,
            &id,
            &PoolChange {
                status: Some(change.status),
                price_ratio_ppm: None,
                expires_at_ms: None,
                by_operator: true,
            },
        )
        .await
        .map_err(ApiError::store("pool"))?;
    app.changed(&[]).await;
    Ok(Json(pool))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    /// A note on the refund transaction, shown in the wallet's entries; 1 to 512 characters.
    pub memo: String,
}

/// Reverses a request's charge: one balanced transaction gives the buyer its cost back and
/// takes the seller's credit and the platform's fee back; once per request id.
#[utoipa::path(post, path = "/v1/admin/usage/{request_id}/refund", tag = "admin",
    security(("admin" = [])), params(("request_id" = String, Path)), request_body = RefundRequest,
    responses((status = 201, description = "Created", body = WalletMove), (status = 200, description = "OK", body = WalletMove),
        (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody),
        (status = 409, description = "Conflicts with the current state", body = super::error::ErrorBody)))]
pub async fn refund_usage(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(request_id): PathParam<String>,
    Body(req): Body<RefundRequest>,
) -> Result<Response, ApiError> {
    if req.memo.is_empty() || req.memo.len() > 512 {
        return Err(ApiError::invalid("memo: 1 to 512 characters"));
    }
    let (transaction_id, created, account) = app
        .store
        .refund(&request_id, &req.memo)
        .await
        .map_err(ApiError::store("usage record"))?;
    wallet_moved(&app, &account, transaction_id, created).await
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    pub account_id: Option<String>,
    pub key_id: Option<String>,
    pub pool_id: Option<String>,
    pub model: Option<String>,
    /// Requests started at or after (Unix ms).
    pub from_ms: Option<i64>,
    /// Requests started before (Unix ms).
    pub to_ms: Option<i64>,
    /// Records to return, newest first (at most the service's list limit).
    pub limit: Option<u32>,
}

/// Applied usage records, newest first, filtered by account, key, pool, model and time.
#[utoipa::path(get, path = "/v1/admin/usage", tag = "admin", security(("admin" = [])),
    params(UsageQuery), responses((status = 200, description = "OK", body = Vec<UsageRow>)))]
pub async fn list_usage(
    _: Admin,
    State(app): State<Arc<App>>,
    QueryParams(q): QueryParams<UsageQuery>,
) -> Result<Json<Vec<UsageRow>>, ApiError> {
    let limit = Page {
        limit: q.limit,
        after: None,
    }
    .limit(&app);
    let filter = UsageFilter {
        account_id: q.account_id,
        key_id: q.key_id,
        pool_id: q.pool_id,
        model: q.model,
        from_ms: q.from_ms,
        to_ms: q.to_ms,
    };
    Ok(Json(
        app.store
            .usage(&filter, limit)
            .await
            .map_err(ApiError::store("usage"))?,
    ))
}

/// What the usage drain last did: records applied and skipped, and how far behind the ledger
/// was in the last batch. Each proxy's own backlog is its `tokn_usage_spool_bytes` metric.
#[utoipa::path(get, path = "/v1/admin/drain", tag = "admin", security(("admin" = [])),
    responses((status = 200, description = "OK", body = crate::DrainStatus)))]
pub async fn drain_status(_: Admin, State(app): State<Arc<App>>) -> Json<crate::DrainStatus> {
    Json(*app.drain.lock().unwrap_or_else(|p| p.into_inner()))
}

#[derive(Serialize, ToSchema)]
pub struct SigninLink {
    /// Opens the web app's operator pages once; valid until `expires_at_ms`. A secret: hand it
    /// only to the operator.
    pub url: String,
    /// When the link stops working, Unix ms.
    pub expires_at_ms: i64,
}

/// A one-time link that signs the operator in to the web app (its operator pages). The link is
/// in this response only.
#[utoipa::path(post, path = "/v1/admin/signin-links", tag = "admin", security(("admin" = [])),
    responses((status = 201, description = "Created", body = SigninLink),
        (status = 404, description = "The web app is off", body = super::error::ErrorBody)))]
pub async fn operator_signin_link(
    _: Admin,
    State(app): State<Arc<App>>,
) -> Result<Created<SigninLink>, ApiError> {
    if !app.web.enabled {
        return Err(ApiError::not_found("web app (it is off)"));
    }
    let url = crate::web::signin_link(&app, &crate::store::Visitor::Operator, "/operator").await?;
    let minutes = i64::try_from(app.web.signin_link_minutes).unwrap_or(i64::MAX / 60_000);
    Ok(Created(SigninLink {
        url,
        expires_at_ms: crate::store::now_ms().saturating_add(minutes.saturating_mul(60_000)),
    }))
}
