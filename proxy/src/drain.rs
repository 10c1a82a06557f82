//! Exiting as soon as a graceful shutdown has nothing left to do.
//!
//! On SIGTERM Pingora stops accepting, tells every service to stop, and then sleeps the whole
//! `grace_period_s` before it exits, even when nothing is running (pingora-core 0.9,
//! `Server::run`). This module counts what a shutdown must wait for — requests in flight and
//! background services still finishing their shutdown work (the spool's last fsync, the sealed
//! snapshot's writer) — and ends the process once both are zero. The grace period stays the
//! upper bound: Pingora's own exit still comes at its end. From the first signal on, responses
//! close their connections ([`is_closing`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::sync::broadcast;
use tracing::info;

static REQUESTS: AtomicUsize = AtomicUsize::new(0);
/// A shutdown or an upgrade has begun: responses close their connections.
static CLOSING: AtomicBool = AtomicBool::new(false);
static SERVICES: AtomicUsize = AtomicUsize::new(0);

/// How often a shutting-down process looks whether it is done.
const POLL: Duration = Duration::from_millis(20);

/// A request in flight, from its context's creation to its drop.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> Self {
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        REQUESTS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A background service whose return (after its shutdown work) a shutdown waits for. Counted
/// from its creation, so one that has not started yet is waited for too.
pub struct Tracked<S>(S);

impl<S> Tracked<S> {
    pub fn new(service: S) -> Self {
        SERVICES.fetch_add(1, Ordering::Relaxed);
        Self(service)
    }
}

#[async_trait]
impl<S: BackgroundService + Send + Sync> BackgroundService for Tracked<S> {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.start(shutdown).await;
        SERVICES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether this process is handing over or shutting down. Its responses then say
/// `Connection: close`, so keep-alive clients move to the new process while this one still
/// answers, instead of losing a request to Pingora dropping idle connections at shutdown.
pub fn is_closing() -> bool {
    CLOSING.load(Ordering::Relaxed)
}

fn drained() -> bool {
    REQUESTS.load(Ordering::Relaxed) == 0 && SERVICES.load(Ordering::Relaxed) == 0
}

/// Watches the server's phases from a thread of its own; once the grace period starts, ends
/// the process as soon as nothing is left in flight (at most `grace` later; Pingora's own exit
/// comes then anyway).
pub fn exit_when_drained(mut phases: broadcast::Receiver<ExecutionPhase>, grace: Duration) {
    let watcher = std::thread::Builder::new()
        .name("tokn drain".to_owned())
        .spawn(move || {
            loop {
                match phases.blocking_recv() {
                    Ok(ExecutionPhase::ShutdownGracePeriod) => break,
                    Ok(
                        ExecutionPhase::GracefulUpgradeTransferringFds
                        | ExecutionPhase::GracefulUpgradeCloseTimeout
                        | ExecutionPhase::GracefulTerminate,
                    ) => CLOSING.store(true, Ordering::Relaxed),
                    Err(broadcast::error::RecvError::Closed) => return,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                }
            }
            let until = Instant::now() + grace;
            while Instant::now() < until {
                if drained() {
                    info!(
                        message = "Nothing left in flight: exiting before the grace period ends."
                    );
                    std::process::exit(0);
                }
                // Its own thread, not a runtime worker: sleeping blocks nothing else.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(POLL);
            }
        });
    if let Err(e) = watcher {
        // Only the early exit is lost: the grace period still ends the process.
        tracing::warn!(message = "The drain watcher could not start.", error = %e);
    }
}
