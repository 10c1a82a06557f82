//! A fake OpenAI-compatible upstream, shared by the tests and the benchmark.
//!
//! It speaks the Chat Completions wire format (JSON and SSE) and validates what it receives the
//! way OpenAI does: a bearer key, a JSON body with a string `model` and a non-empty `messages`
//! array, `stream_options` only with `stream`. What it answers is programmable per bearer key
//! (so each pool can behave differently): latency, time to first token, chunk count and pace,
//! reported usage, error statuses, mid-stream disconnects and hangs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::serve::{self, json_response, lock, Body, StopHandle};
use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// Usage the fake reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
}

/// What the fake does for a request.
#[derive(Debug, Clone)]
pub struct Behavior {
    /// Non-2xx answers with an OpenAI error body.
    pub status: u16,
    /// `error.type` and `error.code` of the error body (defaults follow the status).
    pub error_type_code: Option<(String, String)>,
    pub retry_after_s: Option<u64>,
    /// Delay before the response header.
    pub ttft: Duration,
    /// Pause between stream chunks.
    pub chunk_interval: Duration,
    /// Content chunks in a stream (words in a non-stream answer).
    pub chunks: usize,
    /// Stream a tool call (`get_weather`) instead of text.
    pub tool_call: bool,
    pub usage: FakeUsage,
    /// Leave usage out even when asked for it.
    pub omit_usage: bool,
    /// Drop the connection after this many content chunks.
    pub disconnect_after_chunks: Option<usize>,
    /// Stop sending (without closing) after this many content chunks.
    pub hang_after_chunks: Option<usize>,
    /// Never send the response header.
    pub hang: bool,
    /// Hold every response until this many have been in flight at once (or `HANG_MAX` passes), so a
    /// test can prove concurrency without timing anything.
    pub gate_in_flight: Option<usize>,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            status: 200,
            error_type_code: None,
            retry_after_s: None,
            ttft: Duration::ZERO,
            chunk_interval: Duration::ZERO,
            chunks: 5,
            tool_call: false,
            usage: FakeUsage {
                prompt_tokens: 17,
                completion_tokens: 5,
                cached_tokens: 3,
                reasoning_tokens: 1,
            },
            omit_usage: false,
            disconnect_after_chunks: None,
            hang_after_chunks: None,
            hang: false,
            gate_in_flight: None,
        }
    }
}

/// A request the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

#[derive(Default)]
struct State {
    default: Behavior,
    by_key: HashMap<String, Behavior>,
    by_model: HashMap<String, Behavior>,
    received: Vec<Received>,
    /// Keep requests for `received()` (tests); off for the benchmark, which sends millions.
    record: bool,
    rejected: Vec<String>,
    in_flight: Arc<InFlight>,
    connections: usize,
}

/// Responses being produced right now, and the most seen at once.
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    peak: AtomicUsize,
}

/// Counts one response in flight until dropped (with the response body, when it ends).
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(counter: Arc<InFlight>) -> Self {
        let now = counter.now.fetch_add(1, Ordering::SeqCst) + 1;
        counter.peak.fetch_max(now, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running fake; stops when dropped.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _stop: StopHandle,
}

/// Requests kept for `received()`: a bound, so a long-running fake cannot grow without limit.
const RECEIVED_MAX: usize = 100_000;

/// Hang and pace durations are capped so every fake response ends by itself.
const HANG_MAX: Duration = Duration::from_secs(120);

impl FakeUpstream {
    /// Starts on `127.0.0.1:0` (or `addr`) with a default behavior.
    pub async fn start(default: Behavior) -> std::io::Result<Self> {
        Self::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            default,
        )
        .await
    }

    pub async fn start_on(addr: SocketAddr, default: Behavior) -> std::io::Result<Self> {
        Self::start_with(addr, default, None).await
    }

    /// Starts an HTTPS fake on `127.0.0.1:0` offering HTTP/2 and HTTP/1.1 by ALPN.
    pub async fn start_tls(
        default: Behavior,
        cert_pem: &str,
        key_pem: &str,
    ) -> std::io::Result<Self> {
        let certs = rustls_certs(cert_pem)?;
        use rustls::pki_types::pem::PemObject;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(std::io::Error::other)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(std::io::Error::other)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start_with(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            default,
            Some(acceptor),
        )
        .await
    }

    async fn start_with(
        addr: SocketAddr,
        default: Behavior,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            default,
            record: true,
            ..State::default()
        }));
        let counted = state.clone();
        let st = state.clone();
        let stop = serve::spawn_with(
            listener,
            tls,
            move || lock(&counted).connections += 1,
            move |req| handle(req, st.clone()),
        );
        Ok(Self {
            addr,
            state,
            _stop: stop,
        })
    }

    /// The base URL to configure a pool with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The HTTPS base URL, by name (the test certificate is for `localhost`).
    pub fn tls_base_url(&self) -> String {
        format!("https://localhost:{}/v1", self.addr.port())
    }

    /// Connections accepted so far (pooling shows as fewer connections than requests).
    pub fn connections(&self) -> usize {
        lock(&self.state).connections
    }

    /// Requests carrying `Authorization: Bearer <key>` get `behavior`.
    pub fn set_behavior(&self, key: &str, behavior: Behavior) {
        lock(&self.state).by_key.insert(key.to_owned(), behavior);
    }

    /// Requests for `model` (when no per-key behavior applies) get `behavior`.
    pub fn set_model_behavior(&self, model: &str, behavior: Behavior) {
        lock(&self.state)
            .by_model
            .insert(model.to_owned(), behavior);
    }

    pub fn set_default(&self, behavior: Behavior) {
        lock(&self.state).default = behavior;
    }

    /// Valid requests received so far.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.state).received.clone()
    }

    /// Stops keeping requests for `received()` (the benchmark's fake serves millions).
    pub fn stop_recording(&self) {
        let mut st = lock(&self.state);
        st.record = false;
        st.received = Vec::new();
    }

    /// The most responses the fake was producing at the same time.
    pub fn peak_in_flight(&self) -> usize {
        lock(&self.state).in_flight.peak.load(Ordering::SeqCst)
    }

    /// Why each invalid request was refused.
    pub fn rejected(&self) -> Vec<String> {
        lock(&self.state).rejected.clone()
    }
}

fn rustls_certs(pem: &str) -> std::io::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(std::io::Error::other)
}

fn openai_error(status: u16, message: &str, kind: &str, code: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let version = format!("{:?}", req.version());
    let headers = serve::header_strings(req.headers());
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(openai_error(
                400,
                "unreadable body",
                "invalid_request_error",
                "bad_body",
            ))
        }
    };
    let reject = |why: String| {
        lock(&state).rejected.push(why.clone());
        Ok(openai_error(
            400,
            &why,
            "invalid_request_error",
            "invalid_request",
        ))
    };
    let is_models = method == http::Method::GET && path == "/v1/models";
    if !is_models && (method != http::Method::POST || path != "/v1/chat/completions") {
        return reject(format!("unexpected {method} {path}"));
    }
    let Some(key) = headers
        .get("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
    else {
        lock(&state).rejected.push("missing bearer key".to_owned());
        return Ok(openai_error(
            401,
            "You didn't provide an API key.",
            "invalid_request_error",
            "missing_api_key",
        ));
    };
    if is_models {
        // `GET /v1/models`: what a credential check calls. A key set to fail with 401/403
        // fails here too, the way OpenAI refuses a bad key on every endpoint.
        let status = lock(&state).by_key.get(&key).map_or(200, |b| b.status);
        return Ok(match status {
            401 | 403 => openai_error(
                status,
                "Incorrect API key provided.",
                "invalid_request_error",
                "invalid_api_key",
            ),
            _ => json_response(
                200,
                &json!({"object": "list", "data": [
                    {"id": "gpt-test", "object": "model", "created": 0, "owned_by": "fake"}
                ]}),
            ),
        });
    }
    if headers.get("content-type").map(String::as_str) != Some("application/json") {
        return reject("content-type is not application/json".to_owned());
    }
    let Ok(parsed) = serde_json::from_slice::<Value>(&body) else {
        return reject("body is not JSON".to_owned());
    };
    let Some(model) = parsed
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return reject("model missing or not a string".to_owned());
    };
    if !parsed
        .get("messages")
        .and_then(Value::as_array)
        .is_some_and(|m| {
            !m.is_empty()
                && m.iter()
                    .all(|x| x.get("role").is_some_and(Value::is_string))
        })
    {
        return reject("messages missing, empty or malformed".to_owned());
    }
    let stream = parsed
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if parsed.get("stream_options").is_some_and(|v| !v.is_null()) && !stream {
        return reject("stream_options without stream".to_owned());
    }
    let include_usage = parsed
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let (behavior, guard) = {
        let mut st = lock(&state);
        let guard = InFlightGuard::new(st.in_flight.clone());
        if st.record && st.received.len() < RECEIVED_MAX {
            st.received.push(Received {
                version,
                path,
                headers,
                body: parsed,
            });
        }
        let behavior = st
            .by_key
            .get(&key)
            .or_else(|| st.by_model.get(&model))
            .cloned()
            .unwrap_or_else(|| st.default.clone());
        (behavior, guard)
    };

    if let Some(n) = behavior.gate_in_flight {
        let counter = lock(&state).in_flight.clone();
        let deadline = tokio::time::Instant::now() + HANG_MAX;
        while counter.peak.load(Ordering::SeqCst) < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if behavior.hang {
        tokio::time::sleep(HANG_MAX).await;
    }
    tokio::time::sleep(behavior.ttft.min(HANG_MAX)).await;
    if behavior.status != 200 {
        let (kind, code) = match behavior.status {
            401 => ("invalid_request_error", "invalid_api_key"),
            403 => (
                "invalid_request_error",
                "unsupported_country_region_territory",
            ),
            429 => ("requests", "rate_limit_exceeded"),
            400..=499 => ("invalid_request_error", "invalid_request"),
            _ => ("server_error", "server_error"),
        };
        let (kind, code) = match &behavior.error_type_code {
            Some((k, c)) => (k.as_str(), c.as_str()),
            None => (kind, code),
        };
        let mut resp = openai_error(behavior.status, "fake upstream error", kind, code);
        if let Some(s) = behavior.retry_after_s {
            if let Ok(v) = http::HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        return Ok(resp);
    }
    let id = "chatcmpl-fake";
    let mut resp = if stream {
        stream_response(id, &model, &behavior, include_usage, guard)
    } else {
        json_response(200, &complete_body(id, &model, &behavior))
    };
    resp.headers_mut().insert(
        "x-request-id",
        http::HeaderValue::from_static("fake-upstream-req-1"),
    );
    Ok(resp)
}

fn usage_json(u: &FakeUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    })
}

/// The text the fake generates: `tok0 tok1 …`.
pub fn fake_text(chunks: usize) -> String {
    (0..chunks)
        .map(|i| format!("tok{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn complete_body(id: &str, model: &str, b: &Behavior) -> Value {
    let message = if b.tool_call {
        json!({"role": "assistant", "content": null, "refusal": null,
            "tool_calls": [{"id": "call_fake1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]})
    } else {
        json!({"role": "assistant", "content": fake_text(b.chunks), "refusal": null, "annotations": []})
    };
    let mut body = json!({
        "id": id, "object": "chat.completion", "created": 1_700_000_000u64, "model": model,
        "system_fingerprint": "fp_fake", "service_tier": "default",
        "choices": [{"index": 0, "message": message, "logprobs": null,
            "finish_reason": if b.tool_call { "tool_calls" } else { "stop" }}],
    });
    if !b.omit_usage {
        body["usage"] = usage_json(&b.usage);
    }
    body
}

/// The stream's events, in order, as the bytes a real upstream sends.
pub fn stream_events(id: &str, model: &str, b: &Behavior, include_usage: bool) -> Vec<Bytes> {
    let chunk = |delta: Value, finish: Value| {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000u64,
            "model": model, "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            "usage": null});
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    if b.tool_call {
        events.push(chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_fake1", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}]}),
            Value::Null,
        ));
        let args = ["{\"ci", "ty\":\"Pa", "ris\"}"];
        for part in args {
            events.push(chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
                Value::Null,
            ));
        }
    } else {
        for i in 0..b.chunks {
            let text = if i == 0 {
                format!("tok{i}")
            } else {
                format!(" tok{i}")
            };
            events.push(chunk(json!({"content": text}), Value::Null));
        }
    }
    events.push(chunk(
        json!({}),
        json!(if b.tool_call { "tool_calls" } else { "stop" }),
    ));
    if include_usage && !b.omit_usage {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000u64,
            "model": model, "system_fingerprint": "fp_fake", "choices": [], "usage": usage_json(&b.usage)});
        events.push(Bytes::from(format!("data: {c}\n\n")));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

fn stream_response(
    id: &str,
    model: &str,
    b: &Behavior,
    include_usage: bool,
    guard: InFlightGuard,
) -> Response<Body> {
    let guard = Arc::new(guard);
    let events = stream_events(id, model, b, include_usage);
    let interval = b.chunk_interval.min(HANG_MAX);
    // Content chunks start after the role chunk (index 0).
    let cut = b.disconnect_after_chunks.map(|n| n + 1);
    let hang = b.hang_after_chunks.map(|n| n + 1);
    let body = stream::unfold(0usize, move |i| {
        let events = events.clone();
        let _keep_counted = &guard;
        async move {
            if i >= events.len() {
                return None;
            }
            if cut == Some(i) {
                // Let what was sent reach the peer before the connection is dropped.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Some((
                    Err(std::io::Error::other("fake mid-stream disconnect")),
                    usize::MAX,
                ));
            }
            if hang == Some(i) {
                tokio::time::sleep(HANG_MAX).await;
                return None;
            }
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Some((Ok(Frame::data(events[i].clone())), i + 1))
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(body)));
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert("cache-control", http::HeaderValue::from_static("no-cache"));
    resp
}
