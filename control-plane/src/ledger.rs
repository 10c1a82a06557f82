//! The ledger: balanced transactions, the running balance of every ledger account, and the usage
//! journal the proxies' records are applied to.
//!
//! Ledger accounts: `wallet:{account}` (a buyer's prepaid credit), `payable:{account}` (what a
//! seller has earned and not been paid), `platform:revenue` (fees), and the platform's
//! counter-accounts of money it put in (`platform:promotions`, `platform:grants`). Every
//! movement is one transaction whose postings sum to zero:
//!
//! - explicit transactions (`ledger_transactions` + `ledger_postings`): grants, welcome credit,
//!   refunds;
//! - usage: one `usage_records` row per request id is one transaction with three postings —
//!   the buyer's wallet −buyer cost, the seller's payable +(buyer cost − fee), platform revenue
//!   +fee. Keeping the postings as columns of the request's own row is what lets the drain apply
//!   tens of thousands of records a second: one row per request instead of five.
//!
//! Rounding: `fee = ⌊buyer cost × fee_ratio_ppm / 10⁶⌋` and the seller gets the rest, so no
//! micro-dollar is created or lost. Balances are kept as running totals (`ledger_balances`),
//! moved in the same database transaction as the postings; the ledger check holds each equal to
//! the sum of its postings.

use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use crate::conn::{Conn, Marks, Param};
use crate::ids;
use crate::store::{now_ms, Changed, Store, StoreError, StoreResult};

pub const PLATFORM_REVENUE: &str = "platform:revenue";
pub const PROMOTIONS: &str = "platform:promotions";
pub const GRANTS: &str = "platform:grants";

pub fn wallet_account(account_id: &str) -> String {
    format!("wallet:{account_id}")
}

/// The account whose wallet `ledger_account` is, if it is a wallet.
pub fn wallet_owner(ledger_account: &str) -> Option<&str> {
    ledger_account.strip_prefix("wallet:")
}

pub fn payable_account(account_id: &str) -> String {
    format!("payable:{account_id}")
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// A ledger account's balance after a committed change, and how many changes it has had: a
/// mirror keeps the one with the highest `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceChange {
    pub ledger_account: String,
    pub balance_micros: i64,
    pub seq: i64,
}

/// Records one balanced transaction (postings must sum to zero) and moves the running balances
/// of its accounts.
pub(crate) async fn post(
    tx: &mut Tx<'_>,
    kind: &str,
    idempotency_key: &str,
    memo: &str,
    postings: &[(&str, i64)],
) -> StoreResult<(String, Vec<BalanceChange>)> {
    let sum: i128 = postings.iter().map(|(_, a)| i128::from(*a)).sum();
    if sum != 0 {
        return Err(StoreError::Conflict("unbalanced transaction".to_owned()));
    }
    let id = ids::new("txn");
    sqlx::query(
        "INSERT INTO ledger_transactions (id, kind, idempotency_key, memo, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&id)
    .bind(kind)
    .bind(idempotency_key)
    .bind(memo)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    for (account, amount) in postings {
        sqlx::query(
            "INSERT INTO ledger_postings (transaction_id, ledger_account, amount_micros) \
             VALUES ($1, $2, $3)",
        )
        .bind(&id)
        .bind(*account)
        .bind(*amount)
        .execute(&mut **tx)
        .await?;
    }
    let deltas: BTreeMap<String, i64> = postings
        .iter()
        .map(|(a, amount)| ((*a).to_owned(), *amount))
        .collect();
    let changes = move_balances(&mut Conn::Any(tx), &deltas).await?;
    Ok((id, changes))
}

/// A ledger account's running balance, its row locked until `tx` ends (a zero move: the same
/// statement on both databases).
pub(crate) async fn read_balance_locked(tx: &mut Tx<'_>, account: &str) -> StoreResult<i64> {
    let deltas = BTreeMap::from([(account.to_owned(), 0)]);
    let changes = move_balances(&mut Conn::Any(tx), &deltas).await?;
    Ok(changes.first().map_or(0, |c| c.balance_micros))
}

/// Adds `deltas` to the running balances, in account order (so concurrent transactions lock
/// rows in one order and cannot deadlock).
async fn move_balances(
    conn: &mut Conn<'_>,
    deltas: &BTreeMap<String, i64>,
) -> StoreResult<Vec<BalanceChange>> {
    let mut changes = Vec::with_capacity(deltas.len());
    let deltas: Vec<(&String, &i64)> = deltas.iter().collect();
    // Many rows a statement (a batch touches hundreds of wallets), in account order so
    // concurrent batches lock rows in one order.
    for chunk in deltas.chunks(ROWS_PER_STATEMENT) {
        let mut marks = conn.marks();
        let values: Vec<String> = (0..chunk.len())
            .map(|_| format!("({}, {}, 1)", marks.mark(), marks.mark()))
            .collect();
        let sql = format!(
            "INSERT INTO ledger_balances (ledger_account, balance_micros, seq) VALUES {} \
             ON CONFLICT (ledger_account) DO UPDATE SET \
             balance_micros = ledger_balances.balance_micros + excluded.balance_micros, \
             seq = ledger_balances.seq + 1 \
             RETURNING ledger_account, balance_micros, seq",
            values.join(", ")
        );
        let params = chunk
            .iter()
            .flat_map(|(account, delta)| [Param::Text((*account).clone()), Param::Int(**delta)])
            .collect();
        let rows: Vec<(String, i64, i64)> = conn.fetch_all(&sql, params).await?;
        changes.extend(
            rows.into_iter()
                .map(|(ledger_account, balance_micros, seq)| BalanceChange {
                    ledger_account,
                    balance_micros,
                    seq,
                }),
        );
    }
    Ok(changes)
}

// === The usage drain ===

/// A usage record as a proxy ships it (the proxy's `UsageRecord`, one JSON line). Fields this
/// version does not know are ignored, so proxies can add some before the control plane reads
/// them.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct UsageIn {
    pub request_id: String,
    pub started_at_ms: i64,
    pub key_id: Option<String>,
    pub account: Option<String>,
    pub pool_id: Option<String>,
    pub seller: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub price_version: Option<i64>,
    pub stream: bool,
    pub status: i64,
    pub outcome: String,
    pub usage: TokensIn,
    pub usage_source: String,
    pub list_cost_micros: i64,
    pub buyer_cost_micros: i64,
    pub latency_ms: i64,
    #[serde(default)]
    pub ttft_ms: Option<i64>,
    pub upstream_attempts: i64,
    #[serde(default)]
    pub upstream_request_id: Option<String>,
    /// The hot-state reservation that held the request's cost, when it is not named after the
    /// request (a proxy reserved it ahead of the request: see the proxy's `money.rs`).
    #[serde(default)]
    pub reservation: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema)]
pub struct TokensIn {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    #[serde(default)]
    pub cached_tokens: i64,
    #[serde(default)]
    pub cache_write_tokens: i64,
    #[serde(default)]
    pub cache_write_1h_tokens: i64,
    #[serde(default)]
    pub reasoning_tokens: i64,
}

impl UsageIn {
    /// What is wrong with the record on its own (it is then refused, not applied).
    pub fn problem(&self) -> Option<&'static str> {
        let t = &self.usage;
        let negative = [
            t.prompt_tokens,
            t.completion_tokens,
            t.cached_tokens,
            t.cache_write_tokens,
            t.cache_write_1h_tokens,
            t.reasoning_tokens,
            self.list_cost_micros,
            self.buyer_cost_micros,
        ]
        .iter()
        .any(|v| *v < 0);
        if self.request_id.is_empty() || self.request_id.len() > 128 {
            Some("request_id must be 1 to 128 characters")
        } else if self.account.is_none() || self.key_id.is_none() {
            Some("a usage record names its key and account")
        } else if negative {
            Some("token counts and costs must not be negative")
        } else if self.buyer_cost_micros > 0 && (self.pool_id.is_none() || self.seller.is_none()) {
            Some("a billed record names its pool and seller")
        } else {
            None
        }
    }
}

/// What applying a batch changed.
#[derive(Debug, Default)]
pub struct Applied {
    /// Request ids applied now (a redelivered one is not among them).
    pub applied: Vec<String>,
    pub duplicates: usize,
    pub balances: Vec<BalanceChange>,
    /// `(pool id, consumed micros)` after the batch.
    pub pools: Vec<(String, i64)>,
    /// A pool ran out of face value: the configuration changed.
    pub exhausted_pools: Vec<String>,
}

/// Rows per statement of two-parameter rows (balances, pools): a bound on parameters per
/// statement that suits both databases.
const ROWS_PER_STATEMENT: usize = 200;

/// The usage table's columns, in the order rows are written, with their Postgres types.
const USAGE_COLUMNS: [(&str, &str); 28] = [
    ("request_id", "text"),
    ("started_at", "bigint"),
    ("account_id", "text"),
    ("key_id", "text"),
    ("pool_id", "text"),
    ("seller_id", "text"),
    ("model", "text"),
    ("provider", "text"),
    ("price_version", "bigint"),
    ("stream", "bigint"),
    ("status", "bigint"),
    ("outcome", "text"),
    ("prompt_tokens", "bigint"),
    ("completion_tokens", "bigint"),
    ("cached_tokens", "bigint"),
    ("reasoning_tokens", "bigint"),
    ("usage_source", "text"),
    ("list_cost_micros", "bigint"),
    ("buyer_cost_micros", "bigint"),
    ("fee_micros", "bigint"),
    ("seller_credit_micros", "bigint"),
    ("latency_ms", "bigint"),
    ("ttft_ms", "bigint"),
    ("upstream_attempts", "bigint"),
    ("upstream_request_id", "text"),
    ("applied_at", "bigint"),
    ("cache_write_tokens", "bigint"),
    ("cache_write_1h_tokens", "bigint"),
];

/// The fee on a buyer cost: rounded down, so the seller's credit (the rest) and the fee add up
/// to the buyer cost exactly.
pub fn fee_of(buyer_micros: i64, fee_ratio_ppm: i64) -> i64 {
    let fee = i128::from(buyer_micros) * i128::from(fee_ratio_ppm) / 1_000_000;
    i64::try_from(fee)
        .unwrap_or(0)
        .clamp(0, buyer_micros.max(0))
}

impl Store {
    /// Applies a batch of usage records in one database transaction: each new request id is
    /// inserted once (the primary key decides, not a read), with its postings, and the running
    /// balances and pool consumption move by the batch's sums. A request id seen before is
    /// skipped, so redelivery after any crash is harmless.
    pub async fn apply_usage(
        &self,
        records: &[UsageIn],
        fee_ratio_ppm: i64,
    ) -> StoreResult<Applied> {
        let by_id: BTreeMap<&str, &UsageIn> =
            records.iter().map(|r| (r.request_id.as_str(), r)).collect();
        // In request-id order, so concurrent batches insert (and lock) in one order.
        let now = now_ms();
        let rows: Vec<[Value<'_>; 28]> = by_id
            .values()
            .map(|r| usage_row(r, fee_ratio_ppm, now))
            .collect();
        let mut applied = match &self.drain {
            Some(pg) => {
                let mut attempt = 1;
                loop {
                    if let Some(applied) =
                        apply_on_postgres(pg, &rows, &by_id, fee_ratio_ppm).await?
                    {
                        break applied;
                    }
                    if attempt == INSERT_ATTEMPTS {
                        return Err(StoreError::Conflict(
                            "the batch kept colliding with another delivery of it".to_owned(),
                        ));
                    }
                    attempt += 1;
                }
            }
            None => {
                let mut tx = self.write().await?;
                let ids: Vec<&str> = by_id.keys().copied().collect();
                let mut inserted = Vec::with_capacity(rows.len());
                for (chunk, ids) in rows.chunks(VALUES_ROWS).zip(ids.chunks(VALUES_ROWS)) {
                    inserted.extend(insert_usage_values(&mut tx, chunk, ids).await?);
                }
                let applied =
                    settle(&mut Conn::Any(&mut tx), &by_id, inserted, fee_ratio_ppm).await?;
                tx.commit().await?;
                applied
            }
        };
        applied.duplicates = records.len() - applied.applied.len();
        Ok(applied)
    }
}

/// Tries at applying a batch on Postgres while concurrent deliveries of its records collide.
const INSERT_ATTEMPTS: u32 = 3;

/// Applies a batch on Postgres in one transaction of the drain's own connection pool. None:
/// another transaction inserted one of its request ids after this one looked (a proxy's
/// redelivery racing its first delivery), and this one rolled back; looking again skips it.
async fn apply_on_postgres(
    pg: &sqlx::PgPool,
    rows: &[[Value<'_>; 28]],
    by_id: &BTreeMap<&str, &UsageIn>,
    fee_ratio_ppm: i64,
) -> StoreResult<Option<Applied>> {
    let mut tx = pg.begin().await?;
    let inserted = match insert_usage_arrays(&mut tx, rows).await {
        Ok(ids) => ids,
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let applied = settle(&mut Conn::Pg(&mut tx), by_id, inserted, fee_ratio_ppm).await?;
    tx.commit().await?;
    Ok(Some(applied))
}

const DAY_MS: i64 = 86_400_000;

/// Adds the records just inserted to the daily roll-ups, in the transaction that applies them:
/// `usage_daily` (per account, UTC day, model and key: the buyer's charts) and `pool_daily` (per
/// pool and day: the seller's earnings). A batch touches few such rows, and no page ever scans
/// the journal.
async fn roll_up(conn: &mut Conn<'_>, records: &[&UsageIn], fee_ratio_ppm: i64) -> StoreResult<()> {
    // Keys in order, so concurrent batches lock rows in one order.
    let mut usage: BTreeMap<(&str, i64, &str, &str), [i64; 4]> = BTreeMap::new();
    let mut pools: BTreeMap<(&str, i64), [i64; 4]> = BTreeMap::new();
    for r in records {
        let day = r.started_at_ms.div_euclid(DAY_MS) * DAY_MS;
        let billed = r.buyer_cost_micros;
        if let Some(account) = r.account.as_deref().filter(|a| !a.is_empty()) {
            let key = (
                account,
                day,
                r.model.as_deref().unwrap_or_default(),
                r.key_id.as_deref().unwrap_or_default(),
            );
            add(
                usage.entry(key).or_default(),
                [1, r.usage.prompt_tokens, r.usage.completion_tokens, billed],
            );
        }
        if let Some(pool) = r.pool_id.as_deref() {
            let fee = fee_of(billed, fee_ratio_ppm);
            add(
                pools.entry((pool, day)).or_default(),
                [1, billed, fee, billed - fee],
            );
        }
    }
    let usage: Vec<(Vec<Param>, [i64; 4])> = usage
        .into_iter()
        .map(|((account, day, model, key), sums)| {
            let key = vec![
                Param::Text(account.to_owned()),
                Param::Int(day),
                Param::Text(model.to_owned()),
                Param::Text(key.to_owned()),
            ];
            (key, sums)
        })
        .collect();
    upsert_sums(
        conn,
        "usage_daily",
        &["account_id", "day", "model", "key_id"],
        &["requests", "input_tokens", "output_tokens", "cost_micros"],
        &usage,
    )
    .await?;
    let pools: Vec<(Vec<Param>, [i64; 4])> = pools
        .into_iter()
        .map(|((pool, day), sums)| (vec![Param::Text(pool.to_owned()), Param::Int(day)], sums))
        .collect();
    upsert_sums(
        conn,
        "pool_daily",
        &["pool_id", "day"],
        &[
            "requests",
            "sales_micros",
            "fee_micros",
            "seller_credit_micros",
        ],
        &pools,
    )
    .await
}

fn add(sums: &mut [i64; 4], more: [i64; 4]) {
    for (s, m) in sums.iter_mut().zip(more) {
        *s += m;
    }
}

/// Adds `rows` (key values, four sums) to `table`: new keys inserted, existing ones summed.
async fn upsert_sums(
    conn: &mut Conn<'_>,
    table: &str,
    keys: &[&str],
    sums: &[&str; 4],
    rows: &[(Vec<Param>, [i64; 4])],
) -> StoreResult<()> {
    let width = keys.len() + sums.len();
    let updates: Vec<String> = sums
        .iter()
        .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
        .collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut marks = conn.marks();
        let values: Vec<String> = (0..chunk.len()).map(|_| marks.row(width)).collect();
        let sql = format!(
            "INSERT INTO {table} ({}, {}) VALUES {} ON CONFLICT ({}) DO UPDATE SET {}",
            keys.join(", "),
            sums.join(", "),
            values.join(", "),
            keys.join(", "),
            updates.join(", ")
        );
        let params = chunk
            .iter()
            .flat_map(|(key, s)| key.iter().cloned().chain(s.iter().map(|v| Param::Int(*v))))
            .collect();
        conn.execute(&sql, params).await?;
    }
    Ok(())
}

/// Moves the money of the records just inserted (`inserted`: their request ids): the running
/// balances and the pools' consumption by the batch's sums, and a new configuration version when
/// a pool ran out.
async fn settle(
    conn: &mut Conn<'_>,
    by_id: &BTreeMap<&str, &UsageIn>,
    inserted: Vec<String>,
    fee_ratio_ppm: i64,
) -> StoreResult<Applied> {
    let records = newly_applied(by_id, &inserted);
    // Summed per account, seller and pool first: a ledger account's name is made once per
    // account of the batch, not once per record.
    let mut wallets: BTreeMap<&str, i64> = BTreeMap::new();
    let mut payables: BTreeMap<&str, i64> = BTreeMap::new();
    let mut revenue = 0;
    let mut pools: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &records {
        let billed = r.buyer_cost_micros;
        let fee = fee_of(billed, fee_ratio_ppm);
        if billed > 0 {
            if let (Some(account), Some(seller)) = (&r.account, &r.seller) {
                *wallets.entry(account).or_default() -= billed;
                *payables.entry(seller).or_default() += billed - fee;
                revenue += fee;
            }
        }
        if let Some(pool) = &r.pool_id {
            *pools.entry(pool).or_default() += r.list_cost_micros;
        }
    }
    let mut balances: BTreeMap<String, i64> = wallets
        .into_iter()
        .map(|(a, d)| (wallet_account(a), d))
        .chain(payables.into_iter().map(|(a, d)| (payable_account(a), d)))
        .collect();
    balances.insert(PLATFORM_REVENUE.to_owned(), revenue);
    balances.retain(|_, d| *d != 0);
    pools.retain(|_, d| *d > 0);
    roll_up(conn, &records, fee_ratio_ppm).await?;
    let balances = move_balances(conn, &balances).await?;
    let (pools, exhausted_pools) = consume_pools(conn, &pools).await?;
    if !exhausted_pools.is_empty() {
        let version = crate::store::bump(conn).await?;
        for pool in &exhausted_pools {
            crate::store::record_changes(conn, version, Changed::Pool, "pools", "id", pool).await?;
        }
    }
    Ok(Applied {
        applied: inserted,
        duplicates: 0,
        balances,
        pools,
        exhausted_pools,
    })
}

/// The records of `by_id` whose ids are `inserted` (the ones no earlier delivery applied), in
/// request-id order. Usually every one: no id is looked up then.
fn newly_applied<'a>(by_id: &BTreeMap<&str, &'a UsageIn>, inserted: &[String]) -> Vec<&'a UsageIn> {
    if inserted.len() == by_id.len() {
        return by_id.values().copied().collect();
    }
    let inserted: HashSet<&str> = inserted.iter().map(String::as_str).collect();
    by_id
        .iter()
        .filter(|(id, _)| inserted.contains(*id))
        .map(|(_, r)| *r)
        .collect()
}

/// Usage rows a SQLite statement carries (28 parameters each; SQLite takes at most 32,766).
const VALUES_ROWS: usize = 64;

/// A value of a usage row.
enum Value<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
}

/// A record's row, in [`USAGE_COLUMNS`] order.
fn usage_row(r: &UsageIn, fee_ratio_ppm: i64, now: i64) -> [Value<'_>; 28] {
    use Value::{Int, Text};
    let billed = r.buyer_cost_micros;
    let fee = fee_of(billed, fee_ratio_ppm);
    let t = &r.usage;
    [
        Text(Some(&r.request_id)),
        Int(Some(r.started_at_ms)),
        Text(Some(r.account.as_deref().unwrap_or_default())),
        Text(Some(r.key_id.as_deref().unwrap_or_default())),
        Text(r.pool_id.as_deref()),
        Text(r.seller.as_deref()),
        Text(r.model.as_deref()),
        Text(r.provider.as_deref()),
        Int(r.price_version),
        Int(Some(i64::from(r.stream))),
        Int(Some(r.status)),
        Text(Some(&r.outcome)),
        Int(Some(t.prompt_tokens)),
        Int(Some(t.completion_tokens)),
        Int(Some(t.cached_tokens)),
        Int(Some(t.reasoning_tokens)),
        Text(Some(&r.usage_source)),
        Int(Some(r.list_cost_micros)),
        Int(Some(billed)),
        Int(Some(fee)),
        Int(Some(billed - fee)),
        Int(Some(r.latency_ms)),
        Int(r.ttft_ms),
        Int(Some(r.upstream_attempts)),
        Text(r.upstream_request_id.as_deref()),
        Int(Some(now)),
        Int(Some(t.cache_write_tokens)),
        Int(Some(t.cache_write_1h_tokens)),
    ]
}

/// Postgres: inserts the rows no earlier delivery inserted, one array a column in the binary
/// format, unnested — 28 parameters and a one-node plan whatever the number of rows (a `VALUES`
/// list of thousands of parameters cost more to plan and start than to insert). Returns the
/// request ids inserted.
async fn insert_usage_arrays(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &[[Value<'_>; 28]],
) -> Result<Vec<String>, sqlx::Error> {
    static SQL: OnceLock<String> = OnceLock::new();
    // A custom plan would read every array twice (once to estimate the rows); the generic one
    // is the same one-node plan.
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut **tx)
        .await?;
    let mut query = sqlx::query_scalar::<_, String>(SQL.get_or_init(insert_usage_arrays_sql));
    for column in 0..USAGE_COLUMNS.len() {
        query = match rows.first().map(|row| &row[column]) {
            Some(Value::Int(_)) => query.bind(
                rows.iter()
                    .map(|row| match row[column] {
                        Value::Int(i) => i,
                        Value::Text(_) => None,
                    })
                    .collect::<Vec<Option<i64>>>(),
            ),
            _ => query.bind(
                rows.iter()
                    .map(|row| match &row[column] {
                        Value::Text(t) => t.map(str::to_owned),
                        Value::Int(_) => None,
                    })
                    .collect::<Vec<Option<String>>>(),
            ),
        };
    }
    query.fetch_all(&mut **tx).await
}

/// SQLite: inserts the rows (`ids`: their request ids, in order) no earlier delivery inserted;
/// returns the request ids inserted. The ids already there are looked up first rather than
/// returned by the insert: SQLite's driver hands each returned row from its thread to the
/// task's one at a time, a thread wake-up per record (half the embedded control plane's context
/// switches). Nothing lands between the look and the insert: the store's writer holds SQLite's
/// only write transaction.
async fn insert_usage_values(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    rows: &[[Value<'_>; 28]],
    ids: &[&str],
) -> StoreResult<Vec<String>> {
    let marks = vec!["?"; ids.len()].join(", ");
    let sql = format!("SELECT request_id FROM usage_records WHERE request_id IN ({marks})");
    let mut look = sqlx::query_scalar::<_, String>(&sql);
    for id in ids {
        look = look.bind(*id);
    }
    let applied: HashSet<String> = look.fetch_all(&mut **tx).await?.into_iter().collect();
    let fresh: Vec<(&[Value<'_>; 28], &str)> = rows
        .iter()
        .zip(ids.iter().copied())
        .filter(|(_, id)| !applied.contains(*id))
        .collect();
    if fresh.is_empty() {
        return Ok(Vec::new());
    }
    // A full chunk's statement text is built once.
    static FULL: OnceLock<String> = OnceLock::new();
    let sql = if fresh.len() == VALUES_ROWS {
        FULL.get_or_init(|| insert_usage_values_sql(VALUES_ROWS))
    } else {
        &insert_usage_values_sql(fresh.len())
    };
    let mut insert = sqlx::query(sql);
    for value in fresh.iter().flat_map(|(row, _)| row.iter()) {
        insert = match value {
            Value::Text(t) => insert.bind(t.map(str::to_owned)),
            Value::Int(i) => insert.bind(*i),
        };
    }
    insert.execute(&mut **tx).await?;
    Ok(fresh.into_iter().map(|(_, id)| id.to_owned()).collect())
}

/// `INSERT … SELECT * FROM UNNEST($1::text[], …) AS u (…) WHERE (…) IS NULL RETURNING
/// request_id`: a plain insert of the ids not yet there. `ON CONFLICT DO NOTHING` would do the
/// same with a speculative insertion a row, which cost a fifth of the insert; a row committed
/// meanwhile by another transaction fails this one on the primary key instead (retried). The
/// look-up is a scalar subquery, not `NOT EXISTS`: that one becomes an anti-join, and the
/// generic plan made while the table was small hashed the whole table for every batch.
fn insert_usage_arrays_sql() -> String {
    let names: Vec<&str> = USAGE_COLUMNS.iter().map(|(name, _)| *name).collect();
    let arrays: Vec<String> = USAGE_COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("${}::{ty}[]", i + 1))
        .collect();
    let names = names.join(", ");
    format!(
        "INSERT INTO usage_records ({names}) SELECT * FROM UNNEST({}) AS u ({names}) \
         WHERE (SELECT 1 FROM usage_records r WHERE r.request_id = u.request_id) IS NULL \
         RETURNING request_id",
        arrays.join(", ")
    )
}

/// SQLite's `INSERT … VALUES (…), …` for `rows` rows (`ON CONFLICT DO NOTHING`: the look
/// before it decides what is new; this keeps the primary key from ever failing a batch).
fn insert_usage_values_sql(rows: usize) -> String {
    let names: Vec<&str> = USAGE_COLUMNS.iter().map(|(name, _)| *name).collect();
    let mut marks = Marks::sqlite(true);
    let values: Vec<String> = (0..rows).map(|_| marks.row(USAGE_COLUMNS.len())).collect();
    format!(
        "INSERT INTO usage_records ({}) VALUES {} ON CONFLICT (request_id) DO NOTHING",
        names.join(", "),
        values.join(", ")
    )
}

/// Face value left below which a pool is used up: less than a cent sells no request worth
/// making, and a pool that lingered with it would be skipped by every reservation forever.
pub const POOL_DUST_MICROS: i64 = 10_000;

/// Adds list cost to pools' consumption (`pool id → micros`); a live pool whose face value is
/// used up (less than [`POOL_DUST_MICROS`] left) becomes exhausted. Returns each pool's
/// consumption after it, and the pools that just ran out. A pool deleted meanwhile is left out:
/// its usage is still recorded and billed.
async fn consume_pools(
    conn: &mut Conn<'_>,
    deltas: &BTreeMap<&str, i64>,
) -> StoreResult<(Vec<(String, i64)>, Vec<String>)> {
    let mut consumed = Vec::with_capacity(deltas.len());
    let mut exhausted = Vec::new();
    let deltas: Vec<(&&str, &i64)> = deltas.iter().collect();
    for chunk in deltas.chunks(ROWS_PER_STATEMENT) {
        // `VALUES` names its columns column1, column2 in both databases.
        let mut marks = conn.marks();
        let values: Vec<String> = (0..chunk.len()).map(|_| marks.row(2)).collect();
        let sql = format!(
            "UPDATE pools SET consumed_micros = consumed_micros + v.column2 \
             FROM (VALUES {}) AS v WHERE pools.id = v.column1 \
             RETURNING pools.id, pools.consumed_micros, pools.face_value_micros, pools.status",
            values.join(", ")
        );
        let params = chunk
            .iter()
            .flat_map(|(pool, micros)| [Param::Text((**pool).to_owned()), Param::Int(**micros)])
            .collect();
        let rows: Vec<(String, i64, i64, String)> = conn.fetch_all(&sql, params).await?;
        for (id, total, face, status) in rows {
            if face - total < POOL_DUST_MICROS && status == "live" {
                exhausted.push(id.clone());
            }
            consumed.push((id, total));
        }
    }
    for id in &exhausted {
        conn.execute(
            "UPDATE pools SET status = 'exhausted' WHERE id = $1",
            vec![Param::Text(id.clone())],
        )
        .await?;
    }
    Ok((consumed, exhausted))
}

// === The ledger check ===

/// The ledger's invariants, checked against the store: every field is zero (or empty) when
/// they hold.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct LedgerCheck {
    /// Explicit transactions whose postings do not sum to zero.
    pub unbalanced_transactions: i64,
    /// Usage rows whose buyer cost differs from the seller's credit plus the fee.
    pub unbalanced_usage: i64,
    /// Sum of every posting ever made, the usage journal's included.
    pub imbalance_micros: i64,
    /// Ledger accounts whose running balance differs from the sum of their postings.
    pub balance_mismatches: Vec<String>,
    /// Pools whose consumption differs from the list cost of the requests they served.
    pub pool_mismatches: Vec<String>,
    /// Accounts and pools whose daily roll-ups (the charts' and the earnings' data) differ
    /// from their usage records: requests, tokens, cost, sales, fee or seller credit.
    pub rollup_mismatches: Vec<String>,
    /// Usage records applied (each request id once: the primary key).
    pub usage_records: i64,
}

impl LedgerCheck {
    pub fn holds(&self) -> bool {
        self.unbalanced_transactions == 0
            && self.unbalanced_usage == 0
            && self.imbalance_micros == 0
            && self.balance_mismatches.is_empty()
            && self.pool_mismatches.is_empty()
            && self.rollup_mismatches.is_empty()
    }
}

impl Store {
    /// Runs the ledger check (reads every posting: an operator's tool, not a hot path).
    pub async fn ledger_check(&self) -> StoreResult<LedgerCheck> {
        let mut check = LedgerCheck {
            unbalanced_transactions: sqlx::query_scalar(
                "SELECT COUNT(*) FROM (SELECT transaction_id FROM ledger_postings \
                 GROUP BY transaction_id HAVING SUM(amount_micros) <> 0) t",
            )
            .fetch_one(&self.pool)
            .await?,
            unbalanced_usage: sqlx::query_scalar(
                "SELECT COUNT(*) FROM usage_records \
                 WHERE buyer_cost_micros <> seller_credit_micros + fee_micros",
            )
            .fetch_one(&self.pool)
            .await?,
            usage_records: sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
                .fetch_one(&self.pool)
                .await?,
            ..LedgerCheck::default()
        };
        let expected = self.posted_totals().await?;
        check.imbalance_micros = expected.values().sum();
        let kept: BTreeMap<String, i64> =
            sqlx::query("SELECT ledger_account, balance_micros FROM ledger_balances")
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, sqlx::Error>>()?;
        let accounts: std::collections::BTreeSet<&String> =
            expected.keys().chain(kept.keys()).collect();
        check.balance_mismatches = accounts
            .into_iter()
            .filter(|a| {
                expected.get(*a).copied().unwrap_or(0) != kept.get(*a).copied().unwrap_or(0)
            })
            .cloned()
            .collect();
        let pools = sqlx::query(
            "SELECT p.id, p.consumed_micros, \
             CAST(COALESCE(SUM(u.list_cost_micros), 0) AS BIGINT) \
             FROM pools p LEFT JOIN usage_records u ON u.pool_id = p.id \
             GROUP BY p.id, p.consumed_micros",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in &pools {
            let (id, consumed, served): (String, i64, i64) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            if consumed != served {
                check.pool_mismatches.push(id);
            }
        }
        check.rollup_mismatches = self.rollup_mismatches().await?;
        Ok(check)
    }

    /// Accounts whose `usage_daily` rows, and pools whose `pool_daily` rows, do not sum to their
    /// usage records.
    async fn rollup_mismatches(&self) -> StoreResult<Vec<String>> {
        let sums = |sql: &'static str| async move {
            sqlx::query(sql)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get::<String, _>(0)?,
                        [r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?],
                    ))
                })
                .collect::<Result<BTreeMap<String, [i64; 4]>, sqlx::Error>>()
        };
        let journal = sums(
            "SELECT account_id, CAST(COUNT(*) AS BIGINT), CAST(SUM(prompt_tokens) AS BIGINT), \
             CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(buyer_cost_micros) AS BIGINT) \
             FROM usage_records WHERE account_id <> '' GROUP BY account_id",
        )
        .await?;
        let rolled = sums(
            "SELECT account_id, CAST(SUM(requests) AS BIGINT), CAST(SUM(input_tokens) AS BIGINT), \
             CAST(SUM(output_tokens) AS BIGINT), CAST(SUM(cost_micros) AS BIGINT) \
             FROM usage_daily GROUP BY account_id",
        )
        .await?;
        let pool_journal = sums(
            "SELECT pool_id, CAST(COUNT(*) AS BIGINT), CAST(SUM(buyer_cost_micros) AS BIGINT), \
             CAST(SUM(fee_micros) AS BIGINT), CAST(SUM(seller_credit_micros) AS BIGINT) \
             FROM usage_records WHERE pool_id IS NOT NULL GROUP BY pool_id",
        )
        .await?;
        let pool_rolled = sums(
            "SELECT pool_id, CAST(SUM(requests) AS BIGINT), CAST(SUM(sales_micros) AS BIGINT), \
             CAST(SUM(fee_micros) AS BIGINT), CAST(SUM(seller_credit_micros) AS BIGINT) \
             FROM pool_daily GROUP BY pool_id",
        )
        .await?;
        let mut mismatches = Vec::new();
        for (journal, rolled) in [(&journal, &rolled), (&pool_journal, &pool_rolled)] {
            let ids: std::collections::BTreeSet<&String> =
                journal.keys().chain(rolled.keys()).collect();
            mismatches.extend(
                ids.into_iter()
                    .filter(|id| journal.get(*id) != rolled.get(*id))
                    .cloned(),
            );
        }
        Ok(mismatches)
    }

    /// Every ledger account's sum of postings: explicit ones and the usage journal's.
    async fn posted_totals(&self) -> StoreResult<BTreeMap<String, i64>> {
        let rows = sqlx::query(
            "SELECT ledger_account, CAST(SUM(amount_micros) AS BIGINT) FROM ledger_postings \
             GROUP BY ledger_account \
             UNION ALL SELECT 'wallet:' || account_id, CAST(-SUM(buyer_cost_micros) AS BIGINT) \
             FROM usage_records GROUP BY account_id \
             UNION ALL SELECT 'payable:' || seller_id, CAST(SUM(seller_credit_micros) AS BIGINT) \
             FROM usage_records WHERE seller_id IS NOT NULL GROUP BY seller_id \
             UNION ALL SELECT 'platform:revenue', CAST(COALESCE(SUM(fee_micros), 0) AS BIGINT) \
             FROM usage_records",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut totals: BTreeMap<String, i64> = BTreeMap::new();
        for r in &rows {
            let (account, amount): (String, i64) = (r.try_get(0)?, r.try_get(1)?);
            *totals.entry(account).or_default() += amount;
        }
        totals.retain(|_, v| *v != 0);
        Ok(totals)
    }
}

/// A week of a seller's earnings.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WeekEarnings {
    /// The week's Monday, 00:00 UTC, Unix ms.
    pub week_start_ms: i64,
    /// Requests served that week.
    pub requests: i64,
    /// The seller's share of their sales, micro-USD.
    pub earned_micros: i64,
}

/// A seller's money beyond its payable balance (see [`Store::seller_money`]).
pub struct SellerMoney {
    pub held_micros: i64,
    pub in_transit_micros: i64,
    pub paid_micros: i64,
    pub weeks: Vec<WeekEarnings>,
}

// === What proxies mirror ===

/// A wallet's balance as the ledger holds it now (`seq` orders mirrors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WalletBalance {
    /// The account whose wallet it is.
    pub account: String,
    /// The wallet's balance, micro-USD.
    pub balance_micros: i64,
    /// Changes the balance has had: the higher one is newer.
    pub seq: i64,
}

/// A pool's face value consumed so far, at list cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolConsumption {
    /// The pool's id.
    pub pool: String,
    /// Face value used up so far, micro-USD at list cost.
    pub consumed_micros: i64,
}

/// `$from, $from+1, …` for `n` binds.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// The wallets of `accounts` (all wallets when `None`).
    pub async fn wallet_balances(
        &self,
        accounts: Option<&[String]>,
    ) -> StoreResult<Vec<WalletBalance>> {
        let rows = match accounts {
            None => {
                sqlx::query(
                    "SELECT ledger_account, balance_micros, seq FROM ledger_balances \
                     WHERE ledger_account LIKE 'wallet:%'",
                )
                .fetch_all(&self.pool)
                .await?
            }
            Some([]) => Vec::new(),
            Some(ids) => {
                let sql = format!(
                    "SELECT ledger_account, balance_micros, seq FROM ledger_balances \
                     WHERE ledger_account IN ({})",
                    placeholders(1, ids.len())
                );
                let mut q = sqlx::query(&sql);
                for id in ids {
                    q = q.bind(wallet_account(id));
                }
                q.fetch_all(&self.pool).await?
            }
        };
        rows.iter()
            .map(|r| {
                let ledger_account: String = r.try_get(0)?;
                Ok(WalletBalance {
                    account: wallet_owner(&ledger_account)
                        .unwrap_or(&ledger_account)
                        .to_owned(),
                    balance_micros: r.try_get(1)?,
                    seq: r.try_get(2)?,
                })
            })
            .collect()
    }

    /// The consumption of `pools` (every pool when `None`).
    pub async fn pool_consumption(
        &self,
        pools: Option<&[String]>,
    ) -> StoreResult<Vec<PoolConsumption>> {
        let rows = match pools {
            None => {
                sqlx::query("SELECT id, consumed_micros FROM pools")
                    .fetch_all(&self.pool)
                    .await?
            }
            Some([]) => Vec::new(),
            Some(ids) => {
                let sql = format!(
                    "SELECT id, consumed_micros FROM pools WHERE id IN ({})",
                    placeholders(1, ids.len())
                );
                let mut q = sqlx::query(&sql);
                for id in ids {
                    q = q.bind(id);
                }
                q.fetch_all(&self.pool).await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(PoolConsumption {
                    pool: r.try_get(0)?,
                    consumed_micros: r.try_get(1)?,
                })
            })
            .collect()
    }
}

// === Refunds and statements ===

/// One applied usage record, as the operator lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageRow {
    /// The proxy's id of the request; each is applied once.
    pub request_id: String,
    /// When the request arrived at the proxy, Unix ms.
    pub started_at_ms: i64,
    /// The buyer account whose key made the request.
    pub account_id: String,
    /// The buyer API key the request used.
    pub key_id: String,
    /// The pool that served it; null when none did.
    pub pool_id: Option<String>,
    /// The seller account whose pool served it; null when none did.
    pub seller_id: Option<String>,
    /// The catalog model id requested; null when none was resolved.
    pub model: Option<String>,
    /// HTTP status the proxy answered with (499: the client disconnected; 0: the proxy was lost
    /// mid-request and billed the request's intent when it started again).
    pub status: i64,
    /// `ok`, or why the request ended otherwise (e.g. `client_disconnected`, `proxy_lost`).
    pub outcome: String,
    /// Input tokens.
    pub prompt_tokens: i64,
    /// Output tokens.
    pub completion_tokens: i64,
    /// The request's cost at list price, micro-USD (what the pool's face value lost).
    pub list_cost_micros: i64,
    /// What the buyer's wallet was charged, micro-USD.
    pub buyer_cost_micros: i64,
    /// The platform's fee on the buyer cost, micro-USD.
    pub fee_micros: i64,
    /// What the seller's payable was credited, micro-USD: buyer cost − fee.
    pub seller_credit_micros: i64,
    /// When the control plane applied the record, Unix ms.
    pub applied_at_ms: i64,
}

/// Which records a listing covers.
#[derive(Debug, Default, Clone)]
pub struct UsageFilter {
    pub account_id: Option<String>,
    pub key_id: Option<String>,
    pub pool_id: Option<String>,
    pub model: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

/// One line of a statement: a group's requests, tokens and cost.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StatementLine {
    /// The key id, model id or day (`YYYY-MM-DD`, UTC) the line sums.
    pub group: String,
    /// Requests in the group.
    pub requests: i64,
    /// Input tokens of those requests.
    pub prompt_tokens: i64,
    /// Output tokens of those requests.
    pub completion_tokens: i64,
    /// What the buyer paid for them, micro-USD.
    pub cost_micros: i64,
    /// What the same requests cost at list price.
    pub list_cost_micros: i64,
}

/// What a seller's pool earned.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PoolEarnings {
    /// The pool's id.
    pub pool_id: String,
    /// Requests the pool served (usage records applied).
    pub requests: i64,
    /// Face value consumed, at list cost.
    pub consumed_micros: i64,
    /// The face value listed, micro-USD at list price.
    pub face_value_micros: i64,
    /// What buyers paid for its tokens.
    pub sales_micros: i64,
    /// The platform's fee on them.
    pub fee_micros: i64,
    /// The seller's share: sales − fee.
    pub earned_micros: i64,
}

/// How a statement groups its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    Key,
    Model,
    Day,
}

impl Store {
    /// Reverses a request's charge (an operator's refund): the buyer's wallet gets its cost
    /// back, the seller's payable and platform revenue give back their shares, as one balanced
    /// transaction, once per request id. The face value it consumed stays consumed (the
    /// provider served the tokens). Returns the transaction and whether it was made now.
    pub async fn refund(
        &self,
        request_id: &str,
        memo: &str,
    ) -> StoreResult<(String, bool, String)> {
        let row = sqlx::query(
            "SELECT account_id, seller_id, buyer_cost_micros, fee_micros, seller_credit_micros \
             FROM usage_records WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_one(&self.pool)
        .await?;
        let account: String = row.try_get(0)?;
        let seller: Option<String> = row.try_get(1)?;
        let (buyer, fee, credit): (i64, i64, i64) =
            (row.try_get(2)?, row.try_get(3)?, row.try_get(4)?);
        let key = format!("refund:{request_id}");
        if let Some(id) = self.transaction_by_key(&key).await? {
            return Ok((id, false, account));
        }
        if buyer == 0 {
            return Err(StoreError::Conflict(
                "the request was not charged".to_owned(),
            ));
        }
        let wallet = wallet_account(&account);
        let payable = payable_account(seller.as_deref().unwrap_or_default());
        let mut tx = self.write().await?;
        let postings = [
            (wallet.as_str(), buyer),
            (payable.as_str(), -credit),
            (PLATFORM_REVENUE, -fee),
        ];
        match post(&mut tx, "refund", &key, memo, &postings).await {
            Ok((id, _)) => {
                tx.commit().await?;
                Ok((id, true, account))
            }
            // A concurrent refund of the same request won: the same answer as a replay.
            Err(StoreError::Conflict(_)) => {
                drop(tx);
                let id = self
                    .transaction_by_key(&key)
                    .await?
                    .ok_or(StoreError::NotFound)?;
                Ok((id, false, account))
            }
            Err(e) => Err(e),
        }
    }

    /// Applied usage records, newest first.
    pub async fn usage(&self, f: &UsageFilter, limit: u32) -> StoreResult<Vec<UsageRow>> {
        let (clause, binds) = filter_clause(f);
        let sql = format!(
            "SELECT request_id, started_at, account_id, key_id, pool_id, seller_id, model, status, \
             outcome, prompt_tokens, completion_tokens, list_cost_micros, buyer_cost_micros, \
             fee_micros, seller_credit_micros, applied_at FROM usage_records{clause} \
             ORDER BY started_at DESC, request_id DESC LIMIT ${}",
            binds.len() + 1
        );
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = b.bind(q);
        }
        let rows = q.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    request_id: r.try_get(0)?,
                    started_at_ms: r.try_get(1)?,
                    account_id: r.try_get(2)?,
                    key_id: r.try_get(3)?,
                    pool_id: r.try_get(4)?,
                    seller_id: r.try_get(5)?,
                    model: r.try_get(6)?,
                    status: r.try_get(7)?,
                    outcome: r.try_get(8)?,
                    prompt_tokens: r.try_get(9)?,
                    completion_tokens: r.try_get(10)?,
                    list_cost_micros: r.try_get(11)?,
                    buyer_cost_micros: r.try_get(12)?,
                    fee_micros: r.try_get(13)?,
                    seller_credit_micros: r.try_get(14)?,
                    applied_at_ms: r.try_get(15)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// A buyer's statement: usage grouped by key, model or day.
    pub async fn statement(
        &self,
        f: &UsageFilter,
        grouping: Grouping,
    ) -> StoreResult<Vec<StatementLine>> {
        let (clause, binds) = filter_clause(f);
        let group = match grouping {
            Grouping::Key => "key_id",
            Grouping::Model => "COALESCE(model, '')",
            Grouping::Day => "CAST(started_at / 86400000 AS BIGINT)",
        };
        let sql = format!(
            "SELECT CAST({group} AS TEXT), COUNT(*), \
             CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT), \
             CAST(SUM(buyer_cost_micros) AS BIGINT), CAST(SUM(list_cost_micros) AS BIGINT) \
             FROM usage_records{clause} GROUP BY {group} ORDER BY 1"
        );
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = b.bind(q);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let group: String = r.try_get(0)?;
                Ok(StatementLine {
                    group: match grouping {
                        Grouping::Day => day_of(group.parse().unwrap_or(0)),
                        _ => group,
                    },
                    requests: r.try_get(1)?,
                    prompt_tokens: r.try_get(2)?,
                    completion_tokens: r.try_get(3)?,
                    cost_micros: r.try_get(4)?,
                    list_cost_micros: r.try_get(5)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// What each of a seller's pools earned.
    pub async fn earnings(&self, seller_id: &str) -> StoreResult<Vec<PoolEarnings>> {
        let rows = sqlx::query(
            // From the daily roll-up: a row per pool and day, never the journal.
            "SELECT p.id, CAST(COALESCE(SUM(d.requests), 0) AS BIGINT), p.consumed_micros, \
             p.face_value_micros, CAST(COALESCE(SUM(d.sales_micros), 0) AS BIGINT), \
             CAST(COALESCE(SUM(d.fee_micros), 0) AS BIGINT), \
             CAST(COALESCE(SUM(d.seller_credit_micros), 0) AS BIGINT) \
             FROM pools p LEFT JOIN pool_daily d ON d.pool_id = p.id \
             WHERE p.account_id = $1 \
             GROUP BY p.id, p.consumed_micros, p.face_value_micros, p.listed_seq \
             ORDER BY p.listed_seq",
        )
        .bind(seller_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PoolEarnings {
                    pool_id: r.try_get(0)?,
                    requests: r.try_get(1)?,
                    consumed_micros: r.try_get(2)?,
                    face_value_micros: r.try_get(3)?,
                    sales_micros: r.try_get(4)?,
                    fee_micros: r.try_get(5)?,
                    earned_micros: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// A seller's money beyond its payable balance: earned since `held_since_ms`, in transit,
    /// paid out, and its last `weeks` weeks of earnings.
    pub async fn seller_money(
        &self,
        seller_id: &str,
        held_since_ms: i64,
        weeks: i64,
    ) -> StoreResult<SellerMoney> {
        const WEEK_MS: i64 = 7 * 86_400_000;
        // Unix time began on a Thursday: weeks counted from a Monday start 3 days later.
        const MONDAY_SHIFT_MS: i64 = 3 * 86_400_000;
        // Whole days from the roll-up; the hold's first, partial day from the journal (indexed
        // by pool and time: one day's rows at most).
        let first_whole_day = held_since_ms.div_euclid(DAY_MS) * DAY_MS
            + if held_since_ms.rem_euclid(DAY_MS) == 0 {
                0
            } else {
                DAY_MS
            };
        let whole_days: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(seller_credit_micros), 0) AS BIGINT) FROM pool_daily \
             WHERE pool_id IN (SELECT id FROM pools WHERE account_id = $1) AND day >= $2",
        )
        .bind(seller_id)
        .bind(first_whole_day)
        .fetch_one(&self.pool)
        .await?;
        let first_day: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(seller_credit_micros), 0) AS BIGINT) FROM usage_records \
             WHERE pool_id IN (SELECT id FROM pools WHERE account_id = $1) \
             AND started_at >= $2 AND started_at < $3",
        )
        .bind(seller_id)
        .bind(held_since_ms)
        .bind(first_whole_day)
        .fetch_one(&self.pool)
        .await?;
        let held = whole_days + first_day;
        let paid_cents: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM payouts \
             WHERE account_id = $1 AND status = 'paid'",
        )
        .bind(seller_id)
        .fetch_one(&self.pool)
        .await?;
        let since = (now_ms() + MONDAY_SHIFT_MS) / WEEK_MS - (weeks - 1);
        let rows = sqlx::query(
            // Weeks begin at a day's start: the daily roll-up sums into them exactly.
            "SELECT (day + $1) / $2, CAST(SUM(requests) AS BIGINT), \
             CAST(COALESCE(SUM(seller_credit_micros), 0) AS BIGINT) FROM pool_daily \
             WHERE pool_id IN (SELECT id FROM pools WHERE account_id = $3) AND day >= $4 \
             GROUP BY 1 ORDER BY 1 DESC",
        )
        .bind(MONDAY_SHIFT_MS)
        .bind(WEEK_MS)
        .bind(seller_id)
        .bind(since * WEEK_MS - MONDAY_SHIFT_MS)
        .fetch_all(&self.pool)
        .await?;
        let weeks = rows
            .iter()
            .map(|r| {
                let index: i64 = r.try_get(0)?;
                Ok(WeekEarnings {
                    week_start_ms: index * WEEK_MS - MONDAY_SHIFT_MS,
                    requests: r.try_get(1)?,
                    earned_micros: r.try_get(2)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(SellerMoney {
            held_micros: held,
            in_transit_micros: self
                .ledger_balance(&crate::payouts::transit_account(seller_id))
                .await?,
            paid_micros: crate::stripe::micros_of(paid_cents),
            weeks,
        })
    }

    /// A ledger account's balance (0 when it has none).
    pub async fn ledger_balance(&self, ledger_account: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT balance_micros FROM ledger_balances WHERE ledger_account = $1",
        )
        .bind(ledger_account)
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or(0))
    }
}

/// A bind value of a usage filter.
enum Bind {
    Text(String),
    Int(i64),
}

impl Bind {
    fn bind<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        match self {
            Self::Text(s) => q.bind(s.clone()),
            Self::Int(i) => q.bind(*i),
        }
    }
}

/// ` WHERE …` for a filter, and its binds in order.
fn filter_clause(f: &UsageFilter) -> (String, Vec<Bind>) {
    let mut conditions = Vec::new();
    let mut binds = Vec::new();
    let texts = [
        ("account_id", &f.account_id),
        ("key_id", &f.key_id),
        ("pool_id", &f.pool_id),
        ("model", &f.model),
    ];
    for (column, value) in texts {
        if let Some(v) = value {
            binds.push(Bind::Text(v.clone()));
            conditions.push(format!("{column} = ${}", binds.len()));
        }
    }
    if let (Some(key), None) = (&f.key_id, &f.account_id) {
        // Usage has no index of its own by key: the key's account's index finds its rows.
        binds.push(Bind::Text(key.clone()));
        conditions.push(format!(
            "account_id = (SELECT account_id FROM api_keys WHERE id = ${})",
            binds.len()
        ));
    }
    if let Some(from) = f.from_ms {
        binds.push(Bind::Int(from));
        conditions.push(format!("started_at >= ${}", binds.len()));
    }
    if let Some(to) = f.to_ms {
        binds.push(Bind::Int(to));
        conditions.push(format!("started_at < ${}", binds.len()));
    }
    if conditions.is_empty() {
        (String::new(), binds)
    } else {
        (format!(" WHERE {}", conditions.join(" AND ")), binds)
    }
}

/// `YYYY-MM-DD` (UTC) of a day number since the Unix epoch.
pub(crate) fn day_of(days: i64) -> String {
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fees_round_down_and_the_seller_gets_the_rest() {
        for (buyer, ppm) in [(0, 150_000), (1, 150_000), (7, 150_000), (999_999, 333_333)] {
            let fee = fee_of(buyer, ppm);
            assert!(fee <= buyer && fee >= 0);
            assert_eq!(fee + (buyer - fee), buyer);
            assert_eq!(fee, buyer * ppm / 1_000_000);
        }
    }

    #[test]
    fn days_are_calendar_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(20_793), "2026-12-06");
        assert_eq!(day_of(11_016), "2000-02-29");
    }
}
