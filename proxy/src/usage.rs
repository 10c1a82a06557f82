//! Usage records: exactly one per request, written before the response's last bytes leave.
//!
//! `UsageLog` writes each record once as a JSON line to the audit log (every request) and, with
//! a control plane, to the spool (`spool.rs`) that ships it to the ledger (authenticated
//! requests only: a request without a key bills no one). Each is one `write(2)`: once it
//! returns, the line is in the kernel's page cache and survives a crash of the proxy, so no
//! response completes before its record is safe. (A handoff to a writer thread was measured
//! first: the per-record thread wake-ups cost ~25% of the proxy's CPU at c=32.)
//!
//! Busy, many requests finish in one turn of the runtime: their lines are gathered and written
//! together, one `write(2)` per file for all of them. The first request of a gathering yields
//! once (the runtime runs every other ready request meanwhile) and then writes what gathered;
//! the others wait for that write. No request goes on before its line is written, and a gathering
//! whose first request is dropped is written by the drop.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use serde::Serialize;
use tokn_config::SpoolFullPolicy;

use crate::spool::Spool;
use crate::sync::lock;

/// Token counts for one request. `cached_tokens` (read from the provider's prompt cache) and
/// `cache_write_tokens` (written to it; `cache_write_1h_tokens` of them to a cache that lives an
/// hour) are parts of `prompt_tokens`, and `reasoning_tokens` a part of `completion_tokens`, as
/// OpenAI counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    pub cache_write_1h_tokens: u64,
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

/// One request's bill of materials, borrowed from the request's state. Money is integer
/// micro-USD.
#[derive(Debug, Clone, Serialize)]
pub struct UsageRecord<'a> {
    pub request_id: &'a str,
    /// Unix milliseconds when the request arrived.
    pub started_at_ms: u64,
    pub key_id: Option<&'a str>,
    pub account: Option<&'a str>,
    pub pool_id: Option<&'a str>,
    /// The seller account paid for the pool's tokens.
    pub seller: Option<&'a str>,
    pub model: Option<&'a str>,
    pub provider: Option<&'static str>,
    /// The catalog price version the costs below were computed with (the one in force when
    /// the request started).
    pub price_version: Option<u64>,
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
    pub upstream_request_id: Option<&'a str>,
    /// The hot-state reservation that held the cost, when it was reserved ahead of the request
    /// under its own id (the ledger's drain releases it by that id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation: Option<&'a str>,
}

/// Why a record could not be written.
#[derive(Debug)]
pub struct SinkError {
    pub why: String,
    /// It bills someone and did not reach the spool: served, not billed.
    pub unbilled: bool,
}

impl SinkError {
    fn new(why: String) -> Self {
        Self {
            why,
            unbilled: false,
        }
    }
}

/// Where usage records go: the audit log, and the spool when a control plane bills them.
pub struct UsageLog {
    /// The JSON-lines audit log, when configured.
    audit: Option<File>,
    spool: Option<Arc<Spool>>,
    on_spool_full: SpoolFullPolicy,
    gathering: Mutex<Gathering>,
}

/// Lines waiting for the next write, and whether a request is on its way to write them.
#[derive(Default)]
struct Gathering {
    intents: Vec<Waiting>,
    records: Vec<Waiting>,
    led: bool,
}

/// A request's line and where its outcome goes.
struct Waiting {
    request_id: String,
    line: Vec<u8>,
    /// It bills someone: it goes to the spool too.
    billed: bool,
    done: oneshot::Sender<Result<(), SinkError>>,
}

/// Writes the gathering when dropped: after its leader's yield, or when its leader is dropped.
struct WriteOnDrop<'a>(&'a UsageLog);

impl Drop for WriteOnDrop<'_> {
    fn drop(&mut self) {
        self.0.write_gathered();
    }
}

/// Longest line the log writes in one piece; records are a few hundred bytes.
const LINE_BYTES_TYPICAL: usize = 512;

impl UsageLog {
    /// Opens (creating) the audit log at `path` for appending.
    pub fn open(
        path: &Path,
        spool: Option<Arc<Spool>>,
        on_spool_full: SpoolFullPolicy,
    ) -> std::io::Result<Self> {
        let audit = if path.as_os_str().is_empty() {
            None
        } else {
            Some(OpenOptions::new().create(true).append(true).open(path)?)
        };
        Ok(Self {
            audit,
            spool,
            on_spool_full,
            gathering: Mutex::default(),
        })
    }

    /// Whether billed traffic is to be refused now: the spool is full and the policy says
    /// not to serve what cannot be billed.
    pub fn refuses_billed_traffic(&self) -> bool {
        self.on_spool_full == SpoolFullPolicy::Refuse
            && self
                .spool
                .as_ref()
                .is_some_and(|s| s.is_full(LINE_BYTES_TYPICAL as u64))
    }

    /// Writes the record: to the audit log (if any), and to the spool when it bills someone.
    /// Returns once it is written.
    pub async fn record(&self, record: &UsageRecord<'_>) -> Result<(), SinkError> {
        let billed = self.spool.is_some() && record.key_id.is_some();
        if self.audit.is_none() && !billed {
            return Ok(());
        }
        let line = line_of(record)?;
        self.gather(false, record.request_id, line, billed).await
    }

    /// Journals a billed request's intent before it goes upstream (`record`: what its record
    /// would say were the proxy lost now; see `Spool::intend_all`). Nothing to do without a spool.
    /// Returns once it is written.
    pub async fn intend(&self, record: &UsageRecord<'_>) -> Result<(), SinkError> {
        match &self.spool {
            Some(_) if record.key_id.is_some() => {
                let line = line_of(record)?;
                self.gather(true, record.request_id, line, true).await
            }
            _ => Ok(()),
        }
    }

    /// Adds a line to the gathering and waits until it is written (see the module's comment).
    async fn gather(
        &self,
        intent: bool,
        request_id: &str,
        line: Vec<u8>,
        billed: bool,
    ) -> Result<(), SinkError> {
        let (done, written) = oneshot::channel();
        let waiting = Waiting {
            request_id: request_id.to_owned(),
            line,
            billed,
            done,
        };
        let leads = {
            let mut g = lock(&self.gathering);
            if intent {
                g.intents.push(waiting);
            } else {
                g.records.push(waiting);
            }
            !std::mem::replace(&mut g.led, true)
        };
        if leads {
            let _write = WriteOnDrop(self);
            tokio::task::yield_now().await;
        }
        written
            .await
            .unwrap_or_else(|_| Err(SinkError::new("the usage writer went away".to_owned())))
    }

    /// Writes what gathered: the intents in one write to the journal, the records in one to the
    /// audit log and one to the spool; tells each request its outcome.
    fn write_gathered(&self) {
        let Gathering {
            intents, records, ..
        } = std::mem::take(&mut *lock(&self.gathering));
        if !intents.is_empty() {
            let mut done = Vec::with_capacity(intents.len());
            let mut lines = Vec::with_capacity(intents.len());
            for w in intents {
                lines.push((w.request_id, w.line));
                done.push(w.done);
            }
            let outcome = match &self.spool {
                Some(spool) => spool.intend_all(lines).map_err(|e| e.to_string()),
                None => Ok(()),
            };
            for d in done {
                let _ = d.send(
                    outcome
                        .clone()
                        .map_err(|e| SinkError::new(format!("intent journal: {e}"))),
                );
            }
        }
        if records.is_empty() {
            return;
        }
        let audited = match &self.audit {
            Some(_) => {
                let lines: Vec<&[u8]> = records.iter().map(|w| w.line.as_slice()).collect();
                self.audit(&lines.concat()).map_err(|e| e.why)
            }
            None => Ok(()),
        };
        let billed: Vec<(&str, &[u8])> = records
            .iter()
            .filter(|w| w.billed)
            .map(|w| (w.request_id.as_str(), w.line.as_slice()))
            .collect();
        let mut spooled = match &self.spool {
            Some(spool) if !billed.is_empty() => spool.record_all(&billed).into_iter(),
            _ => Vec::new().into_iter(),
        };
        for w in records {
            let outcome = match w.billed.then(|| spooled.next()).flatten() {
                Some(Err(e)) => Err(SinkError {
                    why: e.to_string(),
                    unbilled: true,
                }),
                _ => audited.clone().map_err(SinkError::new),
            };
            let _ = w.done.send(outcome);
        }
    }

    /// Writes lines (whole records) to the audit log, if there is one, in one write: O_APPEND
    /// places them after every other line.
    pub fn audit(&self, lines: &[u8]) -> Result<(), SinkError> {
        match &self.audit {
            Some(audit) => (&*audit)
                .write_all(lines)
                .map_err(|e| SinkError::new(format!("audit log: {e}"))),
            None => Ok(()),
        }
    }
}

/// A record as one JSON line.
fn line_of(record: &UsageRecord<'_>) -> Result<Vec<u8>, SinkError> {
    let mut line = Vec::with_capacity(LINE_BYTES_TYPICAL);
    serde_json::to_writer(&mut line, record).map_err(|e| SinkError::new(e.to_string()))?;
    line.push(b'\n');
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Poll;

    fn record(id: &str) -> UsageRecord<'_> {
        UsageRecord {
            request_id: id,
            started_at_ms: 1,
            key_id: Some("k"),
            account: Some("a"),
            pool_id: None,
            seller: None,
            model: Some("m"),
            provider: Some("mock"),
            price_version: Some(0),
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
            reservation: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_land_once_each_as_whole_lines() {
        let dir = std::env::temp_dir().join(format!("tokn-usage-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("usage.jsonl");
        let _ = std::fs::remove_file(&path);
        let sink = Arc::new(UsageLog::open(&path, None, SpoolFullPolicy::Refuse).unwrap());
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let sink = sink.clone();
                tokio::spawn(
                    async move { sink.record(&record(&format!("req-{i}"))).await.unwrap() },
                )
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

    /// A directory of this test's own.
    fn temp_dir(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "tokn-usage-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ))
    }

    /// Requests finishing in one turn of a one-thread runtime are written together; one whose
    /// first request is dropped while it waits for the others is still written, and every
    /// request of it hears so.
    #[tokio::test]
    async fn a_gathering_is_written_whole_even_when_its_first_request_is_dropped() {
        let dir = temp_dir("gather");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("usage.jsonl");
        let sink = UsageLog::open(&path, None, SpoolFullPolicy::Refuse).unwrap();
        let first_record = record("first");
        let mut first = Box::pin(sink.record(&first_record));
        // Polled once: it gathers its line and yields to the requests that are ready.
        let pending =
            std::future::poll_fn(|cx| Poll::Ready(first.as_mut().poll(cx).is_pending())).await;
        assert!(pending);
        let second_record = record("second");
        let second = sink.record(&second_record);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        drop(first);
        second.await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("\"first\"") && text.contains("\"second\""));
        // The next request starts a gathering of its own.
        sink.record(&record("third")).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn without_an_audit_log_billed_records_go_to_the_spool_alone() {
        let dir = temp_dir("spool-only");
        let spool = Arc::new(
            Spool::open(
                &dir.join("spool"),
                crate::spool::SpoolLimits {
                    bytes_max: 1 << 20,
                    segment_bytes_max: 1 << 16,
                },
            )
            .unwrap(),
        );
        let sink =
            UsageLog::open(Path::new(""), Some(spool.clone()), SpoolFullPolicy::Refuse).unwrap();
        sink.record(&record("billed")).await.unwrap();
        let unbilled = UsageRecord {
            key_id: None,
            ..record("unbilled")
        };
        sink.record(&unbilled).await.unwrap();
        let batch = spool
            .read_batch(spool.cursor().unwrap(), 10, 1 << 20)
            .unwrap();
        assert_eq!(batch.records, 1);
        assert!(String::from_utf8_lossy(&batch.lines).contains("\"billed\""));
        // Nothing else was written beside the spool.
        let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(entries.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
