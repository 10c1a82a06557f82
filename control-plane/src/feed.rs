//! The balance feed proxies without Redis follow (`GET /internal/v1/balances`): wallet balances
//! and pool consumption as the ledger holds them, as a versioned log of changes. A proxy asks for
//! what changed after the version it has; one that is new, or fell further behind than the log
//! keeps, gets every balance (`complete`). Entries carry the ledger's own order (`seq`, or a
//! consumption that only grows), so a proxy may see one twice or out of order and still keep the
//! newest.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::ledger::{PoolConsumption, WalletBalance};
use crate::lock;
use crate::store::{Store, StoreResult};

/// Changes kept for proxies that are behind (older ones get everything instead).
const LOG_ENTRIES_MAX: usize = 100_000;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FeedAnswer {
    /// Ask for what comes after this next.
    pub version: u64,
    /// Every balance and pool, not only changes: the proxy's book is complete after it.
    pub complete: bool,
    /// Wallet balances that changed (every wallet when `complete`).
    pub balances: Vec<WalletBalance>,
    /// Pool consumption that changed (every pool when `complete`).
    pub pools: Vec<PoolConsumption>,
}

enum Entry {
    Wallet(WalletBalance),
    Pool(PoolConsumption),
}

struct Log {
    version: u64,
    entries: VecDeque<(u64, Entry)>,
}

impl Default for Log {
    /// Versions of this process start above any an earlier process gave out (its start time in
    /// ms, shifted past a million versions a millisecond), so a proxy that followed the last
    /// process gets a complete answer, never this one's changes after a stale version.
    fn default() -> Self {
        Self {
            version: (crate::store::now_ms().max(0) as u64) << 20,
            entries: VecDeque::new(),
        }
    }
}

pub struct BalanceFeed {
    log: Mutex<Log>,
    changed: watch::Sender<u64>,
}

impl Default for BalanceFeed {
    fn default() -> Self {
        Self {
            log: Mutex::new(Log::default()),
            changed: watch::Sender::new(0),
        }
    }
}

impl BalanceFeed {
    /// Adds committed changes.
    pub fn publish(&self, wallets: &[WalletBalance], pools: &[PoolConsumption]) {
        if wallets.is_empty() && pools.is_empty() {
            return;
        }
        let version = {
            let mut log = lock(&self.log);
            log.version += 1;
            let v = log.version;
            let new = wallets
                .iter()
                .cloned()
                .map(Entry::Wallet)
                .chain(pools.iter().cloned().map(Entry::Pool));
            log.entries.extend(new.map(|e| (v, e)));
            while log.entries.len() > LOG_ENTRIES_MAX {
                log.entries.pop_front();
            }
            v
        };
        self.changed.send_replace(version);
    }

    /// What changed after `after`, waiting up to `wait` for something; `None` if nothing did.
    pub async fn since(
        &self,
        store: &Store,
        after: u64,
        wait: Duration,
    ) -> StoreResult<Option<FeedAnswer>> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(answer) = self.answer(store, after).await? {
                return Ok(Some(answer));
            }
            let changed = tokio::time::timeout_at(deadline, rx.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return Ok(None);
            }
        }
    }

    async fn answer(&self, store: &Store, after: u64) -> StoreResult<Option<FeedAnswer>> {
        let (version, changes) = {
            let log = lock(&self.log);
            let oldest = log.entries.front().map_or(log.version + 1, |(v, _)| *v);
            // The oldest version may have lost entries to the cap: a follower from before it gets
            // a complete answer.
            if after == 0 || after < oldest || after > log.version {
                (log.version, None)
            } else {
                let mut balances = Vec::new();
                let mut pools = Vec::new();
                for (_, e) in log.entries.iter().filter(|(v, _)| *v > after) {
                    match e {
                        Entry::Wallet(w) => balances.push(w.clone()),
                        Entry::Pool(p) => pools.push(p.clone()),
                    }
                }
                (log.version, Some((balances, pools)))
            }
        };
        Ok(match changes {
            // New, or too far behind: everything, from the store (read after the version, so
            // nothing committed since is missed: it is in the log after `version`).
            None => Some(FeedAnswer {
                version,
                complete: true,
                balances: store.wallet_balances(None).await?,
                pools: store.pool_consumption(None).await?,
            }),
            Some((balances, pools)) if balances.is_empty() && pools.is_empty() => None,
            Some((balances, pools)) => Some(FeedAnswer {
                version,
                complete: false,
                balances,
                pools,
            }),
        })
    }
}
