//! The control plane's side of Redis hot state: it mirrors every live buyer key (hash and
//! limits, never the key) under `tokn_config::hot::key_record` and announces each change on
//! `key_channel`, so proxies drop their cached copy at once. A periodic reconcile repairs
//! whatever a Redis outage made the mirror miss: it costs one query while nothing changed, and
//! otherwise compares the mirror with the store and writes only what differs.

use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::ledger::{PoolConsumption, WalletBalance};
use crate::store::{now_ms, Store};

pub struct HotMirror {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    /// The configuration version at which the mirror was last found complete.
    synced: Mutex<Option<i64>>,
    /// An announcement failed since: the next periodic reconcile compares whatever the version.
    missed: AtomicBool,
}

/// What a reconcile found: live keys, and the records it wrote and removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    pub live: usize,
    pub written: usize,
    pub removed: usize,
}

/// Records compared per `MGET`.
const COMPARE_CHUNK: usize = 500;

impl HotMirror {
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(2)));
        Ok(Self {
            conn: redis::aio::ConnectionManager::new_with_config(client, config).await?,
            prefix: prefix.to_owned(),
            synced: Mutex::new(None),
            missed: AtomicBool::new(false),
        })
    }

    /// Writes (or removes) the given keys' records and announces them. Failures are counted
    /// and logged; the next reconcile repairs the mirror.
    pub async fn announce(&self, store: &Store, key_hashes: &[String]) {
        for hash in key_hashes {
            if let Err(e) = self.announce_one(store, hash).await {
                self.missed.store(true, Ordering::Relaxed);
                crate::metrics::REDIS_ERRORS.inc();
                tracing::warn!(message = "Redis key announcement failed; reconcile will repair it.",
                    error = %e);
            }
        }
    }

    async fn announce_one(&self, store: &Store, hash: &str) -> Result<(), String> {
        let record = tokn_config::hot::key_record(&self.prefix, hash);
        let mut conn = self.conn.clone();
        match store.live_key(hash).await.map_err(|e| e.to_string())? {
            Some(key) => {
                let json = serde_json::to_string(&crate::push::key_config(&key, None))
                    .map_err(|e| e.to_string())?;
                conn.set::<_, _, ()>(&record, json).await
            }
            None => conn.del::<_, ()>(&record).await,
        }
        .map_err(|e| e.to_string())?;
        conn.publish::<_, _, ()>(tokn_config::hot::key_channel(&self.prefix), hash)
            .await
            .map_err(|e| e.to_string())
    }

    /// The periodic check: nothing to do (one query) while the configuration version is the one
    /// the mirror was last found complete at and no announcement failed since; otherwise
    /// [`HotMirror::reconcile`]. `None` when skipped.
    pub async fn reconcile_if_changed(&self, store: &Store) -> Result<Option<Reconciled>, String> {
        let version = store.config_version().await.map_err(|e| e.to_string())?;
        let missed = self.missed.swap(false, Ordering::Relaxed);
        if !missed && *crate::lock(&self.synced) == Some(version) {
            return Ok(None);
        }
        let done = self.reconcile_at(store, version).await;
        if done.is_err() {
            self.missed.store(true, Ordering::Relaxed);
        }
        done.map(Some)
    }

    /// Makes Redis hold exactly the live keys: compares every record with the store, writes
    /// (and announces) only those that differ or are missing, removes stale ones.
    pub async fn reconcile(&self, store: &Store) -> Result<Reconciled, String> {
        let version = store.config_version().await.map_err(|e| e.to_string())?;
        self.reconcile_at(store, version).await
    }

    /// Reconciles against the store as of `version` (read first: a change made meanwhile
    /// moves the version, and the next check compares again).
    async fn reconcile_at(&self, store: &Store, version: i64) -> Result<Reconciled, String> {
        let live = store.live_keys().await.map_err(|e| e.to_string())?;
        let mut conn = self.conn.clone();
        let mut wanted = Vec::with_capacity(live.len());
        for k in &live {
            let json = serde_json::to_string(&crate::push::key_config(k, None))
                .map_err(|e| e.to_string())?;
            wanted.push((
                k.key_sha256.as_str(),
                tokn_config::hot::key_record(&self.prefix, &k.key_sha256),
                json,
            ));
        }
        let names: std::collections::HashSet<&str> =
            wanted.iter().map(|(_, name, _)| name.as_str()).collect();
        let pattern = tokn_config::hot::key_record(&self.prefix, "*");
        let mut stale = Vec::new();
        {
            // Many keys a step: Redis holds money keys and other tenants' keys beside these.
            let scan = redis::ScanOptions::default()
                .with_pattern(&pattern)
                .with_count(1_000);
            let mut iter: redis::AsyncIter<String> =
                conn.scan_options(scan).await.map_err(|e| e.to_string())?;
            while let Some(item) = futures_util::StreamExt::next(&mut iter).await {
                let name = item.map_err(|e| e.to_string())?;
                if !names.contains(name.as_str()) {
                    stale.push(name);
                }
            }
        }
        let channel = tokn_config::hot::key_channel(&self.prefix);
        let mut pipe = redis::pipe();
        let mut written = 0;
        for chunk in wanted.chunks(COMPARE_CHUNK) {
            let current: Vec<Option<String>> = redis::cmd("MGET")
                .arg(chunk.iter().map(|(_, name, _)| name).collect::<Vec<_>>())
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            for ((hash, name, json), now) in chunk.iter().zip(current) {
                if now.as_deref() != Some(json.as_str()) {
                    pipe.set(name, json).ignore();
                    pipe.publish(&channel, *hash).ignore();
                    written += 1;
                }
            }
        }
        for name in &stale {
            pipe.del(name).ignore();
            if let Some(hash) = name.rsplit(':').next() {
                pipe.publish(&channel, hash).ignore();
            }
        }
        if written > 0 || !stale.is_empty() {
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
        }
        *crate::lock(&self.synced) = Some(version);
        Ok(Reconciled {
            live: live.len(),
            written,
            removed: stale.len(),
        })
    }
}

// === Money ===
//
// The control plane keeps Redis's copy of the ledger's balances (`tokn_config::hot`): it mirrors
// every committed change (newer `seq` wins), releases what drained requests held, loads every
// balance when Redis lost its data, and releases reservations whose proxy never settled them.

/// One drained request: its account, pool and the reservation that held its cost (named after
/// the request, unless the proxy reserved it ahead).
pub struct Drained<'a> {
    pub account: &'a str,
    pub pool: Option<&'a str>,
    pub reservation: &'a str,
}

impl HotMirror {
    /// A script, loaded into Redis so pipelines may call it by its digest (a restarted Redis
    /// forgets scripts: loading each time costs one round trip a batch).
    async fn loaded(&self, source: &str) -> Result<redis::Script, String> {
        let script = redis::Script::new(source);
        script
            .prepare_invoke()
            .load_async(&mut self.conn.clone())
            .await
            .map_err(|e| e.to_string())?;
        Ok(script)
    }

    /// The ledger applied `drained`: mirror the balances and consumption after it, then release
    /// what each request held. A script call drains [`DRAIN_PER_CALL`] requests, and calls go
    /// one after another: each holds Redis for well under a millisecond, so the proxies'
    /// reservations interleave with a large batch instead of waiting behind it.
    pub async fn drained(
        &self,
        drained: &[Drained<'_>],
        wallets: &[WalletBalance],
        pools: &[PoolConsumption],
    ) -> Result<(), String> {
        if drained.is_empty() {
            return Ok(());
        }
        let p = &self.prefix;
        let wallets: HashMap<&str, &WalletBalance> =
            wallets.iter().map(|w| (w.account.as_str(), w)).collect();
        let pools: HashMap<&str, i64> = pools
            .iter()
            .map(|c| (c.pool.as_str(), c.consumed_micros))
            .collect();
        // Called one by one, each call loads the script itself if Redis lacks it.
        let script = redis::Script::new(tokn_config::hot::DRAIN_SCRIPT);
        let mut conn = self.conn.clone();
        let open = tokn_config::hot::money_open(p);
        for chunk in drained.chunks(DRAIN_PER_CALL) {
            // Each account and pool of the chunk once, named by its place. A wallet the batch
            // did not move (its requests cost nothing) is not mirrored, but its requests'
            // holds are released.
            let mut accounts = Places::default();
            let mut chunk_pools = Places::default();
            let places: Vec<(usize, usize)> = chunk
                .iter()
                .map(|d| {
                    let pool = d.pool.map_or(0, |pool| chunk_pools.place(pool));
                    (accounts.place(d.account), pool)
                })
                .collect();
            let mut call = script.prepare_invoke();
            call.key(&open)
                .arg(chunk.len())
                .arg(accounts.names.len())
                .arg(chunk_pools.names.len());
            for (d, (account, pool)) in chunk.iter().zip(places) {
                call.key(tokn_config::hot::money_reservation(p, d.reservation))
                    .arg(d.reservation)
                    .arg(account)
                    .arg(pool);
            }
            for account in &accounts.names {
                call.key(tokn_config::hot::money_account(p, account));
                match wallets.get(account) {
                    Some(w) => call.arg(w.balance_micros).arg(w.seq),
                    None => call.arg("").arg(""),
                };
            }
            for pool in &chunk_pools.names {
                call.key(tokn_config::hot::money_pool(p, pool));
                match pools.get(pool) {
                    Some(consumed) => call.arg(*consumed),
                    None => call.arg(""),
                };
            }
            call.invoke_async::<()>(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Committed balance changes outside usage (grants, welcome credit, refunds).
    pub async fn set_balances(&self, wallets: &[WalletBalance]) -> Result<(), String> {
        if wallets.is_empty() {
            return Ok(());
        }
        let script = self.loaded(tokn_config::hot::SET_BALANCE_SCRIPT).await?;
        let mut pipe = redis::pipe();
        for w in wallets {
            pipe.invoke_script(
                script
                    .key(tokn_config::hot::money_account(&self.prefix, &w.account))
                    .arg(w.balance_micros)
                    .arg(w.seq),
            )
            .ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| e.to_string())
    }

    /// When Redis holds nothing of ours (first start, or it restarted empty): writes every live
    /// key, loads every wallet and pool from the ledger, then marks them loaded. Proxies refuse
    /// to reserve until then. Returns whether it loaded.
    pub async fn restore_if_cold(&self, store: &Store) -> Result<bool, String> {
        let p = &self.prefix;
        let mut conn = self.conn.clone();
        let loaded: bool = conn
            .exists(tokn_config::hot::money_epoch(p))
            .await
            .map_err(|e| e.to_string())?;
        if loaded {
            return Ok(false);
        }
        let keys = self.reconcile(store).await?.live;
        let wallets = store
            .wallet_balances(None)
            .await
            .map_err(|e| e.to_string())?;
        let pools = store
            .pool_consumption(None)
            .await
            .map_err(|e| e.to_string())?;
        for chunk in wallets.chunks(1_000) {
            self.set_balances(chunk).await?;
        }
        let script = self.loaded(tokn_config::hot::SET_CONSUMED_SCRIPT).await?;
        for chunk in pools.chunks(1_000) {
            let mut pipe = redis::pipe();
            for c in chunk {
                pipe.invoke_script(
                    script
                        .key(tokn_config::hot::money_pool(p, &c.pool))
                        .arg(c.consumed_micros),
                )
                .ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
        }
        conn.set::<_, _, ()>(tokn_config::hot::money_epoch(p), now_ms())
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            message = "Keys and balances loaded into Redis.",
            keys,
            wallets = wallets.len(),
            pools = pools.len()
        );
        Ok(true)
    }

    /// Releases reservations past their deadline that no proxy settled (it was killed): their
    /// records, if any were spooled, charge the actual cost when they drain. Returns how many.
    pub async fn expire_reservations(&self, now: i64) -> Result<usize, String> {
        let p = &self.prefix;
        let mut conn = self.conn.clone();
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(tokn_config::hot::money_open(p))
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(EXPIRE_BATCH_MAX)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let script = redis::Script::new(tokn_config::hot::EXPIRE_SCRIPT);
        for rid in &due {
            let res = tokn_config::hot::money_reservation(p, rid);
            let (account, pool): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(&res)
                .arg("acct")
                .arg("pool")
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            script
                .key(tokn_config::hot::money_account(
                    p,
                    account.as_deref().unwrap_or(""),
                ))
                .key(tokn_config::hot::money_pool(
                    p,
                    pool.as_deref().unwrap_or(""),
                ))
                .key(res)
                .key(tokn_config::hot::money_open(p))
                .arg(rid)
                .invoke_async::<()>(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(due.len())
    }
}

/// Requests one drain script call releases.
const DRAIN_PER_CALL: usize = 200;

/// Distinct names in the order first seen, each with its 1-based place (a drain call names an
/// account or pool once and refers to it by place).
#[derive(Default)]
struct Places<'a> {
    names: Vec<&'a str>,
    place_of: HashMap<&'a str, usize>,
}

impl<'a> Places<'a> {
    fn place(&mut self, name: &'a str) -> usize {
        *self.place_of.entry(name).or_insert_with(|| {
            self.names.push(name);
            self.names.len()
        })
    }
}

/// Reservations released per sweep.
const EXPIRE_BATCH_MAX: usize = 1_000;
