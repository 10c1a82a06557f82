//! Money in through Stripe: the operator's credit packs, a buyer's purchases (each a hosted
//! Checkout page), and the webhook that credits wallets. Without a `[stripe]` configuration
//! every endpoint here answers 501 `payments_disabled`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Admin, ApiError, Body, Caller, Created, Page, PathParam, QueryParams};
use crate::payments::{CreditPack, Purchase};
use crate::store::Account;
use crate::stripe::objects::{CheckoutSession, Event};
use crate::stripe::{webhook, Form};
use crate::{App, Payments};

/// The Stripe side of the service, or the error that says it is off.
pub(super) fn payments(app: &App) -> Result<&Payments, ApiError> {
    app.payments.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "payments_disabled",
            "payments are off: this control plane has no [stripe] configuration",
        )
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPack {
    /// What buyers see, 1 to 128 characters.
    pub name: String,
    /// What the buyer pays, in US cents (50, Stripe's smallest charge, to 1000000).
    pub price_cents: i64,
    /// What the wallet receives, micro-USD: at least the price (a bonus is a promotion), at
    /// most $1M.
    pub credit_micros: i64,
}

/// Adds a credit pack buyers can buy.
#[utoipa::path(post, path = "/v1/admin/packs", tag = "admin", security(("admin" = [])),
    request_body = NewPack,
    responses((status = 201, description = "Created", body = CreditPack), (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 501, description = "Payments are off", body = super::error::ErrorBody)))]
pub async fn create_pack(
    _: Admin,
    State(app): State<Arc<App>>,
    Body(new): Body<NewPack>,
) -> Result<Created<CreditPack>, ApiError> {
    payments(&app)?;
    if new.name.is_empty() || new.name.chars().count() > 128 {
        return Err(ApiError::invalid("name: 1 to 128 characters"));
    }
    if !(50..=1_000_000).contains(&new.price_cents) {
        return Err(ApiError::invalid("price_cents: 50 to 1000000"));
    }
    let price = crate::stripe::micros_of(new.price_cents);
    if new.credit_micros < price || new.credit_micros > 1_000_000_000_000 {
        return Err(ApiError::invalid(
            "credit_micros: at least the price (price_cents × 10000) and at most 1000000000000",
        ));
    }
    let pack = app
        .store
        .create_pack(&new.name, new.price_cents, "usd", new.credit_micros)
        .await
        .map_err(ApiError::store("pack"))?;
    Ok(Created(pack))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PackChange {
    /// Whether buyers are offered the pack (purchases already made are unaffected).
    pub active: bool,
}

/// Offers a pack again or withdraws it.
#[utoipa::path(patch, path = "/v1/admin/packs/{pack_id}", tag = "admin", security(("admin" = [])),
    params(("pack_id" = String, Path)), request_body = PackChange,
    responses((status = 200, description = "OK", body = CreditPack), (status = 404, description = "Not found", body = super::error::ErrorBody)))]
pub async fn update_pack(
    _: Admin,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
    Body(change): Body<PackChange>,
) -> Result<Json<CreditPack>, ApiError> {
    payments(&app)?;
    Ok(Json(
        app.store
            .set_pack_active(&id, change.active)
            .await
            .map_err(ApiError::store("pack"))?,
    ))
}

/// Every pack, withdrawn ones included.
#[utoipa::path(get, path = "/v1/admin/packs", tag = "admin", security(("admin" = [])),
    responses((status = 200, description = "OK", body = [CreditPack])))]
pub async fn list_all_packs(
    _: Admin,
    State(app): State<Arc<App>>,
) -> Result<Json<Vec<CreditPack>>, ApiError> {
    payments(&app)?;
    Ok(Json(
        app.store
            .packs(true)
            .await
            .map_err(ApiError::store("pack"))?,
    ))
}

/// The packs on offer, cheapest first.
#[utoipa::path(get, path = "/v1/packs", tag = "account", security(("account" = [])),
    responses((status = 200, description = "OK", body = [CreditPack]), (status = 501, description = "Payments are off", body = super::error::ErrorBody)))]
pub async fn list_packs(
    _: Caller,
    State(app): State<Arc<App>>,
) -> Result<Json<Vec<CreditPack>>, ApiError> {
    payments(&app)?;
    Ok(Json(
        app.store
            .packs(false)
            .await
            .map_err(ApiError::store("pack"))?,
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPurchase {
    /// The pack to buy (`pack_…`).
    pub pack_id: String,
}

#[derive(Serialize, ToSchema)]
pub struct StartedPurchase {
    #[serde(flatten)]
    pub purchase: Purchase,
    /// Stripe's hosted payment page; the wallet is credited when Stripe reports the payment.
    pub checkout_url: String,
    /// When the page stops taking payment, Unix ms.
    pub checkout_expires_at_ms: Option<i64>,
}

/// Starts buying a pack: a Stripe Checkout page to send the buyer to. The wallet is credited
/// only when Stripe reports the payment (its webhook), once.
#[utoipa::path(post, path = "/v1/purchases", tag = "account", security(("account" = [])),
    request_body = NewPurchase,
    responses((status = 201, description = "Created", body = StartedPurchase), (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 403, description = "Not a buyer account", body = super::error::ErrorBody), (status = 404, description = "No such pack on offer", body = super::error::ErrorBody),
        (status = 501, description = "Payments are off", body = super::error::ErrorBody), (status = 502, description = "Stripe refused the session", body = super::error::ErrorBody),
        (status = 503, description = "Stripe could not be reached", body = super::error::ErrorBody)))]
pub async fn create_purchase(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    Body(new): Body<NewPurchase>,
) -> Result<Created<StartedPurchase>, ApiError> {
    Ok(Created(start_purchase(&app, &account, &new.pack_id).await?))
}

/// A purchase of `pack_id` and its Stripe Checkout page (the API's and the web app's).
pub async fn start_purchase(
    app: &App,
    account: &Account,
    pack_id: &str,
) -> Result<StartedPurchase, ApiError> {
    let pay = payments(app)?;
    if !account.role.buys() {
        return Err(ApiError::forbidden("only buyer accounts buy credit"));
    }
    let pack = match app.store.pack(pack_id).await {
        Ok(p) if p.active => p,
        Ok(_) | Err(crate::store::StoreError::NotFound) => return Err(ApiError::not_found("pack")),
        Err(e) => return Err(ApiError::store("pack")(e)),
    };
    let purchase = app
        .store
        .create_purchase(&account.id, &pack)
        .await
        .map_err(ApiError::store("purchase"))?;
    let cfg = &pay.config.config;
    let form = Form::new()
        .set("mode", "payment")
        .set("line_items[0][price_data][currency]", &pack.currency)
        .set("line_items[0][price_data][unit_amount]", pack.price_cents)
        .set("line_items[0][price_data][product_data][name]", &pack.name)
        .set("line_items[0][quantity]", 1)
        .set("success_url", &cfg.success_url)
        .set("cancel_url", &cfg.cancel_url)
        .set("client_reference_id", &purchase.id)
        .set("customer_email", &account.email)
        .set("metadata[purchase_id]", &purchase.id)
        .set("metadata[account_id]", &account.id)
        .set("metadata[pack_id]", &pack.id)
        .set("payment_intent_data[metadata][purchase_id]", &purchase.id);
    let answer: Result<CheckoutSession, _> = pay
        .stripe
        .post(
            "/v1/checkout/sessions",
            &format!("checkout:{}", purchase.id),
            &form,
        )
        .await;
    let session = match answer {
        Ok(s) => s,
        Err(e) => {
            let (status, code, state) = if e.uncertain() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "stripe_unavailable",
                    "unavailable",
                )
            } else {
                (StatusCode::BAD_GATEWAY, "stripe_refused", "failed")
            };
            tracing::warn!(message = "Stripe did not open a Checkout Session.", purchase = %purchase.id, error = %e);
            let _ = app.store.purchase_opened(&purchase.id, Err(state)).await;
            return Err(ApiError::new(
                status,
                code,
                "the payment page could not be opened; nothing was charged, try again",
            ));
        }
    };
    let Some(url) = session.url.clone() else {
        let _ = app.store.purchase_opened(&purchase.id, Err("failed")).await;
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "stripe_refused",
            "Stripe opened no payment page; nothing was charged",
        ));
    };
    app.store
        .purchase_opened(&purchase.id, Ok(&session))
        .await
        .map_err(ApiError::store("purchase"))?;
    let purchase = app
        .store
        .purchase(&account.id, &purchase.id)
        .await
        .map_err(ApiError::store("purchase"))?;
    Ok(StartedPurchase {
        purchase,
        checkout_url: url,
        checkout_expires_at_ms: session.expires_at.map(|t| t.saturating_mul(1000)),
    })
}

/// Your purchases, newest first.
#[utoipa::path(get, path = "/v1/purchases", tag = "account", security(("account" = [])),
    params(Page),
    responses((status = 200, description = "OK", body = [Purchase])))]
pub async fn list_purchases(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Vec<Purchase>>, ApiError> {
    Ok(Json(
        app.store
            .purchases(&account.id, page.limit(&app))
            .await
            .map_err(ApiError::store("purchase"))?,
    ))
}

#[utoipa::path(get, path = "/v1/purchases/{purchase_id}", tag = "account", security(("account" = [])),
    params(("purchase_id" = String, Path)),
    responses((status = 200, description = "OK", body = Purchase), (status = 404, description = "Not found (or another account's)", body = super::error::ErrorBody)))]
pub async fn get_purchase(
    Caller(account): Caller,
    State(app): State<Arc<App>>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Purchase>, ApiError> {
    Ok(Json(
        app.store
            .purchase(&account.id, &id)
            .await
            .map_err(ApiError::store("purchase"))?,
    ))
}

#[derive(Serialize, ToSchema)]
pub struct Received {
    /// Always true: the event was received.
    pub received: bool,
    /// It had been applied before; nothing changed.
    pub duplicate: bool,
}

/// Stripe's webhook (the platform account's endpoint): checkout payments, refunds, disputes.
/// The body is verified against `Stripe-Signature` before it is read.
#[utoipa::path(post, path = "/v1/stripe/webhook", tag = "stripe",
    request_body(content = String, content_type = "application/json",
        description = "A Stripe event, as Stripe signed it (`Stripe-Signature`)"),
    responses((status = 200, description = "Received", body = Received), (status = 400, description = "Bad signature or body", body = super::error::ErrorBody)))]
pub async fn webhook(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Received>, ApiError> {
    let pay = payments(&app)?;
    receive(&app, pay, &headers, &body, false).await
}

/// Stripe's Connect webhook (events of connected accounts: `account.updated`).
#[utoipa::path(post, path = "/v1/stripe/connect-webhook", tag = "stripe",
    request_body(content = String, content_type = "application/json",
        description = "A Stripe Connect event, as Stripe signed it (`Stripe-Signature`)"),
    responses((status = 200, description = "Received", body = Received), (status = 400, description = "Bad signature or body", body = super::error::ErrorBody)))]
pub async fn connect_webhook(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Received>, ApiError> {
    let pay = payments(&app)?;
    receive(&app, pay, &headers, &body, true).await
}

/// Verifies, parses and applies one delivery. Answers 400 to what is not Stripe's, 200 to what
/// was applied or had been (Stripe stops redelivering), 500 when the store failed (Stripe
/// redelivers).
async fn receive(
    app: &App,
    pay: &Payments,
    headers: &HeaderMap,
    body: &[u8],
    connect: bool,
) -> Result<Json<Received>, ApiError> {
    let secrets = if connect {
        &pay.config.connect_webhook_secrets
    } else {
        &pay.config.webhook_secrets
    };
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let now_s = crate::store::now_ms() / 1000;
    let tolerance = i64::try_from(pay.config.config.webhook_tolerance_s).unwrap_or(300);
    if let Err(e) = webhook::verify(signature, body, secrets, now_s, tolerance) {
        crate::metrics::STRIPE_EVENTS
            .with_label_values(&["refused"])
            .inc();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_signature",
            e.message(),
        ));
    }
    let event: Event = serde_json::from_slice(body).map_err(|_| {
        crate::metrics::STRIPE_EVENTS
            .with_label_values(&["malformed"])
            .inc();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_event",
            "the body is not a Stripe event",
        )
    })?;
    // Connect events name their account; the account endpoint's never do.
    if event.account.is_some() != connect {
        crate::metrics::STRIPE_EVENTS
            .with_label_values(&["malformed"])
            .inc();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "wrong_endpoint",
            "this event belongs to the other webhook endpoint",
        ));
    }
    let outcome = app
        .store
        .apply_event(&event, pay.config.livemode)
        .await
        .map_err(|e| {
            crate::metrics::STRIPE_EVENTS
                .with_label_values(&["failed"])
                .inc();
            match e {
                crate::store::StoreError::Conflict(m) => ApiError::invalid(m),
                other => ApiError::store("event")(other),
            }
        })?;
    crate::metrics::STRIPE_EVENTS
        .with_label_values(&[outcome.result()])
        .inc();
    tracing::info!(message = "Stripe event.", id = %event.id, kind = %event.kind, outcome = %outcome.outcome);
    if !outcome.wallets.is_empty() {
        app.wallets_changed(&outcome.wallets).await;
    }
    Ok(Json(Received {
        received: true,
        duplicate: outcome.duplicate,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backfill {
    /// How far back to read, in days (1 to 30: Stripe keeps events 30 days).
    pub days: i64,
}

#[derive(Serialize, ToSchema, Default)]
pub struct BackfillReport {
    /// Events read from Stripe.
    pub read: usize,
    /// Applied now (a delivery had been missed).
    pub applied: usize,
    /// Applied before (their delivery had arrived).
    pub duplicates: usize,
    /// Read and recorded with nothing to do.
    pub ignored: usize,
}

/// Reads the account endpoint's events of the last `days` from Stripe and applies every one
/// not applied yet, oldest first: what a webhook outage (beyond Stripe's 3 days of retries)
/// missed. Applying is the webhook's own, once per event id.
#[utoipa::path(post, path = "/v1/admin/stripe/backfill", tag = "admin", security(("admin" = [])),
    request_body = Backfill,
    responses((status = 200, description = "OK", body = BackfillReport), (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 503, description = "Stripe could not be reached", body = super::error::ErrorBody)))]
pub async fn backfill(
    _: Admin,
    State(app): State<Arc<App>>,
    Body(req): Body<Backfill>,
) -> Result<Json<BackfillReport>, ApiError> {
    let pay = payments(&app)?;
    if !(1..=30).contains(&req.days) {
        return Err(ApiError::invalid("days: 1 to 30"));
    }
    let since = crate::store::now_ms() / 1000 - req.days * 86_400;
    let mut events: Vec<Event> = Vec::new();
    let mut after: Option<String> = None;
    // At most 100 pages of 100, newest first.
    for _ in 0..100 {
        let mut query = Form::new().set("limit", 100).set("created[gte]", since);
        for (i, kind) in crate::payments::ACCOUNT_EVENTS.iter().enumerate() {
            query = query.set(&format!("types[{i}]"), kind);
        }
        let query = query.set_opt("starting_after", after.as_ref());
        let page: crate::stripe::objects::List<Event> =
            pay.stripe.get("/v1/events", &query).await.map_err(|e| {
                tracing::warn!(message = "Reading Stripe's events failed.", error = %e);
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "stripe_unavailable",
                    "Stripe could not be reached; try again",
                )
            })?;
        after = page.data.last().map(|e| e.id.clone());
        let more = page.has_more && after.is_some();
        events.extend(page.data);
        if !more {
            break;
        }
    }
    let mut report = BackfillReport {
        read: events.len(),
        ..BackfillReport::default()
    };
    let mut wallets = Vec::new();
    for event in events.iter().rev() {
        let outcome = app
            .store
            .apply_event(event, pay.config.livemode)
            .await
            .map_err(ApiError::store("event"))?;
        match outcome.result() {
            "duplicate" => report.duplicates += 1,
            "applied" => report.applied += 1,
            _ => report.ignored += 1,
        }
        wallets.extend(outcome.wallets);
    }
    if !wallets.is_empty() {
        app.wallets_changed(&wallets).await;
    }
    Ok(Json(report))
}
