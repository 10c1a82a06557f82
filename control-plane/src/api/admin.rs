//! Operator endpoints (admin token): accounts, credit grants, platform settings.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Admin, ApiError, Body, Created, Page, PathParam, QueryParams};
use crate::store::{Account, AccountStatus, Role, Settings};
use crate::App;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    pub email: String,
    pub role: Role,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedAccount {
    pub account: Account,
    /// The account's API token. Shown once: only its hash is stored.
    pub token: String,
}

#[derive(Serialize, ToSchema)]
pub struct AccountWithBalance {
    #[serde(flatten)]
    pub account: Account,
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountChange {
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
    pub memo: String,
    /// The operator's reference for this grant; repeating it repeats nothing.
    pub reference: String,
}

#[derive(Serialize, ToSchema)]
pub struct GrantResult {
    pub transaction_id: String,
    /// False when `reference` had already been granted: nothing moved.
    pub created: bool,
    pub balance_micros: i64,
}

/// Grants credit to a wallet (a balanced ledger transaction), idempotent per reference.
#[utoipa::path(post, path = "/v1/admin/accounts/{account_id}/credits", tag = "admin",
    security(("admin" = [])), params(("account_id" = String, Path)), request_body = CreditGrant,
    responses((status = 201, description = "Created", body = GrantResult), (status = 200, description = "OK", body = GrantResult),
        (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn grant_credit(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
    Body(grant): Body<CreditGrant>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
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
    if created {
        app.wallets_changed(std::slice::from_ref(&id)).await;
    }
    let balance_micros = app
        .store
        .balance(&id)
        .await
        .map_err(ApiError::store("account"))?;
    let body = GrantResult {
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
