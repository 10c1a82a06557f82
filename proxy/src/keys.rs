//! A buyer key as the hot path sees it, and the in-process counters each key carries. Keys come
//! from the snapshot (embedded mode) or from Redis hot state (fleet mode); either way the
//! plaintext key is never held, only its id, account and limits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokn_config::KeyConfig;

use crate::sync::lock;

/// A buyer key as the hot path sees it: its id and account, never the key itself.
#[derive(Debug)]
pub struct Key {
    pub id: Arc<str>,
    pub account: Arc<str>,
    /// `None`: every model.
    pub allowed_models: Option<Vec<Arc<str>>>,
    /// Most this key may spend in total, micro-USD; unlimited when absent.
    pub spend_cap_micros: Option<u64>,
    /// Requests per minute; unlimited when absent.
    pub requests_per_minute: Option<u32>,
    /// In-process rate and spend counters (the whole story in in-process mode; the fallback
    /// while Redis is unreachable in Redis mode). Shared by every snapshot's copy of the key.
    pub counters: Arc<KeyCounters>,
}

impl Key {
    /// The hot-path view of one key; `counters`: its in-process counters, carried across
    /// configuration changes.
    pub fn from_config(k: &KeyConfig, counters: Arc<KeyCounters>) -> Self {
        Self {
            id: k.id.as_str().into(),
            account: k.account.as_str().into(),
            allowed_models: k
                .allowed_models
                .as_ref()
                .map(|list| list.iter().map(|m| Arc::from(m.as_str())).collect()),
            spend_cap_micros: k.spend_cap_micros,
            requests_per_minute: k.requests_per_minute,
            counters,
        }
    }

    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|list| list.iter().any(|m| &**m == model))
    }
}

/// In-process counters of one key. The rate counter packs the unix minute (high 32 bits) and
/// the requests counted in it (low 32 bits) into one atomic.
#[derive(Debug, Default)]
pub struct KeyCounters {
    rate: AtomicU64,
    spend_micros: AtomicU64,
}

impl KeyCounters {
    /// Counts one request in `unix_minute`; returns the requests counted in that minute,
    /// this one included.
    pub fn hit(&self, unix_minute: u64) -> u64 {
        let minute = unix_minute & 0xffff_ffff;
        let current = self.rate.load(Ordering::Relaxed);
        if current >> 32 != minute {
            // A new window: restart at one. Losing this race to another request is fine, it
            // restarted the window already and the add below counts us in it.
            let fresh = (minute << 32) | 1;
            if self
                .rate
                .compare_exchange(current, fresh, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return 1;
            }
        }
        let after = self.rate.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if after >> 32 == minute {
            after & 0xffff_ffff
        } else {
            // Another request moved the window meanwhile: count this one as the first.
            1
        }
    }

    pub fn add_spend(&self, micros: u64) {
        self.spend_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// What this proxy has counted for the key since it started, micro-USD.
    pub fn spend(&self) -> u64 {
        self.spend_micros.load(Ordering::Relaxed)
    }
}

/// The keys a snapshot accepts, by SHA-256, in shards: a snapshot that differs by a few keys
/// (a configuration delta) shares every shard but theirs with the one before, so applying a
/// change copies a few hundred entries, not every key.
#[derive(Clone)]
pub struct KeyMap {
    shards: Vec<Arc<HashMap<[u8; 32], Arc<Key>>>>,
}

/// 256 shards: 10⁵ keys are ~400 a shard.
const KEY_SHARDS: usize = 256;

impl Default for KeyMap {
    fn default() -> Self {
        Self {
            shards: vec![Arc::default(); KEY_SHARDS],
        }
    }
}

impl KeyMap {
    fn shard(hash: &[u8; 32]) -> usize {
        // A SHA-256: every byte is as good as any other.
        usize::from(hash[0]) % KEY_SHARDS
    }

    pub fn get(&self, hash: &[u8; 32]) -> Option<&Arc<Key>> {
        self.shards[Self::shard(hash)].get(hash)
    }

    /// Adds or replaces a key (copying its shard if another snapshot shares it).
    pub fn insert(&mut self, hash: [u8; 32], key: Arc<Key>) {
        Arc::make_mut(&mut self.shards[Self::shard(&hash)]).insert(hash, key);
    }

    pub fn remove(&mut self, hash: &[u8; 32]) {
        let shard = &mut self.shards[Self::shard(hash)];
        if shard.contains_key(hash) {
            Arc::make_mut(shard).remove(hash);
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.is_empty())
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<Key>> {
        self.shards.iter().flat_map(|s| s.values())
    }
}

/// The counters of every key, by key id, so a key keeps its counts when a new snapshot (or a
/// fresh Redis lookup) builds a new `Key`. Consulted only when keys are built, never per
/// request. Bounded (for Redis mode, where any key may be looked up): when full, counters no
/// live key refers to are dropped, at most once every `max / 16` keys looked up while full (a
/// sweep visits every entry); a key that finds no room gets fresh counters, not remembered. A snapshot that lists its keys
/// raises the bound to hold them all ([`KeyCounterRegistry::hold_at_least`]).
pub struct KeyCounterRegistry {
    map: Mutex<RegistryMap>,
    max: AtomicUsize,
}

#[derive(Default)]
struct RegistryMap {
    counters: HashMap<Arc<str>, Arc<KeyCounters>>,
    /// Keys looked up while it was full: one in `max / 16` of them sweeps it.
    full_misses: usize,
}

impl KeyCounterRegistry {
    pub fn new(max: usize) -> Self {
        Self {
            map: Mutex::new(RegistryMap::default()),
            max: AtomicUsize::new(max.max(1)),
        }
    }

    /// Makes room for `keys` keys, and an eighth more for the ones to come.
    pub fn hold_at_least(&self, keys: usize) {
        self.max
            .fetch_max(keys.saturating_add(keys / 8), Ordering::Relaxed);
    }

    pub fn get(&self, key_id: &str) -> Arc<KeyCounters> {
        let max = self.max.load(Ordering::Relaxed);
        let mut map = lock(&self.map);
        if let Some(c) = map.counters.get(key_id) {
            return c.clone();
        }
        if map.counters.len() >= max {
            if map.full_misses.is_multiple_of((max / 16).max(1)) {
                map.counters.retain(|_, c| Arc::strong_count(c) > 1);
            }
            map.full_misses += 1;
        }
        let counters = Arc::new(KeyCounters::default());
        if map.counters.len() < max {
            map.counters.insert(key_id.into(), counters.clone());
        }
        counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counter_restarts_each_minute() {
        let c = KeyCounters::default();
        assert_eq!(c.hit(100), 1);
        assert_eq!(c.hit(100), 2);
        assert_eq!(c.hit(100), 3);
        assert_eq!(c.hit(101), 1);
        assert_eq!(c.hit(101), 2);
        c.add_spend(5);
        c.add_spend(7);
        assert_eq!(c.spend(), 12);
    }

    #[test]
    fn counter_registry_shares_by_id_and_stays_bounded() {
        let reg = KeyCounterRegistry::new(2);
        let a = reg.get("a");
        a.add_spend(3);
        assert_eq!(reg.get("a").spend(), 3);
        let b = reg.get("b");
        // Full, and both are referenced: a third key gets unremembered counters.
        let c = reg.get("c");
        c.add_spend(1);
        assert_eq!(reg.get("c").spend(), 0);
        drop((a, b));
        // Unreferenced counters make room.
        let d = reg.get("d");
        d.add_spend(2);
        assert_eq!(reg.get("d").spend(), 2);
    }

    #[test]
    fn a_snapshot_listing_more_keys_than_the_bound_keeps_every_keys_counters() {
        let reg = KeyCounterRegistry::new(2);
        reg.hold_at_least(1_000);
        let held: Vec<Arc<KeyCounters>> = (0..1_000).map(|i| reg.get(&format!("k{i}"))).collect();
        for (i, c) in held.iter().enumerate() {
            c.add_spend(i as u64 + 1);
        }
        assert!((0..1_000).all(|i| reg.get(&format!("k{i}")).spend() == i as u64 + 1));
    }
}
