//! Money in through Stripe: the operator's credit packs, a buyer's purchase (a Checkout
//! Session), and the webhook events that credit a wallet once a payment is made and take credit
//! back after a refund or a dispute.
//!
//! Ledger: a paid pack is one transaction — `wallet:{buyer}` +credit, `platform:stripe` −price
//! (money that reached the platform through Stripe), `platform:promotions` −(credit − price)
//! (a pack's bonus). A refund or dispute reverses it in proportion to the cents returned: the
//! wallet gives back what it still holds (never what was spent), and the rest is owed by the
//! buyer, on `receivable:{buyer}` (negative: what it owes). Every event is applied in the
//! transaction that records its id, so a redelivered event changes nothing; a wallet credit is
//! also keyed by its Checkout Session (`checkout:{session}`), so two events about one payment
//! credit once.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::ToSchema;

use crate::ids;
use crate::ledger::{self, wallet_account, PROMOTIONS};
use crate::store::{now_ms, Store, StoreError, StoreResult};
use crate::stripe::micros_of;
use crate::stripe::objects::{Charge, CheckoutSession, Dispute, Event};

/// The account endpoint's events tokn$ acts on (what the operator subscribes the endpoint to,
/// and what a backfill reads).
pub const ACCOUNT_EVENTS: [&str; 6] = [
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "charge.refunded",
    "charge.dispute.created",
];

/// Money that came in through Stripe (minus what was returned).
pub const STRIPE: &str = "platform:stripe";

/// What `account` owes the platform (negative balance), after a refund or dispute of credit it
/// had already spent.
pub fn receivable_account(account_id: &str) -> String {
    format!("receivable:{account_id}")
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreditPack {
    /// `pack_…`
    pub id: String,
    /// What buyers see.
    pub name: String,
    /// What the buyer pays, in cents of `currency`.
    pub price_cents: i64,
    /// `usd`.
    pub currency: String,
    /// What the wallet receives, micro-USD.
    pub credit_micros: i64,
    /// Offered to buyers.
    pub active: bool,
    /// When the operator added it, Unix ms.
    pub created_at_ms: i64,
}

impl CreditPack {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            price_cents: r.try_get("price_cents")?,
            currency: r.try_get("currency")?,
            credit_micros: r.try_get("credit_micros")?,
            active: r.try_get::<i64, _>("active")? != 0,
            created_at_ms: r.try_get("created_at")?,
        })
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Purchase {
    /// `pur_…`
    pub id: String,
    /// The buyer account.
    pub account_id: String,
    /// The pack bought.
    pub pack_id: String,
    /// What the buyer pays, in cents of `currency`.
    pub price_cents: i64,
    /// `usd`.
    pub currency: String,
    /// What the wallet receives when it is paid, micro-USD.
    pub credit_micros: i64,
    /// `creating` (Stripe is being asked), `open` (waiting for the buyer to pay), `paid` (the
    /// wallet was credited), `failed` (the payment failed, or Stripe refused the session),
    /// `expired` (never paid), `unavailable` (Stripe could not be reached; nothing to pay).
    pub status: String,
    /// Stripe's Checkout Session (`cs_…`).
    pub stripe_session_id: Option<String>,
    /// Cents refunded so far.
    pub refunded_cents: i64,
    /// Cents disputed so far.
    pub disputed_cents: i64,
    /// The credit taken back for the cents refunded and disputed, micro-USD.
    pub taken_back_micros: i64,
    /// When the purchase started, Unix ms.
    pub created_at_ms: i64,
    /// When the wallet was credited, Unix ms.
    pub paid_at_ms: Option<i64>,
}

impl Purchase {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            pack_id: r.try_get("pack_id")?,
            price_cents: r.try_get("price_cents")?,
            currency: r.try_get("currency")?,
            credit_micros: r.try_get("credit_micros")?,
            status: r.try_get("status")?,
            stripe_session_id: r.try_get("stripe_session_id")?,
            refunded_cents: r.try_get("refunded_cents")?,
            disputed_cents: r.try_get("disputed_cents")?,
            taken_back_micros: r.try_get("taken_back_micros")?,
            created_at_ms: r.try_get("created_at")?,
            paid_at_ms: r.try_get("paid_at")?,
        })
    }
}

/// What a webhook delivery did.
#[derive(Debug, Default)]
pub struct EventOutcome {
    /// The event was applied before: nothing changed now.
    pub duplicate: bool,
    /// `applied`, or `ignored: why`.
    pub outcome: String,
    /// Wallets whose balance moved (their proxies' books follow).
    pub wallets: Vec<String>,
}

impl EventOutcome {
    /// `applied`, `duplicate` or `ignored`: the metric's label.
    pub fn result(&self) -> &'static str {
        if self.duplicate {
            "duplicate"
        } else if self.outcome == "applied" {
            "applied"
        } else {
            "ignored"
        }
    }
}

type Tx = sqlx::Transaction<'static, sqlx::Any>;

const PURCHASE_COLUMNS: &str = "id, account_id, pack_id, price_cents, currency, credit_micros, \
     status, stripe_session_id, refunded_cents, disputed_cents, taken_back_micros, created_at, \
     paid_at";

impl Store {
    pub async fn create_pack(
        &self,
        name: &str,
        price_cents: i64,
        currency: &str,
        credit_micros: i64,
    ) -> StoreResult<CreditPack> {
        let id = ids::new("pack");
        sqlx::query(
            "INSERT INTO credit_packs (id, name, price_cents, currency, credit_micros, active, \
             created_at) VALUES ($1, $2, $3, $4, $5, 1, $6)",
        )
        .bind(&id)
        .bind(name)
        .bind(price_cents)
        .bind(currency)
        .bind(credit_micros)
        .bind(now_ms())
        .execute(self.writer())
        .await?;
        self.pack(&id).await
    }

    pub async fn pack(&self, id: &str) -> StoreResult<CreditPack> {
        let r = sqlx::query("SELECT * FROM credit_packs WHERE id = $1")
            .bind(id)
            .fetch_one(self.raw())
            .await?;
        Ok(CreditPack::from_row(&r)?)
    }

    /// Packs, cheapest first; only the active ones unless `all`.
    pub async fn packs(&self, all: bool) -> StoreResult<Vec<CreditPack>> {
        let rows = sqlx::query(
            "SELECT * FROM credit_packs WHERE active = 1 OR $1 = 1 ORDER BY price_cents, id",
        )
        .bind(i64::from(all))
        .fetch_all(self.raw())
        .await?;
        Ok(rows
            .iter()
            .map(CreditPack::from_row)
            .collect::<Result<_, _>>()?)
    }

    pub async fn set_pack_active(&self, id: &str, active: bool) -> StoreResult<CreditPack> {
        let n = sqlx::query("UPDATE credit_packs SET active = $1 WHERE id = $2")
            .bind(i64::from(active))
            .bind(id)
            .execute(self.writer())
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        self.pack(id).await
    }

    /// A purchase of `pack`, before Stripe is asked for its Checkout Session.
    pub async fn create_purchase(
        &self,
        account_id: &str,
        pack: &CreditPack,
    ) -> StoreResult<Purchase> {
        let id = ids::new("pur");
        sqlx::query(
            "INSERT INTO purchases (id, account_id, pack_id, price_cents, currency, \
             credit_micros, status, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'creating', $7)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(&pack.id)
        .bind(pack.price_cents)
        .bind(&pack.currency)
        .bind(pack.credit_micros)
        .bind(now_ms())
        .execute(self.writer())
        .await?;
        self.purchase(account_id, &id).await
    }

    /// Stripe answered the purchase's Checkout Session (or could not).
    pub async fn purchase_opened(
        &self,
        id: &str,
        session: Result<&CheckoutSession, &'static str>,
    ) -> StoreResult<()> {
        let q = match session {
            Ok(s) => sqlx::query(
                "UPDATE purchases SET status = 'open', stripe_session_id = $1, \
                 checkout_expires_at = $2 WHERE id = $3 AND status = 'creating'",
            )
            .bind(s.id.clone())
            .bind(s.expires_at.map(|t| t.saturating_mul(1000))),
            Err(status) => sqlx::query(
                "UPDATE purchases SET status = $1 WHERE id = $2 AND status = 'creating'",
            )
            .bind(status),
        };
        q.bind(id).execute(self.writer()).await?;
        Ok(())
    }

    pub async fn purchase(&self, account_id: &str, id: &str) -> StoreResult<Purchase> {
        let r = sqlx::query(&format!(
            "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE id = $1 AND account_id = $2"
        ))
        .bind(id)
        .bind(account_id)
        .fetch_one(self.raw())
        .await?;
        Ok(Purchase::from_row(&r)?)
    }

    /// An account's purchases, newest first.
    pub async fn purchases(&self, account_id: &str, limit: u32) -> StoreResult<Vec<Purchase>> {
        let rows = sqlx::query(&format!(
            "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE account_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        ))
        .bind(account_id)
        .bind(i64::from(limit))
        .fetch_all(self.raw())
        .await?;
        Ok(rows
            .iter()
            .map(Purchase::from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Applies one verified webhook event, once: its id is recorded in the transaction of its
    /// effect. `livemode` is the platform key's mode; an event of the other mode is recorded and
    /// ignored.
    pub async fn apply_event(&self, event: &Event, livemode: bool) -> StoreResult<EventOutcome> {
        let mut tx = self.write().await?;
        let inserted = sqlx::query(
            "INSERT INTO stripe_events (id, type, outcome, received_at) VALUES ($1, $2, '', $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&event.id)
        .bind(&event.kind)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(EventOutcome {
                duplicate: true,
                outcome: "duplicate".to_owned(),
                wallets: Vec::new(),
            });
        }
        let mut out = EventOutcome::default();
        let result = if event.livemode != livemode {
            Err("the event's livemode is not this platform's")
        } else {
            event_effect(&mut tx, event, &mut out).await?
        };
        out.outcome = match result {
            Ok(()) => "applied".to_owned(),
            Err(why) => format!("ignored: {why}"),
        };
        sqlx::query("UPDATE stripe_events SET outcome = $1 WHERE id = $2")
            .bind(&out.outcome)
            .bind(&event.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }
}

/// The event's effect inside `tx`; `Ok(Err(why))` when it has none.
async fn event_effect(
    tx: &mut Tx,
    event: &Event,
    out: &mut EventOutcome,
) -> StoreResult<Result<(), &'static str>> {
    let object = event.data.object.clone();
    let bad = |_| StoreError::Conflict("the event's object is malformed".to_owned());
    match event.kind.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            let session: CheckoutSession = serde_json::from_value(object).map_err(bad)?;
            if session.payment_status != "paid" {
                return Ok(Err("not paid yet (an asynchronous payment is settling)"));
            }
            credit_purchase(tx, &session, out).await
        }
        "checkout.session.async_payment_failed" | "checkout.session.expired" => {
            let session: CheckoutSession = serde_json::from_value(object).map_err(bad)?;
            let status = if event.kind.ends_with("expired") {
                "expired"
            } else {
                "failed"
            };
            let n = sqlx::query(
                "UPDATE purchases SET status = $1 WHERE id = $2 AND status IN ('open', 'creating')",
            )
            .bind(status)
            .bind(session.client_reference_id.unwrap_or_default())
            .execute(&mut **tx)
            .await?
            .rows_affected();
            Ok(if n == 0 {
                Err("no open purchase for this session")
            } else {
                Ok(())
            })
        }
        "charge.refunded" => {
            let charge: Charge = serde_json::from_value(object).map_err(bad)?;
            let Some(intent) = charge.payment_intent else {
                return Ok(Err("the charge names no payment"));
            };
            take_back(tx, &intent, Returned::Refunded(charge.amount_refunded), out).await
        }
        "charge.dispute.created" => {
            let dispute: Dispute = serde_json::from_value(object).map_err(bad)?;
            let Some(intent) = dispute.payment_intent else {
                return Ok(Err("the dispute names no payment"));
            };
            take_back(tx, &intent, Returned::Disputed(dispute.amount), out).await
        }
        "account.updated" => {
            let account: crate::stripe::objects::Account =
                serde_json::from_value(object).map_err(bad)?;
            let ours = crate::payouts::mirror_connect_account(tx, &account).await?;
            Ok(if ours {
                Ok(())
            } else {
                Err("not a seller's account")
            })
        }
        _ => Ok(Err("not an event tokn$ acts on")),
    }
}

/// Credits the purchase a paid Checkout Session is for, once per session.
async fn credit_purchase(
    tx: &mut Tx,
    session: &CheckoutSession,
    out: &mut EventOutcome,
) -> StoreResult<Result<(), &'static str>> {
    let purchase_id = session.client_reference_id.clone().unwrap_or_default();
    let row = sqlx::query(&format!(
        "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE id = $1"
    ))
    .bind(&purchase_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Ok(Err("no purchase for this session"));
    };
    let p = Purchase::from_row(&row)?;
    if p.stripe_session_id
        .as_deref()
        .is_some_and(|s| s != session.id)
    {
        return Ok(Err("the purchase belongs to another session"));
    }
    // What Stripe charged decides, not what our page showed.
    let currency = session.currency.as_deref().unwrap_or_default();
    if session.amount_total != Some(p.price_cents) || !currency.eq_ignore_ascii_case(&p.currency) {
        tracing::error!(
            message = "A paid Checkout Session does not match its purchase; not credited.",
            purchase = %p.id
        );
        return Ok(Err("the amount paid does not match the pack"));
    }
    let key = format!("checkout:{}", session.id);
    let credited: Option<String> =
        sqlx::query_scalar("SELECT id FROM ledger_transactions WHERE idempotency_key = $1")
            .bind(&key)
            .fetch_optional(&mut **tx)
            .await?;
    if credited.is_some() {
        return Ok(Err("this payment was credited already"));
    }
    let wallet = wallet_account(&p.account_id);
    let price = micros_of(p.price_cents);
    let postings = [
        (wallet.as_str(), p.credit_micros),
        (STRIPE, -price),
        (PROMOTIONS, price - p.credit_micros),
    ];
    let memo = format!("credit pack {}", p.pack_id);
    ledger::post(tx, "credit_pack", &key, &memo, &nonzero(&postings)).await?;
    sqlx::query(
        "UPDATE purchases SET status = 'paid', paid_at = $1, stripe_session_id = $2, \
         payment_intent = $3 WHERE id = $4",
    )
    .bind(now_ms())
    .bind(&session.id)
    .bind(session.payment_intent.clone())
    .bind(&p.id)
    .execute(&mut **tx)
    .await?;
    out.wallets.push(p.account_id);
    // A refund or dispute that arrived before this credit is taken back now.
    if let Some(intent) = &session.payment_intent {
        // (Nothing to take back is the usual answer, not a failure.)
        let _nothing_or_taken = take_back(tx, intent, Returned::Nothing, out).await?;
    }
    Ok(Ok(()))
}

/// Cents a payment has returned so far, as Stripe reports them (cumulative).
enum Returned {
    Refunded(i64),
    Disputed(i64),
    /// Nothing new: the payment was just credited; apply what was reported before.
    Nothing,
}

/// Records what a payment has returned (the larger of what was known and what Stripe reports
/// now; the row's lock orders a payment's events) and, once its purchase is credited, takes
/// back the credit of the cents returned beyond what was taken back before: from the wallet as
/// far as it holds credit, the rest owed.
async fn take_back(
    tx: &mut Tx,
    payment_intent: &str,
    returned: Returned,
    out: &mut EventOutcome,
) -> StoreResult<Result<(), &'static str>> {
    let (refunded, disputed) = match returned {
        Returned::Refunded(c) => (c.max(0), 0),
        Returned::Disputed(c) => (0, c.max(0)),
        Returned::Nothing => (0, 0),
    };
    let row = sqlx::query(
        "INSERT INTO payment_returns (payment_intent, refunded_cents, disputed_cents) \
         VALUES ($1, $2, $3) ON CONFLICT (payment_intent) DO UPDATE SET \
         refunded_cents = CASE WHEN excluded.refunded_cents > payment_returns.refunded_cents \
             THEN excluded.refunded_cents ELSE payment_returns.refunded_cents END, \
         disputed_cents = CASE WHEN excluded.disputed_cents > payment_returns.disputed_cents \
             THEN excluded.disputed_cents ELSE payment_returns.disputed_cents END \
         RETURNING refunded_cents, disputed_cents",
    )
    .bind(payment_intent)
    .bind(refunded)
    .bind(disputed)
    .fetch_one(&mut **tx)
    .await?;
    let (refunded, disputed): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    let row = sqlx::query(&format!(
        "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE payment_intent = $1 AND status = 'paid'"
    ))
    .bind(payment_intent)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Ok(Err(
            "recorded: no credited purchase for this payment yet (applied when it is)",
        ));
    };
    let p = Purchase::from_row(&row)?;
    let price = p.price_cents.max(1);
    let returned_before = (p.refunded_cents + p.disputed_cents).clamp(0, price);
    let returned_now = (refunded + disputed).clamp(0, price);
    // Credit in proportion to the cents returned, rounded down.
    let credit_of = |cents: i64| {
        i64::try_from(i128::from(p.credit_micros) * i128::from(cents) / i128::from(price))
            .unwrap_or(p.credit_micros)
    };
    let credit = credit_of(returned_now) - p.taken_back_micros;
    sqlx::query(
        "UPDATE purchases SET refunded_cents = $1, disputed_cents = $2, taken_back_micros = $3 \
         WHERE id = $4",
    )
    .bind(refunded)
    .bind(disputed)
    .bind(p.taken_back_micros + credit.max(0))
    .bind(&p.id)
    .execute(&mut **tx)
    .await?;
    if credit <= 0 {
        return Ok(Err("nothing more to take back"));
    }
    let wallet = wallet_account(&p.account_id);
    // A zero move reads the balance and locks its row until the commit.
    let held = ledger::read_balance_locked(tx, &wallet).await?;
    let from_wallet = credit.min(held.max(0));
    let cash = micros_of(returned_now - returned_before);
    let receivable = receivable_account(&p.account_id);
    let postings = [
        (wallet.as_str(), -from_wallet),
        (receivable.as_str(), -(credit - from_wallet)),
        (STRIPE, cash),
        (PROMOTIONS, credit - cash),
    ];
    let key = format!("takeback:{}:{returned_now}", p.id);
    let memo = format!(
        "credit pack {} returned ({returned_now} of {price} cents)",
        p.pack_id
    );
    ledger::post(tx, "credit_pack_returned", &key, &memo, &nonzero(&postings)).await?;
    if !out.wallets.contains(&p.account_id) {
        out.wallets.push(p.account_id);
    }
    Ok(Ok(()))
}

fn nonzero<'a>(postings: &[(&'a str, i64)]) -> Vec<(&'a str, i64)> {
    postings.iter().copied().filter(|(_, a)| *a != 0).collect()
}
