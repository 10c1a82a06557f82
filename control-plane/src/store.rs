//! The source of truth: one `Store` over Postgres (fleets) or an embedded SQLite file (one
//! machine), through sqlx's `Any` driver. The SQL is written once in the dialect both accept
//! (`$n` parameters, BIGINT and TEXT columns), so the two backends cannot drift apart; the same
//! test suite runs against both.
//!
//! Every change that alters what proxies are pushed bumps `config_version` in the same
//! transaction, so the push version is strictly increasing and never ahead of the data.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use utoipa::ToSchema;

use crate::conn::{Conn, Param};
use crate::ids;
use crate::ledger::{self, wallet_account, GRANTS, PROMOTIONS};

mod web;
pub use web::{AcceptedLink, DailyUsage, OutboxMessage, Session, SigninFlow, Visitor};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug)]
pub enum StoreError {
    NotFound,
    /// A uniqueness or state rule was violated; the message is safe to show.
    Conflict(String),
    Db(sqlx::Error),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound => f.write_str("not found"),
            Self::Conflict(m) => f.write_str(m),
            Self::Db(e) => write!(f, "database: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => Self::NotFound,
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                Self::Conflict("already exists".to_owned())
            }
            _ => Self::Db(e),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Buyer,
    Seller,
    Both,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Buyer => "buyer",
            Self::Seller => "seller",
            Self::Both => "both",
        }
    }
    pub fn buys(self) -> bool {
        matches!(self, Self::Buyer | Self::Both)
    }
    pub fn sells(self) -> bool {
        matches!(self, Self::Seller | Self::Both)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    Active,
    /// Its keys are refused and its pools unused, everywhere, within a second.
    Suspended,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
        }
    }
}

fn parse_text<T: for<'de> Deserialize<'de>>(s: &str) -> Result<T, sqlx::Error> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn parse_json<T: for<'de> Deserialize<'de>>(s: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Account {
    /// The account's id (`acct_…`).
    pub id: String,
    /// The account's email address, lowercase; unique.
    pub email: String,
    /// `buyer`, `seller` or `both`: whether it holds API keys, lists pools, or both.
    pub role: Role,
    /// `active` or `suspended`.
    pub status: AccountStatus,
    /// When the account was created, Unix ms.
    pub created_at_ms: i64,
}

impl Account {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            email: r.try_get("email")?,
            role: parse_text(&r.try_get::<String, _>("role")?)?,
            status: parse_text(&r.try_get::<String, _>("status")?)?,
            created_at_ms: r.try_get("created_at")?,
        })
    }
}

/// Someone waiting for early access.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WaitlistEntry {
    /// Lowercased.
    pub email: String,
    /// What they want to do on the marketplace.
    pub role: Role,
    /// When they first signed up.
    pub created_at_ms: i64,
}

/// A buyer API key as listed: never the key itself, only its lookup prefix.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ApiKey {
    /// The key's id (`key_…`), not the key itself.
    pub id: String,
    /// The buyer account that holds the key.
    pub account_id: String,
    /// The buyer's own name for the key (may be empty).
    pub name: String,
    /// The first characters of the key, enough to recognise it in a list, never to use it.
    pub lookup_prefix: String,
    /// Catalog model ids this key may use; every model when null.
    pub allowed_models: Option<Vec<String>>,
    /// Most this key may spend in total, micro-USD; no cap when null.
    pub spend_cap_micros: Option<i64>,
    /// Most requests this key may make a minute; no limit when null.
    pub requests_per_minute: Option<i64>,
    /// When the key was created, Unix ms.
    pub created_at_ms: i64,
    /// When the key was revoked, Unix ms; null while it is live.
    pub revoked_at_ms: Option<i64>,
    #[serde(skip)]
    pub key_sha256: String,
}

impl ApiKey {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        let models: Option<String> = r.try_get("allowed_models")?;
        Ok(Self {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            name: r.try_get("name")?,
            lookup_prefix: r.try_get("lookup_prefix")?,
            allowed_models: models.as_deref().map(parse_json).transpose()?,
            spend_cap_micros: r.try_get("spend_cap_micros")?,
            requests_per_minute: r.try_get("requests_per_minute")?,
            created_at_ms: r.try_get("created_at")?,
            revoked_at_ms: r.try_get("revoked_at")?,
            key_sha256: r.try_get("key_sha256")?,
        })
    }
}

/// Per-key limits, as created or changed.
#[derive(Debug, Clone, Default)]
pub struct KeyLimits {
    pub allowed_models: Option<Vec<String>>,
    pub spend_cap_micros: Option<i64>,
    pub requests_per_minute: Option<i64>,
}

/// A seller credential as stored: the public fields in clear, the secret sealed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Credential {
    /// The credential's id (`cred_…`).
    pub id: String,
    /// The seller account that owns the credential.
    pub account_id: String,
    /// `openai`, `anthropic`, `bedrock`, `vertex`, `gemini`, `azure` or `mock`.
    pub provider: String,
    /// The seller's own name for it.
    pub label: String,
    /// Fields that are not secret (region, endpoint, deployment, project, base URL).
    #[schema(value_type = Object)]
    pub public: serde_json::Value,
    /// Version of the key-encryption key its secret is sealed under.
    pub kek_version: i64,
    /// When the credential was stored, Unix ms.
    pub created_at_ms: i64,
    /// When it was last verified, Unix ms; null before any verify action.
    pub verified_at_ms: Option<i64>,
    /// `valid`, `invalid` or `unreachable` after a verify action.
    pub verify_status: Option<String>,
    /// The seller chose where requests go (a base URL of their own).
    pub custom_endpoint: bool,
    /// When the operator approved the custom endpoint (its pools serve from then on).
    pub approved_at_ms: Option<i64>,
    #[serde(skip)]
    pub sealed: crate::sealing::Sealed,
}

impl Credential {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        let hex_col = |name: &str| -> Result<Vec<u8>, sqlx::Error> {
            hex::decode(r.try_get::<String, _>(name)?).map_err(|e| sqlx::Error::Decode(Box::new(e)))
        };
        let kek_version: i64 = r.try_get("kek_version")?;
        Ok(Self {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            provider: r.try_get("provider")?,
            label: r.try_get("label")?,
            public: parse_json(&r.try_get::<String, _>("public_fields")?)?,
            kek_version,
            created_at_ms: r.try_get("created_at")?,
            custom_endpoint: r.try_get::<i64, _>("custom_endpoint")? != 0,
            approved_at_ms: r.try_get("approved_at")?,
            verified_at_ms: r.try_get("verified_at")?,
            verify_status: r.try_get("verify_status")?,
            sealed: crate::sealing::Sealed {
                kek_version: u32::try_from(kek_version).unwrap_or(0),
                wrapped_dek: hex_col("wrapped_dek")?,
                ciphertext: hex_col("ciphertext")?,
            },
        })
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Pool {
    /// The pool's id (`pool_…`).
    pub id: String,
    /// The seller account that listed the pool.
    pub account_id: String,
    /// The seller credential its requests are served with.
    pub credential_id: String,
    /// The provider of that credential (`openai`, `anthropic`, `bedrock`, …).
    pub provider: String,
    /// USD face value of the capacity listed, micro-USD at list price.
    pub face_value_micros: i64,
    /// Fraction of list price buyers pay, in parts per million (600000 = 0.60).
    pub price_ratio_ppm: i64,
    /// Catalog model ids the pool serves.
    pub models: Vec<String>,
    /// `live`, `paused` or `exhausted` (face value used up, or retired; final).
    #[schema(value_type = String)]
    pub status: tokn_config::PoolStatus,
    /// When the pool stops serving, Unix ms; never when null.
    pub expires_at_ms: Option<i64>,
    /// FIFO position: pools listed earlier are used first.
    pub listed_seq: i64,
    /// When the pool was listed, Unix ms.
    pub listed_at_ms: i64,
    /// Face value used up so far, at list cost.
    pub consumed_micros: i64,
    /// The operator paused it: only the operator resumes it.
    pub held_by_operator: bool,
}

impl Pool {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        let status: String = r.try_get("status")?;
        Ok(Self {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            credential_id: r.try_get("credential_id")?,
            provider: r.try_get("provider")?,
            face_value_micros: r.try_get("face_value_micros")?,
            price_ratio_ppm: r.try_get("price_ratio_ppm")?,
            models: parse_json(&r.try_get::<String, _>("models")?)?,
            status: tokn_config::PoolStatus::parse(&status)
                .ok_or_else(|| sqlx::Error::Decode(format!("pool status `{status}`").into()))?,
            expires_at_ms: r.try_get("expires_at")?,
            listed_seq: r.try_get("listed_seq")?,
            listed_at_ms: r.try_get("listed_at")?,
            consumed_micros: r.try_get("consumed_micros")?,
            held_by_operator: r.try_get::<i64, _>("operator_hold")? != 0,
        })
    }
}

/// `FROM … WHERE …` of the pools proxies may use, FIFO (`$1`: now): live, unexpired, of active
/// seller accounts, on a verified credential (and an approved endpoint when the seller chose
/// it).
const SERVABLE_POOLS: &str = "FROM pools p \
     JOIN credentials c ON c.id = p.credential_id \
     JOIN accounts a ON a.id = p.account_id \
     WHERE p.status = 'live' AND a.status = 'active' AND c.deleted_at IS NULL \
     AND c.verify_status IN ('valid', 'unchecked') \
     AND (c.custom_endpoint = 0 OR c.approved_at IS NOT NULL) \
     AND (p.expires_at IS NULL OR p.expires_at > $1)";

/// What buyers of one model can be served now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Supply {
    /// Servable pools listing the model.
    pub live_pools: i64,
    /// Face value those pools have left, micro-USD at list price.
    pub face_value_left_micros: i64,
    /// Fraction of list price the pool first in the queue charges, parts per million (the next
    /// request pays it).
    pub price_ratio_ppm: i64,
}

#[derive(Debug, Clone)]
pub struct NewPool {
    pub credential_id: String,
    pub face_value_micros: i64,
    pub price_ratio_ppm: i64,
    pub models: Vec<String>,
    pub expires_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct PoolChange {
    pub status: Option<tokn_config::PoolStatus>,
    pub price_ratio_ppm: Option<i64>,
    /// `Some(None)` clears the expiry.
    pub expires_at_ms: Option<Option<i64>>,
    /// The operator makes it: a pool the operator paused stays paused until the operator
    /// resumes it, whatever its seller asks.
    pub by_operator: bool,
}

/// One price version of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelPrice {
    /// The catalog model id buyers name in `model`.
    pub model_id: String,
    /// The price version: the push version it was added at (higher is newer).
    pub version: i64,
    /// `openai`, `anthropic`, `bedrock`, `vertex`, `gemini`, `azure` or `mock`.
    pub provider: String,
    /// The provider's name for the model.
    pub upstream_model: String,
    /// List price of input tokens, micro-USD per million tokens.
    pub input_price_micros_per_mtok: i64,
    /// List price of output tokens, micro-USD per million tokens.
    pub output_price_micros_per_mtok: i64,
    /// List price of cached input tokens, micro-USD per million tokens.
    pub cached_input_price_micros_per_mtok: i64,
    /// List price of prompt tokens written to the provider's cache, micro-USD per million
    /// tokens.
    pub cache_write_price_micros_per_mtok: i64,
    /// List price of prompt tokens written to a cache that lives an hour.
    pub cache_write_1h_price_micros_per_mtok: i64,
    /// When this version takes effect, Unix ms; requests are priced by the version
    /// in force when they started.
    pub effective_at_ms: i64,
    /// Output cap of one request, for reservations (the proxies' default when absent).
    pub max_output_tokens: Option<i64>,
}

impl ModelPrice {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        let input: i64 = r.try_get("input_micros")?;
        let write = r
            .try_get::<Option<i64>, _>("cache_write_micros")?
            .unwrap_or(input);
        Ok(Self {
            model_id: r.try_get("model_id")?,
            version: r.try_get("version")?,
            provider: r.try_get("provider")?,
            upstream_model: r.try_get("upstream_model")?,
            input_price_micros_per_mtok: input,
            output_price_micros_per_mtok: r.try_get("output_micros")?,
            cached_input_price_micros_per_mtok: r.try_get("cached_input_micros")?,
            // A version written before cache writes had a rate billed them as input, and an
            // hour's writes as any write.
            cache_write_price_micros_per_mtok: write,
            cache_write_1h_price_micros_per_mtok: r
                .try_get::<Option<i64>, _>("cache_write_1h_micros")?
                .unwrap_or(write),
            effective_at_ms: r.try_get("effective_at")?,
            max_output_tokens: r.try_get("max_output_tokens")?,
        })
    }
}

/// Another name of a catalog model: a request naming it is served and billed as the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ModelAlias {
    /// The other name: buyers may put it in `model`.
    pub alias: String,
    /// The catalog model it names.
    pub model_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The platform's share of what buyers pay, parts per million.
    pub fee_ratio_ppm: i64,
    /// Credited once to every new buyer account, micro-USD.
    pub welcome_credit_micros: i64,
    /// Live keys one account may hold.
    pub keys_per_account_max: i64,
    /// Requests per minute given to new keys that name no limit; none: unlimited.
    pub default_requests_per_minute: Option<i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LedgerEntry {
    /// The ledger transaction (`txn_…`); for a `usage` entry, the request id.
    pub transaction_id: String,
    /// `welcome_credit`, `credit_grant`, `refund` or `usage` (a request's charge).
    pub kind: String,
    /// The transaction's memo; for a `usage` entry, the model id.
    pub memo: String,
    /// What the entry moved in the wallet, micro-USD: positive in, negative out.
    pub amount_micros: i64,
    /// When it was made, Unix ms (for `usage`, when the request started).
    pub created_at_ms: i64,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Clone)]
pub struct Store {
    pub(crate) pool: AnyPool,
    /// Where writes go. SQLite: one connection, so concurrent writers queue here (up to
    /// [`WRITER_WAIT`]) instead of failing with "database is locked"; Postgres: `pool`.
    writer: AnyPool,
    /// How a writing transaction starts: SQLite's `BEGIN IMMEDIATE` takes the write lock up
    /// front, so a transaction that reads before it writes never fails to upgrade its lock
    /// ("database is locked") when another connection wrote meanwhile.
    begin: &'static str,
    /// Postgres (writers run concurrently, so a check-then-write takes a row lock first).
    postgres: bool,
    /// Postgres: native connections for the usage drain's transactions, which bind arrays in
    /// the binary format (`Any` binds text only); see `conn.rs`.
    pub(crate) drain: Option<sqlx::PgPool>,
}

/// Postgres connections the usage drain holds at most (batches from every proxy share them).
const DRAIN_CONNECTIONS: u32 = 8;

/// Longest a write waits for its turn on SQLite's one writer connection.
const WRITER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where the store lives.
pub enum Backend<'a> {
    Postgres(&'a str),
    Sqlite(&'a std::path::Path),
}

/// Tables whose rows every drained batch updates in place (running balances, pool consumption,
/// the daily roll-ups).
const UPDATED_IN_PLACE: [&str; 4] = ["ledger_balances", "pools", "usage_daily", "pool_daily"];

/// Postgres: half of each page of [`UPDATED_IN_PLACE`] is left free, so an update writes the
/// row's new version beside the old one (a heap-only tuple: no index entry, and the page
/// prunes itself) instead of on another page with a new entry in every index. A storage
/// setting SQLite has no word for, so it is not a migration; set once, for pages written from
/// then on.
async fn leave_room_for_updates(pool: &sqlx::AnyPool) -> StoreResult<()> {
    for table in UPDATED_IN_PLACE {
        let set: bool = sqlx::query_scalar(
            "SELECT COALESCE('fillfactor=50' = ANY(reloptions), false) FROM pg_class \
             WHERE oid = CAST($1 AS regclass)",
        )
        .bind(table)
        .fetch_one(pool)
        .await?;
        if !set {
            sqlx::query(&format!("ALTER TABLE {table} SET (fillfactor = 50)"))
                .execute(pool)
                .await?;
        }
    }
    Ok(())
}

impl Store {
    /// Connects and applies the migrations shipped in the binary.
    pub async fn open(backend: Backend<'_>) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let (url, max) = match backend {
            Backend::Postgres(url) => (url.to_owned(), 16),
            // One writer at a time is all SQLite does; a small pool avoids lock contention.
            Backend::Sqlite(path) => (format!("sqlite://{}?mode=rwc", path.display()), 4),
        };
        let sqlite = url.starts_with("sqlite");
        let options = AnyConnectOptions::from_str(&url)?;
        // A SQLite connection is a file in this process and cannot go stale: no ping (a
        // message to its thread and back) before each use. A Postgres one can (a restarted
        // server), so it is tested.
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .test_before_acquire(!sqlite)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .after_connect(move |conn, _| Box::pin(async move { sqlite_cache(conn, sqlite).await }))
            .connect_with(options)
            .await?;
        let writer = if sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
            AnyPoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .acquire_timeout(WRITER_WAIT)
                .after_connect(|conn, _| Box::pin(async move { sqlite_cache(conn, true).await }))
                .connect_with(AnyConnectOptions::from_str(&url)?)
                .await?
        } else {
            pool.clone()
        };
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Db(e.into()))?;
        if !sqlite {
            leave_room_for_updates(&pool).await?;
        }
        let begin = if url.starts_with("sqlite") {
            "BEGIN IMMEDIATE"
        } else {
            "BEGIN"
        };
        let drain = if sqlite {
            None
        } else {
            Some(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(DRAIN_CONNECTIONS)
                    .acquire_timeout(std::time::Duration::from_secs(10))
                    .connect(&url)
                    .await?,
            )
        };
        Ok(Self {
            pool,
            writer,
            begin,
            postgres: !sqlite,
            drain,
        })
    }

    /// A transaction that writes.
    pub(crate) async fn write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        self.writer.begin_with(self.begin).await
    }

    pub async fn close(&self) {
        if let Some(drain) = &self.drain {
            drain.close().await;
        }
        self.writer.close().await;
        self.pool.close().await;
    }

    // ---- push version ------------------------------------------------------------------------

    pub async fn config_version(&self) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT version FROM config_version WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Bumps the version for a scheduled price taking effect: a catalog change.
    pub async fn bump_version(&self) -> StoreResult<i64> {
        let mut tx = self.write().await?;
        let v = bump_for(&mut tx, Changed::Catalog, "").await?;
        tx.commit().await?;
        Ok(v)
    }

    // ---- settings ----------------------------------------------------------------------------

    pub async fn settings(&self) -> StoreResult<Settings> {
        let r = sqlx::query(
            "SELECT fee_ratio_ppm, welcome_credit_micros, keys_per_account_max, \
             default_requests_per_minute FROM settings WHERE id = 1",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Settings {
            fee_ratio_ppm: r.try_get(0)?,
            welcome_credit_micros: r.try_get(1)?,
            keys_per_account_max: r.try_get(2)?,
            default_requests_per_minute: r.try_get(3)?,
        })
    }

    pub async fn put_settings(&self, s: &Settings) -> StoreResult<()> {
        sqlx::query(
            "UPDATE settings SET fee_ratio_ppm = $1, welcome_credit_micros = $2, \
             keys_per_account_max = $3, default_requests_per_minute = $4, updated_at = $5 \
             WHERE id = 1",
        )
        .bind(s.fee_ratio_ppm)
        .bind(s.welcome_credit_micros)
        .bind(s.keys_per_account_max)
        .bind(s.default_requests_per_minute)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    // ---- accounts ----------------------------------------------------------------------------

    /// Creates an account holding `token_sha256` as its API token; a buyer gets the welcome
    /// credit in the same transaction.
    pub async fn create_account(
        &self,
        email: &str,
        role: Role,
        token_sha256: &str,
    ) -> StoreResult<Account> {
        let settings = self.settings().await?;
        let account = Account {
            id: ids::new("acct"),
            email: email.to_owned(),
            role,
            status: AccountStatus::Active,
            created_at_ms: now_ms(),
        };
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO accounts (id, email, role, status, token_sha256, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&account.id)
        .bind(&account.email)
        .bind(role.as_str())
        .bind(account.status.as_str())
        .bind(token_sha256)
        .bind(account.created_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => {
                StoreError::Conflict("an account with this email exists".to_owned())
            }
            other => other,
        })?;
        if role.buys() && settings.welcome_credit_micros > 0 {
            ledger::post(
                &mut tx,
                "welcome_credit",
                &format!("welcome:{}", account.id),
                "welcome credit",
                &[
                    (&wallet_account(&account.id), settings.welcome_credit_micros),
                    (PROMOTIONS, -settings.welcome_credit_micros),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(account)
    }

    pub async fn account(&self, id: &str) -> StoreResult<Account> {
        let r = sqlx::query("SELECT * FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Account::from_row(&r)?)
    }

    pub async fn account_by_token(&self, token_sha256: &str) -> StoreResult<Account> {
        let r = sqlx::query("SELECT * FROM accounts WHERE token_sha256 = $1")
            .bind(token_sha256)
            .fetch_one(&self.pool)
            .await?;
        Ok(Account::from_row(&r)?)
    }

    pub async fn accounts(&self, after: Option<&str>, limit: u32) -> StoreResult<Vec<Account>> {
        let rows = sqlx::query("SELECT * FROM accounts WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after.unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        decode_all(&rows, Account::from_row)
    }

    pub async fn set_account_status(
        &self,
        id: &str,
        status: AccountStatus,
    ) -> StoreResult<Account> {
        let mut tx = self.write().await?;
        let n = sqlx::query("UPDATE accounts SET status = $1 WHERE id = $2")
            .bind(status.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        // Its keys and pools are accepted, or not, from this version on.
        let conn = &mut Conn::Any(&mut tx);
        let version = bump(conn).await?;
        for (kind, table) in [(Changed::Key, "api_keys"), (Changed::Pool, "pools")] {
            record_changes(conn, version, kind, table, "account_id", id).await?;
        }
        tx.commit().await?;
        self.account(id).await
    }

    // ---- waitlist ----------------------------------------------------------------------------

    /// Adds `email` (already normalized) to the waitlist; `false` when it was on it already
    /// (its first sign-up stands). One statement: two sign-ups at once never make two rows.
    pub async fn join_waitlist(&self, email: &str, role: Role) -> StoreResult<bool> {
        let added = sqlx::query(
            "INSERT INTO waitlist (email, role, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (email) DO NOTHING",
        )
        .bind(email)
        .bind(role.as_str())
        .bind(now_ms())
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(added == 1)
    }

    /// The waitlist in sign-up order, from after the entry of `after` (an email address).
    pub async fn waitlist(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<WaitlistEntry>> {
        let rows = match after {
            None => sqlx::query(
                "SELECT email, role, created_at FROM waitlist ORDER BY created_at, email LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?,
            Some(after) => {
                sqlx::query(
                    "SELECT w.email, w.role, w.created_at FROM waitlist w, waitlist a \
                 WHERE a.email = $1 AND (w.created_at > a.created_at \
                 OR (w.created_at = a.created_at AND w.email > a.email)) \
                 ORDER BY w.created_at, w.email LIMIT $2",
                )
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(WaitlistEntry {
                    email: r.try_get("email")?,
                    role: parse_text(&r.try_get::<String, _>("role")?)?,
                    created_at_ms: r.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    // ---- keys --------------------------------------------------------------------------------

    /// Creates a key within the account's cap and with the default rate limit, both read from
    /// the settings in the writing statement itself (no read before the write, nothing stale).
    pub async fn create_key(
        &self,
        account_id: &str,
        name: &str,
        lookup_prefix: &str,
        key_sha256: &str,
        limits: &KeyLimits,
    ) -> StoreResult<ApiKey> {
        let id = ids::new("key");
        let created_at_ms = now_ms();
        // The key's columns, $1 to $9; the answer (a row only if the key was written): its rate limit.
        let with_key = |sql: &'static str| {
            sqlx::query_scalar::<_, Option<i64>>(sql)
                .bind(&id)
                .bind(account_id)
                .bind(name)
                .bind(lookup_prefix)
                .bind(key_sha256)
                .bind(limits.allowed_models.as_ref().map(to_json))
                .bind(limits.spend_cap_micros)
                .bind(limits.requests_per_minute)
                .bind(created_at_ms)
        };
        let created = if self.postgres {
            // One statement, its own transaction: the cap checked and counted (a conditional
            // update, re-checked on the row's latest version when concurrent creations wait on
            // it), the key, the version and its journal row — so the account's and the
            // version's row locks are held for this statement and its commit alone, and the
            // call is one round trip.
            with_key(
                "WITH s AS (SELECT keys_per_account_max AS most, default_requests_per_minute \
                 AS rpm FROM settings WHERE id = 1), \
                 a AS (UPDATE accounts SET live_keys = live_keys + 1 \
                 WHERE id = $2 AND live_keys < (SELECT most FROM s) RETURNING id), \
                 k AS (INSERT INTO api_keys (id, account_id, name, lookup_prefix, key_sha256, \
                 allowed_models, spend_cap_micros, requests_per_minute, created_at) \
                 SELECT $1, a.id, $3, $4, $5, $6, $7, COALESCE($8, s.rpm), $9 FROM a, s \
                 RETURNING requests_per_minute), \
                 v AS (UPDATE config_version SET version = version + 1 \
                 WHERE id = 1 AND EXISTS (SELECT 1 FROM k) RETURNING version), \
                 c AS (INSERT INTO config_changes (version, kind, item_id) \
                 SELECT version, 'key', $1 FROM v RETURNING version) \
                 SELECT k.requests_per_minute FROM c, k",
            )
            .fetch_optional(&self.writer)
            .await?
        } else {
            // The same four writes as one message to the connection's thread (sqlx runs each
            // SQLite connection on a thread of its own; a message per statement costs more
            // than the statements): each write happens only if the one before it did, and
            // the last statement answers only if the key was written.
            let mut tx = self.write().await?;
            let created = with_key(
                "INSERT INTO api_keys (id, account_id, name, lookup_prefix, key_sha256, \
                 allowed_models, spend_cap_micros, requests_per_minute, created_at) \
                 SELECT $1, a.id, $3, $4, $5, $6, $7, \
                 COALESCE($8, s.default_requests_per_minute), $9 FROM accounts a, settings s \
                 WHERE a.id = $2 AND s.id = 1 AND a.live_keys < s.keys_per_account_max; \
                 UPDATE accounts SET live_keys = live_keys + 1 WHERE id = $2 AND changes() = 1; \
                 UPDATE config_version SET version = version + 1 WHERE id = 1 AND changes() = 1; \
                 INSERT INTO config_changes (version, kind, item_id) \
                 SELECT version, 'key', $1 FROM config_version WHERE id = 1 AND changes() = 1; \
                 SELECT requests_per_minute FROM api_keys WHERE id = $1",
            )
            // All rows: a fetch of one would stop the statements at the first row.
            .fetch_all(&mut *tx)
            .await?
            .pop();
            if created.is_some() {
                tx.commit().await?;
            }
            created
        };
        let Some(requests_per_minute) = created else {
            let most = self.settings().await?.keys_per_account_max;
            return Err(StoreError::Conflict(format!(
                "this account already holds {most} live keys, the most allowed"
            )));
        };
        // What was written (no second read).
        Ok(ApiKey {
            id,
            account_id: account_id.to_owned(),
            name: name.to_owned(),
            lookup_prefix: lookup_prefix.to_owned(),
            allowed_models: limits.allowed_models.clone(),
            spend_cap_micros: limits.spend_cap_micros,
            requests_per_minute,
            created_at_ms,
            revoked_at_ms: None,
            key_sha256: key_sha256.to_owned(),
        })
    }

    /// One key of one account; another account's key is `NotFound`.
    pub async fn key(&self, account_id: &str, id: &str) -> StoreResult<ApiKey> {
        let r = sqlx::query("SELECT * FROM api_keys WHERE id = $1 AND account_id = $2")
            .bind(id)
            .bind(account_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(ApiKey::from_row(&r)?)
    }

    pub async fn keys(&self, account_id: &str, limit: u32) -> StoreResult<Vec<ApiKey>> {
        let rows = sqlx::query(
            "SELECT * FROM api_keys WHERE account_id = $1 ORDER BY created_at, id LIMIT $2",
        )
        .bind(account_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        decode_all(&rows, ApiKey::from_row)
    }

    pub async fn set_key_limits(
        &self,
        account_id: &str,
        id: &str,
        limits: &KeyLimits,
    ) -> StoreResult<ApiKey> {
        let mut tx = self.write().await?;
        let n = sqlx::query(
            "UPDATE api_keys SET allowed_models = $1, spend_cap_micros = $2, \
             requests_per_minute = $3 WHERE id = $4 AND account_id = $5 AND revoked_at IS NULL",
        )
        .bind(limits.allowed_models.as_ref().map(to_json))
        .bind(limits.spend_cap_micros)
        .bind(limits.requests_per_minute)
        .bind(id)
        .bind(account_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        bump_for(&mut tx, Changed::Key, id).await?;
        tx.commit().await?;
        self.key(account_id, id).await
    }

    /// Revokes a key; revoking a revoked key changes nothing and is not an error.
    pub async fn revoke_key(&self, account_id: &str, id: &str) -> StoreResult<ApiKey> {
        let key = self.key(account_id, id).await?;
        if key.revoked_at_ms.is_some() {
            return Ok(key);
        }
        let mut tx = self.write().await?;
        let revoked =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if revoked == 0 {
            // Revoked meanwhile by another call.
            drop(tx);
            return self.key(account_id, id).await;
        }
        sqlx::query("UPDATE accounts SET live_keys = live_keys - 1 WHERE id = $1")
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        bump_for(&mut tx, Changed::Key, id).await?;
        tx.commit().await?;
        self.key(account_id, id).await
    }

    /// Every key a proxy should accept: not revoked, of an active buyer account.
    pub async fn live_keys(&self) -> StoreResult<Vec<ApiKey>> {
        let rows = sqlx::query(
            "SELECT k.* FROM api_keys k JOIN accounts a ON a.id = k.account_id \
             WHERE k.revoked_at IS NULL AND a.status = 'active' AND a.role <> 'seller' \
             ORDER BY k.id",
        )
        .fetch_all(&self.pool)
        .await?;
        decode_all(&rows, ApiKey::from_row)
    }

    /// The current version and what the versions after `after` up to it changed, when each
    /// changed keys, pools or the catalog alone (`None` otherwise): the keys with whether a
    /// proxy should accept each now (what `live_keys` selects), and whether pools or the
    /// catalog changed (the pools are read with [`Store::changed_pools`]). The version and the
    /// kinds of change are one read.
    pub async fn changes_since(&self, after: i64) -> StoreResult<(i64, Option<Changes>)> {
        let rows = sqlx::query(
            "SELECT DISTINCT v.version AS top, c.version, c.kind FROM config_version v \
             LEFT JOIN config_changes c ON c.version > $1 AND c.version <= v.version \
             WHERE v.id = 1",
        )
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        let to: i64 = match rows.first() {
            Some(row) => row.try_get("top")?,
            None => return Err(StoreError::NotFound),
        };
        if to <= after {
            return Ok((to, None));
        }
        let mut versions = std::collections::HashSet::new();
        let mut changes = Changes::default();
        for row in &rows {
            let Some(version) = row.try_get::<Option<i64>, _>("version")? else {
                continue; // no change after `after`
            };
            versions.insert(version);
            match row.try_get::<String, _>("kind")?.as_str() {
                "key" => changes.keys_changed = true,
                "pool" => changes.pools = true,
                "catalog" => changes.catalog = true,
                // A kind this build does not know (a newer replica): everything.
                _ => return Ok((to, None)),
            }
        }
        // A version with no row changed something else.
        if versions.len() as i64 != to - after {
            return Ok((to, None));
        }
        if !changes.keys_changed {
            return Ok((to, Some(changes)));
        }
        let rows = sqlx::query(
            "SELECT k.*, a.status AS account_status, a.role AS account_role \
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id IN \
             (SELECT item_id FROM config_changes WHERE kind = 'key' AND version > $1 \
             AND version <= $2)",
        )
        .bind(after)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        for row in &rows {
            let key = ApiKey::from_row(row)?;
            // What `live_keys` selects.
            let live = key.revoked_at_ms.is_none()
                && row.try_get::<String, _>("account_status")? == "active"
                && row.try_get::<String, _>("account_role")? != "seller";
            changes.keys.push((key, live));
        }
        Ok((to, Some(changes)))
    }

    /// The pools the versions after `after` up to `to` changed that proxies may use now
    /// (as [`Store::servable_pools`] selects them), with their credentials; and the ids of
    /// all the pools they changed.
    pub async fn changed_pools(
        &self,
        after: i64,
        to: i64,
        now_ms: i64,
    ) -> StoreResult<(Vec<(Pool, Credential)>, Vec<String>)> {
        let changed = |after: u8, to: u8| {
            format!(
                "(SELECT item_id FROM config_changes WHERE kind = 'pool' \
                 AND version > ${after} AND version <= ${to})"
            )
        };
        let rows = sqlx::query(&format!(
            "SELECT p.*, c.provider {SERVABLE_POOLS} AND p.id IN {}",
            changed(2, 3)
        ))
        .bind(now_ms)
        .bind(after)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        let creds = sqlx::query(&format!(
            "SELECT * FROM credentials WHERE deleted_at IS NULL AND id IN \
             (SELECT credential_id FROM pools WHERE id IN {})",
            changed(1, 2)
        ))
        .bind(after)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT item_id FROM config_changes WHERE kind = 'pool' \
             AND version > $1 AND version <= $2",
        )
        .bind(after)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        Ok((with_credentials(&rows, &creds)?, ids))
    }

    /// Forgets what versions up to `through` changed (a proxy that far behind gets everything
    /// anyway).
    pub async fn forget_changes(&self, through: i64) -> StoreResult<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM config_changes WHERE version <= $1")
            .bind(through)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The key with this hash if a proxy should accept it.
    pub async fn live_key(&self, key_sha256: &str) -> StoreResult<Option<ApiKey>> {
        let row = sqlx::query(
            "SELECT k.* FROM api_keys k JOIN accounts a ON a.id = k.account_id \
             WHERE k.key_sha256 = $1 AND k.revoked_at IS NULL AND a.status = 'active' \
             AND a.role <> 'seller'",
        )
        .bind(key_sha256)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(ApiKey::from_row).transpose()?)
    }

    /// The keys of one account, whatever their state (to re-announce them to hot state).
    pub async fn account_key_hashes(&self, account_id: &str) -> StoreResult<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT key_sha256 FROM api_keys WHERE account_id = $1")
                .bind(account_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    // ---- wallets and ledger -------------------------------------------------------------------

    /// A wallet's balance: its running total (the ledger check holds it equal to the sum of
    /// the wallet's postings).
    pub async fn balance(&self, account_id: &str) -> StoreResult<i64> {
        self.ledger_balance(&wallet_account(account_id)).await
    }

    pub async fn wallet_entries(
        &self,
        account_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<LedgerEntry>> {
        // Explicit transactions (grants, refunds) and the usage journal (one row a request).
        let rows = sqlx::query(
            "SELECT t.id, t.kind, t.memo, p.amount_micros, t.created_at \
             FROM ledger_postings p JOIN ledger_transactions t ON t.id = p.transaction_id \
             WHERE p.ledger_account = $1 \
             UNION ALL \
             SELECT request_id, 'usage', COALESCE(model, ''), -buyer_cost_micros, started_at \
             FROM usage_records WHERE account_id = $2 AND buyer_cost_micros > 0 \
             ORDER BY 5 DESC, 1 DESC LIMIT $3",
        )
        .bind(wallet_account(account_id))
        .bind(account_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LedgerEntry {
                    transaction_id: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    memo: r.try_get(2)?,
                    amount_micros: r.try_get(3)?,
                    created_at_ms: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// An operator's credit grant, idempotent per `reference`: the second call with the same
    /// reference returns the first transaction and moves no money. `Ok((id, created))`.
    pub async fn grant_credit(
        &self,
        account_id: &str,
        amount_micros: i64,
        memo: &str,
        reference: &str,
    ) -> StoreResult<(String, bool)> {
        self.account(account_id).await?;
        let key = format!("grant:{account_id}:{reference}");
        if let Some(id) = self.transaction_by_key(&key).await? {
            return Ok((id, false));
        }
        let mut tx = self.write().await?;
        let result = ledger::post(
            &mut tx,
            "credit_grant",
            &key,
            memo,
            &[
                (&wallet_account(account_id), amount_micros),
                (GRANTS, -amount_micros),
            ],
        )
        .await;
        match result {
            Ok((id, _)) => {
                tx.commit().await?;
                Ok((id, true))
            }
            // A concurrent grant with the same reference won the race: same answer as a replay.
            Err(StoreError::Conflict(_)) => {
                drop(tx);
                let id = self
                    .transaction_by_key(&key)
                    .await?
                    .ok_or(StoreError::NotFound)?;
                Ok((id, false))
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn transaction_by_key(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM ledger_transactions WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Sum of every posting ever made: zero while double entry holds.
    pub async fn ledger_imbalance(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(amount_micros), 0) AS BIGINT) FROM ledger_postings",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    // ---- credentials -------------------------------------------------------------------------

    /// Stores a credential sealed by `seal`, which is given the new record's id (bound as
    /// associated data) and returns the sealed secret.
    pub async fn create_credential(
        &self,
        account_id: &str,
        provider: &str,
        label: &str,
        public: &serde_json::Value,
        custom_endpoint: bool,
        seal: impl FnOnce(&str) -> Result<crate::sealing::Sealed, crate::sealing::SealError>,
    ) -> StoreResult<Credential> {
        let id = ids::new("cred");
        let sealed = seal(&id).map_err(|e| StoreError::Conflict(format!("sealing: {e}")))?;
        sqlx::query(
            "INSERT INTO credentials (id, account_id, provider, label, public_fields, \
             kek_version, wrapped_dek, ciphertext, created_at, custom_endpoint) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(provider)
        .bind(label)
        .bind(public.to_string())
        .bind(i64::from(sealed.kek_version))
        .bind(hex::encode(&sealed.wrapped_dek))
        .bind(hex::encode(&sealed.ciphertext))
        .bind(now_ms())
        .bind(i64::from(custom_endpoint))
        .execute(&self.writer)
        .await?;
        self.credential(account_id, &id).await
    }

    pub async fn credential(&self, account_id: &str, id: &str) -> StoreResult<Credential> {
        let r = sqlx::query(
            "SELECT * FROM credentials WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(account_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(Credential::from_row(&r)?)
    }

    pub async fn credentials(&self, account_id: &str, limit: u32) -> StoreResult<Vec<Credential>> {
        let rows = sqlx::query(
            "SELECT * FROM credentials WHERE account_id = $1 AND deleted_at IS NULL \
             ORDER BY created_at, id LIMIT $2",
        )
        .bind(account_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        decode_all(&rows, Credential::from_row)
    }

    /// Every stored credential, for key rotation.
    pub async fn all_credentials(&self) -> StoreResult<Vec<Credential>> {
        let rows = sqlx::query("SELECT * FROM credentials ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        decode_all(&rows, Credential::from_row)
    }

    /// Replaces a credential's sealed secret (re-wrapped under a newer key-encryption key).
    pub async fn replace_sealed(
        &self,
        id: &str,
        sealed: &crate::sealing::Sealed,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE credentials SET kek_version = $1, wrapped_dek = $2, ciphertext = $3 \
             WHERE id = $4",
        )
        .bind(i64::from(sealed.kek_version))
        .bind(hex::encode(&sealed.wrapped_dek))
        .bind(hex::encode(&sealed.ciphertext))
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Replaces a credential's secret and public fields (the provider stays): its pools serve
    /// again only once it is verified, and — when its endpoint changed — approved again. A new
    /// configuration; proxies see another credential and forget its pools' back-offs.
    pub async fn replace_credential(
        &self,
        account_id: &str,
        id: &str,
        public: &serde_json::Value,
        custom_endpoint: bool,
        seal: impl FnOnce(&str) -> Result<crate::sealing::Sealed, crate::sealing::SealError>,
    ) -> StoreResult<Credential> {
        let current = self.credential(account_id, id).await?;
        let same_endpoint = current.public == *public && current.custom_endpoint == custom_endpoint;
        let sealed = seal(id).map_err(|e| StoreError::Conflict(format!("sealing: {e}")))?;
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE credentials SET public_fields = $1, custom_endpoint = $2, kek_version = $3, \
             wrapped_dek = $4, ciphertext = $5, verified_at = NULL, verify_status = NULL, \
             approved_at = CASE WHEN $6 = 1 THEN approved_at ELSE NULL END \
             WHERE id = $7 AND account_id = $8 AND deleted_at IS NULL",
        )
        .bind(public.to_string())
        .bind(i64::from(custom_endpoint))
        .bind(i64::from(sealed.kek_version))
        .bind(hex::encode(&sealed.wrapped_dek))
        .bind(hex::encode(&sealed.ciphertext))
        .bind(i64::from(same_endpoint))
        .bind(id)
        .bind(account_id)
        .execute(&mut *tx)
        .await?;
        bump_for_credential(&mut tx, id).await?;
        tx.commit().await?;
        self.credential(account_id, id).await
    }

    pub async fn record_verification(
        &self,
        account_id: &str,
        id: &str,
        status: &str,
    ) -> StoreResult<Credential> {
        // Whether its pools serve depends on it: a new configuration.
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE credentials SET verified_at = $1, verify_status = $2 \
             WHERE id = $3 AND account_id = $4",
        )
        .bind(now_ms())
        .bind(status)
        .bind(id)
        .bind(account_id)
        .execute(&mut *tx)
        .await?;
        bump_for_credential(&mut tx, id).await?;
        tx.commit().await?;
        self.credential(account_id, id).await
    }

    /// Deletes a credential no live or paused pool uses. Its sealed secret is erased.
    pub async fn delete_credential(&self, account_id: &str, id: &str) -> StoreResult<()> {
        self.credential(account_id, id).await?;
        let in_use: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pools WHERE credential_id = $1 AND status <> 'exhausted'",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        if in_use > 0 {
            return Err(StoreError::Conflict(
                "pools still use this credential; mark them exhausted first".to_owned(),
            ));
        }
        sqlx::query(
            "UPDATE credentials SET deleted_at = $1, wrapped_dek = '', ciphertext = '' \
             WHERE id = $2 AND account_id = $3",
        )
        .bind(now_ms())
        .bind(id)
        .bind(account_id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    // ---- pools -------------------------------------------------------------------------------

    pub async fn create_pool(&self, account_id: &str, new: &NewPool) -> StoreResult<Pool> {
        let cred = self.credential(account_id, &new.credential_id).await?;
        let id = ids::new("pool");
        let mut tx = self.write().await?;
        // The new push version doubles as the FIFO position: strictly increasing, one writer.
        let seq = bump_for(&mut tx, Changed::Pool, &id).await?;
        sqlx::query(
            "INSERT INTO pools (id, account_id, credential_id, face_value_micros, \
             price_ratio_ppm, models, status, expires_at, listed_seq, listed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'live', $7, $8, $9)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(&cred.id)
        .bind(new.face_value_micros)
        .bind(new.price_ratio_ppm)
        .bind(to_json(&new.models))
        .bind(new.expires_at_ms)
        .bind(seq)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.pool(account_id, &id).await
    }

    pub async fn pool(&self, account_id: &str, id: &str) -> StoreResult<Pool> {
        let r = sqlx::query(
            "SELECT p.*, c.provider FROM pools p JOIN credentials c ON c.id = p.credential_id \
             WHERE p.id = $1 AND p.account_id = $2",
        )
        .bind(id)
        .bind(account_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(Pool::from_row(&r)?)
    }

    pub async fn pools(&self, account_id: &str, limit: u32) -> StoreResult<Vec<Pool>> {
        let rows = sqlx::query(
            "SELECT p.*, c.provider FROM pools p JOIN credentials c ON c.id = p.credential_id \
             WHERE p.account_id = $1 ORDER BY p.listed_seq LIMIT $2",
        )
        .bind(account_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        decode_all(&rows, Pool::from_row)
    }

    pub async fn change_pool(
        &self,
        account_id: &str,
        id: &str,
        change: &PoolChange,
    ) -> StoreResult<Pool> {
        let mut pool = self.pool(account_id, id).await?;
        if pool.status == tokn_config::PoolStatus::Exhausted && change.status.is_some() {
            return Err(StoreError::Conflict(
                "an exhausted pool stays exhausted; list a new one".to_owned(),
            ));
        }
        if pool.held_by_operator && !change.by_operator && change.status.is_some() {
            return Err(StoreError::Conflict(
                "the operator paused this pool; only the operator resumes it".to_owned(),
            ));
        }
        if let Some(s) = change.status {
            pool.status = s;
            if change.by_operator {
                pool.held_by_operator = s == tokn_config::PoolStatus::Paused;
            }
        }
        let raised = change
            .price_ratio_ppm
            .is_some_and(|r| r > pool.price_ratio_ppm);
        if let Some(r) = change.price_ratio_ppm {
            pool.price_ratio_ppm = r;
        }
        if let Some(e) = change.expires_at_ms {
            pool.expires_at_ms = e;
        }
        let mut tx = self.write().await?;
        let version = bump_for(&mut tx, Changed::Pool, id).await?;
        // A lower price keeps the pool's place; a higher one sends it to the back of the queue
        // (a seller cannot raise the price of capacity buyers are already queued on).
        let listed_seq = if raised { version } else { pool.listed_seq };
        sqlx::query(
            "UPDATE pools SET status = $1, price_ratio_ppm = $2, expires_at = $3, listed_seq = $4, \
             operator_hold = $5 WHERE id = $6 AND account_id = $7",
        )
        .bind(pool.status.as_str())
        .bind(pool.price_ratio_ppm)
        .bind(pool.expires_at_ms)
        .bind(listed_seq)
        .bind(i64::from(pool.held_by_operator))
        .bind(id)
        .bind(account_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.pool(account_id, id).await
    }

    /// The account that owns a pool (for the operator's actions on any pool).
    pub async fn pool_owner(&self, id: &str) -> StoreResult<String> {
        Ok(
            sqlx::query_scalar("SELECT account_id FROM pools WHERE id = $1")
                .bind(id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// The operator approves a credential's custom endpoint: its pools may serve.
    pub async fn approve_credential(&self, id: &str) -> StoreResult<Credential> {
        let mut tx = self.write().await?;
        let account: String = sqlx::query_scalar(
            "UPDATE credentials SET approved_at = $1 WHERE id = $2 AND deleted_at IS NULL \
             RETURNING account_id",
        )
        .bind(now_ms())
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        bump_for_credential(&mut tx, id).await?;
        tx.commit().await?;
        self.credential(&account, id).await
    }

    /// Pools proxies may use, FIFO: live, unexpired, of active seller accounts, on a verified
    /// credential (and an approved endpoint when the seller chose it), with the credential each
    /// needs.
    pub async fn servable_pools(&self, now_ms: i64) -> StoreResult<Vec<(Pool, Credential)>> {
        let rows = sqlx::query(&format!(
            "SELECT p.*, c.provider {SERVABLE_POOLS} ORDER BY p.listed_seq"
        ))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        // The credentials those pools use, in one query rather than one per pool.
        let creds = sqlx::query(
            "SELECT * FROM credentials WHERE deleted_at IS NULL AND id IN \
             (SELECT credential_id FROM pools WHERE status = 'live')",
        )
        .fetch_all(&self.pool)
        .await?;
        with_credentials(&rows, &creds)
    }

    // ---- catalog -----------------------------------------------------------------------------

    /// Adds a price version of a model (a new model when it has none). Its version number is
    /// the push version it was created at.
    pub async fn add_price(&self, p: &ModelPrice) -> StoreResult<ModelPrice> {
        let mut tx = self.write().await?;
        let version = bump_for(&mut tx, Changed::Catalog, "").await?;
        if let Some(existing) = sqlx::query_scalar::<_, String>(
            "SELECT provider FROM model_prices WHERE model_id = $1 LIMIT 1",
        )
        .bind(&p.model_id)
        .fetch_optional(&mut *tx)
        .await?
        {
            if existing != p.provider {
                return Err(StoreError::Conflict(format!(
                    "model `{}` is a {existing} model",
                    p.model_id
                )));
            }
        }
        if is_alias(&mut tx, &p.model_id).await? {
            return Err(StoreError::Conflict(format!(
                "`{}` is an alias of another model",
                p.model_id
            )));
        }
        insert_price(&mut tx, p, version).await?;
        tx.commit().await?;
        Ok(ModelPrice {
            version,
            ..p.clone()
        })
    }

    /// Names `model_id` also as `alias` (or points an alias at another model). The model must
    /// exist and the alias must not be a model id.
    pub async fn set_alias(&self, alias: &str, model_id: &str) -> StoreResult<ModelAlias> {
        let mut tx = self.write().await?;
        bump_for(&mut tx, Changed::Catalog, "").await?;
        insert_alias(&mut tx, alias, model_id).await?;
        tx.commit().await?;
        Ok(ModelAlias {
            alias: alias.to_owned(),
            model_id: model_id.to_owned(),
        })
    }

    /// Removes an alias; `NotFound` when there is none.
    pub async fn remove_alias(&self, alias: &str) -> StoreResult<()> {
        let mut tx = self.write().await?;
        bump_for(&mut tx, Changed::Catalog, "").await?;
        let gone = sqlx::query("DELETE FROM model_aliases WHERE alias = $1")
            .bind(alias)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if gone == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every alias, by name.
    pub async fn aliases(&self) -> StoreResult<Vec<ModelAlias>> {
        let rows = sqlx::query("SELECT alias, model_id FROM model_aliases ORDER BY alias")
            .fetch_all(&self.pool)
            .await?;
        decode_all(&rows, |r| {
            Ok(ModelAlias {
                alias: r.try_get("alias")?,
                model_id: r.try_get("model_id")?,
            })
        })
    }

    /// Loads a catalog as one version when the store has none (first start).
    pub async fn seed_catalog(
        &self,
        prices: &[ModelPrice],
        aliases: &[ModelAlias],
    ) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM model_prices")
            .fetch_one(&mut *tx)
            .await?;
        if n > 0 {
            return Ok(false);
        }
        let version = bump_for(&mut tx, Changed::Catalog, "").await?;
        for p in prices {
            insert_price(&mut tx, p, version).await?;
        }
        for a in aliases {
            insert_alias(&mut tx, &a.alias, &a.model_id).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Every price version of every model, by model then version.
    pub async fn prices(&self) -> StoreResult<Vec<ModelPrice>> {
        let rows =
            sqlx::query("SELECT * FROM model_prices ORDER BY model_id, effective_at, version")
                .fetch_all(&self.pool)
                .await?;
        decode_all(&rows, ModelPrice::from_row)
    }

    /// Each model's supply: what the servable pools listing it have left, and the price ratio
    /// of the pool first in its queue (what the next request pays).
    pub async fn supply(&self, now_ms: i64) -> StoreResult<BTreeMap<String, Supply>> {
        let rows = sqlx::query(&format!(
            "SELECT p.models, p.face_value_micros, p.consumed_micros, p.price_ratio_ppm \
             {SERVABLE_POOLS} ORDER BY p.listed_seq"
        ))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut out: BTreeMap<String, Supply> = BTreeMap::new();
        for r in &rows {
            let models: Vec<String> = parse_json(&r.try_get::<String, _>(0)?)?;
            let left = (r.try_get::<i64, _>(1)? - r.try_get::<i64, _>(2)?).max(0);
            let ratio: i64 = r.try_get(3)?;
            for model in models {
                let supply = out.entry(model).or_insert(Supply {
                    live_pools: 0,
                    face_value_left_micros: 0,
                    price_ratio_ppm: ratio,
                });
                supply.live_pools += 1;
                supply.face_value_left_micros += left;
            }
        }
        Ok(out)
    }

    /// Raw access for tests that inspect what is stored (the canary search); the readers'
    /// pool for the crate's own reads.
    pub fn raw(&self) -> &AnyPool {
        &self.pool
    }

    /// Where a single write statement goes (on SQLite, the one writer connection).
    pub(crate) fn writer(&self) -> &AnyPool {
        &self.writer
    }
}

fn decode_all<T>(
    rows: &[AnyRow],
    decode: fn(&AnyRow) -> Result<T, sqlx::Error>,
) -> StoreResult<Vec<T>> {
    rows.iter().map(|r| decode(r).map_err(Into::into)).collect()
}

/// Writes one price version of one model.
async fn insert_price(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    p: &ModelPrice,
    version: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO model_prices (model_id, version, provider, upstream_model, input_micros, \
         output_micros, cached_input_micros, effective_at, created_at, max_output_tokens, \
         cache_write_micros, cache_write_1h_micros) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&p.model_id)
    .bind(version)
    .bind(&p.provider)
    .bind(&p.upstream_model)
    .bind(p.input_price_micros_per_mtok)
    .bind(p.output_price_micros_per_mtok)
    .bind(p.cached_input_price_micros_per_mtok)
    .bind(p.effective_at_ms)
    .bind(now_ms())
    .bind(p.max_output_tokens)
    .bind(p.cache_write_price_micros_per_mtok)
    .bind(p.cache_write_1h_price_micros_per_mtok)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes an alias (replacing where it pointed), after checking the model exists and the
/// alias names no model.
async fn insert_alias(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    alias: &str,
    model_id: &str,
) -> StoreResult<()> {
    let known = |id: &str| {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM model_prices WHERE model_id = $1")
            .bind(id.to_owned())
    };
    if known(alias).fetch_one(&mut **tx).await? > 0 {
        return Err(StoreError::Conflict(format!(
            "`{alias}` is a model id, not free for an alias"
        )));
    }
    if known(model_id).fetch_one(&mut **tx).await? == 0 {
        return Err(StoreError::NotFound);
    }
    sqlx::query(
        "INSERT INTO model_aliases (alias, model_id, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (alias) DO UPDATE SET model_id = excluded.model_id",
    )
    .bind(alias)
    .bind(model_id)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn is_alias(tx: &mut sqlx::Transaction<'_, sqlx::Any>, id: &str) -> StoreResult<bool> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM model_aliases WHERE alias = $1")
        .bind(id)
        .fetch_one(&mut **tx)
        .await?;
    Ok(n > 0)
}

/// SQLite's page cache per connection: its default (2 MiB) holds a small fraction of a store
/// at marketplace scale (10⁵ keys, 10⁴ pools), and every page it misses is read again.
async fn sqlite_cache(conn: &mut sqlx::AnyConnection, sqlite: bool) -> Result<(), sqlx::Error> {
    if sqlite {
        sqlx::query("PRAGMA cache_size = -32768")
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// A new configuration version. The caller records what it changed ([`record_changes`]), or
/// proxies behind it are sent the whole configuration.
pub(crate) async fn bump(conn: &mut Conn<'_>) -> StoreResult<i64> {
    let rows: Vec<(i64,)> = conn
        .fetch_all(
            "UPDATE config_version SET version = version + 1 WHERE id = 1 RETURNING version",
            Vec::new(),
        )
        .await?;
    rows.first().map(|r| r.0).ok_or(StoreError::NotFound)
}

/// What a configuration version changed, when proxies can be sent that alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Changed {
    Key,
    Pool,
    Catalog,
}

impl Changed {
    fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Pool => "pool",
            Self::Catalog => "catalog",
        }
    }
}

/// What versions changed, from [`Store::changes`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Keys changed, each with whether a proxy should accept it now.
    pub keys: Vec<(ApiKey, bool)>,
    keys_changed: bool,
    /// Some pool changed ([`Store::changed_pools`] says which).
    pub pools: bool,
    /// Prices or models changed.
    pub catalog: bool,
}

/// A new configuration version that changed one item alone (`id`: a key's or a pool's; empty
/// for the catalog). On Postgres one statement, so the version row — which every change locks —
/// is held for that statement and the commit only: key creations by many clients wait on it
/// in turn.
pub(crate) async fn bump_for(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    kind: Changed,
    id: &str,
) -> StoreResult<i64> {
    if tx.backend_name() == "PostgreSQL" {
        return Ok(sqlx::query_scalar(
            "WITH v AS (UPDATE config_version SET version = version + 1 WHERE id = 1 \
             RETURNING version) INSERT INTO config_changes (version, kind, item_id) \
             SELECT version, $1, $2 FROM v RETURNING version",
        )
        .bind(kind.as_str())
        .bind(id)
        .fetch_one(&mut **tx)
        .await?);
    }
    let version = bump(&mut Conn::Any(tx)).await?;
    sqlx::query("INSERT INTO config_changes (version, kind, item_id) VALUES ($1, $2, $3)")
        .bind(version)
        .bind(kind.as_str())
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(version)
}

/// Records that `version` changed every `kind` row of `table` whose `column` is `value`.
pub(crate) async fn record_changes(
    conn: &mut Conn<'_>,
    version: i64,
    kind: Changed,
    table: &str,
    column: &str,
    value: &str,
) -> StoreResult<()> {
    conn.execute(
        &format!(
            "INSERT INTO config_changes (version, kind, item_id) \
             SELECT $1, $2, id FROM {table} WHERE {column} = $3"
        ),
        vec![
            Param::Int(version),
            Param::Text(kind.as_str().to_owned()),
            Param::Text(value.to_owned()),
        ],
    )
    .await?;
    Ok(())
}

/// A new version that changed the pools on credential `id` (replaced, verified, approved).
async fn bump_for_credential(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
) -> StoreResult<i64> {
    let conn = &mut Conn::Any(tx);
    let version = bump(conn).await?;
    record_changes(conn, version, Changed::Pool, "pools", "credential_id", id).await?;
    Ok(version)
}

/// Pool rows, in their order, each with its credential among `creds` (a pool whose credential
/// was deleted between the two reads is left out: it is not served).
fn with_credentials(
    rows: &[sqlx::any::AnyRow],
    creds: &[sqlx::any::AnyRow],
) -> StoreResult<Vec<(Pool, Credential)>> {
    let by_id: std::collections::HashMap<String, Credential> =
        decode_all(creds, Credential::from_row)?
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect();
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let pool = Pool::from_row(r)?;
        if let Some(cred) = by_id.get(&pool.credential_id) {
            out.push((pool, cred.clone()));
        }
    }
    Ok(out)
}
