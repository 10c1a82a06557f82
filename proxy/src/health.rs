//! A pool's health, shared by every request that uses it and carried from one configuration to
//! the next (see `snapshot::PoolHealthRegistry`).
//!
//! Four states, after Envoy's outlier detection:
//! - **quarantined**: its credential was refused (or its seller cannot pay); only time or a
//!   new credential ends it, and no probe is ever sent with the refused credential;
//! - **backed off**: the provider asked for a pause (429, or an overload answer);
//! - **ejected**: `eject_after_failures` errors in a row (5xx, no connection); the ejection
//!   doubles with each one in a row (from `throttle_backoff_ms` up to `throttle_backoff_max_ms`)
//!   and a success ends it — one failure never takes a pool out;
//! - **half-open**: every pool of a model is backed off or ejected; rather than answer 503 to
//!   everyone, one request a second probes the pool whose pause ends first.
//!
//! Times are milliseconds after the registry's epoch (one monotonic reading per check).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// When the whole model is out, one probe per pool per this many milliseconds.
pub const PROBE_INTERVAL_MS: u64 = 1_000;

/// The ejection rule (from `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    /// Errors in a row that eject a pool.
    pub after_failures: u32,
    /// The first ejection's length; each one in a row doubles it.
    pub base_ms: u64,
    pub max_ms: u64,
}

#[derive(Default)]
pub struct HealthCell {
    quarantined_until_ms: AtomicU64,
    /// A pause the provider asked for.
    paused_until_ms: AtomicU64,
    /// An ejection after errors in a row.
    ejected_until_ms: AtomicU64,
    failures_in_a_row: AtomicU32,
    ejections_in_a_row: AtomicU32,
    probed_at_ms: AtomicU64,
}

impl HealthCell {
    /// Neither quarantined, paused nor ejected at `now`.
    pub fn is_usable(&self, now: u64) -> bool {
        self.usable_from() <= now
    }

    /// Refused credential: out for `ms` (never shortened).
    pub fn quarantine(&self, now: u64, ms: u64) {
        self.quarantined_until_ms
            .fetch_max(now.saturating_add(ms), Ordering::Relaxed);
    }

    /// The provider asked for a pause of `ms` (never shortened).
    pub fn pause(&self, now: u64, ms: u64) {
        self.paused_until_ms
            .fetch_max(now.saturating_add(ms), Ordering::Relaxed);
    }

    /// One more error in a row; the ejection's length when this one ejects the pool.
    pub fn failed(&self, now: u64, rule: &Ejection) -> Option<u64> {
        let in_a_row = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row < rule.after_failures.max(1) {
            return None;
        }
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        let doublings = self
            .ejections_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            .min(20);
        let ms = rule
            .base_ms
            .saturating_mul(1 << doublings)
            .min(rule.max_ms.max(rule.base_ms));
        self.ejected_until_ms
            .fetch_max(now.saturating_add(ms), Ordering::Relaxed);
        Some(ms)
    }

    /// The pool answered: its errors in a row and any ejection end (a pause the provider asked
    /// for runs its course). Reads first: the hot path writes the shared line only when there is
    /// something to reset.
    pub fn succeeded(&self) {
        if self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_a_row.store(0, Ordering::Relaxed);
        }
        if self.ejections_in_a_row.load(Ordering::Relaxed) != 0 {
            self.ejections_in_a_row.store(0, Ordering::Relaxed);
        }
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// When its ejection ends, if it is out only because it is ejected (a pool a half-open
    /// probe may try).
    pub fn ejected_until(&self, now: u64) -> Option<u64> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let otherwise = self
            .quarantined_until_ms
            .load(Ordering::Relaxed)
            .max(self.paused_until_ms.load(Ordering::Relaxed));
        (otherwise <= now && until > now).then_some(until)
    }

    /// When it may serve again (quarantine, pause and ejection all over).
    pub fn usable_from(&self) -> u64 {
        self.quarantined_until_ms
            .load(Ordering::Relaxed)
            .max(self.paused_until_ms.load(Ordering::Relaxed))
            .max(self.ejected_until_ms.load(Ordering::Relaxed))
    }

    /// Claims this interval's one probe; false when another request has it.
    pub fn claim_probe(&self, now: u64) -> bool {
        let last = self.probed_at_ms.load(Ordering::Relaxed);
        if last != 0 && now < last.saturating_add(PROBE_INTERVAL_MS) {
            return false;
        }
        self.probed_at_ms
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Ejection = Ejection {
        after_failures: 3,
        base_ms: 1_000,
        max_ms: 5_000,
    };

    #[test]
    fn errors_in_a_row_eject_for_doubling_times_and_a_success_forgives_them() {
        let h = HealthCell::default();
        assert_eq!(h.failed(10, &RULE), None);
        assert_eq!(h.failed(10, &RULE), None);
        assert!(h.is_usable(10), "two errors do not eject");
        assert_eq!(h.failed(10, &RULE), Some(1_000));
        assert!(!h.is_usable(10) && h.is_usable(1_010));
        // In a row again: twice as long, then capped.
        for _ in 0..2 {
            assert_eq!(h.failed(2_000, &RULE), None);
        }
        assert_eq!(h.failed(2_000, &RULE), Some(2_000));
        for _ in 0..2 {
            h.failed(5_000, &RULE);
        }
        assert_eq!(h.failed(5_000, &RULE), Some(4_000));
        for _ in 0..2 {
            h.failed(9_000, &RULE);
        }
        assert_eq!(h.failed(9_000, &RULE), Some(5_000));
        // A success ends the ejection and the count.
        h.succeeded();
        assert!(h.is_usable(9_001));
        assert_eq!(h.failed(9_001, &RULE), None);
        h.succeeded();
        assert_eq!(h.failed(9_002, &RULE), None);
        assert_eq!(h.failed(9_002, &RULE), None);
        assert_eq!(h.failed(9_002, &RULE), Some(1_000));
    }

    #[test]
    fn an_ejection_is_probed_once_an_interval_and_a_pause_or_quarantine_never() {
        let h = HealthCell::default();
        h.quarantine(0, 300_000);
        assert_eq!(h.ejected_until(1), None);
        assert_eq!(h.usable_from(), 300_000);
        let h = HealthCell::default();
        h.pause(0, 10_000);
        assert_eq!(h.ejected_until(1), None, "the provider's pause is honoured");
        h.succeeded();
        assert!(
            !h.is_usable(1),
            "a success does not cut the provider's pause short"
        );
        let h = HealthCell::default();
        for _ in 0..3 {
            h.failed(0, &RULE);
        }
        assert_eq!(h.ejected_until(1), Some(1_000));
        assert!(h.claim_probe(1));
        assert!(!h.claim_probe(500), "one probe an interval");
        assert!(h.claim_probe(1 + PROBE_INTERVAL_MS));
        h.succeeded();
        assert!(h.is_usable(2));
    }
}
