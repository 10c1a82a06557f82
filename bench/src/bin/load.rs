//! `tokn-load`: the benchmark's load generator for what wrk cannot do — SSE time to first token,
//! fixed-rate load with coordinated-omission correction, and thousands of held-open streams —
//! plus closed-loop latency. Every response is checked (status, and usage where expected), so a
//! fast wrong answer never counts. Prints one JSON object.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Mode {
    /// `conns` connections, each sending the next request when the last one ends.
    Closed,
    /// `rate` requests per second on a schedule; latency counts from the scheduled time.
    Rate,
    /// `conns` concurrent streams opened at once and held to the end; prints `holding` on
    /// stderr once every stream has its first byte.
    Hold,
}

/// The API a request speaks: where it goes and what a complete answer shows.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Api {
    /// `POST /v1/chat/completions`: usage with `completion_tokens`.
    Chat,
    /// `POST /v1/messages` (Anthropic): usage with `output_tokens`, and a stream's
    /// `message_stop`.
    Messages,
    /// `POST /v1/responses`: usage with `output_tokens`, and a stream's `response.completed`.
    Responses,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Messages => "/v1/messages",
            Self::Responses => "/v1/responses",
        }
    }

    /// What a complete answer with its usage contains (streamed or not).
    fn usage_marks(self, streamed: bool) -> &'static [&'static str] {
        match (self, streamed) {
            (Self::Chat, _) => &["\"usage\"", "\"completion_tokens\""],
            (Self::Messages, false) => &["\"usage\"", "\"output_tokens\""],
            (Self::Messages, true) => &["\"output_tokens\"", "message_stop"],
            (Self::Responses, false) => &["\"usage\"", "\"output_tokens\""],
            (Self::Responses, true) => &["\"output_tokens\"", "response.completed"],
        }
    }
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    /// `host:port` of the server.
    #[arg(long)]
    addr: String,
    #[arg(long, value_enum, default_value = "chat")]
    api: Api,
    /// The request path; the API's own when absent.
    #[arg(long)]
    path: Option<String>,
    /// File with the request body.
    #[arg(long)]
    body_file: std::path::PathBuf,
    /// Extra request headers, `name: value`.
    #[arg(long = "header")]
    headers: Vec<String>,
    #[arg(long, default_value_t = 1)]
    conns: usize,
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value_t = 3.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 0.5)]
    warmup_s: f64,
    #[arg(long, default_value_t = 200)]
    expect_status: u16,
    /// Require `"usage"` with token counts in the body (the stream's usage chunk for SSE).
    #[arg(long)]
    expect_usage: bool,
    /// Upper bound on connections in rate mode.
    #[arg(long, default_value_t = 1024)]
    max_conns: usize,
}

struct Shared {
    args: Args,
    body: Bytes,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    ok: AtomicU64,
    bad: AtomicU64,
    /// Every completed exchange, warm-up included (the basis of CPU per request).
    all: AtomicU64,
    first_bytes: AtomicUsize,
    latency: Mutex<Histogram<u64>>,
    ttft: Mutex<Histogram<u64>>,
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> std::io::Result<Sender> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One exchange: returns (valid, ttft, total) measured from `start`.
async fn exchange(
    shared: &Shared,
    sender: &mut Sender,
    start: Instant,
) -> (bool, Duration, Duration) {
    let path = shared.args.path.as_deref();
    let mut req = http::Request::post(path.unwrap_or(shared.args.api.path()))
        .header("host", shared.args.addr.as_str())
        .header("content-type", "application/json");
    for (k, v) in &shared.headers {
        req = req.header(k, v);
    }
    let Ok(req) = req.body(Full::new(shared.body.clone())) else {
        return (false, Duration::ZERO, Duration::ZERO);
    };
    if sender.ready().await.is_err() {
        return (false, Duration::ZERO, Duration::ZERO);
    }
    let Ok(resp) = sender.send_request(req).await else {
        return (false, Duration::ZERO, Duration::ZERO);
    };
    let status_ok = resp.status().as_u16() == shared.args.expect_status;
    let mut body = resp.into_body();
    let mut ttft = None;
    let mut seen = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (false, ttft.unwrap_or_default(), start.elapsed());
        };
        if let Some(data) = frame.data_ref() {
            if ttft.is_none() {
                ttft = Some(start.elapsed());
                first_byte(shared);
            }
            if shared.args.expect_usage {
                seen.extend_from_slice(data);
            }
        }
    }
    let total = start.elapsed();
    let usage_ok = !shared.args.expect_usage || {
        let text = String::from_utf8_lossy(&seen);
        let streamed = text.starts_with("event:") || text.starts_with("data:");
        shared
            .args
            .api
            .usage_marks(streamed)
            .iter()
            .all(|mark| text.contains(mark))
    };
    (status_ok && usage_ok, ttft.unwrap_or(total), total)
}

/// Counts a stream that got its first byte (or failed); in hold mode says `holding` once every
/// stream has.
fn first_byte(shared: &Shared) {
    if shared.first_bytes.fetch_add(1, Ordering::SeqCst) + 1 == shared.args.conns
        && shared.args.mode == Mode::Hold
    {
        eprintln!("holding");
    }
}

async fn record(shared: &Shared, measured: bool, result: (bool, Duration, Duration)) {
    let (valid, ttft, total) = result;
    shared.all.fetch_add(1, Ordering::Relaxed);
    if !valid {
        shared.bad.fetch_add(1, Ordering::Relaxed);
        // A failed stream will never see a first byte: count it so `holding` still fires.
        if ttft.is_zero() {
            first_byte(shared);
        }
        return;
    }
    if !measured {
        return;
    }
    shared.ok.fetch_add(1, Ordering::Relaxed);
    let us = |d: Duration| (d.as_micros() as u64).max(1);
    let _ = shared.latency.lock().await.record(us(total));
    let _ = shared.ttft.lock().await.record(us(ttft));
}

/// Runs `session` on `conns` connections at once, each opened first (a connection that cannot
/// be opened counts as a failed exchange), and waits for all of them.
async fn on_every_connection<F, Fut>(shared: &Arc<Shared>, session: F)
where
    F: Fn(Arc<Shared>, Sender) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks = Vec::with_capacity(shared.args.conns);
    for _ in 0..shared.args.conns {
        let shared = shared.clone();
        let session = session.clone();
        tasks.push(tokio::spawn(async move {
            match connect(&shared.args.addr).await {
                Ok(sender) => session(shared, sender).await,
                Err(_) => {
                    shared.bad.fetch_add(1, Ordering::Relaxed);
                    first_byte(&shared);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn run_closed(shared: Arc<Shared>) -> f64 {
    let begin = Instant::now();
    let warm_end = begin + Duration::from_secs_f64(shared.args.warmup_s);
    let end = warm_end + Duration::from_secs_f64(shared.args.duration_s);
    on_every_connection(&shared, move |shared, mut sender| async move {
        loop {
            let start = Instant::now();
            if start >= end {
                break;
            }
            let result = exchange(&shared, &mut sender, start).await;
            let valid = result.0;
            record(&shared, start >= warm_end, result).await;
            if !valid {
                match connect(&shared.args.addr).await {
                    Ok(s) => sender = s,
                    Err(_) => break,
                }
            }
        }
    })
    .await;
    shared.args.duration_s
}

async fn run_rate(shared: Arc<Shared>) -> f64 {
    let pool: Arc<Mutex<Vec<Sender>>> = Arc::new(Mutex::new(Vec::new()));
    let open = Arc::new(AtomicUsize::new(0));
    let interval = Duration::from_secs_f64(1.0 / shared.args.rate.max(1.0));
    let begin = Instant::now();
    let warm_end = begin + Duration::from_secs_f64(shared.args.warmup_s);
    let total = Duration::from_secs_f64(shared.args.warmup_s + shared.args.duration_s);
    let count = (total.as_secs_f64() / interval.as_secs_f64()) as u64;
    let mut tasks = Vec::with_capacity(count as usize);
    for i in 0..count {
        let scheduled = begin + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let shared = shared.clone();
        let pool = pool.clone();
        let open = open.clone();
        tasks.push(tokio::spawn(async move {
            let reused = pool.lock().await.pop();
            let sender = match reused {
                Some(s) => Some(s),
                None if open.load(Ordering::Relaxed) < shared.args.max_conns => {
                    open.fetch_add(1, Ordering::Relaxed);
                    connect(&shared.args.addr).await.ok()
                }
                None => None,
            };
            let Some(mut sender) = sender else {
                shared.bad.fetch_add(1, Ordering::Relaxed);
                return;
            };
            // Latency counts from the scheduled time: queueing is not hidden.
            let result = exchange(&shared, &mut sender, scheduled).await;
            let valid = result.0;
            record(&shared, scheduled >= warm_end, result).await;
            if valid {
                pool.lock().await.push(sender);
            } else {
                open.fetch_sub(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    shared.args.duration_s
}

async fn run_hold(shared: Arc<Shared>) -> f64 {
    let begin = Instant::now();
    on_every_connection(&shared, move |shared, mut sender| async move {
        let start = Instant::now();
        let result = exchange(&shared, &mut sender, start).await;
        record(&shared, true, result).await;
    })
    .await;
    begin.elapsed().as_secs_f64()
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "count": h.len(),
        "mean": h.mean(),
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let body = Bytes::from(std::fs::read(&args.body_file)?);
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h.split_once(':').ok_or("headers are `name: value`")?;
        headers.push((
            http::HeaderName::try_from(k.trim())?,
            http::HeaderValue::try_from(v.trim())?,
        ));
    }
    let histogram = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
    let shared = Arc::new(Shared {
        args,
        body,
        headers,
        ok: AtomicU64::new(0),
        bad: AtomicU64::new(0),
        all: AtomicU64::new(0),
        first_bytes: AtomicUsize::new(0),
        latency: Mutex::new(histogram()?),
        ttft: Mutex::new(histogram()?),
    });
    // One worker thread: the load generator shares its core with the fake upstream.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let seconds = runtime.block_on(async {
        match shared.args.mode {
            Mode::Closed => run_closed(shared.clone()).await,
            Mode::Rate => run_rate(shared.clone()).await,
            Mode::Hold => run_hold(shared.clone()).await,
        }
    });
    let ok = shared.ok.load(Ordering::Relaxed);
    let latency = runtime.block_on(async { summary(&*shared.latency.lock().await) });
    let ttft = runtime.block_on(async { summary(&*shared.ttft.lock().await) });
    let out = json!({
        "ok": ok,
        "bad": shared.bad.load(Ordering::Relaxed),
        "all": shared.all.load(Ordering::Relaxed),
        "seconds": seconds,
        "rps": ok as f64 / seconds.max(1e-9),
        "latency_us": latency,
        "ttft_us": ttft,
    });
    #[expect(
        clippy::print_stdout,
        reason = "the tool's output is its JSON on stdout"
    )]
    {
        println!("{out}");
    }
    Ok(())
}
