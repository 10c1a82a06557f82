//! Wall-clock readings, in one place. Durations on the request path use `Instant`; these are
//! for timestamps that leave the process (records, `created`, token lifetimes).

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_secs() -> u64 {
    unix_millis() / 1000
}

/// How often a request thread's timer anchor goes off.
const ANCHOR_PERIOD: Duration = Duration::from_secs(1);

thread_local! {
    static ANCHORED: Cell<bool> = const { Cell::new(false) };
}

/// Keeps a timer pending on this thread's runtime (once per thread; a no-op outside one).
///
/// Tokio wakes its time driver — a system call, and one more turn of the event loop — whenever
/// a timer is armed earlier than every timer already pending. Every request arms one (the
/// upstream header timeout), so on an otherwise idle runtime each request paid for that wake-up.
/// With a timer always due within a second, the request's later timers arm silently; the
/// anchor costs one wake-up a second.
pub fn anchor_timers() {
    if ANCHORED.with(|a| a.replace(true)) {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async {
            let mut tick = tokio::time::interval(ANCHOR_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
            }
        });
    }
}
