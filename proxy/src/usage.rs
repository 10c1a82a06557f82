//! Usage records: exactly one per request, written before the response's last bytes leave.
//!
//! The sink interface is what the control plane's drain will plug into later; today's sink appends
//! JSON lines to a file from a dedicated writer thread. Requests hand a record over and wait for
//! the writer's acknowledgement (group commit: one `write` for every record queued meanwhile), so
//! no tokio worker ever blocks on the file and no response completes before its record is written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::thread;

use serde::Serialize;
use tokio::sync::oneshot;

/// Token counts for one request. `cached_tokens` is a subset of `prompt_tokens` and
/// `reasoning_tokens` a subset of `completion_tokens`, as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
}

/// Where a record's token counts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// Counted by the upstream and reported in its response.
    Reported,
    /// The upstream reported nothing (e.g. the client left mid-stream): estimated as one token
    /// per 4 bytes of request body and one per 4 bytes of generated text relayed so far.
    Estimated,
    /// No tokens were consumed (rejected before reaching an upstream).
    None,
}

/// One request's bill of materials. Money is integer micro-USD.
#[derive(Debug, Clone, Serialize)]
pub struct UsageRecord {
    pub request_id: String,
    /// Unix milliseconds when the request arrived.
    pub started_at_ms: u64,
    pub key_id: Option<String>,
    pub account: Option<String>,
    pub pool_id: Option<String>,
    pub model: Option<String>,
    pub provider: Option<&'static str>,
    pub stream: bool,
    pub status: u16,
    /// `ok`, or why the request ended otherwise (e.g. `client_disconnected`, `invalid_api_key`).
    pub outcome: &'static str,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub list_cost_micros: u64,
    pub buyer_cost_micros: u64,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub upstream_attempts: u32,
    /// The upstream's own request id, for disputes with a provider.
    pub upstream_request_id: Option<String>,
}

/// Why a record could not be written.
#[derive(Debug)]
pub struct SinkError(pub String);

/// Destination of usage records.
#[async_trait::async_trait]
pub trait UsageSink: Send + Sync {
    /// Returns once the record is durably handed over (for the file sink: written to the file).
    async fn record(&self, record: &UsageRecord) -> Result<(), SinkError>;
}

type Job = (Vec<u8>, oneshot::Sender<Result<(), String>>);

/// Appends JSON lines to a file from one writer thread.
pub struct JsonlFileSink {
    tx: mpsc::SyncSender<Job>,
}

impl JsonlFileSink {
    /// Opens (creating) `path` for appending and starts the writer thread. `queue_max` bounds the
    /// records waiting to be written; beyond it callers wait.
    pub fn open(path: &Path, queue_max: usize) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = mpsc::sync_channel::<Job>(queue_max);
        thread::Builder::new()
            .name("tokn-usage-writer".to_owned())
            .spawn(move || write_loop(file, rx))?;
        Ok(Self { tx })
    }
}

fn write_loop(mut file: File, rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut acks = Vec::with_capacity(256);
    while let Ok(first) = rx.recv() {
        batch.clear();
        let mut next = Some(first);
        while let Some((line, ack)) = next {
            batch.extend_from_slice(&line);
            acks.push(ack);
            next = if acks.len() < 4096 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        // One append per batch; O_APPEND keeps each batch contiguous in the file.
        let result = file.write_all(&batch).map_err(|e| e.to_string());
        for ack in acks.drain(..) {
            let _ = ack.send(result.clone());
        }
    }
}

#[async_trait::async_trait]
impl UsageSink for JsonlFileSink {
    async fn record(&self, record: &UsageRecord) -> Result<(), SinkError> {
        let mut line = serde_json::to_vec(record).map_err(|e| SinkError(e.to_string()))?;
        line.push(b'\n');
        let (ack_tx, ack_rx) = oneshot::channel();
        let mut job = (line, ack_tx);
        // The queue is bounded: when it is full, wait in small steps rather than block a worker.
        loop {
            match self.tx.try_send(job) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(back)) => {
                    job = back;
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    return Err(SinkError("usage writer thread has stopped".to_owned()))
                }
            }
        }
        match ack_rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SinkError(e)),
            Err(_) => Err(SinkError("usage writer dropped the record".to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> UsageRecord {
        UsageRecord {
            request_id: format!("req-{i}"),
            started_at_ms: 1,
            key_id: Some("k".into()),
            account: Some("a".into()),
            pool_id: None,
            model: Some("m".into()),
            provider: Some("mock"),
            stream: false,
            status: 200,
            outcome: "ok",
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                ..Usage::default()
            },
            usage_source: UsageSource::Reported,
            list_cost_micros: 10,
            buyer_cost_micros: 6,
            latency_ms: 1,
            ttft_ms: None,
            upstream_attempts: 1,
            upstream_request_id: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_land_once_each_as_whole_lines() {
        let dir = std::env::temp_dir().join(format!("tokn-usage-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("usage.jsonl");
        let _ = std::fs::remove_file(&path);
        let sink = std::sync::Arc::new(JsonlFileSink::open(&path, 8).unwrap());
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let sink = sink.clone();
                tokio::spawn(async move { sink.record(&record(i)).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 500);
        assert_eq!(text.lines().count(), 500);
    }
}
