//! Events throttled per source address: a client with `max` events within `WINDOW` is answered
//! 429 for the rest of the window. Failed sign-ins (`FAILURES_MAX` bad tokens — admin, proxy
//! or account — refuse whatever the client presents next, before any token is looked at;
//! tokens are 256-bit random strings, so guessing is hopeless anyway: the throttle keeps a
//! scanner from costing lookups and filling logs) and waitlist sign-ups (`WAITLIST_MAX`).
//! Counted per IP address in memory, per replica; the table is bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bad tokens a source may present per window.
pub const FAILURES_MAX: u32 = 50;
/// Waitlist sign-ups a source may make per window.
pub const WAITLIST_MAX: u32 = 10;
/// Sign-in links a source may ask for per window.
pub const SIGNIN_LINKS_MAX: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked at once; past it, windows that ended are forgotten first, then the oldest.
const SOURCES_MAX: usize = 10_000;

pub struct Throttle {
    max: u32,
    sources: Mutex<HashMap<IpAddr, Window>>,
}

#[derive(Clone, Copy)]
struct Window {
    started: Instant,
    events: u32,
}

impl Throttle {
    /// A throttle allowing `max` events per source per `WINDOW`.
    pub fn new(max: u32) -> Self {
        Self {
            max,
            sources: Mutex::default(),
        }
    }

    /// `Some(seconds until the window ends)` when `source` may not try again yet.
    pub fn refused(&self, source: IpAddr) -> Option<u64> {
        let sources = crate::lock(&self.sources);
        let w = sources.get(&source)?;
        let left = WINDOW.checked_sub(w.started.elapsed())?;
        (w.events >= self.max).then(|| left.as_secs().max(1))
    }

    /// Counts one event of `source` (a bad token, a sign-up).
    pub fn count(&self, source: IpAddr) {
        let mut sources = crate::lock(&self.sources);
        if sources.len() >= SOURCES_MAX && !sources.contains_key(&source) {
            sources.retain(|_, w| w.started.elapsed() < WINDOW);
            if sources.len() >= SOURCES_MAX {
                if let Some(oldest) = sources
                    .iter()
                    .min_by_key(|(_, w)| w.started)
                    .map(|(a, _)| *a)
                {
                    sources.remove(&oldest);
                }
            }
        }
        let w = sources.entry(source).or_insert(Window {
            started: Instant::now(),
            events: 0,
        });
        if w.started.elapsed() >= WINDOW {
            *w = Window {
                started: Instant::now(),
                events: 0,
            };
        }
        w.events += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_refused_after_its_failures_and_others_are_not() {
        let t = Throttle::new(FAILURES_MAX);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..FAILURES_MAX - 1 {
            t.count(a);
        }
        assert_eq!(t.refused(a), None);
        t.count(a);
        let wait = t.refused(a).expect("throttled");
        assert!((1..=60).contains(&wait), "{wait}");
        assert_eq!(t.refused(b), None);
    }

    #[test]
    fn the_table_stays_bounded() {
        let t = Throttle::new(FAILURES_MAX);
        for i in 0..(SOURCES_MAX as u32 + 100) {
            t.count(IpAddr::from(i.to_be_bytes()));
        }
        assert!(crate::lock(&t.sources).len() <= SOURCES_MAX);
    }
}
