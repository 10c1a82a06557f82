//! The proxy's one way to take a `std::sync::Mutex`.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking it even if a panic elsewhere poisoned it: everything the proxy guards this
/// way (counters, sums, queues, a file writer) is left consistent between statements, so a
/// panicked holder costs at most its own request.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
