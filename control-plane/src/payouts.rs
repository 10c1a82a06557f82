//! Money out: sellers' Stripe Connect accounts, and payouts of their earnings by transfer.
//!
//! A payout is a state machine that survives a crash at every step:
//!
//! ```text
//!  run ──(one transaction: the payout row + payable:{s} → transit:{s})──▶ pending
//!  pending ──attempt counted──▶ POST /v1/transfers (Idempotency-Key payout:{id}) ──▶ sent
//!     │  balance_insufficient, no answer, 429/5xx: stays pending (last_error says why)
//!     └─ refused (4xx): failed, transit:{s} → payable:{s}
//!  sent ──GET the transfer: there, not reversed──▶ paid (transit:{s} → platform:stripe)
//! ```
//!
//! A payout attempted before is first looked up on Stripe by its transfer group (its own id),
//! so a crash between Stripe's answer and our commit adopts the transfer instead of making a
//! second one (the idempotency key would replay it too, for 24 hours). A (seller, run) pair is
//! unique, a run is recorded once, and one replica at a time works (a lease): two replicas
//! never pay twice. Cents are micro-USD rounded down; the sub-cent rest stays payable.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::ToSchema;

use crate::ids;
use crate::ledger::{self, payable_account};
use crate::payments::STRIPE;
use crate::store::{now_ms, Store, StoreError, StoreResult};
use crate::stripe::objects::{Account, List, Transfer};
use crate::stripe::{cents_of, micros_of, Form, StripeError};
use crate::{metrics, App, Payments};

/// Earnings on their way to a seller: moved out of payable when a payout is made, out of here
/// when it is paid (or back to payable when it failed).
pub fn transit_account(account_id: &str) -> String {
    format!("transit:{account_id}")
}

/// A seller's Connect account and whether it can be paid.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConnectAccount {
    /// The seller account.
    pub account_id: String,
    /// Stripe's connected account (`acct_…`).
    pub stripe_account: String,
    /// Transfers can be made to it: the `transfers` capability is active and payouts are on.
    pub payable: bool,
    /// The `transfers` capability is active.
    pub transfers_active: bool,
    /// Stripe pays out to the seller's bank.
    pub payouts_enabled: bool,
    /// The seller finished Stripe's onboarding form.
    pub details_submitted: bool,
    /// What Stripe still needs from the seller.
    pub requirements_due: Vec<String>,
    /// Why Stripe disabled the account, if it did.
    pub disabled_reason: Option<String>,
    /// When Stripe last reported on it, Unix ms.
    pub updated_at_ms: i64,
}

impl ConnectAccount {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        let transfers_active = r.try_get::<i64, _>("transfers_active")? != 0;
        let payouts_enabled = r.try_get::<i64, _>("payouts_enabled")? != 0;
        Ok(Self {
            account_id: r.try_get("account_id")?,
            stripe_account: r.try_get("stripe_account")?,
            payable: transfers_active && payouts_enabled,
            transfers_active,
            payouts_enabled,
            details_submitted: r.try_get::<i64, _>("details_submitted")? != 0,
            requirements_due: serde_json::from_str(&r.try_get::<String, _>("requirements_due")?)
                .unwrap_or_default(),
            disabled_reason: r.try_get("disabled_reason")?,
            updated_at_ms: r.try_get("updated_at")?,
        })
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Payout {
    /// `po_…`: also the transfer's group and, as `payout:{id}`, its idempotency key.
    pub id: String,
    /// The seller account.
    pub account_id: String,
    /// The run that made it (the weekly run's date, or the operator's name for it).
    pub run: String,
    /// What it pays, in cents of `currency`.
    pub amount_cents: i64,
    /// `usd`.
    pub currency: String,
    /// `pending` (being sent; waiting when `last_error` says why), `sent` (Stripe made the
    /// transfer), `paid` (confirmed on Stripe), `failed` (refused: the amount is payable again).
    pub status: String,
    /// The seller's Connect account it pays (`acct_…`).
    pub stripe_account: String,
    /// Stripe's transfer (`tr_…`), once made.
    pub transfer_id: Option<String>,
    /// Calls to Stripe made for it.
    pub attempts: i64,
    /// Why it waits, or why it failed (Stripe's code and message).
    pub last_error: Option<String>,
    /// When the run made it, Unix ms.
    pub created_at_ms: i64,
    /// Its last change, Unix ms.
    pub updated_at_ms: i64,
}

impl Payout {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            run: r.try_get("run")?,
            amount_cents: r.try_get("amount_cents")?,
            currency: r.try_get("currency")?,
            status: r.try_get("status")?,
            stripe_account: r.try_get("stripe_account")?,
            transfer_id: r.try_get("transfer_id")?,
            attempts: r.try_get("attempts")?,
            last_error: r.try_get("last_error")?,
            created_at_ms: r.try_get("created_at")?,
            updated_at_ms: r.try_get("updated_at")?,
        })
    }
}

/// What one pass of the payout worker did.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct PayoutReport {
    /// The run made in this pass, if any.
    pub run: Option<String>,
    /// Payouts made by the run.
    pub created: usize,
    /// Transfers Stripe made (or that were found made) in this pass.
    pub sent: usize,
    /// Payouts confirmed paid.
    pub paid: usize,
    /// Payouts waiting (the platform's balance is short, or Stripe did not answer).
    pub waiting: usize,
    /// Payouts Stripe refused (their amount is payable again).
    pub failed: usize,
}

impl Store {
    pub async fn connect_account(&self, account_id: &str) -> StoreResult<Option<ConnectAccount>> {
        let r = sqlx::query("SELECT * FROM connect_accounts WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(self.raw())
            .await?;
        Ok(r.as_ref().map(ConnectAccount::from_row).transpose()?)
    }

    /// Records the seller's Connect account (the first one stays if two were made at once).
    pub async fn save_connect_account(
        &self,
        account_id: &str,
        stripe: &Account,
    ) -> StoreResult<ConnectAccount> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO connect_accounts (account_id, stripe_account, created_at, updated_at) \
             VALUES ($1, $2, $3, $3) ON CONFLICT (account_id) DO NOTHING",
        )
        .bind(account_id)
        .bind(&stripe.id)
        .bind(now)
        .execute(self.writer())
        .await?;
        let mut tx = self.write().await?;
        mirror_connect_account(&mut tx, stripe).await?;
        tx.commit().await?;
        self.connect_account(account_id)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// Takes (or renews) the lease `name` for `holder` until `ttl_ms` from now; false while
    /// another holder's lease runs.
    pub async fn take_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> StoreResult<bool> {
        let now = now_ms();
        let n = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(now + ttl_ms)
        .bind(now)
        .execute(self.writer())
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    pub async fn drop_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    /// Records that run `run` starts; false when it started before.
    pub async fn start_run(&self, run: &str) -> StoreResult<bool> {
        let n = sqlx::query(
            "INSERT INTO payout_runs (run, started_at) VALUES ($1, $2) ON CONFLICT (run) DO NOTHING",
        )
        .bind(run)
        .bind(now_ms())
        .execute(self.writer())
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    /// Sellers that can be paid: `(account, Connect account, payable micros, held micros)`,
    /// held being what they earned since `held_since_ms` (still open to refunds and disputes).
    pub async fn payable_sellers(
        &self,
        held_since_ms: i64,
    ) -> StoreResult<Vec<(String, String, i64, i64)>> {
        let rows = sqlx::query(
            "SELECT c.account_id, c.stripe_account, COALESCE(b.balance_micros, 0) \
             FROM connect_accounts c \
             LEFT JOIN ledger_balances b ON b.ledger_account = 'payable:' || c.account_id \
             WHERE c.transfers_active = 1 AND c.payouts_enabled = 1 ORDER BY c.account_id",
        )
        .fetch_all(self.raw())
        .await?;
        let held = self.earned_since(held_since_ms).await?;
        rows.iter()
            .map(|r| {
                let account: String = r.try_get(0)?;
                let held = held.get(&account).copied().unwrap_or(0);
                Ok((account, r.try_get(1)?, r.try_get(2)?, held))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Each seller's earnings from requests started since `since_ms`.
    async fn earned_since(
        &self,
        since_ms: i64,
    ) -> StoreResult<std::collections::BTreeMap<String, i64>> {
        let rows = sqlx::query(
            "SELECT seller_id, CAST(SUM(seller_credit_micros) AS BIGINT) FROM usage_records \
             WHERE started_at >= $1 AND seller_id IS NOT NULL GROUP BY seller_id",
        )
        .bind(since_ms)
        .fetch_all(self.raw())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Makes run `run`'s payout to `seller`: its payable balance (read under the row's lock)
    /// less `held_micros`, in whole cents, when at least `minimum_cents` — the row and the
    /// ledger's move from payable to in transit in one transaction. None when there is less, or
    /// the run paid this seller already.
    pub async fn create_payout(
        &self,
        seller: &str,
        stripe_account: &str,
        run: &str,
        held_micros: i64,
        minimum_cents: i64,
    ) -> StoreResult<Option<Payout>> {
        let id = ids::new("po");
        let now = now_ms();
        let (payable, transit) = (payable_account(seller), transit_account(seller));
        let mut tx = self.write().await?;
        // Locked until the commit: a second run (another replica, a second click) waits here
        // and then sees what this one took.
        let balance = ledger::read_balance_locked(&mut tx, &payable).await?;
        let cents = cents_of(balance - held_micros.max(0));
        if cents < minimum_cents.max(1) {
            return Ok(None);
        }
        let n = sqlx::query(
            "INSERT INTO payouts (id, account_id, run, amount_cents, currency, status, \
             stripe_account, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'usd', 'pending', $5, $6, $6) \
             ON CONFLICT (account_id, run) DO NOTHING",
        )
        .bind(&id)
        .bind(seller)
        .bind(run)
        .bind(cents)
        .bind(stripe_account)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(None);
        }
        let m = micros_of(cents);
        let memo = format!("payout {id} ({run})");
        ledger::post(
            &mut tx,
            "payout",
            &format!("payout:{id}"),
            &memo,
            &[(payable.as_str(), -m), (transit.as_str(), m)],
        )
        .await?;
        tx.commit().await?;
        self.payout(&id).await.map(Some)
    }

    pub async fn payout(&self, id: &str) -> StoreResult<Payout> {
        let r = sqlx::query("SELECT * FROM payouts WHERE id = $1")
            .bind(id)
            .fetch_one(self.raw())
            .await?;
        Ok(Payout::from_row(&r)?)
    }

    /// Payouts in `status`, oldest first.
    pub async fn payouts_in(&self, status: &str, limit: u32) -> StoreResult<Vec<Payout>> {
        let rows =
            sqlx::query("SELECT * FROM payouts WHERE status = $1 ORDER BY created_at, id LIMIT $2")
                .bind(status)
                .bind(i64::from(limit))
                .fetch_all(self.raw())
                .await?;
        Ok(rows
            .iter()
            .map(Payout::from_row)
            .collect::<Result<_, _>>()?)
    }

    /// A seller's payouts (every seller's for `None`), newest first.
    pub async fn payouts(&self, account_id: Option<&str>, limit: u32) -> StoreResult<Vec<Payout>> {
        let rows = sqlx::query(
            "SELECT * FROM payouts WHERE account_id = $1 OR $1 IS NULL \
             ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(account_id.map(str::to_owned))
        .bind(i64::from(limit))
        .fetch_all(self.raw())
        .await?;
        Ok(rows
            .iter()
            .map(Payout::from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Counts a call to Stripe for a pending payout before it is made.
    async fn payout_attempt(&self, id: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE payouts SET attempts = attempts + 1, updated_at = $1 \
             WHERE id = $2 AND status = 'pending'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    async fn payout_note(&self, id: &str, why: &str) -> StoreResult<()> {
        sqlx::query("UPDATE payouts SET last_error = $1, updated_at = $2 WHERE id = $3")
            .bind(why)
            .bind(now_ms())
            .bind(id)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    async fn payout_sent(&self, id: &str, transfer: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE payouts SET status = 'sent', transfer_id = $1, last_error = NULL, \
             updated_at = $2 WHERE id = $3 AND status = 'pending'",
        )
        .bind(transfer)
        .bind(now_ms())
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Ends a payout from `from` status, once, with its ledger move out of transit:
    /// `returned_cents` back to payable (a refusal returns it all, a partial reversal part), the
    /// rest out through Stripe. `paid` when any of it left, `failed` when none did.
    async fn payout_end(
        &self,
        p: &Payout,
        from: &str,
        returned_cents: i64,
        why: Option<&str>,
    ) -> StoreResult<()> {
        let returned = returned_cents.clamp(0, p.amount_cents);
        let status = if returned < p.amount_cents {
            "paid"
        } else {
            "failed"
        };
        let mut tx = self.write().await?;
        let n = sqlx::query(
            "UPDATE payouts SET status = $1, last_error = COALESCE($2, last_error), \
             updated_at = $3 WHERE id = $4 AND status = $5",
        )
        .bind(status)
        .bind(why.map(str::to_owned))
        .bind(now_ms())
        .bind(&p.id)
        .bind(from)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(());
        }
        let (transit, payable) = (
            transit_account(&p.account_id),
            payable_account(&p.account_id),
        );
        let (m, back) = (micros_of(p.amount_cents), micros_of(returned));
        let postings: Vec<(&str, i64)> = [
            (transit.as_str(), -m),
            (payable.as_str(), back),
            (STRIPE, m - back),
        ]
        .into_iter()
        .filter(|(_, a)| *a != 0)
        .collect();
        ledger::post(
            &mut tx,
            if status == "paid" {
                "payout_paid"
            } else {
                "payout_returned"
            },
            &format!("payout_{status}:{}", p.id),
            &format!("payout {} {status}", p.id),
            &postings,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Mirrors what Stripe says of a connected account; false when it is not one of ours.
pub(crate) async fn mirror_connect_account(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    a: &Account,
) -> StoreResult<bool> {
    let req = a.requirements.clone().unwrap_or_default();
    let due: Vec<&String> = req.currently_due.iter().chain(&req.past_due).collect();
    let n = sqlx::query(
        "UPDATE connect_accounts SET transfers_active = $1, payouts_enabled = $2, \
         details_submitted = $3, requirements_due = $4, disabled_reason = $5, updated_at = $6 \
         WHERE stripe_account = $7",
    )
    .bind(i64::from(
        a.capabilities.get("transfers").map(String::as_str) == Some("active"),
    ))
    .bind(i64::from(a.payouts_enabled))
    .bind(i64::from(a.details_submitted))
    .bind(serde_json::to_string(&due).unwrap_or_else(|_| "[]".to_owned()))
    .bind(req.disabled_reason.clone())
    .bind(now_ms())
    .bind(&a.id)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// The lease the payout worker holds while it works.
const LEASE: &str = "payouts";
/// How long a lease outlives its last renewal (a replica that died is replaced after this).
const LEASE_MS: i64 = 15_000;
/// Payouts handled a pass, per state.
const BATCH: u32 = 500;

impl Payments {
    /// One pass: the scheduled run when it is due (or the run `force`d by the operator), then
    /// every pending payout sent and every sent one confirmed. `Ok(None)` when another replica
    /// holds the lease. Passes of one replica (its worker, the operator's runs) take turns.
    pub async fn pass(
        &self,
        app: &App,
        force: Option<&str>,
    ) -> Result<Option<PayoutReport>, StoreError> {
        let _turn = self.pass_turn.lock().await;
        if !app.store.take_lease(LEASE, &self.replica, LEASE_MS).await? {
            return Ok(None);
        }
        let result = self.pass_leased(app, force).await;
        if let Err(e) = app.store.drop_lease(LEASE, &self.replica).await {
            tracing::warn!(message = "Releasing the payout lease failed; it expires.", error = %e);
        }
        result.map(Some)
    }

    /// Renews the lease; false when another replica took it meanwhile (this pass stops: what
    /// it left is resumed by whoever holds it).
    async fn still_leased(&self, app: &App) -> Result<bool, StoreError> {
        app.store.take_lease(LEASE, &self.replica, LEASE_MS).await
    }

    async fn pass_leased(
        &self,
        app: &App,
        force: Option<&str>,
    ) -> Result<PayoutReport, StoreError> {
        let mut report = PayoutReport::default();
        let cfg = &self.config.config.payouts;
        let now = now_ms();
        let due = match force {
            // An operator's run never takes a scheduled run's name.
            Some(run) => Some(format!("manual:{run}")),
            None if cfg.automatic => {
                Some(scheduled_run(now, self.config.payout_weekday, cfg.hour_utc))
            }
            None => None,
        };
        if let Some(run) = due {
            if app.store.start_run(&run).await? {
                report.created = self.make_run(app, &run, now).await?;
                report.run = Some(run);
            }
        }
        self.send_pending(app, &mut report).await?;
        self.confirm_sent(app, &mut report).await?;
        Ok(report)
    }

    /// Makes run `run`'s payouts: each payable seller's earnings older than the hold, in whole
    /// cents, when at least the minimum.
    async fn make_run(&self, app: &App, run: &str, now: i64) -> Result<usize, StoreError> {
        let cfg = &self.config.config.payouts;
        let held_since = now - i64::from(cfg.hold_days) * 86_400_000;
        let mut made = 0;
        for (seller, stripe_account, payable, held) in app.store.payable_sellers(held_since).await?
        {
            if cents_of(payable - held.max(0)) < cfg.minimum_cents {
                continue;
            }
            if !self.still_leased(app).await? {
                break;
            }
            let payout = app
                .store
                .create_payout(&seller, &stripe_account, run, held, cfg.minimum_cents)
                .await?;
            if payout.is_some() {
                made += 1;
                metrics::PAYOUTS.with_label_values(&["created"]).inc();
            }
        }
        tracing::info!(message = "Payout run made.", run, payouts = made);
        Ok(made)
    }

    async fn send_pending(&self, app: &App, report: &mut PayoutReport) -> Result<(), StoreError> {
        let pending = app.store.payouts_in("pending", BATCH).await?;
        if pending.is_empty() {
            return Ok(());
        }
        // What the platform can pay now; unknown (and then left to the transfer) when Stripe
        // does not answer.
        let mut available = match self
            .stripe
            .get::<crate::stripe::objects::Balance>("/v1/balance", &Form::new())
            .await
        {
            Ok(b) => Some(b.available_in("usd")),
            Err(_) => None,
        };
        for p in pending {
            if !self.still_leased(app).await? {
                break;
            }
            let outcome = match self.made_before(app, &p).await? {
                Some(outcome) => outcome,
                None if available.is_some_and(|a| a < p.amount_cents) => {
                    let why = "balance_insufficient: the platform's available Stripe balance \
                               does not cover it; it waits";
                    app.store.payout_note(&p.id, why).await?;
                    metrics::PAYOUTS.with_label_values(&["waiting"]).inc();
                    Sending::Waiting
                }
                None => {
                    let outcome = self.send(app, &p).await?;
                    if let Sending::Sent = outcome {
                        available = available.map(|a| a - p.amount_cents);
                    }
                    outcome
                }
            };
            match outcome {
                Sending::Sent => report.sent += 1,
                Sending::Waiting => report.waiting += 1,
                Sending::Failed => report.failed += 1,
            }
        }
        Ok(())
    }

    /// For a payout attempted before (its answer may have been lost to a crash or a timeout):
    /// its transfer, if Stripe made it, adopted; `Waiting` while Stripe cannot say. `None`: no
    /// transfer exists, send it.
    async fn made_before(&self, app: &App, p: &Payout) -> Result<Option<Sending>, StoreError> {
        if p.attempts == 0 {
            return Ok(None);
        }
        let query = Form::new().set("transfer_group", &p.id).set("limit", 10);
        match self
            .stripe
            .get::<List<Transfer>>("/v1/transfers", &query)
            .await
        {
            Ok(list) => {
                let Some(t) = list
                    .data
                    .iter()
                    .find(|t| t.metadata.get("payout_id") == Some(&p.id))
                else {
                    return Ok(None);
                };
                app.store.payout_sent(&p.id, &t.id).await?;
                metrics::PAYOUTS.with_label_values(&["sent"]).inc();
                Ok(Some(Sending::Sent))
            }
            Err(e) => {
                // Never send again without knowing: after 24 hours the idempotency key no
                // longer guards it.
                let why = format!(
                    "{}; its earlier transfer could not be looked up, it waits",
                    e.describe()
                );
                app.store.payout_note(&p.id, &why).await?;
                metrics::PAYOUTS.with_label_values(&["waiting"]).inc();
                Ok(Some(Sending::Waiting))
            }
        }
    }

    /// Makes one pending payout's transfer (its attempt counted first).
    async fn send(&self, app: &App, p: &Payout) -> Result<Sending, StoreError> {
        app.store.payout_attempt(&p.id).await?;
        let form = Form::new()
            .set("amount", p.amount_cents)
            .set("currency", &p.currency)
            .set("destination", &p.stripe_account)
            .set("transfer_group", &p.id)
            .set("description", format!("tokn$ payout {}", p.id))
            .set("metadata[payout_id]", &p.id)
            .set("metadata[account_id]", &p.account_id);
        let answer: Result<Transfer, StripeError> = self
            .stripe
            .post("/v1/transfers", &format!("payout:{}", p.id), &form)
            .await;
        match answer {
            Ok(t) => {
                app.store.payout_sent(&p.id, &t.id).await?;
                metrics::PAYOUTS.with_label_values(&["sent"]).inc();
                Ok(Sending::Sent)
            }
            Err(e) if e.uncertain() || e.code() == Some("balance_insufficient") => {
                let why = if e.uncertain() {
                    format!("{}; it is tried again", e.describe())
                } else {
                    format!("balance_insufficient: {}; it waits", e.describe())
                };
                app.store.payout_note(&p.id, &why).await?;
                metrics::PAYOUTS.with_label_values(&["waiting"]).inc();
                Ok(Sending::Waiting)
            }
            Err(e) => {
                tracing::warn!(message = "Stripe refused a payout; its amount is payable again.", payout = %p.id, error = %e);
                app.store
                    .payout_end(p, "pending", p.amount_cents, Some(&e.describe()))
                    .await?;
                metrics::PAYOUTS.with_label_values(&["failed"]).inc();
                Ok(Sending::Failed)
            }
        }
    }

    /// Confirms sent payouts on Stripe: paid when the transfer is there; what was reversed of
    /// it is payable again (all of it: failed).
    async fn confirm_sent(&self, app: &App, report: &mut PayoutReport) -> Result<(), StoreError> {
        for p in app.store.payouts_in("sent", BATCH).await? {
            let Some(transfer_id) = &p.transfer_id else {
                continue;
            };
            let Ok(t) = self
                .stripe
                .get::<Transfer>(&format!("/v1/transfers/{transfer_id}"), &Form::new())
                .await
            else {
                continue;
            };
            if t.amount != p.amount_cents {
                let why = format!(
                    "the transfer is of {} cents, not {}",
                    t.amount, p.amount_cents
                );
                app.store.payout_note(&p.id, &why).await?;
                continue;
            }
            let reversed = if t.reversed {
                t.amount
            } else {
                t.amount_reversed
            };
            let why =
                (reversed > 0).then(|| format!("{reversed} cents of the transfer were reversed"));
            app.store
                .payout_end(&p, "sent", reversed, why.as_deref())
                .await?;
            if reversed >= p.amount_cents {
                report.failed += 1;
                metrics::PAYOUTS.with_label_values(&["failed"]).inc();
            } else {
                report.paid += 1;
                metrics::PAYOUTS.with_label_values(&["paid"]).inc();
            }
        }
        Ok(())
    }

    /// Runs passes every `tick_s` until the process ends.
    pub async fn worker(app: std::sync::Arc<App>) {
        let Some(me) = app.payments.as_ref() else {
            return;
        };
        let tick = std::time::Duration::from_secs(me.config.config.payouts.tick_s);
        loop {
            match me.pass(&app, None).await {
                Ok(Some(r)) if r.created + r.sent + r.paid + r.failed > 0 => {
                    tracing::info!(message = "Payouts moved.", run = ?r.run, created = r.created, sent = r.sent, paid = r.paid, waiting = r.waiting, failed = r.failed);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(message = "A payout pass failed; the next one resumes it.", error = %e)
                }
            }
            tokio::time::sleep(tick).await;
        }
    }
}

enum Sending {
    Sent,
    Waiting,
    Failed,
}

/// The most recent scheduled run at or before `now_ms` (`weekday` 0 = Monday, `hour` UTC),
/// named by its date, `YYYY-MM-DD`.
pub fn scheduled_run(now_ms: i64, weekday: u32, hour: u32) -> String {
    let day_ms = 86_400_000;
    let days = now_ms.div_euclid(day_ms);
    // 1970-01-01 was a Thursday (3 when Monday is 0).
    let today = (days + 3).rem_euclid(7);
    let mut run_day = days - (today - i64::from(weekday)).rem_euclid(7);
    if run_day * day_ms + i64::from(hour) * 3_600_000 > now_ms {
        run_day -= 7;
    }
    ledger::day_of(run_day)
}

#[cfg(test)]
mod tests {
    use super::scheduled_run;
    use crate::ledger::day_of as civil_date;

    #[test]
    fn dates_and_the_weekly_schedule() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(19_723), "2024-01-01");
        assert_eq!(civil_date(20_429), "2025-12-07");
        assert_eq!(civil_date(11_016), "2000-02-29");
        // Monday 2026-12-07 05:00 UTC: the Monday 06:00 run of this week is not due yet.
        let monday_5am = 20_794 * 86_400_000 + 5 * 3_600_000;
        assert_eq!(civil_date(20_794), "2026-12-07");
        assert_eq!(scheduled_run(monday_5am, 0, 6), "2026-11-30");
        assert_eq!(scheduled_run(monday_5am + 3_600_000, 0, 6), "2026-12-07");
        assert_eq!(scheduled_run(monday_5am, 6, 0), "2026-12-06");
        assert_eq!(scheduled_run(monday_5am, 1, 0), "2026-12-01");
    }
}
