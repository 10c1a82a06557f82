//! The proxy's hot state: where buyer keys are found and where their rate and spend counters
//! live. One interface, two implementations:
//!
//! - **in process** (default): keys come from the snapshot's key map; counters are atomics on
//!   each key (`KeyCounters`), carried across snapshot swaps by key id. No lock, no allocation,
//!   no network on the request path.
//! - **Redis** (`hot_state.redis_url`): when the pushed configuration keeps keys in Redis
//!   (`keys_in_hot_state`), a key is looked up in an in-process cache, then `GET` of its record
//!   (`tokn_config::hot::key_record`). A subscriber on `key_channel` evicts entries as the
//!   control plane announces changes, and clears the cache whenever it (re)subscribes, since
//!   messages may have been lost meanwhile. Rate and spend counters are fleet-wide Redis
//!   counters (`INCR`+`EXPIRE` per minute window, `INCRBY` of each request's buyer cost).
//!
//! Failure modes (Redis mode): a key whose cache entry expired is served from that stale entry
//! while Redis cannot be reached; a key never seen gets a 503 (`key_store_unavailable`). Limits
//! fall back to this proxy's own counters (the limit then holds per proxy, not per fleet).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{watch, OnceCell};
use tokn_config::{hot, KeyConfig, ValidConfig};
use tracing::{info, warn};

use crate::batch::Batcher;
use crate::clock::unix_millis;
use crate::error::GatewayError;
use crate::keys::{Key, KeyCounterRegistry};
use crate::metrics;
use crate::snapshot::Snapshot;
use crate::sync::lock;

/// Cache entries of keys that were not found are trusted for at most this long.
const NEGATIVE_TTL_MAX: Duration = Duration::from_secs(2);
/// Every Redis operation on the request path gives up after this long.
const REDIS_OP_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnection back-off of the subscriber.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often the subscriber checks that its connection is still alive.
const SUBSCRIBER_PING_EVERY: Duration = Duration::from_secs(10);
/// A Redis error is logged at most this often (each one is counted in metrics).
const ERROR_LOG_EVERY_MS: u64 = 5_000;
/// Most spend increments one round trip carries.
const SPEND_BATCH_MAX: usize = 256;
/// The rate counter of a minute window outlives it by this much.
const RATE_WINDOW_TTL_S: i64 = 120;

/// Where keys are found and counted. See the module documentation.
pub struct HotState {
    counters: KeyCounterRegistry,
    redis: Option<Arc<RedisHot>>,
    /// Spend to add to keys' Redis counters, sent in batches (Redis mode).
    spends: Option<Arc<Batcher<Spend>>>,
}

/// A key's id and what to add to its spend, micro-USD.
type Spend = (Arc<str>, u64);

impl HotState {
    /// Keys from the snapshot, counters in process.
    pub fn in_process(entries_max: usize) -> Self {
        Self {
            counters: KeyCounterRegistry::new(entries_max),
            redis: None,
            spends: None,
        }
    }

    /// The hot state a validated configuration asks for. Connects lazily: a Redis that is
    /// down at start only delays the first lookups that need it.
    pub fn from_config(valid: &ValidConfig) -> Result<Self, String> {
        let h = &valid.config.hot_state;
        let Some(url) = &valid.redis_url else {
            return Ok(Self::in_process(h.key_cache_entries_max));
        };
        // The URL may carry a password: never echo it.
        let client = redis::Client::open(url.as_str())
            .map_err(|_| "hot_state.redis_url: not a valid Redis URL".to_owned())?;
        let ttl = Duration::from_millis(h.key_cache_ttl_ms);
        let redis = Arc::new(RedisHot {
            client,
            conn: OnceCell::new(),
            prefix: h.prefix.clone(),
            cache: KeyCache::new(h.key_cache_entries_max, ttl),
            ttl,
            negative_ttl: ttl.min(NEGATIVE_TTL_MAX),
            subscriptions: AtomicU64::new(0),
            last_error_log_ms: AtomicU64::new(0),
        });
        let r = redis.clone();
        let spends = Batcher::new(SPEND_BATCH_MAX, move |batch| {
            let r = r.clone();
            async move {
                if let Err(e) = r.add_spends(batch).await {
                    r.note_error("spend", &e);
                }
            }
        });
        Ok(Self {
            counters: KeyCounterRegistry::new(h.key_cache_entries_max),
            redis: Some(redis),
            spends: Some(spends),
        })
    }

    /// `"redis"` or `"in_process"`.
    pub fn kind(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else {
            "in_process"
        }
    }

    pub fn counters(&self) -> &KeyCounterRegistry {
        &self.counters
    }

    /// The key whose SHA-256 is `hash`, or `None` for an unknown key.
    pub async fn lookup(
        &self,
        snap: &Snapshot,
        hash: &[u8; 32],
    ) -> Result<Option<Arc<Key>>, GatewayError> {
        match &self.redis {
            Some(redis) if snap.keys_in_hot_state => redis.lookup(snap, hash, &self.counters).await,
            _ => Ok(snap.keys.get(hash).cloned()),
        }
    }

    /// Counts the request against the key's rate limit and checks its spending cap.
    pub async fn check_limits(&self, key: &Key) -> Result<(), GatewayError> {
        if key.requests_per_minute.is_none() && key.spend_cap_micros.is_none() {
            return Ok(());
        }
        let now_s = unix_millis() / 1000;
        // This proxy's own counts are kept in every mode: they are the whole answer in
        // process and the fallback while Redis is unreachable.
        let local_count = key
            .requests_per_minute
            .map(|_| key.counters.hit(now_s / 60));
        let (count, spend) = match &self.redis {
            None => (local_count, key.counters.spend()),
            Some(redis) => match redis.count_and_spend(key, now_s).await {
                Ok(remote) => remote,
                Err(e) => {
                    redis.note_error("limits", &e);
                    (local_count, key.counters.spend())
                }
            },
        };
        if let (Some(limit), Some(count)) = (key.requests_per_minute, count) {
            if count > u64::from(limit) {
                return Err(GatewayError::rate_limited(limit, 60 - now_s % 60));
            }
        }
        if key.spend_cap_micros.is_some_and(|cap| spend >= cap) {
            return Err(GatewayError::quota_exceeded());
        }
        Ok(())
    }

    /// Adds a request's buyer cost to the key's spend. In Redis mode the `INCRBY` goes out
    /// with the next batch (the response does not wait for it), unless the request's settlement
    /// already adds it there (`counted_by_settlement`).
    pub fn record_spend(&self, key: &Key, micros: u64, counted_by_settlement: bool) {
        if micros == 0 {
            return;
        }
        key.counters.add_spend(micros);
        if counted_by_settlement {
            return;
        }
        if let Some(spends) = &self.spends {
            spends.push_lazy((key.id.clone(), micros));
        }
    }

    /// The background task that keeps the key cache in step with the control plane's
    /// announcements (Redis mode only).
    pub fn subscriber(&self) -> Option<KeySubscriber> {
        self.redis.clone().map(|redis| KeySubscriber {
            redis,
            ping_every: SUBSCRIBER_PING_EVERY,
        })
    }

    /// Times the subscriber has (re)subscribed: 0 until its first subscription holds.
    pub fn subscriptions(&self) -> u64 {
        self.redis
            .as_ref()
            .map_or(0, |r| r.subscriptions.load(Ordering::Relaxed))
    }
}

/// Why a Redis operation failed; a label safe for logs and metrics (no URL, no data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisFailure {
    Timeout,
    Unreachable,
    /// Redis answered with an error, or with something that is not a key record.
    BadReply,
    /// Redis holds none of the control plane's state (it restarted empty; the control plane
    /// restores it within a tick): a missing key record says nothing about the key.
    Cold,
}

impl RedisFailure {
    pub fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::BadReply => "bad_reply",
            Self::Cold => "cold",
        }
    }

    fn of(e: &redis::RedisError) -> Self {
        if e.is_timeout() {
            Self::Timeout
        } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            Self::Unreachable
        } else {
            Self::BadReply
        }
    }
}

struct RedisHot {
    client: redis::Client,
    /// Created on first use, on the runtime of the request that needs it.
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    cache: KeyCache,
    ttl: Duration,
    negative_ttl: Duration,
    subscriptions: AtomicU64,
    last_error_log_ms: AtomicU64,
}

impl RedisHot {
    async fn conn(&self) -> Result<ConnectionManager, RedisFailure> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_OP_TIMEOUT))
                    .set_response_timeout(Some(REDIS_OP_TIMEOUT))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await
            .map_err(|e| RedisFailure::of(&e))?;
        Ok(conn.clone())
    }

    /// Runs one Redis operation within `REDIS_OP_TIMEOUT`.
    async fn run<T>(
        &self,
        op: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, RedisFailure> {
        let mut conn = self.conn().await?;
        match tokio::time::timeout(REDIS_OP_TIMEOUT, op(&mut conn)).await {
            Err(_) => Err(RedisFailure::Timeout),
            Ok(Err(e)) => Err(RedisFailure::of(&e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// `GET`, once more if the connection turned out to be broken (a Redis restart: the
    /// manager reconnects, and the second attempt waits for it). Both within
    /// `REDIS_OP_TIMEOUT`. Writes are never retried: a lost reply would count them twice.
    async fn get(&self, key: &str) -> Result<Option<String>, RedisFailure> {
        let mut conn = self.conn().await?;
        let attempts = async {
            let mut result = Ok(None);
            for _ in 0..2 {
                result = redis::cmd("GET").arg(key).query_async(&mut conn).await;
                match &result {
                    Err(e) if RedisFailure::of(e) == RedisFailure::Unreachable => continue,
                    _ => break,
                }
            }
            result
        };
        match tokio::time::timeout(REDIS_OP_TIMEOUT, attempts).await {
            Err(_) => Err(RedisFailure::Timeout),
            Ok(Err(e)) => Err(RedisFailure::of(&e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    fn note_error(&self, op: &'static str, failure: &RedisFailure) {
        metrics::HOT_STATE_ERRORS.with_label_values(&[op]).inc();
        let now = unix_millis();
        let last = self.last_error_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= ERROR_LOG_EVERY_MS
            && self
                .last_error_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(
                message = "Redis hot state failed; serving from cache and local counters.",
                op,
                failure = failure.label()
            );
        }
    }

    async fn lookup(
        &self,
        snap: &Snapshot,
        hash: &[u8; 32],
        counters: &KeyCounterRegistry,
    ) -> Result<Option<Arc<Key>>, GatewayError> {
        let now = Instant::now();
        let cached = self.cache.get(hash);
        if let Some(entry) = &cached {
            let ttl = if entry.found.is_some() {
                self.ttl
            } else {
                self.negative_ttl
            };
            if now.saturating_duration_since(entry.fetched) < ttl {
                return Ok(self.current_key(snap, hash, entry.found.clone(), counters));
            }
        }
        let generation = self.cache.generation();
        match self.fetch(hash).await {
            Ok(config) => {
                let found = config.map(|config| {
                    let key = Key::from_config(&config, counters.get(&config.id));
                    Found {
                        config: Arc::new(config),
                        key: Arc::new(key),
                        snapshot_version: snap.version,
                    }
                });
                let key = found.as_ref().map(|f| f.key.clone());
                self.cache.insert(
                    generation,
                    *hash,
                    CacheEntry {
                        fetched: now,
                        found,
                    },
                );
                Ok(key)
            }
            Err(failure) => {
                self.note_error("lookup", &failure);
                match cached {
                    Some(entry) => {
                        metrics::HOT_STATE_STALE_KEYS.inc();
                        Ok(self.current_key(snap, hash, entry.found, counters))
                    }
                    None => Err(GatewayError::hot_state_unavailable()),
                }
            }
        }
    }

    /// A cached key, rebuilt (once) when the snapshot changed since it was built: its
    /// `/v1/models` body depends on the catalog.
    fn current_key(
        &self,
        snap: &Snapshot,
        hash: &[u8; 32],
        found: Option<Found>,
        counters: &KeyCounterRegistry,
    ) -> Option<Arc<Key>> {
        let found = found?;
        if found.snapshot_version == snap.version {
            return Some(found.key);
        }
        let key = Arc::new(Key::from_config(
            &found.config,
            counters.get(&found.config.id),
        ));
        self.cache
            .refresh_key(hash, &found.config, key.clone(), snap.version);
        Some(key)
    }

    /// `GET` of the key's record. A record for another hash is treated as absent.
    async fn fetch(&self, hash: &[u8; 32]) -> Result<Option<KeyConfig>, RedisFailure> {
        let hex = hex::encode(hash);
        let record_key = hot::key_record(&self.prefix, &hex);
        let text = match self.get(&record_key).await? {
            Some(text) => text,
            None => match self.second_look(&record_key).await? {
                Some(text) => text,
                None => return Ok(None),
            },
        };
        let config: KeyConfig = serde_json::from_str(&text).map_err(|_| RedisFailure::BadReply)?;
        if config
            .key_sha256
            .as_deref()
            .is_some_and(|h| !h.eq_ignore_ascii_case(&hex))
        {
            warn!(message = "A Redis key record names another key hash; ignored.", key_id = %config.id);
            return Ok(None);
        }
        Ok(Some(config))
    }

    /// After a miss: the key's record after all, or `None` when the key is unknown.
    /// A miss means an unknown key only if Redis held the control plane's whole state all along
    /// a second look: the epoch (written once a restore is complete, a new value each time)
    /// read before and after it, the same. Otherwise Redis is cold — restarted, or being
    /// restored between the first look and this one (the race that once answered a live key
    /// 401). Misses are rare and then cached, so the extra round trips cost nothing.
    async fn second_look(&self, record_key: &str) -> Result<Option<String>, RedisFailure> {
        let epoch = hot::money_epoch(&self.prefix);
        let Some(before) = self.get(&epoch).await? else {
            return Err(RedisFailure::Cold);
        };
        if let Some(text) = self.get(record_key).await? {
            return Ok(Some(text));
        }
        match self.get(&epoch).await? {
            Some(after) if after == before => Ok(None),
            _ => Err(RedisFailure::Cold),
        }
    }

    /// The key's request count in this minute window (after counting this one, when it has a
    /// rate limit) and its spend so far, in one round trip.
    async fn count_and_spend(
        &self,
        key: &Key,
        now_s: u64,
    ) -> Result<(Option<u64>, u64), RedisFailure> {
        let rate_key = hot::rate_counter(&self.prefix, &key.id, now_s / 60);
        let spend_key = hot::spend_counter(&self.prefix, &key.id);
        let legacy_spend_key = hot::legacy_spend_counter(&self.prefix, &key.id);
        let mut pipe = redis::pipe();
        if key.requests_per_minute.is_some() {
            pipe.cmd("INCR").arg(&rate_key);
            pipe.cmd("EXPIRE")
                .arg(&rate_key)
                .arg(RATE_WINDOW_TTL_S)
                .ignore();
        }
        if key.spend_cap_micros.is_some() {
            pipe.cmd("GET").arg(&spend_key);
            pipe.cmd("GET").arg(&legacy_spend_key);
        }
        let replies: Vec<Option<u64>> = self.run(async |c| pipe.query_async(c).await).await?;
        let mut replies = replies.into_iter();
        let count = match key.requests_per_minute {
            Some(_) => Some(replies.next().flatten().ok_or(RedisFailure::BadReply)?),
            None => None,
        };
        let spend = match key.spend_cap_micros {
            Some(_) => replies.take(2).flatten().sum(),
            None => 0,
        };
        Ok((count, spend))
    }

    /// Adds each key's spend in `batch`, one `INCRBY` a key, in one round trip.
    async fn add_spends(&self, batch: Vec<Spend>) -> Result<(), RedisFailure> {
        let mut per_key: HashMap<Arc<str>, u64> = HashMap::new();
        for (key_id, micros) in batch {
            *per_key.entry(key_id).or_default() += micros;
        }
        let mut pipe = redis::pipe();
        for (key_id, micros) in &per_key {
            pipe.cmd("INCRBY")
                .arg(hot::spend_counter(&self.prefix, key_id))
                .arg(*micros)
                .ignore();
        }
        self.run(async |c| pipe.query_async::<()>(c).await).await
    }
}

struct CacheEntry {
    fetched: Instant,
    /// `None`: Redis had no record (a negative entry).
    found: Option<Found>,
}

#[derive(Clone)]
struct Found {
    config: Arc<KeyConfig>,
    key: Arc<Key>,
    /// Version of the snapshot `key` was built with.
    snapshot_version: u64,
}

#[derive(Clone)]
struct CachedView {
    fetched: Instant,
    found: Option<Found>,
}

/// The Redis-mode key cache. Expired entries are kept (until evicted or crowded out) to answer
/// while Redis is unreachable. `generation` changes on every eviction, under the lock, so an
/// answer fetched from Redis before an eviction is never cached after it.
struct KeyCache {
    map: Mutex<HashMap<[u8; 32], CacheEntry>>,
    generation: AtomicU64,
    max: usize,
    ttl: Duration,
}

impl KeyCache {
    fn new(max: usize, ttl: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            max: max.max(1),
            ttl,
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn get(&self, hash: &[u8; 32]) -> Option<CachedView> {
        lock(&self.map).get(hash).map(|e| CachedView {
            fetched: e.fetched,
            found: e.found.clone(),
        })
    }

    /// Caches an answer fetched while the cache was at `generation`, unless an eviction
    /// happened since.
    fn insert(&self, generation: u64, hash: [u8; 32], entry: CacheEntry) {
        let mut map = lock(&self.map);
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if map.len() >= self.max && !map.contains_key(&hash) {
            let now = Instant::now();
            // Crowded: drop expired entries first, then an arbitrary eighth.
            let ttl = self.ttl;
            map.retain(|_, e| now.saturating_duration_since(e.fetched) < ttl);
            if map.len() >= self.max {
                let mut to_drop = (self.max / 8).max(1);
                map.retain(|_, _| {
                    if to_drop > 0 {
                        to_drop -= 1;
                        false
                    } else {
                        true
                    }
                });
            }
        }
        map.insert(hash, entry);
    }

    /// Stores a key rebuilt for a newer snapshot, if the entry still holds the same record.
    fn refresh_key(&self, hash: &[u8; 32], config: &Arc<KeyConfig>, key: Arc<Key>, version: u64) {
        let mut map = lock(&self.map);
        if let Some(Some(found)) = map.get_mut(hash).map(|e| e.found.as_mut()) {
            if Arc::ptr_eq(&found.config, config) && found.snapshot_version < version {
                found.key = key;
                found.snapshot_version = version;
            }
        }
    }

    fn evict(&self, hash: &[u8; 32]) {
        let mut map = lock(&self.map);
        map.remove(hash);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn clear(&self) {
        let mut map = lock(&self.map);
        map.clear();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Subscribes to the key channel and evicts announced keys from the cache; reconnects with
/// bounded exponential back-off. Runs until `shutdown` turns true (or its sender is dropped).
pub struct KeySubscriber {
    redis: Arc<RedisHot>,
    ping_every: Duration,
}

impl KeySubscriber {
    /// How often the subscription's connection is checked with a `PING` (default 10 s).
    pub fn with_ping_every(mut self, every: Duration) -> Self {
        self.ping_every = every.max(Duration::from_millis(10));
        self
    }

    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let channel = hot::key_channel(&self.redis.prefix);
        let mut backoff = BACKOFF_MIN;
        while !*shutdown.borrow() {
            match self.subscribe(&channel).await {
                Ok((mut sink, mut stream)) => {
                    // Announcements may have been missed while unsubscribed.
                    self.redis.cache.clear();
                    self.redis.subscriptions.fetch_add(1, Ordering::Relaxed);
                    info!(message = "Subscribed to key announcements.", channel = %channel);
                    backoff = BACKOFF_MIN;
                    let mut ping = tokio::time::interval(self.ping_every);
                    ping.reset();
                    loop {
                        tokio::select! {
                            _ = shutdown.changed() => return,
                            msg = stream.next() => match msg {
                                Some(msg) => self.evict_announced(msg.get_payload_bytes()),
                                None => break,
                            },
                            _ = ping.tick() => {
                                let pong = tokio::time::timeout(
                                    REDIS_OP_TIMEOUT,
                                    sink.ping::<redis::Value>(),
                                )
                                .await;
                                if !matches!(pong, Ok(Ok(_))) {
                                    break;
                                }
                            }
                        }
                    }
                    self.redis
                        .note_error("subscribe", &RedisFailure::Unreachable);
                }
                Err(failure) => self.redis.note_error("subscribe", &failure),
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn subscribe(
        &self,
        channel: &str,
    ) -> Result<(redis::aio::PubSubSink, redis::aio::PubSubStream), RedisFailure> {
        let connect = async {
            let (mut sink, stream) = self.redis.client.get_async_pubsub().await?.split();
            sink.subscribe(channel).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        match tokio::time::timeout(REDIS_OP_TIMEOUT * 2, connect).await {
            Err(_) => Err(RedisFailure::Timeout),
            Ok(Err(e)) => Err(RedisFailure::of(&e)),
            Ok(Ok(pair)) => Ok(pair),
        }
    }

    fn evict_announced(&self, payload: &[u8]) {
        match std::str::from_utf8(payload)
            .ok()
            .and_then(|s| tokn_config::decode_hex32(s.trim()))
        {
            Some(hash) => self.redis.cache.evict(&hash),
            // Not a key hash: drop everything rather than guess.
            None => self.redis.cache.clear(),
        }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for KeySubscriber {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        self.run(shutdown).await;
    }
}
