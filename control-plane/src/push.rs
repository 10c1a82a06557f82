//! Configuration push: the control plane publishes the configuration proxies run, one store
//! version at a time, and proxies long-poll for the first version newer than theirs
//! (`GET /internal/v1/config`).
//!
//! A proxy a few versions behind is answered with what changed when only keys, pools or the
//! catalog did (a `ConfigDelta`: O(change), whatever the number of keys and pools); a proxy
//! further behind, cold, or behind a change to anything else gets the whole document,
//! serialized once per version and only when somebody asks. The store's change journal says
//! what each version changed; the publisher reads only that (the changed keys, the changed
//! pools with their credentials, the prices) and rebuilds everything otherwise.
//!
//! Publishing happens off the API's request path ([`Push::publisher`]); changes made by other
//! replicas (or a price version coming into force) are picked up by a poll of the store's
//! version every `limits.version_poll_ms`. Each publication is labelled with the store version
//! read *before* its data, so a label never claims more than the data holds.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex, Notify};
use tokn_config::{
    ConfigDelta, KeyConfig, ModelConfig, PoolChange, PoolConfig, PoolStatus, ProviderKind,
    PushedConfig, PushedPool, ScheduledPrice,
};

use crate::store::{
    now_ms, ApiKey, Changes, Credential, ModelAlias, ModelPrice, Pool, StoreResult,
};
use crate::App;

/// Most changes kept to answer proxies that are behind; one further behind gets the whole
/// document.
const DELTAS_KEPT: usize = 1_024;

/// What a watch answers.
pub enum Answer {
    /// The whole document (JSON `PushedConfig`). Holds seller credentials: kept in memory only.
    Full(Arc<String>),
    /// What changed since the proxy's version (JSON `ConfigDelta`). Holds the credentials of
    /// the pools it carries.
    Delta(String),
}

/// Which changes a watching proxy applies from a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Deltas {
    /// None: always the whole document.
    None,
    /// Keys only (a proxy of an earlier release).
    Keys,
    /// Keys, pools and the catalog.
    All,
}

impl Deltas {
    /// From the watch's `delta` and `pools` flags.
    pub fn of(delta: bool, pools: bool) -> Self {
        match (delta, pools) {
            (false, _) => Self::None,
            (true, false) => Self::Keys,
            (true, true) => Self::All,
        }
    }
}

/// The configuration as last published, kept to answer watches and to apply the next change in
/// place.
#[derive(Default)]
struct Current {
    version: u64,
    models: Vec<ModelConfig>,
    /// FIFO: each pool with its place in the queue (`listed_seq`), in that order.
    pools: Vec<(i64, PushedPool)>,
    /// Each pool's place, by id: a change finds its pools without a pass over all of them.
    places: HashMap<String, i64>,
    /// By key id; `None` when keys live in Redis hot state.
    keys: Option<BTreeMap<String, KeyConfig>>,
    /// The whole document at `version`, once somebody asked for it.
    body: Option<Arc<String>>,
    /// The changes that led to `version`, oldest first, each starting where the one before
    /// ended.
    changes: VecDeque<Arc<Change>>,
}

/// One publication that changed keys, pools or the catalog alone.
#[derive(Debug, Default)]
struct Change {
    from: u64,
    version: u64,
    /// Keys to accept (hashes only); empty when keys live in Redis.
    keys: Vec<KeyConfig>,
    /// Hashes of keys no longer accepted.
    revoked: Vec<String>,
    /// Ids of pools changed in any way (listed, changed, no longer sold).
    pools: Vec<String>,
    catalog: bool,
}

impl Current {
    /// Everything that changed since `after`, when the kept changes reach back to it and the
    /// proxy applies their kinds. `after` may fall inside a change (a version another replica
    /// published, which this one took in one step with others): a delta carries each key's and
    /// pool's latest state, so sending a proxy a change it already has again changes nothing.
    fn delta_since(&self, after: u64, deltas: Deltas) -> Option<ConfigDelta> {
        if deltas == Deltas::None {
            return None;
        }
        let first = self
            .changes
            .iter()
            .position(|d| d.from <= after && after < d.version)?;
        // Latest state of each key by hash: `None` when revoked.
        let mut keys: BTreeMap<&str, Option<&KeyConfig>> = BTreeMap::new();
        let mut pools: HashSet<&str> = HashSet::new();
        let mut catalog = false;
        for d in self.changes.iter().skip(first) {
            for k in &d.keys {
                if let Some(hash) = k.key_sha256.as_deref() {
                    keys.insert(hash, Some(k));
                }
            }
            for hash in &d.revoked {
                keys.insert(hash, None);
            }
            pools.extend(d.pools.iter().map(String::as_str));
            catalog |= d.catalog;
        }
        if deltas < Deltas::All && (catalog || !pools.is_empty()) {
            return None;
        }
        let mut delta = ConfigDelta {
            from: after,
            version: self.version,
            models: catalog.then(|| self.models.clone()),
            ..ConfigDelta::default()
        };
        for (hash, key) in keys {
            match key {
                Some(k) => delta.keys.push(k.clone()),
                None => delta.revoked.push(hash.to_owned()),
            }
        }
        // Each changed pool still queued after the one before it in the queue now, in queue
        // order; the others removed.
        let mut placed = Vec::new();
        for id in pools {
            match self.position(id) {
                Some(at) => placed.push(at),
                None => delta.pools_removed.push(id.to_owned()),
            }
        }
        placed.sort_unstable();
        delta.pools = placed
            .into_iter()
            .map(|at| PoolChange {
                after: at
                    .checked_sub(1)
                    .map(|before| self.pools[before].1.id().to_owned()),
                pool: self.pools[at].1.clone(),
            })
            .collect();
        delta.pools_removed.sort_unstable();
        Some(delta)
    }

    /// Where pool `id` is in the queue, if it is queued.
    fn position(&self, id: &str) -> Option<usize> {
        let place = *self.places.get(id)?;
        self.pools.binary_search_by_key(&place, |(p, _)| *p).ok()
    }

    /// Takes pool `id` out of the queue, if it is queued.
    fn dequeue(&mut self, id: &str) {
        if let Some(at) = self.position(id) {
            self.pools.remove(at);
            self.places.remove(id);
        }
    }

    /// Puts a pool in the queue at `place`.
    fn enqueue(&mut self, place: i64, pool: PushedPool) {
        let at = self.pools.partition_point(|(p, _)| *p < place);
        self.places.insert(pool.id().to_owned(), place);
        self.pools.insert(at, (place, pool));
    }

    fn document(&mut self) -> Arc<String> {
        if let Some(body) = &self.body {
            return body.clone();
        }
        let config = PushedConfig {
            version: self.version,
            models: self.models.clone(),
            pools: self.pools.iter().map(|(_, p)| p.clone()).collect(),
            keys: self.keys.as_ref().map(|k| k.values().cloned().collect()),
        };
        let body = Arc::new(serde_json::to_string(&config).unwrap_or_default());
        self.body = Some(body.clone());
        body
    }
}

pub struct Push {
    /// The published version: watches wait on it.
    tx: watch::Sender<u64>,
    current: std::sync::Mutex<Current>,
    build: Mutex<()>,
    /// When the earliest not-yet-effective model comes into force (i64::MAX: none).
    next_activation_ms: AtomicI64,
    /// Set at shutdown: waiting watches answer at once instead of holding the exit.
    closing: watch::Sender<bool>,
    /// A change was committed: the publisher builds the configuration (once for a burst).
    wanted: Arc<Notify>,
    /// A change was committed since the last refresh began (a watch then refreshes first).
    unpublished: std::sync::atomic::AtomicBool,
}

impl Drop for Push {
    fn drop(&mut self) {
        // The publisher wakes, finds its app gone and ends.
        self.wanted.notify_one();
    }
}

impl Default for Push {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(0),
            current: std::sync::Mutex::new(Current::default()),
            build: Mutex::new(()),
            next_activation_ms: AtomicI64::new(i64::MAX),
            closing: watch::Sender::new(false),
            wanted: Arc::new(Notify::new()),
            unpublished: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Push {
    pub fn version(&self) -> u64 {
        *self.tx.borrow()
    }

    /// The answer for a proxy at version `after`, once a newer version is published, waiting up
    /// to `wait`: what changed since then when the proxy applies deltas of those kinds, the
    /// whole document otherwise.
    pub async fn newer_than(&self, after: u64, wait: Duration, deltas: Deltas) -> Option<Answer> {
        let mut rx = self.tx.subscribe();
        let mut closing = self.closing.subscribe();
        tokio::select! {
            found = tokio::time::timeout(wait, rx.wait_for(|v| *v > after)) => {
                found.ok()?.ok()?;
            }
            _ = closing.wait_for(|c| *c) => return None,
        }
        let mut current = crate::lock(&self.current);
        if after > 0 {
            if let Some(d) = current.delta_since(after, deltas) {
                return Some(Answer::Delta(serde_json::to_string(&d).unwrap_or_default()));
            }
        }
        Some(Answer::Full(current.document()))
    }

    /// Ends every waiting watch (with "nothing newer") and every later one.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Asks the publisher for a new configuration; returns at once.
    pub fn wake(&self) {
        self.unpublished.store(true, Ordering::SeqCst);
        self.wanted.notify_one();
    }

    /// Publishes on every [`Push::wake`], off the API's request path: the changes committed
    /// while a configuration is being built are published together by the next build. Ends
    /// when `app` is gone.
    pub async fn publisher(app: std::sync::Weak<App>) {
        let Some(wanted) = app.upgrade().map(|a| a.push.wanted.clone()) else {
            return;
        };
        loop {
            wanted.notified().await;
            let Some(app) = app.upgrade() else {
                return;
            };
            if let Err(e) = app.push.refresh(&app).await {
                // The change is committed; the version poll publishes it on its next tick.
                tracing::error!(message = "Publishing the configuration failed.", error = %e);
            }
        }
    }

    /// Publishes the store's configuration if its version moved past the published one: what
    /// changed alone when only keys, pools or the catalog changed since, everything otherwise.
    pub async fn refresh(&self, app: &App) -> StoreResult<()> {
        let _one_at_a_time = self.build.lock().await;
        self.unpublished.store(false, Ordering::SeqCst);
        let refreshed = self.refresh_now(app).await;
        if refreshed.is_err() {
            // Still unpublished: the next watch tries again.
            self.unpublished.store(true, Ordering::SeqCst);
        }
        refreshed
    }

    async fn refresh_now(&self, app: &App) -> StoreResult<()> {
        let have = self.version();
        // Before the first build, the version alone (not every change ever made).
        let (version, changes) = if have > 0 {
            app.store.changes_since(have as i64).await?
        } else {
            (app.store.config_version().await?, None)
        };
        let version = u64::try_from(version).unwrap_or(0);
        if version <= have {
            return Ok(());
        }
        if let Some(changes) = changes {
            if self.publish_changes(app, have, version, changes).await? {
                return Ok(());
            }
        }
        let started = std::time::Instant::now();
        let (config, next_activation) = build(app).await?;
        tracing::debug!(
            message = "Configuration rebuilt whole.",
            version,
            from = have,
            ms = started.elapsed().as_millis() as u64
        );
        self.next_activation_ms
            .store(next_activation.unwrap_or(i64::MAX), Ordering::Relaxed);
        *crate::lock(&self.current) = Current {
            version,
            models: config.models,
            places: config
                .pools
                .iter()
                .map(|(place, p)| (p.id().to_owned(), *place))
                .collect(),
            pools: config.pools,
            keys: config
                .keys
                .map(|keys| keys.into_iter().map(|k| (k.id.clone(), k)).collect()),
            body: None,
            changes: VecDeque::new(),
        };
        crate::metrics::CONFIG_VERSION.set(version as i64);
        self.tx.send_replace(version);
        Ok(())
    }

    /// Publishes `version`, whose changes since `have` were to keys, pools or the catalog
    /// alone, reading only what changed. `false` when the catalog change alters which models
    /// are served (every pool's pushed models may change): then the caller rebuilds everything.
    async fn publish_changes(
        &self,
        app: &App,
        have: u64,
        version: u64,
        changes: Changes,
    ) -> StoreResult<bool> {
        let now = now_ms();
        let catalog = if changes.catalog {
            Some(load_catalog(app, now).await?)
        } else {
            None
        };
        let (pools, pool_ids) = if changes.pools {
            app.store
                .changed_pools(have as i64, version as i64, now)
                .await?
        } else {
            Default::default()
        };
        let mut current = crate::lock(&self.current);
        if let Some((models, _)) = &catalog {
            if served(models) != served(&current.models) {
                return Ok(false);
            }
        }
        let mut change = Change {
            from: current.version,
            version,
            catalog: catalog.is_some(),
            ..Change::default()
        };
        if let Some((models, next_activation)) = catalog {
            current.models = models;
            self.next_activation_ms
                .store(next_activation.unwrap_or(i64::MAX), Ordering::Relaxed);
        }
        if !pool_ids.is_empty() {
            let served = served(&current.models);
            for id in &pool_ids {
                current.dequeue(id);
            }
            for (pool, cred) in pools {
                let place = pool.listed_seq;
                if let Some(pushed) = pushed_pool(app, pool, &cred, &served) {
                    current.enqueue(place, pushed);
                }
            }
            change.pools = pool_ids;
        }
        let catalog_ids: HashSet<&str> = current.models.iter().map(|m| m.id.as_str()).collect();
        for (key, live) in &changes.keys {
            if *live {
                change.keys.push(key_config(key, Some(&catalog_ids)));
            } else {
                change.revoked.push(key.key_sha256.clone());
            }
        }
        drop(catalog_ids);
        match current.keys.as_mut() {
            Some(keys) => {
                for (key, live) in &changes.keys {
                    if !live {
                        keys.remove(&key.id);
                    }
                }
                for k in &change.keys {
                    keys.insert(k.id.clone(), k.clone());
                }
            }
            // With keys in Redis hot state, proxies need nothing of them but the new version.
            None => {
                change.keys.clear();
                change.revoked.clear();
            }
        }
        current.version = version;
        current.body = None;
        if current.changes.len() == DELTAS_KEPT {
            current.changes.pop_front();
        }
        current.changes.push_back(Arc::new(change));
        drop(current);
        crate::metrics::CONFIG_VERSION.set(version as i64);
        self.tx.send_replace(version);
        Ok(true)
    }

    /// Publishes what this replica committed and has not published yet, if anything: a watch
    /// never answers with less than that, and otherwise costs no query.
    pub async fn catch_up(&self, app: &App) -> StoreResult<()> {
        if self.unpublished.load(Ordering::SeqCst) {
            return self.refresh(app).await;
        }
        // A build under way may be publishing such a change: it is waited for.
        drop(self.build.lock().await);
        Ok(())
    }

    /// Whether a scheduled model has come into force and needs a new version.
    pub fn activation_due(&self) -> bool {
        self.next_activation_ms.load(Ordering::Relaxed) <= now_ms()
    }
}

/// What proxies run, before it is a document: pools with their places in the queue.
struct Built {
    models: Vec<ModelConfig>,
    pools: Vec<(i64, PushedPool)>,
    keys: Option<Vec<KeyConfig>>,
}

/// Builds what proxies run. Returns it with the moment the next not-yet-effective model comes
/// into force, if any.
async fn build(app: &App) -> StoreResult<(Built, Option<i64>)> {
    let now = now_ms();
    let (models, next_activation) = load_catalog(app, now).await?;
    let served = served(&models);
    let pools = app
        .store
        .servable_pools(now)
        .await?
        .into_iter()
        .filter_map(|(pool, cred)| {
            let seq = pool.listed_seq;
            pushed_pool(app, pool, &cred, &served).map(|p| (seq, p))
        })
        .collect();
    let keys = if app.hot.is_some() {
        None
    } else {
        let ids: HashSet<&str> = models.iter().map(|m| m.id.as_str()).collect();
        Some(
            app.store
                .live_keys()
                .await?
                .iter()
                .map(|k| key_config(k, Some(&ids)))
                .collect(),
        )
    };
    Ok((
        Built {
            models,
            pools,
            keys,
        },
        next_activation,
    ))
}

/// The models in force, each with its provider: what pools may be pushed with.
fn served(models: &[ModelConfig]) -> HashSet<(String, ProviderKind)> {
    models.iter().map(|m| (m.id.clone(), m.provider)).collect()
}

/// A servable pool as proxies get it: its credential opened, its models those `served` by its
/// provider. `None` when it has none left, or its credential cannot be opened.
fn pushed_pool(
    app: &App,
    pool: Pool,
    cred: &Credential,
    served: &HashSet<(String, ProviderKind)>,
) -> Option<PushedPool> {
    let credential = match app.open_credential(cred) {
        Ok(c) => c,
        Err(e) => {
            // A credential sealed under a key this replica lacks: the pool is left out,
            // loudly, rather than the whole fleet's configuration.
            tracing::error!(message = "Credential cannot be opened; pool not pushed.",
                pool = %pool.id, error = %e);
            return None;
        }
    };
    let provider = credential.kind();
    let models: Vec<String> = pool
        .models
        .into_iter()
        .filter(|m| served.contains(&(m.clone(), provider)))
        .collect();
    if models.is_empty() {
        return None;
    }
    Some(PushedPool::from(PoolConfig {
        id: pool.id,
        credential,
        models,
        price_ratio: None,
        price_ratio_ppm: u64::try_from(pool.price_ratio_ppm).ok(),
        status: PoolStatus::Live,
        seller: Some(pool.account_id),
        face_value_micros: u64::try_from(pool.face_value_micros).ok(),
        expires_at_ms: pool.expires_at_ms.and_then(|t| u64::try_from(t).ok()),
    }))
}

/// The key as proxies see it: its hash and limits, never the key. With `catalog`, allowed
/// models outside it are dropped (a proxy refuses a configuration naming unknown models).
pub fn key_config(k: &ApiKey, catalog: Option<&HashSet<&str>>) -> KeyConfig {
    KeyConfig {
        id: k.id.clone(),
        account: k.account_id.clone(),
        key: None,
        key_sha256: Some(k.key_sha256.clone()),
        allowed_models: k.allowed_models.as_ref().map(|list| {
            list.iter()
                .filter(|m| catalog.is_none_or(|c| c.contains(m.as_str())))
                .cloned()
                .collect()
        }),
        spend_cap_micros: k.spend_cap_micros.and_then(|c| u64::try_from(c).ok()),
        requests_per_minute: k.requests_per_minute.and_then(|r| u32::try_from(r).ok()),
    }
}

/// Per model: the price version in force now, and the later ones as its schedule.
/// The models in force at `now`, from the store.
async fn load_catalog(app: &App, now: i64) -> StoreResult<(Vec<ModelConfig>, Option<i64>)> {
    let prices = app.store.prices().await?;
    let aliases = app.store.aliases().await?;
    Ok(catalog(&prices, &aliases, now))
}

fn catalog(
    prices: &[ModelPrice],
    aliases: &[ModelAlias],
    now: i64,
) -> (Vec<ModelConfig>, Option<i64>) {
    let mut by_model: BTreeMap<&str, Vec<&ModelPrice>> = BTreeMap::new();
    for p in prices {
        by_model.entry(&p.model_id).or_default().push(p);
    }
    let mut names: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for a in aliases {
        names.entry(&a.model_id).or_default().push(a.alias.clone());
    }
    let mut next_activation: Option<i64> = None;
    let mut models = Vec::with_capacity(by_model.len());
    for (id, mut versions) in by_model {
        versions.sort_by_key(|p| (p.effective_at_ms, p.version));
        let (past, future): (Vec<&ModelPrice>, Vec<&ModelPrice>) =
            versions.iter().partition(|p| p.effective_at_ms <= now);
        let Some(current) = past.last() else {
            if let Some(first) = future.first().map(|p| p.effective_at_ms) {
                next_activation = Some(next_activation.map_or(first, |n| n.min(first)));
            }
            continue;
        };
        let Some(provider) = ProviderKind::parse(&current.provider) else {
            continue;
        };
        let micros = |v: i64| u64::try_from(v).unwrap_or(0);
        models.push(ModelConfig {
            id: id.to_owned(),
            provider,
            upstream_model: Some(current.upstream_model.clone()),
            aliases: names.remove(id).unwrap_or_default(),
            input_price_micros_per_mtok: micros(current.input_price_micros_per_mtok),
            output_price_micros_per_mtok: micros(current.output_price_micros_per_mtok),
            cached_input_price_micros_per_mtok: Some(micros(
                current.cached_input_price_micros_per_mtok,
            )),
            cache_write_price_micros_per_mtok: Some(micros(
                current.cache_write_price_micros_per_mtok,
            )),
            cache_write_1h_price_micros_per_mtok: Some(micros(
                current.cache_write_1h_price_micros_per_mtok,
            )),
            max_output_tokens: current
                .max_output_tokens
                .and_then(|t| u64::try_from(t).ok()),
            created: past.first().map_or(0, |p| micros(p.effective_at_ms) / 1000),
            price_version: micros(current.version),
            scheduled_prices: future
                .iter()
                .map(|p| ScheduledPrice {
                    version: micros(p.version),
                    effective_at_ms: micros(p.effective_at_ms),
                    input_price_micros_per_mtok: micros(p.input_price_micros_per_mtok),
                    output_price_micros_per_mtok: micros(p.output_price_micros_per_mtok),
                    cached_input_price_micros_per_mtok: micros(
                        p.cached_input_price_micros_per_mtok,
                    ),
                    cache_write_price_micros_per_mtok: Some(micros(
                        p.cache_write_price_micros_per_mtok,
                    )),
                    cache_write_1h_price_micros_per_mtok: Some(micros(
                        p.cache_write_1h_price_micros_per_mtok,
                    )),
                })
                .collect(),
        });
    }
    (models, next_activation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(model: &str, version: i64, at: i64, input: i64) -> ModelPrice {
        ModelPrice {
            model_id: model.to_owned(),
            version,
            provider: "openai".to_owned(),
            upstream_model: model.to_owned(),
            input_price_micros_per_mtok: input,
            output_price_micros_per_mtok: 2 * input,
            cached_input_price_micros_per_mtok: input / 2,
            cache_write_price_micros_per_mtok: input,
            cache_write_1h_price_micros_per_mtok: input,
            effective_at_ms: at,
            max_output_tokens: None,
        }
    }

    fn key(id: &str) -> KeyConfig {
        KeyConfig {
            id: id.to_owned(),
            account: "a".to_owned(),
            key: None,
            key_sha256: Some(format!("{id:0>64}")),
            allowed_models: None,
            spend_cap_micros: None,
            requests_per_minute: None,
        }
    }

    fn change(from: u64, version: u64, keys: Vec<KeyConfig>, revoked: Vec<String>) -> Arc<Change> {
        Arc::new(Change {
            from,
            version,
            keys,
            revoked,
            ..Change::default()
        })
    }

    #[test]
    fn deltas_merge_from_any_version_they_cover_with_each_keys_latest_state() {
        let current = Current {
            version: 9,
            changes: VecDeque::from([
                // Versions 5 to 7 taken in one step (another replica published 6).
                change(5, 7, vec![key("a"), key("b")], vec![]),
                change(7, 9, vec![key("c")], vec![format!("{:0>64}", "a")]),
            ]),
            ..Current::default()
        };
        let ids = |d: &ConfigDelta| d.keys.iter().map(|k| k.id.clone()).collect::<Vec<_>>();
        for after in [5, 6] {
            let d = current.delta_since(after, Deltas::Keys).unwrap();
            assert_eq!((d.from, d.version), (after, 9));
            assert_eq!(ids(&d), ["b", "c"], "a was revoked since");
            assert_eq!(d.revoked, [format!("{:0>64}", "a")]);
        }
        let d = current.delta_since(8, Deltas::All).unwrap();
        assert_eq!(ids(&d), ["c"]);
        assert!(d.pools.is_empty() && d.pools_removed.is_empty() && d.models.is_none());
        // Older than what is kept: nothing to merge (the whole document instead).
        assert!(current.delta_since(4, Deltas::All).is_none());
        assert!(current.delta_since(8, Deltas::None).is_none());
    }

    fn pool(id: &str) -> PushedPool {
        serde_json::from_value(serde_json::json!({
            "id": id, "provider": "openai", "api_key": "sk", "models": ["m"],
            "price_ratio_ppm": 600_000}))
        .unwrap()
    }

    /// Changed pools travel whole, each placed after the pool before it in the queue now (in
    /// queue order); pools no longer in the queue are named removed; a proxy that applies keys
    /// alone gets the whole document instead.
    #[test]
    fn pool_changes_carry_their_places_and_removals() {
        let mut current = Current {
            version: 12,
            changes: VecDeque::from([
                Arc::new(Change {
                    from: 10,
                    version: 11,
                    pools: vec!["p4".into(), "gone".into()],
                    ..Change::default()
                }),
                Arc::new(Change {
                    from: 11,
                    version: 12,
                    pools: vec!["p1".into()],
                    catalog: true,
                    ..Change::default()
                }),
            ]),
            ..Current::default()
        };
        for (place, id) in [(9, "p9"), (1, "p1"), (4, "p4"), (3, "p3"), (5, "p5")] {
            current.enqueue(place, pool(id));
        }
        current.dequeue("p5");
        let d = current.delta_since(10, Deltas::All).unwrap();
        let placed: Vec<(Option<&str>, &str)> = d
            .pools
            .iter()
            .map(|c| (c.after.as_deref(), c.pool.id()))
            .collect();
        assert_eq!(placed, [(None, "p1"), (Some("p3"), "p4")]);
        assert_eq!(d.pools_removed, ["gone"]);
        assert!(d.models.is_some(), "the catalog changed");
        let d = current.delta_since(11, Deltas::All).unwrap();
        assert_eq!(d.pools.len(), 1);
        assert!(d.pools_removed.is_empty());
        assert!(current.delta_since(10, Deltas::Keys).is_none());
    }

    #[test]
    fn the_version_in_force_is_current_and_later_ones_are_scheduled() {
        let prices = [
            price("a", 2, 100, 10),
            price("a", 5, 500, 20),
            price("a", 7, 900, 30),
            price("b", 8, 2_000, 40),
        ];
        let alias = |alias: &str, model: &str| ModelAlias {
            alias: alias.to_owned(),
            model_id: model.to_owned(),
        };
        let aliases = [alias("claude-a", "a"), alias("claude-b", "b")];
        let (models, next) = catalog(&prices, &aliases, 600);
        assert_eq!(models.len(), 1, "b is not in force yet");
        let a = &models[0];
        assert_eq!(a.aliases, ["claude-a"]);
        assert_eq!((a.price_version, a.input_price_micros_per_mtok), (5, 20));
        assert_eq!(a.scheduled_prices.len(), 1);
        assert_eq!(a.scheduled_prices[0].version, 7);
        assert_eq!(a.scheduled_prices[0].effective_at_ms, 900);
        assert_eq!(next, Some(2_000));
    }
}
