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
    /// The log holds every change after this version (older ones fell to the cap, or came
    /// before this process).
    whole_after: u64,
}

impl Default for Log {
    /// Versions of this process start above any an earlier process gave out (its start time in
    /// ms, shifted past a million versions a millisecond), so a proxy that followed the last
    /// process gets a complete answer, never this one's changes after a stale version.
    fn default() -> Self {
        let version = (crate::store::now_ms().max(0) as u64) << 20;
        Self {
            version,
            entries: VecDeque::new(),
            whole_after: version,
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
                // A version whose entries are partly gone is no longer whole.
                if let Some((gone, _)) = log.entries.pop_front() {
                    log.whole_after = log.whole_after.max(gone);
                }
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
        let (version, changes) = self.logged_since(after);
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

    /// The log's version and what it holds after `after`; `None` when it does not hold all of
    /// it (a follower that is new, from before the log's whole part or another process, or
    /// from the future), which calls for a complete answer.
    fn logged_since(&self, after: u64) -> (u64, Option<Changes>) {
        let log = lock(&self.log);
        if after < log.whole_after || after > log.version {
            return (log.version, None);
        }
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
}

/// Balances and pools that changed.
type Changes = (Vec<WalletBalance>, Vec<PoolConsumption>);

#[cfg(test)]
mod tests {
    use super::*;

    fn wallet(account: &str, seq: i64) -> WalletBalance {
        WalletBalance {
            account: account.to_owned(),
            balance_micros: 100 * seq,
            seq,
        }
    }

    #[test]
    fn a_follower_at_the_current_version_is_told_of_changes_only() {
        let feed = BalanceFeed::default();
        // New: a complete answer; it gives the version to follow from.
        let (start, changes) = feed.logged_since(0);
        assert!(changes.is_none());
        // Nothing changed since: nothing to answer (not a complete answer in a loop).
        let (_, changes) = feed.logged_since(start);
        assert_eq!(changes.map(|(b, p)| (b.len(), p.len())), Some((0, 0)));
        feed.publish(&[wallet("a", 1), wallet("b", 1)], &[]);
        let (v1, changes) = feed.logged_since(start);
        assert_eq!(changes.unwrap().0.len(), 2);
        feed.publish(&[wallet("a", 2)], &[]);
        let (_, changes) = feed.logged_since(v1);
        assert_eq!(changes.unwrap().0[0].seq, 2);
        // From another process's versions, or from the future: everything.
        assert!(feed.logged_since(start - 1).1.is_none());
        assert!(feed.logged_since(v1 + 10).1.is_none());
    }

    #[test]
    fn a_follower_from_before_what_the_cap_kept_gets_everything() {
        let feed = BalanceFeed::default();
        let (start, _) = feed.logged_since(0);
        let many: Vec<WalletBalance> = (0..LOG_ENTRIES_MAX as i64 - 1)
            .map(|i| wallet(&format!("w{i}"), 1))
            .collect();
        feed.publish(&many, &[]);
        let (v1, _) = feed.logged_since(start);
        assert!(feed.logged_since(start).1.is_some(), "all of it is kept");
        // Two more entries: the first version loses one of its entries to the cap.
        feed.publish(&[wallet("x", 1), wallet("y", 1)], &[]);
        assert!(
            feed.logged_since(start).1.is_none(),
            "v1 is no longer whole"
        );
        assert_eq!(feed.logged_since(v1).1.unwrap().0.len(), 2);
    }
}
