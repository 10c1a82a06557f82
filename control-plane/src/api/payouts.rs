//! Money out through Stripe Connect: a seller's onboarding, its payouts and earnings; the
//! operator's payout list, a run on demand and the reconciliation of our ledger with Stripe.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use super::payments::payments;
use super::{Admin, ApiError, Body, Caller, Page, QueryParams};
use crate::payouts::{ConnectAccount, Payout, PayoutReport};
use crate::store::Account;
use crate::stripe::objects::{Account as StripeAccount, AccountLink, Balance, List, Transfer};
use crate::stripe::{micros_of, Form};
use crate::App;

fn seller(account: &Account) -> Result<(), ApiError> {
    if account.role.sells() {
        Ok(())
    } else {
        Err(ApiError::forbidden("only seller accounts are paid out"))
    }
}

fn stripe_failed(e: &crate::stripe::StripeError) -> ApiError {
    tracing::warn!(message = "A Stripe call for onboarding failed.", error = %e);
    if e.uncertain() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stripe_unavailable",
            "Stripe could not be reached; try again",
        )
    } else {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "stripe_refused",
            format!(
                "Stripe refused ({}); the operator's log has its reason",
                e.code().unwrap_or("error")
            ),
        )
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Onboard {
    /// The seller's country (ISO 3166-1 alpha-2), when its Connect account is made; `US` when
    /// absent. Ignored once the account exists.
    #[serde(default)]
    pub country: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Onboarding {
    /// The seller's Connect account as Stripe last reported it.
    pub account: ConnectAccount,
    /// Stripe's hosted onboarding, for the seller only: single use, valid a few minutes (ask
    /// again for a fresh one).
    pub onboarding_url: String,
    /// When the link stops working, Unix ms.
    pub onboarding_expires_at_ms: i64,
}

/// Makes the seller's Stripe Connect account (once) and a fresh onboarding link. Earnings
/// accrue from the first request regardless; payouts wait until Stripe says the account can be
/// paid (`payable`).
#[utoipa::path(post, path = "/v1/payouts/account", tag = "sellers", security(("account" = [])),
    request_body = Onboard,
    responses((status = 200, description = "OK", body = Onboarding), (status = 403, description = "Not a seller account", body = super::error::ErrorBody),
        (status = 501, description = "Payments are off", body = super::error::ErrorBody), (status = 502, description = "Stripe refused", body = super::error::ErrorBody),
        (status = 503, description = "Stripe could not be reached", body = super::error::ErrorBody)))]
pub async fn onboard(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    Body(req): Body<Onboard>,
) -> Result<Json<Onboarding>, ApiError> {
    Ok(Json(start_onboarding(&app, &account, req.country).await?))
}

/// The seller's Connect account (made on first call) and a fresh hosted onboarding link.
pub async fn start_onboarding(
    app: &App,
    account: &Account,
    country: Option<String>,
) -> Result<Onboarding, ApiError> {
    let pay = payments(app)?;
    seller(account)?;
    let country = country.unwrap_or_else(|| "US".to_owned());
    if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ApiError::invalid(
            "country: two capital letters (ISO 3166-1 alpha-2)",
        ));
    }
    let connect = match app
        .store
        .connect_account(&account.id)
        .await
        .map_err(ApiError::store("account"))?
    {
        Some(c) => c,
        None => {
            // Express-like, with controller properties: Stripe collects the requirements and
            // hosts the dashboard; the platform pays the fees and carries the losses.
            let form = Form::new()
                .set("country", &country)
                .set("email", &account.email)
                .set("controller[stripe_dashboard][type]", "express")
                .set("controller[requirement_collection]", "stripe")
                .set("controller[fees][payer]", "application")
                .set("controller[losses][payments]", "application")
                .set("capabilities[transfers][requested]", "true")
                .set("metadata[account_id]", &account.id);
            let made: StripeAccount = pay
                .stripe
                .post("/v1/accounts", &format!("connect:{}", account.id), &form)
                .await
                .map_err(|e| stripe_failed(&e))?;
            app.store
                .save_connect_account(&account.id, &made)
                .await
                .map_err(ApiError::store("account"))?
        }
    };
    let cfg = &pay.config.config;
    let form = Form::new()
        .set("account", &connect.stripe_account)
        .set("type", "account_onboarding")
        .set("refresh_url", &cfg.onboarding_refresh_url)
        .set("return_url", &cfg.onboarding_return_url);
    // Each link is single use: a new one each time.
    let key = format!("onboarding:{}:{}", account.id, crate::ids::new("link"));
    let link: AccountLink = pay
        .stripe
        .post("/v1/account_links", &key, &form)
        .await
        .map_err(|e| stripe_failed(&e))?;
    Ok(Onboarding {
        account: connect,
        onboarding_url: link.url,
        onboarding_expires_at_ms: link.expires_at.saturating_mul(1000),
    })
}

/// The seller's Connect account as Stripe last reported it.
#[utoipa::path(get, path = "/v1/payouts/account", tag = "sellers", security(("account" = [])),
    responses((status = 200, description = "OK", body = ConnectAccount), (status = 404, description = "Not onboarded yet", body = super::error::ErrorBody)))]
pub async fn connect_account(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
) -> Result<Json<ConnectAccount>, ApiError> {
    payments(&app)?;
    seller(&account)?;
    app.store
        .connect_account(&account.id)
        .await
        .map_err(ApiError::store("account"))?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("Connect account (POST /v1/payouts/account makes one)"))
}

/// The seller's payouts, newest first.
#[utoipa::path(get, path = "/v1/payouts", tag = "sellers", security(("account" = [])), params(Page),
    responses((status = 200, description = "OK", body = [Payout])))]
pub async fn my_payouts(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Vec<Payout>>, ApiError> {
    seller(&account)?;
    Ok(Json(
        app.store
            .payouts(Some(&account.id), page.limit(&app))
            .await
            .map_err(ApiError::store("payout"))?,
    ))
}

/// Every payout, newest first, with its Stripe ids, attempts and last error.
#[utoipa::path(get, path = "/v1/admin/payouts", tag = "admin", security(("admin" = [])), params(Page),
    responses((status = 200, description = "OK", body = [Payout])))]
pub async fn all_payouts(
    _: Admin,
    State(app): State<Arc<App>>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Vec<Payout>>, ApiError> {
    Ok(Json(
        app.store
            .payouts(None, page.limit(&app))
            .await
            .map_err(ApiError::store("payout"))?,
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The run's name (1 to 64 characters); a run happens once, so repeating a name makes no
    /// new payouts. Absent: `manual-{now ms}`.
    #[serde(default)]
    pub run: Option<String>,
}

/// Runs payouts now, as the weekly schedule does: every payable seller's earnings past the
/// hold, then sending and confirming.
#[utoipa::path(post, path = "/v1/admin/payouts/run", tag = "admin", security(("admin" = [])),
    request_body = RunRequest,
    responses((status = 200, description = "OK", body = PayoutReport), (status = 409, description = "Another replica is running payouts", body = super::error::ErrorBody),
        (status = 501, description = "Payments are off", body = super::error::ErrorBody)))]
pub async fn run_payouts(
    _: Admin,
    State(app): State<Arc<App>>,
    Body(req): Body<RunRequest>,
) -> Result<Json<PayoutReport>, ApiError> {
    Ok(Json(run_now(&app, req.run).await?))
}

/// A payout run now under the name `run` (`manual-{now ms}` when absent): the API's and the
/// operator page's.
pub async fn run_now(app: &App, run: Option<String>) -> Result<PayoutReport, ApiError> {
    let pay = payments(app)?;
    let run = run.unwrap_or_else(|| format!("manual-{}", crate::store::now_ms()));
    if run.is_empty() || run.len() > 64 {
        return Err(ApiError::invalid("run: 1 to 64 characters"));
    }
    match pay.pass(app, Some(&run)).await {
        Ok(Some(report)) => Ok(report),
        Ok(None) => Err(ApiError::conflict(
            "another replica is running payouts; try again shortly",
        )),
        Err(e) => Err(ApiError::store("payout")(e)),
    }
}

#[derive(Serialize, ToSchema, Default)]
pub struct StatusTotal {
    /// Payouts in the status.
    pub count: i64,
    /// Their amount, cents.
    pub amount_cents: i64,
}

#[derive(Serialize, ToSchema)]
pub struct Reconciliation {
    /// Our payouts by status.
    pub payouts: BTreeMap<String, StatusTotal>,
    /// The ledger's earnings in transit: equal to the pending and sent payouts.
    pub ledger_in_transit_micros: i64,
    /// The ledger's earnings payable to sellers, in all.
    pub ledger_payable_micros: i64,
    /// The ledger's `platform:stripe`: minus what came in through Stripe, plus what left.
    pub ledger_stripe_micros: i64,
    /// Stripe's available balance now, cents.
    pub stripe_available_cents: i64,
    /// Stripe's pending balance now, cents.
    pub stripe_pending_cents: i64,
    /// Stripe's transfers read.
    pub transfers_checked: usize,
    /// Our sent or paid payouts whose transfer Stripe does not have.
    pub missing_on_stripe: Vec<String>,
    /// Stripe transfers naming a payout we do not have, or none.
    pub unknown_on_stripe: Vec<String>,
    /// Payouts whose transfer has another amount, or was reversed.
    pub mismatched: Vec<String>,
    /// In transit equals pending + sent, and nothing is missing, unknown or mismatched.
    pub agrees: bool,
}

/// Our ledger and payouts against Stripe's transfers and balance.
#[utoipa::path(get, path = "/v1/admin/payouts/reconcile", tag = "admin", security(("admin" = [])),
    responses((status = 200, description = "OK", body = Reconciliation), (status = 503, description = "Stripe could not be reached", body = super::error::ErrorBody)))]
pub async fn reconcile(
    _: Admin,
    State(app): State<Arc<App>>,
) -> Result<Json<Reconciliation>, ApiError> {
    let pay = payments(&app)?;
    let db = app.store.raw();
    let store_err = |e: sqlx::Error| ApiError::store("payout")(e.into());
    let mut payouts: BTreeMap<String, StatusTotal> = BTreeMap::new();
    let mut ours: BTreeMap<String, (String, i64)> = BTreeMap::new();
    for r in sqlx::query("SELECT id, status, amount_cents, transfer_id FROM payouts")
        .fetch_all(db)
        .await
        .map_err(store_err)?
    {
        let status: String = r.try_get(1).map_err(store_err)?;
        let cents: i64 = r.try_get(2).map_err(store_err)?;
        let t = payouts.entry(status.clone()).or_default();
        t.count += 1;
        t.amount_cents += cents;
        if let Some(transfer) = r.try_get::<Option<String>, _>(3).map_err(store_err)? {
            if status == "sent" || status == "paid" {
                ours.insert(transfer, (r.try_get(0).map_err(store_err)?, cents));
            }
        }
    }
    let sum = |pattern: &'static str| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT CAST(COALESCE(SUM(balance_micros), 0) AS BIGINT) FROM ledger_balances \
             WHERE ledger_account LIKE $1",
        )
        .bind(pattern)
        .fetch_one(db)
        .await
    };
    let in_transit = sum("transit:%").await.map_err(store_err)?;
    let payable = sum("payable:%").await.map_err(store_err)?;
    let stripe_micros = sum("platform:stripe").await.map_err(store_err)?;
    let balance: Balance = pay
        .stripe
        .get("/v1/balance", &Form::new())
        .await
        .map_err(|e| stripe_failed(&e))?;
    let mut theirs: Vec<Transfer> = Vec::new();
    let mut after: Option<String> = None;
    // At most 100 pages of 100.
    for _ in 0..100 {
        let query = Form::new()
            .set("limit", 100)
            .set_opt("starting_after", after.as_ref());
        let page: List<Transfer> = pay
            .stripe
            .get("/v1/transfers", &query)
            .await
            .map_err(|e| stripe_failed(&e))?;
        after = page.data.last().map(|t| t.id.clone());
        let more = page.has_more && after.is_some();
        theirs.extend(page.data);
        if !more {
            break;
        }
    }
    let mut mismatched = Vec::new();
    let mut unknown = Vec::new();
    for t in &theirs {
        match ours.remove(&t.id) {
            Some((payout, cents)) if cents != t.amount || t.amount_reversed > 0 => {
                mismatched.push(payout)
            }
            Some(_) => {}
            None => unknown.push(t.id.clone()),
        }
    }
    let missing: Vec<String> = ours.into_values().map(|(payout, _)| payout).collect();
    let open_cents: i64 = ["pending", "sent"]
        .iter()
        .filter_map(|s| payouts.get(*s))
        .map(|t| t.amount_cents)
        .sum();
    let agrees = in_transit == micros_of(open_cents)
        && missing.is_empty()
        && unknown.is_empty()
        && mismatched.is_empty();
    Ok(Json(Reconciliation {
        payouts,
        ledger_in_transit_micros: in_transit,
        ledger_payable_micros: payable,
        ledger_stripe_micros: stripe_micros,
        stripe_available_cents: balance.available_in("usd"),
        stripe_pending_cents: balance
            .pending
            .iter()
            .filter(|a| a.currency == "usd")
            .map(|a| a.amount)
            .sum(),
        transfers_checked: theirs.len(),
        missing_on_stripe: missing,
        unknown_on_stripe: unknown,
        mismatched,
        agrees,
    }))
}
