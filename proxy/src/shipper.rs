//! The usage shipper: a background service that sends the spool's records to the control plane
//! (`POST /internal/v1/usage`, proxy token) in batches (three on their way at once through a
//! backlog), and moves the spool's cursor, in spool order, only past batches the control plane
//! has applied; after a failure it sends again from the cursor. The control plane applies each
//! request id once, so a batch sent again after a crash or a lost answer moves no money twice.
//! It also fsyncs the spool on its interval.
//!
//! While the control plane (or its database) is down, batches fail and are retried with
//! back-off; the proxy keeps serving and the spool keeps the records until they are applied.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::stream::{FuturesOrdered, StreamExt};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Deserialize;
use tracing::error;

use crate::clock::unix_millis;
use crate::metrics;
use crate::money::{BalanceIn, Money, PoolIn, Shipping};
use crate::retry::Retry;
use crate::spool::{Batch, Cursor, Spool};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A batch is about this many bytes at most (the control plane takes 16 MiB).
const BATCH_BYTES_MAX: usize = 4 << 20;
const SHIP_TIMEOUT: Duration = Duration::from_secs(30);
/// Batches on their way at once while there is a backlog.
const IN_FLIGHT_MAX: usize = 3;

pub struct Shipper {
    spool: Arc<Spool>,
    money: Arc<Money>,
    http: reqwest::Client,
    url: String,
    token: String,
    batch_records_max: usize,
    idle: Duration,
    fsync_every: Duration,
}

/// The control plane's answer (`Ingested`): what it applied, and the balances and pool
/// consumption after it.
#[derive(Default, Deserialize)]
struct Ingested {
    applied: u64,
    duplicates: u64,
    refused: Vec<Refused>,
    #[serde(default)]
    balances: Vec<BalanceIn>,
    #[serde(default)]
    pools: Vec<PoolIn>,
}

#[derive(Deserialize)]
struct Refused {
    line: usize,
    reason: String,
}

impl Shipper {
    pub fn new(
        spool: Arc<Spool>,
        money: Arc<Money>,
        http: reqwest::Client,
        control_url: &str,
        token: &str,
        usage: &tokn_config::UsageConfig,
    ) -> Self {
        Self {
            spool,
            money,
            http,
            url: format!("{control_url}/internal/v1/usage"),
            token: token.to_owned(),
            batch_records_max: usage.ship_batch_records_max,
            idle: Duration::from_millis(usage.ship_interval_ms),
            fsync_every: Duration::from_millis(usage.spool_fsync_interval_ms),
        }
    }

    pub fn spool(&self) -> Arc<Spool> {
        self.spool.clone()
    }

    async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut retry = Retry::new("usage shipping", BACKOFF_MIN, BACKOFF_MAX);
        let mut synced = Instant::now();
        // Everything before `acked` is applied; batches up to `read_to` are on their way.
        let mut acked = match self.spool.cursor() {
            Ok(c) => c,
            Err(e) => {
                error!(message = "The usage spool's cursor cannot be read; nothing is shipped.", error = %e);
                return;
            }
        };
        let mut read_to = acked;
        let mut in_flight = FuturesOrdered::new();
        loop {
            if synced.elapsed() >= self.fsync_every {
                self.sync().await;
                synced = Instant::now();
            }
            // While batches come out full (a backlog), the next one is sent before the last is
            // answered: the control plane reads one while its database writes the other.
            let mut fill = Ok(());
            while in_flight.len() < IN_FLIGHT_MAX {
                match self.read(read_to).await {
                    Ok(Some((batch, shipping))) => {
                        read_to = batch.next;
                        let full = self.is_full(&batch);
                        in_flight.push_back(self.post(batch, shipping));
                        if !full {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        fill = Err(e);
                        break;
                    }
                }
            }
            let outcome = match fill {
                Err(e) => Err(e),
                Ok(()) => match in_flight.next().await {
                    None => {
                        metrics::USAGE_DRAIN_LAG.set(0);
                        Ok(false)
                    }
                    Some((batch, shipping, answer)) => match answer {
                        Ok(ingested) => self.absorb(&batch, shipping, ingested).await.map(|()| {
                            acked = batch.next;
                            self.is_full(&batch)
                        }),
                        Err(e) => Err(e),
                    },
                },
            };
            let wait = match outcome {
                // A backlog goes out batch after batch; otherwise the next batch gathers for an
                // interval, so a busy proxy does not pay a round trip and a cursor fsync for
                // every few records.
                Ok(full) => {
                    retry.succeeded();
                    if full || !in_flight.is_empty() {
                        Duration::ZERO
                    } else {
                        self.idle.min(self.fsync_every)
                    }
                }
                Err(e) => {
                    // Later batches may have been applied too: they are sent again from the
                    // cursor, and the ledger skips what it has.
                    in_flight.clear();
                    read_to = acked;
                    metrics::USAGE_SHIP_ERRORS.inc();
                    retry.failed(&e)
                }
            };
            metrics::USAGE_SPOOL_BYTES.set(self.spool.backlog_bytes() as i64);
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {
                    // Whatever was written is flushed to disk before the process ends.
                    self.sync().await;
                    return;
                }
            }
        }
    }

    async fn sync(&self) {
        let spool = self.spool.clone();
        let synced = tokio::task::spawn_blocking(move || spool.sync()).await;
        if let Ok(Err(e)) = synced {
            error!(message = "The usage spool could not be fsynced.", error = %e);
        }
    }

    /// The batch after `from`, counted by the book as on its way; `None` when there is nothing
    /// to ship.
    async fn read(&self, from: Cursor) -> Result<Option<(Batch, Shipping)>, String> {
        let (spool, money) = (self.spool.clone(), self.money.clone());
        let records_max = self.batch_records_max;
        tokio::task::spawn_blocking(move || {
            let batch = spool
                .read_batch(from, records_max, BATCH_BYTES_MAX)
                .map_err(|e| format!("reading the spool: {e}"))?;
            // Only a torn tail passed over is a batch too: the cursor moves past it.
            Ok((batch.records > 0 || batch.next != from).then(|| {
                let shipping = money.shipping(&batch.lines);
                (batch, shipping)
            }))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Whether more may be waiting behind `batch`.
    fn is_full(&self, batch: &Batch) -> bool {
        batch.records >= self.batch_records_max || batch.lines.len() >= BATCH_BYTES_MAX / 2
    }

    /// Sends a batch to the control plane; its answer, with the batch.
    async fn post(
        &self,
        batch: Batch,
        shipping: Shipping,
    ) -> (Batch, Shipping, Result<Ingested, String>) {
        if batch.records == 0 {
            return (batch, shipping, Ok(Ingested::default()));
        }
        let answer = async {
            let answer = self
                .http
                .post(&self.url)
                .bearer_auth(&self.token)
                .header("content-type", "application/x-ndjson")
                .timeout(SHIP_TIMEOUT)
                .body(batch.lines.clone())
                .send()
                .await
                .map_err(|e| format!("transport: {}", e.without_url()))?;
            let status = answer.status();
            if !status.is_success() {
                return Err(format!("the control plane answered {status}"));
            }
            answer
                .json::<Ingested>()
                .await
                .map_err(|e| format!("unreadable answer: {}", e.without_url()))
        }
        .await;
        (batch, shipping, answer)
    }

    /// The control plane applied `batch`: the book and the cursor follow, in spool order.
    async fn absorb(
        &self,
        batch: &Batch,
        shipping: Shipping,
        ingested: Ingested,
    ) -> Result<(), String> {
        for r in &ingested.refused {
            // The record is kept in the audit log; the spool moves past it.
            error!(message = "The control plane refused a usage record.", line = r.line, reason = %r.reason);
        }
        metrics::USAGE_SHIPPED
            .with_label_values(&["applied"])
            .inc_by(ingested.applied);
        metrics::USAGE_SHIPPED
            .with_label_values(&["duplicate"])
            .inc_by(ingested.duplicates);
        metrics::USAGE_SHIPPED
            .with_label_values(&["refused"])
            .inc_by(ingested.refused.len() as u64);
        if let Some(at) = oldest_started_at(&batch.lines) {
            metrics::USAGE_DRAIN_LAG.set(unix_millis().saturating_sub(at) as i64);
        }
        // The cursor moves first: a batch whose cursor could not move is sent again, so its
        // records must stay held (dropping `shipping` keeps them) or they would be released twice.
        self.acknowledge(batch).await?;
        // The ledger has these records: the book takes the balances after them and releases
        // what they held, together.
        self.money
            .applied(shipping, &ingested.balances, &ingested.pools);
        Ok(())
    }

    async fn acknowledge(&self, batch: &Batch) -> Result<(), String> {
        let spool = self.spool.clone();
        let (to, bytes) = (batch.next, batch.bytes());
        tokio::task::spawn_blocking(move || spool.acknowledge(to, bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("moving the spool's cursor: {e}"))
    }
}

/// `started_at_ms` of a batch's first record (the oldest: records are spooled in order).
fn oldest_started_at(lines: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Started {
        started_at_ms: u64,
    }
    let first = lines.split(|b| *b == b'\n').next()?;
    serde_json::from_slice::<Started>(first)
        .ok()
        .map(|s| s.started_at_ms)
}

#[async_trait]
impl BackgroundService for Shipper {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.run(shutdown).await;
    }
}
