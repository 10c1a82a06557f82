//! The configuration the hot path reads: catalog, prices, pools and keys, indexed and with
//! everything per-request work would otherwise recompute (each pool's adapter with its endpoint
//! and credential headers, `/v1/models` bodies) prepared once. Swapped whole (`arc-swap`) when new configuration arrives.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokn_config::{
    decode_hex32, ConfigDelta, ModelConfig, PoolStatus, ProviderKind, PushedPool, SkippedPool,
    ValidConfig, ValidPool,
};

use crate::clock::unix_millis;
use crate::health::{Ejection, HealthCell};
use crate::keys::{Key, KeyCounterRegistry, KeyMap};
use crate::metrics;
use crate::providers::{self, ProviderAdapter};
use crate::sync::lock;
use crate::usage::Usage;

/// List prices of one model in micro-USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write: u64,
    /// Those written to a cache that lives an hour.
    pub cache_write_1h: u64,
}

/// What a request costs, in micro-USD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    pub list_micros: u64,
    pub buyer_micros: u64,
}

impl Prices {
    /// A version's prices as listed, `(input, output)` and the optional ones with their
    /// defaults: cached input and cache writes at the input price, an hour's writes at the
    /// cache write price.
    fn listed(
        (input, output): (u64, u64),
        cached_input: Option<u64>,
        cache_write: Option<u64>,
        cache_write_1h: Option<u64>,
    ) -> Self {
        let cache_write = cache_write.unwrap_or(input);
        Self {
            input,
            output,
            cached_input: cached_input.unwrap_or(input),
            cache_write,
            cache_write_1h: cache_write_1h.unwrap_or(cache_write),
        }
    }

    /// Rounding rule: the exact cost is `Σ tokens × price / 10⁶` micro-USD; it is rounded up once,
    /// after summing, so a request is never billed below its exact cost. The buyer pays
    /// `exact × ratio_ppm / 10⁶`, likewise rounded up once.
    /// Cache reads and writes (an hour's writes a part of the writes) are parts of the prompt:
    /// each is priced at its own rate and the rest at the input price.
    pub fn cost(&self, usage: &Usage, ratio_ppm: u64) -> Cost {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let written = usage.cache_write_tokens.min(usage.prompt_tokens - cached);
        let written_1h = usage.cache_write_1h_tokens.min(written);
        let plain = usage.prompt_tokens - cached - written;
        let exact_pico: u128 = plain as u128 * self.input as u128
            + cached as u128 * self.cached_input as u128
            + (written - written_1h) as u128 * self.cache_write as u128
            + written_1h as u128 * self.cache_write_1h as u128
            + usage.completion_tokens as u128 * self.output as u128;
        let list = exact_pico.div_ceil(1_000_000);
        let buyer = (exact_pico * ratio_ppm as u128).div_ceil(1_000_000_000_000);
        Cost {
            list_micros: u64::try_from(list).unwrap_or(u64::MAX),
            buyer_micros: u64::try_from(buyer).unwrap_or(u64::MAX),
        }
    }
}

/// The prices a request is billed at, fixed when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceChoice {
    pub version: u64,
    pub prices: Prices,
}

pub struct Model {
    pub id: Arc<str>,
    pub provider: ProviderKind,
    pub upstream_model: String,
    /// The prices in force when the configuration was pushed, and their version.
    pub prices: Prices,
    pub price_version: u64,
    /// Later price versions, ordered by `effective_at_ms`.
    pub scheduled: Vec<ScheduledPrices>,
    /// The most output tokens one request can produce (what a reservation assumes when the
    /// request names no limit); the gateway's default when the catalog does not say.
    pub max_output_tokens: Option<u64>,
    /// Pools serving this model, FIFO (configuration order).
    pub pools: Vec<Arc<Pool>>,
    /// `GET /v1/models/{id}` body.
    pub object_body: Bytes,
}

/// A price version that takes effect at a wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledPrices {
    pub effective_at_ms: u64,
    pub version: u64,
    pub prices: Prices,
}

impl Model {
    fn new(m: &ModelConfig, pools: Vec<Arc<Pool>>) -> Self {
        Self {
            id: m.id.as_str().into(),
            provider: m.provider,
            upstream_model: m.upstream_model.clone().unwrap_or_else(|| m.id.clone()),
            prices: Prices::listed(
                (
                    m.input_price_micros_per_mtok,
                    m.output_price_micros_per_mtok,
                ),
                m.cached_input_price_micros_per_mtok,
                m.cache_write_price_micros_per_mtok,
                m.cache_write_1h_price_micros_per_mtok,
            ),
            price_version: m.price_version,
            scheduled: scheduled_prices(m),
            max_output_tokens: m.max_output_tokens,
            pools,
            object_body: serde_json::to_vec(&ModelObject::of(m))
                .map(Bytes::from)
                .unwrap_or_default(),
        }
    }

    /// The price version in force at `unix_ms`: the latest scheduled one already effective, or
    /// the current one. Called once per request, with the request's start time.
    pub fn prices_at(&self, unix_ms: u64) -> PriceChoice {
        let mut choice = PriceChoice {
            version: self.price_version,
            prices: self.prices,
        };
        for s in &self.scheduled {
            if s.effective_at_ms > unix_ms {
                break;
            }
            choice = PriceChoice {
                version: s.version,
                prices: s.prices,
            };
        }
        choice
    }
}

pub struct Pool {
    pub id: Arc<str>,
    pub provider: ProviderKind,
    /// The provider's adapter, holding this pool's endpoint and credential.
    pub adapter: Box<dyn ProviderAdapter>,
    pub price_ratio_ppm: u64,
    /// Status `live` (paused and exhausted pools are never used).
    pub live: bool,
    /// The seller account paid for this pool's tokens.
    pub seller: Option<Arc<str>>,
    /// Face value listed (list cost it may serve); unlimited when absent.
    pub face_value_micros: Option<u64>,
    /// Its upstream may resolve to internal addresses: a pool of this proxy's own file, or a
    /// seller's where the operator allows internal upstreams.
    pub internal_ok: bool,
    /// The catalog models it serves.
    models: Vec<Arc<str>>,
    health: PoolHealth,
}

/// Back-off state shared by every request that uses a pool.
struct PoolHealth {
    /// The registry's epoch: back-offs are milliseconds after it.
    epoch: Instant,
    /// Carried from snapshot to snapshot while the pool keeps its credential.
    cell: Arc<HealthCell>,
    /// `expires_at_ms` translated once to milliseconds after `epoch` (`u64::MAX`: never), so
    /// the hot path compares one monotonic reading instead of asking the wall clock.
    expires_after_ms: u64,
}

/// Pool health (back-off, quarantine) by pool id and credential fingerprint, carried from one
/// snapshot to the next: a configuration change forgives no failing pool — a refused credential
/// stays quarantined however many keys or other pools change meanwhile — while a replaced
/// credential (another fingerprint) starts afresh. Consulted when snapshots are built, never per
/// request; it holds the pools of the last snapshot built.
pub struct PoolHealthRegistry {
    epoch: Instant,
    by_pool: Mutex<HealthByPool>,
}

/// By pool id: its credential's fingerprint and its health.
type HealthByPool = HashMap<Arc<str>, ([u8; 32], Arc<HealthCell>)>;

impl Default for PoolHealthRegistry {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            by_pool: Mutex::new(HashMap::new()),
        }
    }
}

impl PoolHealthRegistry {
    /// The health of each of `pools` (the one it had, or a fresh one); forgets every other pool.
    fn renew(&self, pools: &[ValidPool]) -> Vec<Arc<HealthCell>> {
        let mut by_pool = lock(&self.by_pool);
        let mut kept = HashMap::with_capacity(pools.len());
        let health = pools
            .iter()
            .map(|p| {
                let id: Arc<str> = Arc::from(p.config.id.as_str());
                let health = carried(&mut by_pool, &id, fingerprint(p));
                kept.insert(id, (fingerprint(p), health.clone()));
                health
            })
            .collect();
        *by_pool = kept;
        health
    }

    /// The health of each of `changed` (the one it had while its credential stays the same, or
    /// a fresh one) and forgets the pools `gone`; every other pool keeps its own.
    fn update<'a>(
        &self,
        changed: &[&ValidPool],
        gone: impl Iterator<Item = &'a str>,
    ) -> Vec<Arc<HealthCell>> {
        let mut by_pool = lock(&self.by_pool);
        for id in gone {
            by_pool.remove(id);
        }
        changed
            .iter()
            .map(|p| {
                let id: Arc<str> = Arc::from(p.config.id.as_str());
                let health = carried(&mut by_pool, &id, fingerprint(p));
                by_pool.insert(id, (fingerprint(p), health.clone()));
                health
            })
            .collect()
    }
}

/// The health `id` had if its credential is still `fingerprint`, a fresh one otherwise (taken
/// out of `by_pool`).
fn carried(by_pool: &mut HealthByPool, id: &str, fingerprint: [u8; 32]) -> Arc<HealthCell> {
    match by_pool.remove(id) {
        Some((same, health)) if same == fingerprint => health,
        _ => Arc::default(),
    }
}

/// A digest of the pool's credential (its secret included): equal only for the same credential.
fn fingerprint(p: &ValidPool) -> [u8; 32] {
    let text = serde_json::to_vec(&p.config.credential).unwrap_or_default();
    Sha256::digest(&text).into()
}

impl Pool {
    /// The pool with its provider's adapter and its carried health; `since_epoch_ms` and
    /// `now_unix_ms` are one reading shared by the snapshot's pools.
    fn new(
        p: &ValidPool,
        internal_ok: bool,
        health: (Instant, Arc<HealthCell>),
        since_epoch_ms: u64,
        now_unix_ms: u64,
    ) -> Result<Self, String> {
        let pc = &p.config;
        let adapter =
            providers::adapter(&pc.credential).map_err(|why| format!("pool `{}`: {why}", pc.id))?;
        Ok(Self {
            id: pc.id.as_str().into(),
            provider: pc.provider(),
            adapter,
            price_ratio_ppm: p.price_ratio_ppm,
            live: pc.status == PoolStatus::Live,
            seller: pc.seller.as_deref().map(Arc::from),
            face_value_micros: pc.face_value_micros,
            internal_ok,
            models: pc.models.iter().map(|m| Arc::from(m.as_str())).collect(),
            health: PoolHealth {
                epoch: health.0,
                cell: health.1,
                expires_after_ms: pc.expires_at_ms.map_or(u64::MAX, |at| {
                    since_epoch_ms.saturating_add(at.saturating_sub(now_unix_ms))
                }),
            },
        })
    }

    fn now_ms(&self) -> u64 {
        self.health.epoch.elapsed().as_millis() as u64
    }

    /// Live, not expired, not quarantined, backed off or ejected.
    pub fn is_available(&self) -> bool {
        let now = self.now_ms();
        self.is_listed(now) && self.health.cell.is_usable(now)
    }

    /// Live and not expired: a pool this configuration sells, whatever its health.
    fn is_listed(&self, now: u64) -> bool {
        self.live && now < self.health.expires_after_ms
    }

    /// A refused credential: out for `ms`, and never probed meanwhile.
    pub fn quarantine(&self, ms: u64) {
        self.health.cell.quarantine(self.now_ms(), ms);
    }

    /// The provider asked for a pause of `ms` (never shortens a longer one in place).
    pub fn back_off(&self, ms: u64) {
        self.health.cell.pause(self.now_ms(), ms);
    }

    /// One more error in a row; the ejection's length when it ejects the pool.
    pub fn failed(&self, rule: &Ejection) -> Option<u64> {
        self.health.cell.failed(self.now_ms(), rule)
    }

    /// It answered: errors in a row and any pause end.
    pub fn succeeded(&self) {
        self.health.cell.succeeded();
    }

    /// When every pool of a model is out: whether this one (sold, out only because it was
    /// ejected) may be probed now; `Err(ms)` is how long until it may serve or be probed again.
    pub fn claim_probe(&self) -> Result<(), u64> {
        let now = self.now_ms();
        if !self.is_listed(now) {
            return Err(u64::MAX);
        }
        match self.health.cell.ejected_until(now) {
            Some(_) if self.health.cell.claim_probe(now) => Ok(()),
            Some(until) => Err((until - now).min(crate::health::PROBE_INTERVAL_MS)),
            None => Err(self.health.cell.usable_from().saturating_sub(now)),
        }
    }
}

pub struct Snapshot {
    pub version: u64,
    pub models: HashMap<Arc<str>, Arc<Model>>,
    pub keys: KeyMap,
    /// Keys are looked up in Redis hot state, not in `keys`.
    pub keys_in_hot_state: bool,
    /// Pools this configuration runs (for `/status`).
    pub pool_count: usize,
    /// The catalog as pushed (a delta that leaves it alone reuses it).
    catalog: Arc<Vec<ModelConfig>>,
    /// Every pool in FIFO order, shared with the next snapshot until a pool changes.
    listing: Arc<Vec<Arc<Pool>>>,
    /// Pools pushed but left out (pushed without their credential, or with fields this build
    /// refuses), by id.
    left_out: Arc<HashSet<Arc<str>>>,
    /// The models a live pool serves, in catalog order: what `/v1/models` lists (a model
    /// nobody supplies would only answer `no_capacity`).
    servable: Vec<ModelConfig>,
    /// Per seller, the servable models only that seller's pools supply: never listed to its
    /// own keys (no pool serves its own seller).
    sole_supplier: HashMap<Arc<str>, Vec<Arc<str>>>,
    all_models_body: Bytes,
}

/// What a snapshot derives from its catalog and pools.
struct Index {
    models: HashMap<Arc<str>, Arc<Model>>,
    pool_count: usize,
    servable: Vec<ModelConfig>,
    sole_supplier: HashMap<Arc<str>, Vec<Arc<str>>>,
    all_models_body: Bytes,
}

impl Index {
    /// Each catalog model with the pools serving it in FIFO order (one pass over the pools),
    /// and what `/v1/models` lists.
    fn of(catalog: &[ModelConfig], listing: &[Arc<Pool>]) -> Self {
        let mut serving: HashMap<&str, Vec<Arc<Pool>>> = HashMap::with_capacity(catalog.len());
        let mut pool_count = 0;
        for pool in listing {
            pool_count += 1;
            for m in &pool.models {
                serving.entry(&**m).or_default().push(pool.clone());
            }
        }
        let models: HashMap<Arc<str>, Arc<Model>> = catalog
            .iter()
            .map(|m| {
                let model = Model::new(m, serving.remove(m.id.as_str()).unwrap_or_default());
                (model.id.clone(), Arc::new(model))
            })
            .collect();
        Self::with_models(catalog, models, pool_count)
    }

    /// `snapshot`'s index after a change to the pools serving the models `affected` (the
    /// catalog unchanged): those models are rebuilt from `listing`, every other one shared.
    fn patched(snapshot: &Snapshot, listing: &[Arc<Pool>], affected: &HashSet<Arc<str>>) -> Self {
        let mut models = snapshot.models.clone();
        for m in snapshot.catalog.iter() {
            if affected.contains(m.id.as_str()) {
                let serving = listing
                    .iter()
                    .filter(|p| p.models.iter().any(|id| **id == *m.id))
                    .cloned()
                    .collect();
                let model = Model::new(m, serving);
                models.insert(model.id.clone(), Arc::new(model));
            }
        }
        Self::with_models(&snapshot.catalog, models, listing.len())
    }

    /// What `/v1/models` lists, derived from the models and their pools; each model also under
    /// its aliases.
    fn with_models(
        catalog: &[ModelConfig],
        mut models: HashMap<Arc<str>, Arc<Model>>,
        pool_count: usize,
    ) -> Self {
        for m in catalog {
            if let Some(model) = models.get(m.id.as_str()).cloned() {
                for alias in &m.aliases {
                    models.insert(alias.as_str().into(), model.clone());
                }
            }
        }
        let servable: Vec<ModelConfig> = catalog
            .iter()
            .filter(|m| {
                models
                    .get(m.id.as_str())
                    .is_some_and(|model| model.pools.iter().any(|p| p.live))
            })
            .cloned()
            .collect();
        Self {
            sole_supplier: sole_suppliers(&servable, &models),
            all_models_body: models_body(servable.iter()),
            models,
            pool_count,
            servable,
        }
    }
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelObject<'a>>,
}

#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

impl<'a> ModelObject<'a> {
    fn of(m: &'a ModelConfig) -> Self {
        Self {
            id: &m.id,
            object: "model",
            created: m.created,
            owned_by: m.provider.as_str(),
        }
    }
}

#[derive(Serialize)]
struct AnthropicModelList<'a> {
    data: Vec<AnthropicModel<'a>>,
    has_more: bool,
    first_id: Option<&'a str>,
    last_id: Option<&'a str>,
}

#[derive(Serialize)]
struct AnthropicModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    display_name: &'a str,
    created_at: String,
}

/// `unix_secs` as RFC 3339 (`YYYY-MM-DDTHH:MM:SSZ`), from the one calendar conversion the
/// workspace has (SigV4's `x-amz-date`, `YYYYMMDDTHHMMSSZ`).
fn rfc3339(unix_secs: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs);
    let Ok(date) = tokn_sigv4::AmzDate::from_system_time(time) else {
        return "1970-01-01T00:00:00Z".to_owned();
    };
    let d = date.as_str();
    let part = |r: std::ops::Range<usize>| d.get(r).unwrap_or_default();
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        part(0..4),
        part(4..6),
        part(6..8),
        part(9..11),
        part(11..13),
        part(13..15)
    )
}

/// `GET /v1/models` for the given models, rendered once.
fn models_body<'a>(models: impl Iterator<Item = &'a ModelConfig>) -> Bytes {
    let list = ModelList {
        object: "list",
        data: models.map(ModelObject::of).collect(),
    };
    serde_json::to_vec(&list)
        .map(Bytes::from)
        .unwrap_or_default()
}

impl Snapshot {
    /// The configuration of a proxy that has not received one yet: no model, no key.
    pub fn empty() -> Self {
        Self {
            version: 0,
            models: HashMap::new(),
            keys: KeyMap::default(),
            keys_in_hot_state: false,
            pool_count: 0,
            catalog: Arc::default(),
            listing: Arc::default(),
            left_out: Arc::default(),
            servable: Vec::new(),
            sole_supplier: HashMap::new(),
            all_models_body: models_body(std::iter::empty()),
        }
    }

    /// Builds the hot-path view of a validated configuration. Keys take their in-process
    /// counters from `counters`, and pools their health from `health`, so rate and spend counts
    /// and back-offs survive a configuration change.
    pub fn build(
        valid: &ValidConfig,
        version: u64,
        counters: &KeyCounterRegistry,
        health: &PoolHealthRegistry,
    ) -> Result<Self, String> {
        Self::build_leaving_out(valid, &[], version, counters, health)
    }

    /// [`Snapshot::build`] of a pushed configuration whose pools `left_out` were not kept.
    pub fn build_leaving_out(
        valid: &ValidConfig,
        left_out: &[SkippedPool],
        version: u64,
        counters: &KeyCounterRegistry,
        health: &PoolHealthRegistry,
    ) -> Result<Self, String> {
        let cfg = &valid.config;
        let built = PoolBuilder::new(health, cfg.limits.allow_internal_upstreams);
        let listing = valid
            .pools
            .iter()
            .zip(health.renew(&valid.pools))
            .map(|(p, h)| built.listed(p, h))
            .collect::<Result<Vec<_>, _>>()?;
        let mut snapshot = Self {
            version,
            keys_in_hot_state: valid.keys_in_hot_state,
            catalog: Arc::new(cfg.models.clone()),
            left_out: Arc::new(left_out.iter().map(|p| Arc::from(p.id.as_str())).collect()),
            ..Self::empty()
        };
        snapshot.set_index(Index::of(&snapshot.catalog, &listing));
        snapshot.listing = Arc::new(listing);
        counters.hold_at_least(valid.keys.len());
        for k in &valid.keys {
            let key = Key::from_config(&k.config, counters.get(&k.config.id));
            snapshot.keys.insert(k.hash, Arc::new(key));
        }
        Ok(snapshot)
    }

    fn set_index(&mut self, index: Index) {
        self.models = index.models;
        self.pool_count = index.pool_count;
        self.servable = index.servable;
        self.sole_supplier = index.sole_supplier;
        self.all_models_body = index.all_models_body;
    }

    /// This snapshot with a configuration delta applied: keys added, replaced or gone, pools
    /// listed, changed or gone, the catalog replaced. Costs the change plus one pass over the
    /// pools' places when pools or the catalog changed — never the number of keys, and no pool
    /// that did not change is rebuilt or loses its health. Returns it with the pools the delta
    /// brought that this build left out (and why). Refuses a key whose hash is unreadable or
    /// that names a model the catalog lacks, as a whole configuration would, and a pool whose
    /// place is after a pool this snapshot does not hold.
    pub fn with_delta(
        &self,
        delta: &ConfigDelta,
        counters: &KeyCounterRegistry,
        health: &PoolHealthRegistry,
        allow_internal_upstreams: bool,
    ) -> Result<(Self, Vec<SkippedPool>), DeltaRefused> {
        let mut next = Self {
            version: delta.version,
            models: self.models.clone(),
            keys: self.keys.clone(),
            keys_in_hot_state: self.keys_in_hot_state,
            pool_count: self.pool_count,
            catalog: self.catalog.clone(),
            listing: self.listing.clone(),
            left_out: self.left_out.clone(),
            servable: self.servable.clone(),
            sole_supplier: self.sole_supplier.clone(),
            all_models_body: self.all_models_body.clone(),
        };
        let mut skipped = Vec::new();
        if delta.changes_pools_or_catalog() {
            if let Some(models) = &delta.models {
                // Ids and aliases share one name space: a name twice is refused.
                let mut names = std::collections::HashSet::new();
                let mut all = models
                    .iter()
                    .flat_map(|m| std::iter::once(&m.id).chain(&m.aliases));
                if let Some(name) = all.find(|name| !names.insert(name.as_str())) {
                    let why = format!("models: `{name}` is listed twice");
                    return Err(DeltaRefused::Invalid(why));
                }
                next.catalog = Arc::new(models.clone());
            }
            let Relisted {
                listing,
                skipped: left_out,
                still_out,
                affected,
            } = self.relisted(delta, &next.catalog, health, allow_internal_upstreams)?;
            next.left_out = Arc::new(still_out);
            skipped = left_out;
            next.set_index(match delta.models {
                Some(_) => Index::of(&next.catalog, &listing),
                None => Index::patched(self, &listing, &affected),
            });
            next.listing = Arc::new(listing);
        }
        counters.hold_at_least(self.keys.len() + delta.keys.len());
        for hex in &delta.revoked {
            let hash = decode_hex32(hex).ok_or_else(|| {
                DeltaRefused::Invalid(format!("revoked: `{hex}` is not a SHA-256"))
            })?;
            next.keys.remove(&hash);
        }
        for k in &delta.keys {
            let hash = k
                .key_sha256
                .as_deref()
                .and_then(decode_hex32)
                .ok_or_else(|| {
                    DeltaRefused::Invalid(format!("keys: `{}` has no readable key_sha256", k.id))
                })?;
            if k.account.is_empty() {
                let why = format!("keys: `{}` has no account", k.id);
                return Err(DeltaRefused::Invalid(why));
            }
            if let Some(m) = k
                .allowed_models
                .iter()
                .flatten()
                .find(|m| !next.models.contains_key(m.as_str()))
            {
                return Err(DeltaRefused::Invalid(format!(
                    "keys: `{}` allows `{m}`, which is not in the catalog",
                    k.id
                )));
            }
            let key = Key::from_config(k, counters.get(&k.id));
            next.keys.insert(hash, Arc::new(key));
        }
        Ok((next, skipped))
    }

    /// The FIFO queue after `delta`'s pools: the ones it changes or removes taken out, each it
    /// brings put back right after its `after`; with the pools it brings that this build leaves
    /// out, and the models whose pools changed. Only the pools it brings are built (and
    /// validated against `catalog`); the others are shared.
    fn relisted(
        &self,
        delta: &ConfigDelta,
        catalog: &[ModelConfig],
        health: &PoolHealthRegistry,
        allow_internal_upstreams: bool,
    ) -> Result<Relisted, DeltaRefused> {
        // Few, sorted: a binary search per pool hashes nothing.
        let mut changed: Vec<&str> = delta
            .pools
            .iter()
            .map(|c| c.pool.id())
            .chain(delta.pools_removed.iter().map(String::as_str))
            .collect();
        changed.sort_unstable();
        // The models whose pools change: those the pools taken out serve, and those the pools
        // put in serve.
        let mut affected: HashSet<Arc<str>> = HashSet::new();
        let mut listing: Vec<Arc<Pool>> = Vec::with_capacity(self.listing.len() + changed.len());
        for pool in self.listing.iter() {
            if changed.binary_search(&&*pool.id).is_ok() {
                affected.extend(pool.models.iter().cloned());
            } else {
                listing.push(pool.clone());
            }
        }
        let mut skipped = Vec::new();
        let mut placed = Vec::with_capacity(delta.pools.len());
        for (i, change) in delta.pools.iter().enumerate() {
            let pool = match &change.pool {
                PushedPool::Read(pool) => ValidPool::pushed(i, (**pool).clone(), catalog),
                PushedPool::Unreadable { id, problem } => Err(SkippedPool {
                    id: id.clone(),
                    problems: vec![format!("pools[{i}]: {problem}")],
                }),
            };
            match pool {
                Ok(pool) => placed.push((change.after.as_deref(), pool)),
                Err(skip) => skipped.push(skip),
            }
        }
        let pools: Vec<&ValidPool> = placed.iter().map(|(_, p)| p).collect();
        let gone = delta
            .pools_removed
            .iter()
            .map(String::as_str)
            .chain(skipped.iter().map(|p| p.id.as_str()));
        let cells = health.update(&pools, gone);
        let built = PoolBuilder::new(health, allow_internal_upstreams);
        for ((after, pool), cell) in placed.iter().zip(cells) {
            let at = match after {
                None => 0,
                Some(after) => {
                    let found = listing.iter().position(|p| *p.id == **after);
                    found.ok_or_else(|| DeltaRefused::Unplaced {
                        after: (*after).to_owned(),
                    })? + 1
                }
            };
            let pool = built.listed(pool, cell).map_err(DeltaRefused::Invalid)?;
            affected.extend(pool.models.iter().cloned());
            listing.insert(at, pool);
        }
        // Left out: those left out before that the delta does not touch, and its own.
        let still_out = self
            .left_out
            .iter()
            .filter(|id| changed.binary_search(&&***id).is_err())
            .cloned()
            .chain(skipped.iter().map(|p| Arc::from(p.id.as_str())))
            .collect();
        Ok(Relisted {
            listing,
            skipped,
            still_out,
            affected,
        })
    }

    /// Pools pushed but left out of this configuration.
    pub fn left_out_count(&self) -> usize {
        self.left_out.len()
    }

    /// `GET /v1/models` for `key`: the servable models it may use, less those only its own
    /// account supplies. Rendered per call (rare), so no key holds a copy that a pool change
    /// would make stale.
    pub fn models_body(&self, key: &Key) -> Bytes {
        match (&key.allowed_models, self.sole_supplier.get(&*key.account)) {
            (None, None) => self.all_models_body.clone(),
            _ => models_body(self.visible_models(key)),
        }
    }

    /// The same list in Anthropic's shape, for clients of its API (they send
    /// `anthropic-version`): `{"data": [{"type": "model", "id", "display_name", "created_at"}],
    /// "has_more", "first_id", "last_id"}`.
    /// Listed under the names Claude Code accepts: a model's id and aliases that begin with
    /// `claude` or `anthropic` (it ignores every other id); the operator aliases other models
    /// to list them.
    pub fn anthropic_models_body(&self, key: &Key) -> Bytes {
        let claude_like = |name: &str| name.starts_with("claude") || name.starts_with("anthropic");
        let data: Vec<AnthropicModel<'_>> = self
            .visible_models(key)
            .flat_map(|m| {
                std::iter::once(&m.id)
                    .chain(&m.aliases)
                    .filter(|name| claude_like(name))
                    .map(move |name| AnthropicModel {
                        kind: "model",
                        id: name,
                        display_name: name,
                        created_at: rfc3339(m.created),
                    })
            })
            .collect();
        let list = AnthropicModelList {
            first_id: data.first().map(|m| m.id),
            last_id: data.last().map(|m| m.id),
            has_more: false,
            data,
        };
        serde_json::to_vec(&list)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    /// The servable models `key` may use, less those only its own account supplies.
    fn visible_models<'a>(&'a self, key: &'a Key) -> impl Iterator<Item = &'a ModelConfig> {
        let own = self.sole_supplier.get(&*key.account);
        self.servable.iter().filter(move |m| {
            key.allowed_models
                .as_ref()
                .is_none_or(|list| list.iter().any(|id| **id == *m.id))
                && own.is_none_or(|own| !own.iter().any(|id| **id == *m.id))
        })
    }
}

/// The FIFO queue after a delta's pools.
struct Relisted {
    listing: Vec<Arc<Pool>>,
    /// Pools the delta brought that this build leaves out.
    skipped: Vec<SkippedPool>,
    /// Every pool left out after the delta.
    still_out: HashSet<Arc<str>>,
    /// The models whose pools changed.
    affected: HashSet<Arc<str>>,
}

/// Why a configuration delta was not applied.
#[derive(Debug)]
pub enum DeltaRefused {
    /// It holds what a whole configuration would be refused for.
    Invalid(String),
    /// It places a pool after one this snapshot does not hold (one it left out): only the
    /// whole configuration can say where it goes.
    Unplaced { after: String },
}

/// Builds the pools of one snapshot: one clock reading shared by all of them.
struct PoolBuilder {
    epoch: Instant,
    since_epoch_ms: u64,
    now_unix_ms: u64,
    allow_internal_upstreams: bool,
}

impl PoolBuilder {
    fn new(health: &PoolHealthRegistry, allow_internal_upstreams: bool) -> Self {
        Self {
            epoch: health.epoch,
            since_epoch_ms: health.epoch.elapsed().as_millis() as u64,
            now_unix_ms: unix_millis(),
            allow_internal_upstreams,
        }
    }

    fn listed(&self, p: &ValidPool, health: Arc<HealthCell>) -> Result<Arc<Pool>, String> {
        let internal_ok = !p.marketplace || self.allow_internal_upstreams;
        let pool = Pool::new(
            p,
            internal_ok,
            (self.epoch, health),
            self.since_epoch_ms,
            self.now_unix_ms,
        )?;
        Ok(Arc::new(pool))
    }
}

/// Per seller, the servable models whose live pools all belong to that seller.
fn sole_suppliers(
    servable: &[ModelConfig],
    models: &HashMap<Arc<str>, Arc<Model>>,
) -> HashMap<Arc<str>, Vec<Arc<str>>> {
    let mut sole: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
    for m in servable {
        let Some(model) = models.get(m.id.as_str()) else {
            continue;
        };
        let mut sellers = model.pools.iter().filter(|p| p.live).map(|p| &p.seller);
        if let Some(Some(first)) = sellers.next() {
            if sellers.all(|s| s.as_ref() == Some(first)) {
                sole.entry(first.clone())
                    .or_default()
                    .push(model.id.clone());
            }
        }
    }
    sole
}

fn scheduled_prices(m: &ModelConfig) -> Vec<ScheduledPrices> {
    let mut out: Vec<ScheduledPrices> = m
        .scheduled_prices
        .iter()
        .map(|s| ScheduledPrices {
            effective_at_ms: s.effective_at_ms,
            version: s.version,
            prices: Prices::listed(
                (
                    s.input_price_micros_per_mtok,
                    s.output_price_micros_per_mtok,
                ),
                Some(s.cached_input_price_micros_per_mtok),
                s.cache_write_price_micros_per_mtok,
                s.cache_write_1h_price_micros_per_mtok,
            ),
        })
        .collect();
    out.sort_by_key(|s| (s.effective_at_ms, s.version));
    out
}

/// Where the configuration in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    /// The configuration file (no control plane).
    File,
    /// The sealed snapshot persisted by an earlier run, until the control plane answers.
    Persisted,
    /// The control plane.
    Control,
    /// Nothing yet: a control-plane proxy before its first configuration.
    None,
}

impl ConfigSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Persisted => "persisted",
            Self::Control => "control",
            Self::None => "none",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::File,
            1 => Self::Persisted,
            2 => Self::Control,
            _ => Self::None,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::File => 0,
            Self::Persisted => 1,
            Self::Control => 2,
            Self::None => 3,
        }
    }
}

/// The snapshot in use, swapped whole; shared by the gateway, the control-plane sync and the
/// operations endpoint. Requests in flight finish on the snapshot they started with.
pub struct SnapshotSlot {
    current: ArcSwap<Snapshot>,
    source: AtomicU8,
    /// Unix ms of the last exchange with the control plane that left this proxy up to date
    /// (0: never).
    last_sync_unix_ms: AtomicU64,
}

impl SnapshotSlot {
    pub fn new(snapshot: Snapshot, source: ConfigSource) -> Self {
        metrics::CONFIG_VERSION.set(snapshot.version as i64);
        Self {
            current: ArcSwap::from_pointee(snapshot),
            source: AtomicU8::new(source.to_u8()),
            last_sync_unix_ms: AtomicU64::new(0),
        }
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn version(&self) -> u64 {
        self.current.load().version
    }

    pub fn source(&self) -> ConfigSource {
        ConfigSource::from_u8(self.source.load(Ordering::Relaxed))
    }

    /// Replaces the snapshot unconditionally.
    pub fn store(&self, snapshot: Snapshot, source: ConfigSource) {
        metrics::CONFIG_VERSION.set(snapshot.version as i64);
        self.current.store(Arc::new(snapshot));
        self.source.store(source.to_u8(), Ordering::Relaxed);
    }

    /// Replaces the snapshot only if it is newer than the one in use; returns whether it did.
    /// (One writer, the control-plane sync, so check-then-store does not race.)
    pub fn store_if_newer(&self, snapshot: Snapshot, source: ConfigSource) -> bool {
        if snapshot.version <= self.version() {
            return false;
        }
        self.store(snapshot, source);
        true
    }

    pub fn mark_synced(&self) {
        self.last_sync_unix_ms
            .store(unix_millis(), Ordering::Relaxed);
    }

    /// Seconds since the control plane last confirmed this proxy is up to date.
    pub fn sync_age_s(&self) -> Option<u64> {
        match self.last_sync_unix_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(unix_millis().saturating_sub(at) / 1000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_up_once_after_summing() {
        let p = Prices {
            input: 150_000,
            output: 600_000,
            cached_input: 75_000,
            cache_write: 187_500,
            cache_write_1h: 300_000,
        };
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
            cached_tokens: 200,
            ..Usage::default()
        };
        // 800×0.15 + 200×0.075 + 500×0.6 = 120 + 15 + 300 = 435 micro-USD exactly.
        assert_eq!(
            p.cost(&u, 600_000),
            Cost {
                list_micros: 435,
                buyer_micros: 261
            }
        );
        // One input token at $0.15/M is 0.15 micro-USD: billed as 1.
        let one = Usage {
            prompt_tokens: 1,
            ..Usage::default()
        };
        assert_eq!(
            p.cost(&one, 600_000),
            Cost {
                list_micros: 1,
                buyer_micros: 1
            }
        );
        assert_eq!(p.cost(&Usage::default(), 600_000), Cost::default());
        // Cached tokens beyond the prompt (a confused upstream) are capped, never underflow.
        let odd = Usage {
            prompt_tokens: 1,
            cached_tokens: 5,
            ..Usage::default()
        };
        assert_eq!(p.cost(&odd, 1_000_000).list_micros, 1);
    }

    #[test]
    fn cache_writes_are_priced_at_their_own_rate() {
        let p = Prices {
            input: 3_000_000,
            output: 15_000_000,
            cached_input: 300_000,
            cache_write: 3_750_000,
            cache_write_1h: 6_000_000,
        };
        // 100 plain × 3 + 400 read × 0.3 + 500 written × 3.75 + 10 out × 15
        // = 300 + 120 + 1875 + 150 = 2445 micro-USD.
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 10,
            cached_tokens: 400,
            cache_write_tokens: 500,
            ..Usage::default()
        };
        assert_eq!(p.cost(&u, 1_000_000).list_micros, 2445);
        // 200 of the writes for an hour: 200 × (6 − 3.75) = 450 more.
        let hour = Usage {
            cache_write_1h_tokens: 200,
            ..u
        };
        assert_eq!(p.cost(&hour, 1_000_000).list_micros, 2895);
        // Reads and writes beyond the prompt (a confused upstream) are capped: never more
        // tokens priced than the prompt holds.
        let odd = Usage {
            prompt_tokens: 10,
            cached_tokens: 4,
            cache_write_tokens: 100,
            ..Usage::default()
        };
        // 4 × 0.3 + 6 × 3.75 = 1.2 + 22.5 = 23.7 → 24.
        assert_eq!(p.cost(&odd, 1_000_000).list_micros, 24);
    }

    /// The snapshot of `valid`, with nothing carried from an earlier one.
    fn build(valid: &ValidConfig) -> Snapshot {
        Snapshot::build(
            valid,
            1,
            &KeyCounterRegistry::new(16),
            &PoolHealthRegistry::default(),
        )
        .unwrap()
    }

    fn load(extra: &str) -> ValidConfig {
        tokn_config::load(
            &format!("{}\n{extra}", tokn_config::DEFAULT_CONFIG_TOML),
            Vec::new(),
            &|_| None,
        )
        .unwrap()
    }

    #[test]
    fn the_price_version_in_force_at_the_request_start_is_chosen() {
        let valid = load(
            r#"
[[models]]
id = "priced"
provider = "mock"
input_price_micros_per_mtok = 100
output_price_micros_per_mtok = 200
price_version = 3

[[models.scheduled_prices]]
version = 5
effective_at_ms = 2_000
input_price_micros_per_mtok = 500
output_price_micros_per_mtok = 600
cached_input_price_micros_per_mtok = 50
cache_write_price_micros_per_mtok = 625

[[models.scheduled_prices]]
version = 4
effective_at_ms = 1_000
input_price_micros_per_mtok = 300
output_price_micros_per_mtok = 400
cached_input_price_micros_per_mtok = 30
"#,
        );
        let snap = build(&valid);
        let m = &snap.models["priced"];
        let at = |ms| {
            let c = m.prices_at(ms);
            (c.version, c.prices.input)
        };
        // Listed out of order; applied in effective order.
        assert_eq!(at(0), (3, 100));
        assert_eq!(at(999), (3, 100));
        assert_eq!(at(1_000), (4, 300));
        assert_eq!(at(1_999), (4, 300));
        assert_eq!(at(2_000), (5, 500));
        assert_eq!(m.prices_at(u64::MAX).prices.cached_input, 50);
        assert_eq!(m.prices_at(u64::MAX).prices.cache_write, 625);
        // No hour's price: the cache write price.
        assert_eq!(m.prices_at(u64::MAX).prices.cache_write_1h, 625);
        // A version without a cache write price charges writes as input.
        assert_eq!(m.prices_at(1_000).prices.cache_write, 300);
        // No schedule: always the current prices, cached defaulting to input.
        let mock = &snap.models["mock"];
        assert_eq!(mock.prices_at(u64::MAX).version, 0);
        assert_eq!(mock.prices_at(0).prices, mock.prices);
    }

    #[test]
    fn expired_paused_and_exhausted_pools_are_unavailable() {
        let now = unix_millis();
        let valid = load(&format!(
            r#"
[[pools]]
id = "expired"
provider = "mock"
models = ["mock"]
price_ratio = 0.5
expires_at_ms = {past}

[[pools]]
id = "expiring-later"
provider = "mock"
models = ["mock"]
price_ratio = 0.5
expires_at_ms = {future}
seller = "seller-9"

[[pools]]
id = "paused"
provider = "mock"
models = ["mock"]
price_ratio = 0.5
status = "paused"

[[pools]]
id = "exhausted"
provider = "mock"
models = ["mock"]
price_ratio = 0.5
status = "exhausted"
"#,
            past = now - 1,
            future = now + 3_600_000
        ));
        let snap = build(&valid);
        let available: Vec<&str> = snap.models["mock"]
            .pools
            .iter()
            .filter(|p| p.is_available())
            .map(|p| &*p.id)
            .collect();
        assert_eq!(available, ["mock-pool", "expiring-later"]);
        assert_eq!(
            snap.models["mock"].pools[2].seller.as_deref(),
            Some("seller-9")
        );
    }

    #[test]
    fn a_model_only_its_own_seller_supplies_is_not_listed_to_that_sellers_keys() {
        let valid = load(
            r#"
[[models]]
id = "sold"
provider = "mock"
input_price_micros_per_mtok = 100
output_price_micros_per_mtok = 200

[[pools]]
id = "seller-9-pool"
provider = "mock"
models = ["sold", "mock"]
price_ratio = 0.5
seller = "seller-9"
"#,
        );
        let snap = build(&valid);
        let listed = |account: &str, allowed: Option<Vec<String>>| {
            let k = tokn_config::KeyConfig {
                id: "k".into(),
                account: account.into(),
                key: None,
                key_sha256: None,
                allowed_models: allowed,
                spend_cap_micros: None,
                requests_per_minute: None,
            };
            let key = Key::from_config(&k, Arc::default());
            let body: serde_json::Value = serde_json::from_slice(&snap.models_body(&key)).unwrap();
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        // `mock` has another supplier; `sold` has only seller-9.
        assert_eq!(listed("buyer", None), ["mock", "sold"]);
        assert_eq!(listed("seller-9", None), ["mock"]);
        assert_eq!(
            listed("seller-9", Some(vec!["sold".into()])),
            [] as [&str; 0]
        );
        assert_eq!(listed("buyer", Some(vec!["sold".into()])), ["sold"]);
    }

    #[test]
    fn back_offs_survive_configuration_changes_until_the_credential_changes() {
        let config = |key: &str, ratio: &str| {
            load(&format!(
                r#"
[[models]]
id = "gpt-test"
provider = "openai"
input_price_micros_per_mtok = 100
output_price_micros_per_mtok = 200

[[pools]]
id = "refused"
provider = "openai"
base_url = "https://api.openai.com/v1"
api_key = "{key}"
models = ["gpt-test"]
price_ratio = {ratio}
"#
            ))
        };
        let (counters, health) = (KeyCounterRegistry::new(16), PoolHealthRegistry::default());
        let pool = |snap: &Snapshot| snap.models["gpt-test"].pools[0].clone();
        let first = Snapshot::build(&config("sk-old", "0.5"), 1, &counters, &health).unwrap();
        pool(&first).back_off(300_000);
        // A hundred unrelated changes (and one to the pool's own price): still quarantined.
        for version in 2..102 {
            let snap = Snapshot::build(&config("sk-old", "0.5"), version, &counters, &health);
            assert!(!pool(&snap.unwrap()).is_available());
        }
        let repriced = Snapshot::build(&config("sk-old", "0.6"), 102, &counters, &health).unwrap();
        assert!(!pool(&repriced).is_available());
        // A new credential: tried at once.
        let replaced = Snapshot::build(&config("sk-new", "0.6"), 103, &counters, &health).unwrap();
        assert!(pool(&replaced).is_available());
        // A pool that left the configuration is forgotten.
        Snapshot::build(&load(""), 104, &counters, &health).unwrap();
        assert!(
            lock(&health.by_pool).len() == 1,
            "only the mock pool is kept"
        );
    }

    /// A seller's pool as the control plane pushes it.
    fn pushed_pool(id: &str, key: &str, ppm: u64) -> tokn_config::PushedPool {
        serde_json::from_value(serde_json::json!({
            "id": id, "provider": "openai", "base_url": "https://api.openai.com/v1",
            "api_key": key, "models": ["gpt-test"], "price_ratio_ppm": ppm,
            "seller": "seller-1", "face_value_micros": 1_000_000_000u64}))
        .unwrap()
    }

    fn change(after: Option<&str>, pool: tokn_config::PushedPool) -> tokn_config::PoolChange {
        tokn_config::PoolChange {
            after: after.map(str::to_owned),
            pool,
        }
    }

    const GPT_TEST: &str = r#"
[[models]]
id = "gpt-test"
provider = "openai"
input_price_micros_per_mtok = 100
output_price_micros_per_mtok = 200
"#;

    fn order(snap: &Snapshot) -> Vec<String> {
        snap.models["gpt-test"]
            .pools
            .iter()
            .map(|p| p.id.to_string())
            .collect()
    }

    /// Pools listed, changed and removed by deltas land where a whole configuration would put
    /// them; a pool that did not change is not rebuilt and keeps its health, one whose price
    /// changed keeps its health, one whose credential changed starts afresh, one removed is
    /// forgotten.
    #[test]
    fn pool_deltas_keep_fifo_order_and_the_health_of_what_they_do_not_touch() {
        let (counters, health) = (KeyCounterRegistry::new(16), PoolHealthRegistry::default());
        let first = Snapshot::build(&load(GPT_TEST), 1, &counters, &health).unwrap();
        let delta = |from, pools, removed: &[&str]| ConfigDelta {
            from,
            version: from + 1,
            pools,
            pools_removed: removed.iter().map(|r| (*r).to_owned()).collect(),
            ..ConfigDelta::default()
        };
        let apply = |snap: &Snapshot, d: &ConfigDelta| {
            let (next, skipped) = snap.with_delta(d, &counters, &health, false).unwrap();
            assert!(skipped.is_empty(), "{skipped:?}");
            next
        };
        let a = pushed_pool("a", "sk-a", 600_000);
        let b = pushed_pool("b", "sk-b", 600_000);
        let c = pushed_pool("c", "sk-c", 600_000);
        let listed = apply(
            &first,
            &delta(
                1,
                vec![change(None, a), change(Some("a"), b), change(Some("b"), c)],
                &[],
            ),
        );
        assert_eq!(order(&listed), ["a", "b", "c"]);
        assert_eq!(listed.pool_count, first.pool_count + 3);
        let pool = |snap: &Snapshot, id: &str| {
            snap.models["gpt-test"]
                .pools
                .iter()
                .find(|p| &*p.id == id)
                .unwrap()
                .clone()
        };
        for id in ["a", "b", "c"] {
            pool(&listed, id).back_off(300_000);
        }
        // b repriced in place, c's credential replaced, a removed, d listed last.
        let d = pushed_pool("d", "sk-d", 600_000);
        let next = apply(
            &listed,
            &delta(
                2,
                vec![
                    change(None, pushed_pool("b", "sk-b", 500_000)),
                    change(Some("b"), pushed_pool("c", "sk-c2", 600_000)),
                    change(Some("c"), d),
                ],
                &["a"],
            ),
        );
        assert_eq!(order(&next), ["b", "c", "d"]);
        assert_eq!(pool(&next, "b").price_ratio_ppm, 500_000);
        assert!(
            !pool(&next, "b").is_available(),
            "same credential: still backed off"
        );
        assert!(
            pool(&next, "c").is_available(),
            "a new credential starts afresh"
        );
        assert!(!lock(&health.by_pool).contains_key("a"), "a is forgotten");
        // A key-only change shares every pool.
        let keys_only = apply(&next, &delta(3, Vec::new(), &[]));
        assert!(Arc::ptr_eq(&pool(&next, "d"), &pool(&keys_only, "d")));
        // Repricing d rebuilds d alone.
        let repriced = apply(
            &keys_only,
            &delta(
                4,
                vec![change(Some("c"), pushed_pool("d", "sk-d", 700_000))],
                &[],
            ),
        );
        assert!(Arc::ptr_eq(&pool(&keys_only, "b"), &pool(&repriced, "b")));
        assert!(
            Arc::ptr_eq(&keys_only.models["mock"], &repriced.models["mock"]),
            "a model whose pools did not change is shared"
        );
        assert!(!Arc::ptr_eq(&pool(&keys_only, "d"), &pool(&repriced, "d")));
        assert_eq!(order(&repriced), ["b", "c", "d"]);
        // The same pools pushed whole land in the same order.
        let whole = load(&format!(
            "{GPT_TEST}\n{}",
            ["b", "c", "d"]
                .iter()
                .map(|id| format!(
                    "[[pools]]\nid = \"{id}\"\nprovider = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\napi_key = \"sk-{id}\"\nmodels = [\"gpt-test\"]\nprice_ratio = 0.6\n"
                ))
                .collect::<String>()
        ));
        let rebuilt = Snapshot::build(&whole, 6, &counters, &health).unwrap();
        assert_eq!(order(&rebuilt), order(&repriced));
    }

    /// A delta placing a pool after one this proxy does not hold is refused as unplaced (the
    /// proxy then asks for everything); one whose pool this build refuses leaves it out and
    /// counts it.
    #[test]
    fn a_pool_placed_after_an_unknown_pool_is_unplaced_and_a_refused_one_left_out() {
        let (counters, health) = (KeyCounterRegistry::new(16), PoolHealthRegistry::default());
        let first = Snapshot::build(&load(GPT_TEST), 1, &counters, &health).unwrap();
        let d = ConfigDelta {
            from: 1,
            version: 2,
            pools: vec![change(Some("nowhere"), pushed_pool("a", "sk-a", 600_000))],
            ..ConfigDelta::default()
        };
        assert!(matches!(
            first.with_delta(&d, &counters, &health, false),
            Err(DeltaRefused::Unplaced { after }) if after == "nowhere"
        ));
        let mut refused: serde_json::Value =
            serde_json::to_value(pushed_pool("x", "sk-x", 600_000)).unwrap();
        refused["base_url"] = "http://10.0.0.1/v1".into();
        let d = ConfigDelta {
            pools: vec![change(None, serde_json::from_value(refused).unwrap())],
            ..d
        };
        let (next, skipped) = first.with_delta(&d, &counters, &health, false).unwrap();
        assert_eq!(skipped.len(), 1);
        assert_eq!(next.left_out_count(), 1);
        assert_eq!(next.pool_count, first.pool_count);
        // Removed, it is no longer counted.
        let d = ConfigDelta {
            from: 2,
            version: 3,
            pools_removed: vec!["x".into()],
            ..ConfigDelta::default()
        };
        let (next, _) = next.with_delta(&d, &counters, &health, false).unwrap();
        assert_eq!(next.left_out_count(), 0);
    }

    /// A catalog delta reprices models without rebuilding any pool.
    #[test]
    fn a_catalog_delta_reprices_and_keeps_every_pool() {
        let (counters, health) = (KeyCounterRegistry::new(16), PoolHealthRegistry::default());
        let first = Snapshot::build(&load(GPT_TEST), 1, &counters, &health).unwrap();
        let (listed, _) = first
            .with_delta(
                &ConfigDelta {
                    from: 1,
                    version: 2,
                    pools: vec![change(None, pushed_pool("a", "sk-a", 600_000))],
                    ..ConfigDelta::default()
                },
                &counters,
                &health,
                false,
            )
            .unwrap();
        let mut models = listed.catalog.to_vec();
        let gpt = models.iter_mut().find(|m| m.id == "gpt-test").unwrap();
        gpt.input_price_micros_per_mtok = 150;
        gpt.price_version = 9;
        let (repriced, _) = listed
            .with_delta(
                &ConfigDelta {
                    from: 2,
                    version: 3,
                    models: Some(models),
                    ..ConfigDelta::default()
                },
                &counters,
                &health,
                false,
            )
            .unwrap();
        let model = &repriced.models["gpt-test"];
        assert_eq!((model.prices.input, model.price_version), (150, 9));
        assert!(Arc::ptr_eq(
            &listed.models["gpt-test"].pools[0],
            &model.pools[0]
        ));
    }

    #[test]
    fn key_counters_survive_a_new_snapshot() {
        let valid = load("");
        let counters = KeyCounterRegistry::new(16);
        let first = Snapshot::build(&valid, 1, &counters, &PoolHealthRegistry::default()).unwrap();
        let key = first.keys.values().next().unwrap().clone();
        key.counters.add_spend(42);
        let second = Snapshot::build(&valid, 2, &counters, &PoolHealthRegistry::default()).unwrap();
        let again = second.keys.values().next().unwrap();
        assert!(!Arc::ptr_eq(&key, again));
        assert_eq!(again.counters.spend(), 42);
    }

    #[test]
    fn pools_keep_fifo_order_and_back_off() {
        let valid = tokn_config::load(
            &format!(
                "{}\n[[pools]]\nid = \"second\"\nprovider = \"mock\"\nmodels = [\"mock\"]\nprice_ratio = 0.5\n",
                tokn_config::DEFAULT_CONFIG_TOML
            ),
            Vec::new(),
            &|_| None,
        )
        .unwrap();
        let snap = build(&valid);
        let model = &snap.models["mock"];
        let ids: Vec<&str> = model.pools.iter().map(|p| &*p.id).collect();
        assert_eq!(ids, ["mock-pool", "second"]);
        assert!(model.pools[0].is_available());
        model.pools[0].back_off(60_000);
        assert!(!model.pools[0].is_available());
        assert!(model.pools[1].is_available());
    }
}
