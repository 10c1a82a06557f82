//! Retrying a dependency that failed (the control plane's configuration watch, its balance
//! feed, the usage drain): a bounded exponential backoff, and a log line when something changes —
//! the first failure, a different error, the recovery — never one per try, so a proxy started an
//! hour before its control plane logs a handful of lines, not thousands.

use std::fmt::Display;
use std::time::Duration;

use tracing::{debug, info, warn};

pub struct Retry {
    /// What is retried, as logged ("control-plane sync").
    what: &'static str,
    min: Duration,
    max: Duration,
    next: Duration,
    /// Failures in a row.
    failures: u64,
    /// The last failure's text: a different one is news.
    last_error: String,
}

impl Retry {
    pub fn new(what: &'static str, min: Duration, max: Duration) -> Self {
        Self {
            what,
            min,
            max,
            next: min,
            failures: 0,
            last_error: String::new(),
        }
    }

    /// A try failed: logs it if it is news, and returns how long to wait before the next try
    /// (doubling from `min` up to `max`).
    pub fn failed(&mut self, error: &dyn Display) -> Duration {
        let error = error.to_string();
        let wait = self.next;
        let retry_in_ms = wait.as_millis() as u64;
        if self.failures == 0 || error != self.last_error {
            warn!(message = "A dependency is failing; retrying with backoff (logged again when the error changes or it recovers).",
                dependency = self.what, error = %error, retry_in_ms);
        } else {
            debug!(
                message = "Still failing.",
                dependency = self.what,
                failures = self.failures + 1,
                retry_in_ms
            );
        }
        self.failures += 1;
        self.last_error = error;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// A try succeeded: the backoff starts over, and a recovery is logged.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(
                message = "A dependency recovered.",
                dependency = self.what,
                failures = self.failures
            );
        }
        self.failures = 0;
        self.next = self.min;
        self.last_error.clear();
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_up_to_its_bound_and_starts_over_after_a_success() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut retry = Retry::new("test", min, max);
        let waits: Vec<u128> = (0..6)
            .map(|_| retry.failed(&"refused").as_millis())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(retry.failures(), 6);
        retry.succeeded();
        assert_eq!(retry.failures(), 0);
        assert_eq!(retry.failed(&"refused"), min);
    }

    #[test]
    fn a_long_outage_logs_its_changes_not_its_tries() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;

        /// Counts the events at WARN or above.
        struct Warnings(Arc<Mutex<usize>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                if *event.metadata().level() <= tracing::Level::WARN {
                    *self.0.lock().unwrap() += 1;
                }
            }
        }
        let warnings = Arc::new(Mutex::new(0));
        let subscriber = tracing_subscriber::registry().with(Warnings(warnings.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let mut retry = Retry::new("test", Duration::from_millis(1), Duration::from_secs(1));
            // 300 tries refused, then 300 timing out: two changes, two lines.
            for _ in 0..300 {
                retry.failed(&"connection refused");
            }
            for _ in 0..300 {
                retry.failed(&"timeout");
            }
            retry.succeeded();
            // A new outage is news again.
            retry.failed(&"connection refused");
        });
        assert_eq!(*warnings.lock().unwrap(), 3);
    }
}
