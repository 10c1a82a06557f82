//! Self-service for sellers (account token): provider credentials and the pools listed on them.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;

use super::{double_option, ApiError, Body, Caller, Created, Page, PathParam, QueryParams};
use crate::store::{Account, Credential, NewPool, Pool, PoolChange};
use crate::App;

fn seller(account: &Account) -> Result<(), ApiError> {
    if account.role.sells() {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "only seller accounts list credentials and pools",
        ))
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCredential {
    /// The seller's own name for it.
    #[serde(default)]
    pub label: String,
    /// The provider credential, tagged by `provider`; sealed at rest, its secrets never
    /// returned.
    pub credential: tokn_config::Credential,
}

/// Stores a provider credential, encrypted at rest. The secret is never returned again.
#[utoipa::path(post, path = "/v1/credentials", tag = "sellers", security(("account" = [])),
    request_body = NewCredential,
    responses((status = 201, description = "Created", body = Credential), (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 403, description = "Not allowed for this account", body = super::error::ErrorBody)))]
pub async fn create_credential(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    Body(new): Body<NewCredential>,
) -> Result<Created<Credential>, ApiError> {
    Ok(Created(add_credential(&app, &account, new).await?))
}

/// Seals and stores a seller's credential (the API's and the web app's).
pub async fn add_credential(
    app: &App,
    account: &Account,
    new: NewCredential,
) -> Result<Credential, ApiError> {
    seller(account)?;
    if new.label.len() > 128 {
        return Err(ApiError::invalid("label: at most 128 characters"));
    }
    let plaintext = acceptable(app, &new.credential)?;
    app.store
        .create_credential(
            &account.id,
            new.credential.kind().as_str(),
            &new.label,
            &new.credential.public_fields(),
            new.credential.has_custom_endpoint(),
            |id| app.keyring.seal(id, &plaintext),
        )
        .await
        .map_err(ApiError::store("credential"))
}

/// A credential this marketplace accepts, as the plaintext to seal.
fn acceptable(
    app: &App,
    credential: &tokn_config::Credential,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ApiError> {
    if matches!(credential, tokn_config::Credential::Mock(_)) && !app.embedded {
        // The built-in mock answers without a provider: only a demo may list it.
        return Err(ApiError::invalid(
            "credential: mock credentials are for the embedded demo only",
        ));
    }
    // The proxies' own rule: a credential accepted here is one every proxy serves.
    let problems = credential.problems(tokn_config::UrlPolicy::Marketplace);
    if !problems.is_empty() {
        return Err(ApiError::invalid(format!(
            "credential: {}",
            problems.join("; ")
        )));
    }
    Ok(zeroize::Zeroizing::new(
        serde_json::to_vec(credential).map_err(|_| ApiError::internal())?,
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialReplacement {
    /// The new provider credential (a rotated key, say), of the same provider; sealed at
    /// rest, its secrets never returned.
    pub credential: tokn_config::Credential,
}

/// Replaces a credential's secret (a rotated provider key). Its pools stop serving until it is
/// verified again (and approved again when its endpoint changed); proxies then try it at once,
/// whatever back-off the old secret had earned.
#[utoipa::path(put, path = "/v1/credentials/{credential_id}", tag = "sellers",
    security(("account" = [])), params(("credential_id" = String, Path)),
    request_body = CredentialReplacement,
    responses((status = 200, description = "Replaced; verify it before its pools serve", body = Credential),
        (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody),
        (status = 409, description = "Another provider than the credential's", body = super::error::ErrorBody)))]
pub async fn replace_credential(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
    Body(new): Body<CredentialReplacement>,
) -> Result<Json<Credential>, ApiError> {
    seller(&account)?;
    let current = app
        .store
        .credential(&account.id, &id)
        .await
        .map_err(ApiError::store("credential"))?;
    if current.provider != new.credential.kind().as_str() {
        return Err(ApiError::conflict(format!(
            "credential: this credential is for `{}`; list another credential for `{}`",
            current.provider,
            new.credential.kind().as_str()
        )));
    }
    let plaintext = acceptable(&app, &new.credential)?;
    let cred = app
        .store
        .replace_credential(
            &account.id,
            &id,
            &new.credential.public_fields(),
            new.credential.has_custom_endpoint(),
            |id| app.keyring.seal(id, &plaintext),
        )
        .await
        .map_err(ApiError::store("credential"))?;
    app.changed(&[]).await;
    Ok(Json(cred))
}

#[utoipa::path(get, path = "/v1/credentials", tag = "sellers", security(("account" = [])),
    params(Page), responses((status = 200, description = "OK", body = Vec<Credential>)))]
pub async fn list_credentials(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Vec<Credential>>, ApiError> {
    Ok(Json(
        app.store
            .credentials(&account.id, page.limit(&app))
            .await
            .map_err(ApiError::store("credential"))?,
    ))
}

#[utoipa::path(get, path = "/v1/credentials/{credential_id}", tag = "sellers",
    security(("account" = [])), params(("credential_id" = String, Path)),
    responses((status = 200, description = "OK", body = Credential), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn get_credential(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Credential>, ApiError> {
    Ok(Json(
        app.store
            .credential(&account.id, &id)
            .await
            .map_err(ApiError::store("credential"))?,
    ))
}

/// Deletes a credential no pool still uses; its sealed secret is erased.
#[utoipa::path(delete, path = "/v1/credentials/{credential_id}", tag = "sellers",
    security(("account" = [])), params(("credential_id" = String, Path)),
    responses((status = 204, description = "Done, no content"), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody),
        (status = 409, description = "Conflicts with the current state", body = super::error::ErrorBody)))]
pub async fn delete_credential(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
) -> Result<StatusCode, ApiError> {
    app.store
        .delete_credential(&account.id, &id)
        .await
        .map_err(ApiError::store("credential"))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Checks the credential against its provider and records the outcome (`valid`, `invalid`,
/// `unreachable`, or `unchecked` for providers without a verification call yet).
#[utoipa::path(post, path = "/v1/credentials/{credential_id}/verify", tag = "sellers",
    security(("account" = [])), params(("credential_id" = String, Path)),
    responses((status = 200, description = "OK", body = Credential), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn verify_credential(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Credential>, ApiError> {
    Ok(Json(check_credential(&app, &account.id, &id).await?))
}

/// Asks the provider whether one of the account's credentials works, and records the answer.
pub async fn check_credential(
    app: &App,
    account_id: &str,
    id: &str,
) -> Result<Credential, ApiError> {
    let cred = app
        .store
        .credential(account_id, id)
        .await
        .map_err(ApiError::store("credential"))?;
    let secret = app
        .open_credential(&cred)
        .map_err(|_| ApiError::internal())?;
    let outcome = app.verifier.verify(&secret).await;
    let cred = app
        .store
        .record_verification(account_id, id, outcome.as_str())
        .await
        .map_err(ApiError::store("credential"))?;
    // Its pools serve once it verified (and its endpoint, if the seller's own, is approved).
    app.changed(&[]).await;
    Ok(cred)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPoolRequest {
    /// The seller's credential the pool's requests are served with.
    pub credential_id: String,
    /// USD face value of the capacity listed, micro-USD.
    pub face_value_micros: i64,
    /// Fraction of list price buyers pay, parts per million (600000 = 0.60).
    pub price_ratio_ppm: i64,
    /// Catalog models of the credential's provider this pool serves.
    pub models: Vec<String>,
    /// When the pool stops serving, Unix ms, in the future; never when absent.
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
}

fn check_ratio(ppm: i64) -> Result<(), ApiError> {
    if (1..=1_000_000).contains(&ppm) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "price_ratio_ppm: must be between 1 and 1000000",
        ))
    }
}

fn check_expiry(at: Option<i64>) -> Result<(), ApiError> {
    match at {
        Some(t) if t <= crate::store::now_ms() => {
            Err(ApiError::invalid("expires_at_ms: must be in the future"))
        }
        _ => Ok(()),
    }
}

/// Lists capacity on a credential. Pools are used first-in first-out by listing time.
#[utoipa::path(post, path = "/v1/pools", tag = "sellers", security(("account" = [])),
    request_body = NewPoolRequest,
    responses((status = 201, description = "Created", body = Pool), (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn create_pool(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    Body(new): Body<NewPoolRequest>,
) -> Result<Created<Pool>, ApiError> {
    Ok(Created(list_pool(&app, &account, new).await?))
}

/// Lists a pool on one of the seller's credentials (the API's and the web app's).
pub async fn list_pool(
    app: &App,
    account: &Account,
    new: NewPoolRequest,
) -> Result<Pool, ApiError> {
    seller(account)?;
    check_ratio(new.price_ratio_ppm)?;
    check_expiry(new.expires_at_ms)?;
    if !(crate::ledger::POOL_DUST_MICROS..=1_000_000_000_000).contains(&new.face_value_micros) {
        return Err(ApiError::invalid(
            "face_value_micros: must be between 10000 ($0.01) and 1000000000000 ($1M)",
        ));
    }
    if new.models.is_empty() || new.models.len() > 1000 {
        return Err(ApiError::invalid("models: 1 to 1000 catalog model ids"));
    }
    let cred = app
        .store
        .credential(&account.id, &new.credential_id)
        .await
        .map_err(ApiError::store("credential"))?;
    let catalog = app.store.prices().await.map_err(ApiError::store("model"))?;
    for m in &new.models {
        match catalog.iter().find(|p| &p.model_id == m) {
            None => {
                return Err(ApiError::invalid(format!(
                    "models: `{}` is not in the catalog",
                    m.chars().take(256).collect::<String>()
                )))
            }
            Some(p) if p.provider != cred.provider => {
                return Err(ApiError::invalid(format!(
                    "models: `{m}` is a {} model, the credential is {}",
                    p.provider, cred.provider
                )))
            }
            Some(_) => {}
        }
    }
    let pool = app
        .store
        .create_pool(
            &account.id,
            &NewPool {
                credential_id: cred.id,
                face_value_micros: new.face_value_micros,
                price_ratio_ppm: new.price_ratio_ppm,
                models: new.models,
                expires_at_ms: new.expires_at_ms,
            },
        )
        .await
        .map_err(ApiError::store("pool"))?;
    app.changed(&[]).await;
    Ok(pool)
}

#[utoipa::path(get, path = "/v1/pools", tag = "sellers", security(("account" = [])),
    params(Page), responses((status = 200, description = "OK", body = Vec<Pool>)))]
pub async fn list_pools(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Vec<Pool>>, ApiError> {
    Ok(Json(
        app.store
            .pools(&account.id, page.limit(&app))
            .await
            .map_err(ApiError::store("pool"))?,
    ))
}

#[utoipa::path(get, path = "/v1/pools/{pool_id}", tag = "sellers", security(("account" = [])),
    params(("pool_id" = String, Path)),
    responses((status = 200, description = "OK", body = Pool), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn get_pool(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Pool>, ApiError> {
    Ok(Json(
        app.store
            .pool(&account.id, &id)
            .await
            .map_err(ApiError::store("pool"))?,
    ))
}

/// Changes to a pool; absent fields stay, `expires_at_ms: null` removes the expiry.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolChangeRequest {
    /// `live`, `paused` or `exhausted` (final).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub status: Option<tokn_config::PoolStatus>,
    /// New fraction of list price buyers pay, parts per million (1 to 1000000); a
    /// higher one sends the pool to the back of the queue.
    #[serde(default)]
    pub price_ratio_ppm: Option<i64>,
    /// New expiry, Unix ms, in the future; `null` removes it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub expires_at_ms: Option<Option<i64>>,
}

/// Pauses, resumes, retires or re-prices a pool; every proxy applies it within a second.
#[utoipa::path(patch, path = "/v1/pools/{pool_id}", tag = "sellers", security(("account" = [])),
    params(("pool_id" = String, Path)), request_body = PoolChangeRequest,
    responses((status = 200, description = "OK", body = Pool), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody),
        (status = 409, description = "Conflicts with the current state", body = super::error::ErrorBody)))]
pub async fn update_pool(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
    Body(change): Body<PoolChangeRequest>,
) -> Result<Json<Pool>, ApiError> {
    if let Some(r) = change.price_ratio_ppm {
        check_ratio(r)?;
    }
    if let Some(e) = change.expires_at_ms {
        check_expiry(e)?;
    }
    let pool = app
        .store
        .change_pool(
            &account.id,
            &id,
            &PoolChange {
                status: change.status,
                price_ratio_ppm: change.price_ratio_ppm,
                expires_at_ms: change.expires_at_ms,
                by_operator: false,
            },
        )
        .await
        .map_err(ApiError::store("pool"))?;
    app.changed(&[]).await;
    Ok(Json(pool))
}

#[derive(serde::Serialize, ToSchema)]
pub struct Earnings {
    /// The seller account.
    pub account_id: String,
    /// Per pool, FIFO order.
    pub pools: Vec<crate::ledger::PoolEarnings>,
    /// The pools' earnings summed.
    pub earned_micros: i64,
    /// What the platform owes the seller now (earnings less payouts and refunds).
    pub payable_micros: i64,
    /// Of that, what was earned within the payout hold (buyers' refunds and disputes may still
    /// arrive): the next payout leaves it.
    pub held_micros: i64,
    /// Payouts made and not yet confirmed paid.
    pub in_transit_micros: i64,
    /// Payouts confirmed paid, in all.
    pub paid_micros: i64,
    /// The last 12 weeks' earnings, newest first (weeks start Monday 00:00 UTC).
    pub weeks: Vec<crate::ledger::WeekEarnings>,
}

/// What the seller's pools earned: requests served, face value consumed, sales, the platform's
/// fee, the seller's share; and the payable balance.
#[utoipa::path(get, path = "/v1/earnings", tag = "sellers", security(("account" = [])),
    responses((status = 200, description = "OK", body = Earnings), (status = 403, description = "Not allowed for this account", body = super::error::ErrorBody)))]
pub async fn earnings(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
) -> Result<Json<Earnings>, ApiError> {
    Ok(Json(earnings_of(&app, &account).await?))
}

/// A seller's earnings, per pool and per week, and where the money stands.
pub async fn earnings_of(app: &App, account: &Account) -> Result<Earnings, ApiError> {
    seller(account)?;
    let pools = app
        .store
        .earnings(&account.id)
        .await
        .map_err(ApiError::store("pool"))?;
    let payable_micros = app
        .store
        .ledger_balance(&crate::ledger::payable_account(&account.id))
        .await
        .map_err(ApiError::store("account"))?;
    let now = crate::store::now_ms();
    let hold_days = app
        .payments
        .as_ref()
        .map_or(0, |p| p.config.config.payouts.hold_days);
    let money = app
        .store
        .seller_money(&account.id, now - i64::from(hold_days) * 86_400_000, 12)
        .await
        .map_err(ApiError::store("account"))?;
    Ok(Earnings {
        earned_micros: pools.iter().map(|p| p.earned_micros).sum(),
        account_id: account.id.clone(),
        pools,
        held_micros: money.held_micros.min(payable_micros.max(0)),
        payable_micros,
        in_transit_micros: money.in_transit_micros,
        paid_micros: money.paid_micros,
        weeks: money.weeks,
    })
}
