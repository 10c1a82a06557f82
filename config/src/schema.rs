//! The configuration file as written by an operator: every section rejects unknown fields.

use serde::{Deserialize, Serialize};

use crate::credential::Credential;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub usage: UsageConfig,
    /// The model catalog with list prices; until the control plane pushes one.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// Seller pools, in FIFO order: the first listed live pool serving a model is used first.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// Buyer keys.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Where catalog, pools and keys come from when a control plane pushes them.
    #[serde(default)]
    pub control: Option<ControlConfig>,
    /// The proxy's hot state (key cache, rate and spend counters): Redis, or in-process.
    #[serde(default)]
    pub hot_state: HotStateConfig,
}

/// A proxy fed by the control plane: `models`, `pools` and `keys` in the file must be empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Base URL of the control plane, e.g. `https://control.internal:7070`.
    pub url: String,
    /// The proxy token the control plane was given (`proxy_token`); usually `env:NAME`.
    pub token: SecretRef,
    /// Where the last good configuration is kept for a start while the control plane is down.
    #[serde(default = "default_snapshot_path")]
    pub snapshot_path: String,
    /// 64 hex digits: the AES-256-GCM key the persisted snapshot is sealed with (it holds
    /// seller credentials). Usually `env:NAME`.
    pub snapshot_key: SecretRef,
    /// How long one watch request waits for a change before it is renewed.
    #[serde(default = "default_watch_timeout_s")]
    pub watch_timeout_s: u64,
    /// PEM bundle of CAs trusted for the control plane's TLS instead of the platform store.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// PEM certificate (chain) and private key this proxy presents to a control plane that
    /// requires client certificates (`[tls] client_ca_file` there). Both or neither.
    #[serde(default)]
    pub client_cert_file: Option<String>,
    #[serde(default)]
    pub client_key_file: Option<String>,
}

fn default_snapshot_path() -> String {
    "tokn-snapshot.sealed".to_owned()
}

fn default_watch_timeout_s() -> u64 {
    25
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotStateConfig {
    /// `redis://host:port/db`; none keeps hot state in process (one proxy, no services).
    pub redis_url: Option<SecretRef>,
    /// Prefix of every Redis key and channel, so deployments can share a server.
    pub prefix: String,
    /// How long a key looked up in Redis is trusted without asking again. Changes and
    /// revocations are also pushed at once over pub/sub; this bounds staleness if a message is
    /// lost.
    pub key_cache_ttl_ms: u64,
    /// Keys kept in the in-process cache.
    pub key_cache_entries_max: usize,
    /// When balances cannot be checked (Redis unreachable or not yet loaded).
    pub on_balance_unavailable: BalancePolicy,
    /// With `local_allowance`: what each key may spend through this proxy while balances
    /// cannot be checked, micro-USD.
    pub local_allowance_micros: u64,
}

/// What a proxy does when it cannot check a buyer's balance: refuse (503, never overspend), or
/// let each key spend a small allowance per proxy (bounded overspend: allowance × keys ×
/// proxies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancePolicy {
    #[default]
    FailClosed,
    LocalAllowance,
}

impl Default for HotStateConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            prefix: "tokn:".to_owned(),
            key_cache_ttl_ms: 30_000,
            key_cache_entries_max: 100_000,
            on_balance_unavailable: BalancePolicy::FailClosed,
            local_allowance_micros: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Plain HTTP listen addresses (`host:port`).
    pub listen: Vec<String>,
    /// HTTPS listen addresses; need `tls_cert_path` and `tls_key_path`. HTTP/2 via ALPN.
    pub tls_listen: Vec<String>,
    pub tls_cert_path: Option<String>,
    pub tls_key_path: Option<String>,
    /// PEM bundle of CAs trusted for upstream TLS instead of the platform store (private CAs,
    /// self-hosted upstreams).
    pub upstream_ca_file: Option<String>,
    /// Prometheus `/metrics` listen address; none disables the endpoint.
    pub metrics_listen: Option<String>,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// How long a graceful shutdown (SIGTERM) waits for in-flight requests.
    pub grace_period_s: u64,
    /// The Unix socket a graceful upgrade hands the listening sockets over (SIGQUIT to the
    /// running process, a new one started with `--upgrade`). Its directory must be private to
    /// this user. Default: `sock` in `{usage.spool_dir}.upgrade/`, created private, so two
    /// proxies on one host never share one.
    pub upgrade_sock: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:8080".to_owned()],
            tls_listen: Vec::new(),
            tls_cert_path: None,
            tls_key_path: None,
            upstream_ca_file: None,
            metrics_listen: Some("127.0.0.1:9090".to_owned()),
            threads: 2,
            grace_period_s: 30,
            upgrade_sock: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body accepted; larger ones get 413 and never reach an upstream.
    pub request_body_bytes_max: usize,
    /// Largest non-streaming upstream response body the proxy will buffer.
    pub response_body_bytes_max: usize,
    /// Time allowed to receive the whole request body from the client.
    pub request_body_timeout_ms: u64,
    /// TCP connect timeout to an upstream.
    pub upstream_connect_timeout_ms: u64,
    /// TCP + TLS connect timeout to an upstream.
    pub upstream_tls_timeout_ms: u64,
    /// Time allowed for the upstream's response header (time to first byte).
    pub upstream_header_timeout_ms: u64,
    /// Longest silence between two upstream body reads (a hung stream is cut after this).
    pub upstream_idle_read_timeout_ms: u64,
    /// Longest a whole request may take, streaming included.
    pub request_total_timeout_ms: u64,
    /// How long an idle pooled upstream connection is kept.
    pub upstream_keepalive_idle_s: u64,
    /// Idle connections kept per worker thread for all upstreams together.
    pub upstream_keepalive_pool_size: usize,
    /// Concurrent requests multiplexed on one HTTP/2 upstream connection.
    pub upstream_h2_streams_max: usize,
    /// Pools tried for one request (the first plus failovers).
    pub failover_attempts_max: usize,
    /// A pool whose credential was refused (401/403) is skipped for this long.
    pub credential_quarantine_ms: u64,
    /// A pool that throttled (429), failed (5xx) or could not be reached is skipped for this
    /// long, or for its `retry-after` if that is shorter than `throttle_backoff_max_ms`.
    pub throttle_backoff_ms: u64,
    pub throttle_backoff_max_ms: u64,
    /// Errors in a row (5xx, no connection) that eject a pool; it is out for
    /// `throttle_backoff_ms`, doubled with each ejection in a row up to `throttle_backoff_max_ms`,
    /// and a success ends it. One error never takes a pool out.
    pub eject_after_failures: u32,
    /// Pools pushed by the control plane (sellers' endpoints) may reach internal addresses —
    /// loopback, private ranges, link-local (cloud metadata) and the rest that is not the public
    /// internet — after resolution. Off by default; pools in this file always may.
    pub allow_internal_upstreams: bool,
    /// Time from a request header's first byte to its end; past it the connection closes
    /// (slow clients, slowloris).
    pub request_header_timeout_ms: u64,
    /// Connections one client address may have sending a request header at once; more are
    /// closed.
    pub header_connections_per_ip_max: usize,
    /// Output tokens a reservation assumes for a request without `max_tokens`, of a model
    /// whose catalog entry names no output cap.
    pub reserve_output_tokens_default: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            request_body_bytes_max: 16 * 1024 * 1024,
            response_body_bytes_max: 32 * 1024 * 1024,
            request_body_timeout_ms: 30_000,
            upstream_connect_timeout_ms: 5_000,
            upstream_tls_timeout_ms: 10_000,
            upstream_header_timeout_ms: 300_000,
            upstream_idle_read_timeout_ms: 120_000,
            request_total_timeout_ms: 900_000,
            upstream_keepalive_idle_s: 60,
            upstream_keepalive_pool_size: 256,
            upstream_h2_streams_max: 100,
            failover_attempts_max: 3,
            credential_quarantine_ms: 300_000,
            throttle_backoff_ms: 10_000,
            throttle_backoff_max_ms: 60_000,
            eject_after_failures: 3,
            allow_internal_upstreams: false,
            request_header_timeout_ms: 10_000,
            header_connections_per_ip_max: 64,
            reserve_output_tokens_default: 4_096,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// JSON-lines audit log: one record per request, every request (rejected ones included).
    /// Empty: none (only with a control plane, whose spool holds every billed record).
    pub path: String,
    /// With a control plane: the spool directory (the write-ahead log of records not yet
    /// applied to the ledger).
    pub spool_dir: String,
    /// Most bytes the spool holds unshipped; a full spool refuses new records.
    pub spool_bytes_max: u64,
    /// A spool segment closes at this size.
    pub spool_segment_bytes_max: u64,
    /// How often the open segment is fsynced: a machine crash loses at most this much.
    pub spool_fsync_interval_ms: u64,
    /// What a full spool does to billed traffic.
    pub on_spool_full: SpoolFullPolicy,
    /// Most records shipped to the control plane in one batch.
    pub ship_batch_records_max: usize,
    /// How long the shipper waits when the spool is empty.
    pub ship_interval_ms: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            path: "tokn-usage.jsonl".to_owned(),
            spool_dir: "tokn-spool".to_owned(),
            spool_bytes_max: 1 << 30,
            spool_segment_bytes_max: 16 << 20,
            spool_fsync_interval_ms: 1_000,
            on_spool_full: SpoolFullPolicy::Refuse,
            ship_batch_records_max: 5_000,
            ship_interval_ms: 50,
        }
    }
}

/// A full spool: refuse billed requests (503, nothing served unbilled), or serve them and count
/// them as unbilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolFullPolicy {
    #[default]
    Refuse,
    ServeUnbilled,
}

/// The providers an adapter exists for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI or any server speaking its Chat Completions API (vLLM, llama.cpp, ...).
    Openai,
    /// Built in, no network: deterministic answers for demos and tests.
    Mock,
    Anthropic,
    /// AWS Bedrock (Converse).
    Bedrock,
    /// Google Vertex AI (service-account OAuth).
    Vertex,
    /// Google Gemini API (API key).
    Gemini,
    /// Azure OpenAI.
    Azure,
}

impl ProviderKind {
    pub const ALL: [Self; 7] = [
        Self::Openai,
        Self::Mock,
        Self::Anthropic,
        Self::Bedrock,
        Self::Vertex,
        Self::Gemini,
        Self::Azure,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Mock => "mock",
            Self::Anthropic => "anthropic",
            Self::Bedrock => "bedrock",
            Self::Vertex => "vertex",
            Self::Gemini => "gemini",
            Self::Azure => "azure",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name buyers put in `model`.
    pub id: String,
    pub provider: ProviderKind,
    /// The name the upstream knows the model by; defaults to `id`.
    pub upstream_model: Option<String>,
    /// Other names buyers may put in `model` (served and billed as `id`): Claude Code lists
    /// only `claude*` ids and sends the dated ids it knows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// List prices in micro-USD per 1M tokens.
    pub input_price_micros_per_mtok: u64,
    pub output_price_micros_per_mtok: u64,
    /// Cached prompt tokens; defaults to the input price.
    pub cached_input_price_micros_per_mtok: Option<u64>,
    /// Prompt tokens written to the provider's cache (Anthropic bills them above the input
    /// price); defaults to the input price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_price_micros_per_mtok: Option<u64>,
    /// Those written to a cache that lives an hour (Anthropic's `ttl: "1h"`, 2× input);
    /// defaults to the cache write price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h_price_micros_per_mtok: Option<u64>,
    /// The most output tokens one request can produce: what a reservation holds when the
    /// request names no `max_tokens` (`limits.reserve_output_tokens_default` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Unix seconds shown as `created` in `/v1/models`.
    #[serde(default)]
    pub created: u64,
    /// The catalog version the prices above belong to (0 in a hand-written file).
    #[serde(default)]
    pub price_version: u64,
    /// Price versions that take effect later, in effective order. A request is priced by the
    /// version in force when it started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scheduled_prices: Vec<ScheduledPrice>,
}

/// A later price version of a model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduledPrice {
    pub version: u64,
    /// Unix milliseconds from which these prices apply.
    pub effective_at_ms: u64,
    pub input_price_micros_per_mtok: u64,
    pub output_price_micros_per_mtok: u64,
    pub cached_input_price_micros_per_mtok: u64,
    /// The input price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_price_micros_per_mtok: Option<u64>,
    /// The cache write price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h_price_micros_per_mtok: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolStatus {
    #[default]
    Live,
    Paused,
    /// Its face value is used up.
    Exhausted,
}

impl PoolStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Paused => "paused",
            Self::Exhausted => "exhausted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Live, Self::Paused, Self::Exhausted]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// A seller pool. Its credential is flattened into it (`provider = "openai"`, `api_key`, …):
/// the credential's own type refuses fields its provider does not take.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct PoolConfig {
    pub id: String,
    #[serde(flatten)]
    pub credential: Credential,
    /// Catalog model ids this pool serves.
    pub models: Vec<String>,
    /// Fraction of list price buyers pay for tokens from this pool, in (0, 1]; or
    /// `price_ratio_ppm`, the same in parts per million (what the control plane pushes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_ratio_ppm: Option<u64>,
    #[serde(default)]
    pub status: PoolStatus,
    /// The seller account paid for this pool's tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seller: Option<String>,
    /// Face value of the listed capacity, micro-USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub face_value_micros: Option<u64>,
    /// Unix milliseconds after which the pool is no longer used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

impl PoolConfig {
    pub fn provider(&self) -> ProviderKind {
        self.credential.kind()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub id: String,
    pub account: String,
    /// The key itself (usually `env:NAME`); hashed at load and dropped.
    pub key: Option<SecretRef>,
    /// Or its SHA-256, lowercase hex, so the file holds no key at all.
    pub key_sha256: Option<String>,
    /// Models this key may use; all when absent.
    pub allowed_models: Option<Vec<String>>,
    /// Most this key may spend in total, micro-USD (buyer price); unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_cap_micros: Option<u64>,
    /// Requests per minute allowed to this key, fleet-wide when hot state is Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
}

/// A secret given literally or as `env:NAME`, read from the environment at load.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum SecretRef {
    Literal(String),
    Env(String),
}

/// Serialized as written (`env:NAME` or the literal). Only the control plane's push to a proxy
/// carries literals, over its authenticated channel.
impl Serialize for SecretRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Literal(v) => s.serialize_str(v),
            Self::Env(name) => s.serialize_str(&format!("env:{name}")),
        }
    }
}

impl From<String> for SecretRef {
    fn from(s: String) -> Self {
        match s.strip_prefix("env:") {
            Some(name) => Self::Env(name.to_owned()),
            None => Self::Literal(s),
        }
    }
}

impl std::fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Literal(_) => f.write_str("SecretRef(<redacted>)"),
            Self::Env(name) => write!(f, "SecretRef(env:{name})"),
        }
    }
}

/// What the control plane pushes to every proxy: catalog, pools and keys at one version.
/// The proxy keeps its own `server`, `limits` and `usage` sections.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushedConfig {
    /// Strictly increasing across every change the control plane makes.
    pub version: u64,
    pub models: Vec<ModelConfig>,
    /// FIFO: listing order.
    pub pools: Vec<PushedPool>,
    /// The buyer keys (hashes only), or `None` when keys live in Redis hot state and are
    /// looked up there (`hot_state` key layout in `tokn_config::hot`).
    pub keys: Option<Vec<KeyConfig>>,
}

/// The watch's response header saying whether its body is a `PushedConfig` (`full`) or a
/// `ConfigDelta` (`delta`).
pub const CONFIG_KIND_HEADER: &str = "x-tokn-config";

/// What the watch answers a proxy whose version is behind by changes to keys, pools or the
/// catalog (header `x-tokn-config: delta`): what changed since `from`, in O(change) whatever
/// the number of keys and pools. A proxy at `from` applies it in place; any other proxy asks
/// for everything.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDelta {
    /// The version this applies to.
    pub from: u64,
    /// The version it brings the proxy to.
    pub version: u64,
    /// Keys created or changed (hashes only), to accept from now on.
    pub keys: Vec<KeyConfig>,
    /// SHA-256 (hex) of keys no longer accepted: revoked, or their account suspended.
    pub revoked: Vec<String>,
    /// Pools listed or changed, whole, each with its place in the FIFO queue; in queue order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolChange>,
    /// Ids of pools no longer sold (paused, used up, deleted, their credential or seller
    /// withdrawn).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools_removed: Vec<String>,
    /// The whole catalog, when prices changed (O(models): it never lists keys or pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<ModelConfig>>,
}

impl ConfigDelta {
    /// Whether it changes anything but keys.
    pub fn changes_pools_or_catalog(&self) -> bool {
        !self.pools.is_empty() || !self.pools_removed.is_empty() || self.models.is_some()
    }
}

/// A pool of a [`ConfigDelta`] and where it goes in the FIFO queue: right after the pool
/// `after` (first when `None`), which the receiver holds already or finds earlier in the same
/// delta.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolChange {
    pub after: Option<String>,
    pub pool: PushedPool,
}

/// A pushed pool as a proxy reads it: each pool on its own, so that one this build cannot read
/// (a provider or field from a newer control plane) is left out, not the whole push.
#[derive(Debug, Clone, PartialEq)]
pub enum PushedPool {
    Read(Box<PoolConfig>),
    /// Why it could not be read (the reason names fields, never their values).
    Unreadable {
        id: String,
        problem: String,
    },
}

impl From<PoolConfig> for PushedPool {
    fn from(pool: PoolConfig) -> Self {
        Self::Read(Box::new(pool))
    }
}

impl<'de> Deserialize<'de> for PushedPool {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        Ok(match PoolConfig::deserialize(&value) {
            Ok(pool) => Self::Read(Box::new(pool)),
            Err(e) => Self::Unreadable {
                id: value["id"]
                    .as_str()
                    .unwrap_or("?")
                    .chars()
                    .take(128)
                    .collect(),
                problem: without_quoted_values(&e.to_string()),
            },
        })
    }
}

impl PushedPool {
    pub fn id(&self) -> &str {
        match self {
            Self::Read(pool) => &pool.id,
            Self::Unreadable { id, .. } => id,
        }
    }
}

impl Serialize for PushedPool {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Read(pool) => pool.serialize(s),
            Self::Unreadable { id, .. } => serde_json::json!({ "id": id }).serialize(s),
        }
    }
}

/// A deserializer's message with any value it quotes (`"…"`) blanked: a mistyped field could
/// be a secret.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                out.push_str(if quoted { "\"…" } else { "\"" });
            }
            _ if quoted => {}
            c => out.push(c),
        }
    }
    out
}
