//! A fake OpenAI-compatible upstream, shared by the tests and the benchmark.
//!
//! It speaks the Chat Completions wire format (JSON and SSE) and validates what it receives the
//! way OpenAI does ([`validate_chat_body`]): a bearer key, a JSON body with a string `model` and
//! a non-empty `messages` array of known roles, `tool` messages answering the `tool_calls` of the
//! assistant message before them (and every call answered), well-formed `tools`, `tool_choice`,
//! content parts and image data URLs, `temperature` 0–2, `top_p` 0–1, `max_tokens` ≥ 1,
//! `stream_options` only with `stream`. A refusal is OpenAI's 400 error JSON, recorded for
//! [`FakeUpstream::rejected`].
//!
//! What it answers follows the request and the [`Behavior`] (programmable per bearer key, so each
//! pool can behave differently): parallel tool calls when the request offers tools and the
//! behavior names some, a summary of the tool results when the request ends with `tool` messages
//! ([`TOOL_RESULTS_REPLY`] for the conformance matrix), [`FAKE_JSON_REPLY`] in JSON mode, and
//! otherwise [`fake_text`] cut at `max_completion_tokens` / `max_tokens` (`finish_reason:
//! length`); plus latency, time to first token, chunk count and pace, reported usage, error
//! statuses, mid-stream disconnects and hangs.

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
    /// Answer one tool call (`get_weather` with `{"city":"Paris"}`, id `call_fake1`) instead of
    /// text, whatever the request offers (unless it ends with tool results).
    pub tool_call: bool,
    /// Tool calls `(name, arguments)` made, in parallel, when the request offers a non-empty
    /// `tools` list (and `tool_choice` is not `"none"`; only the first with
    /// `parallel_tool_calls: false`), with ids `call_fake1`, `call_fake2`, …; arguments given as
    /// a JSON string are sent as they are, anything else serialized.
    pub tool_calls: Vec<(String, Value)>,
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
            tool_calls: Vec::new(),
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
        let any = "127.0.0.1:0".parse().map_err(std::io::Error::other)?;
        Self::start_tls_on(any, default, cert_pem, key_pem).await
    }

    /// The same on `addr` (the benchmark's fixed port).
    pub async fn start_tls_on(
        addr: SocketAddr,
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
        Self::start_with(addr, default, Some(acceptor)).await
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
    let serve::ReadRequest {
        method,
        path,
        version,
        headers,
        body,
        ..
    } = serve::read_request(req).await;
    let body = match body {
        Some(b) => b,
        None => {
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
    let is_responses = path == "/v1/responses";
    let is_embeddings = path == "/v1/embeddings";
    let known = path == "/v1/chat/completions" || is_responses || is_embeddings;
    if !is_models && (method != http::Method::POST || !known) {
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
    if is_embeddings {
        if let Err(why) = crate::fake_responses::validate_embeddings_body(&parsed) {
            return reject(why);
        }
    } else if is_responses {
        if let Err(why) = crate::fake_responses::validate_responses_body(&parsed) {
            return reject(why);
        }
    } else if let Err(invalid) = validate_chat_body(&parsed) {
        lock(&state).rejected.push(invalid.message.clone());
        return Ok(invalid_response(&invalid));
    }
    let stream = parsed
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
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
                body: parsed.clone(),
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
    let answer = answer(&parsed, &behavior);
    let mut resp = if is_embeddings {
        json_response(
            200,
            &crate::fake_responses::embeddings_json(&parsed, &behavior),
        )
    } else if is_responses && stream {
        let events = crate::fake_responses::response_events(&parsed, &behavior);
        stream_response(events, &behavior, guard)
    } else if is_responses {
        json_response(
            200,
            &crate::fake_responses::response_json(&parsed, &behavior),
        )
    } else if stream {
        let events = answer_events(id, &model, &answer, &behavior, include_usage);
        stream_response(events, &behavior, guard)
    } else {
        json_response(200, &complete_body(id, &model, &answer, &behavior))
    };
    resp.headers_mut().insert(
        "x-request-id",
        http::HeaderValue::from_static("fake-upstream-req-1"),
    );
    Ok(resp)
}

/// OpenAI's `usage` object for `u` (shared by the OpenAI-format fakes).
pub(crate) fn usage_json(u: &FakeUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    })
}

/// The text the fake generates: `tok0 tok1 …`, one word (one completion token, one stream
/// chunk) per chunk.
pub fn fake_text(chunks: usize) -> String {
    fake_words(chunks).join(" ")
}

pub(crate) fn fake_words(chunks: usize) -> Vec<String> {
    (0..chunks).map(|i| format!("tok{i}")).collect()
}

/// The reply when the request asks for JSON (`response_format` `json_object` or `json_schema`).
pub const FAKE_JSON_REPLY: &str = r#"{"answer":"hi","confidence":1}"#;

/// The reply to the conformance matrix's tool-result turn (tool contents `result-get_weather`
/// and `result-get_time`): what [`tool_results_reply`] makes of them, as every fake answers.
pub const TOOL_RESULTS_REPLY: &str = "Tool results: result-get_weather; result-get_time.";

/// `Tool results: <content1>; <content2>.` for the `tool` messages that end `messages`, in
/// order (text parts joined); `None` when the last message is not a tool result.
pub fn tool_results_reply(messages: &[Value]) -> Option<String> {
    let trailing = messages
        .iter()
        .rev()
        .take_while(|m| m["role"] == "tool")
        .count();
    if trailing == 0 {
        return None;
    }
    let results: Vec<String> = messages[messages.len() - trailing..]
        .iter()
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
            _ => String::new(),
        })
        .collect();
    Some(format!("Tool results: {}.", results.join("; ")))
}

/// The words (one completion token each) and finish reason of a text answer to an OpenAI chat
/// request: the tool results when it ends with them, `json_reply` in JSON mode, otherwise
/// `default_words()`; cut at `max_completion_tokens` (else `max_tokens`) with `length`.
pub(crate) fn text_reply(
    req: &Value,
    json_reply: &str,
    default_words: impl FnOnce() -> Vec<String>,
) -> (Vec<String>, &'static str) {
    let messages = req["messages"].as_array().map_or(&[][..], Vec::as_slice);
    let split = |text: &str| text.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let mut words = if let Some(results) = tool_results_reply(messages) {
        split(&results)
    } else if matches!(
        req["response_format"]["type"].as_str(),
        Some("json_object" | "json_schema")
    ) {
        split(json_reply)
    } else {
        default_words()
    };
    let limit = req["max_completion_tokens"]
        .as_u64()
        .or_else(|| req["max_tokens"].as_u64())
        .and_then(|n| usize::try_from(n).ok());
    match limit {
        Some(n) if n < words.len() => {
            words.truncate(n);
            (words, "length")
        }
        _ => (words, "stop"),
    }
}

/// `args` in `n` pieces of about equal length, cut at character boundaries (a streamed tool
/// call's argument deltas).
pub(crate) fn argument_pieces(args: &str, n: usize) -> Vec<&str> {
    let n = n.max(1);
    let mut cuts: Vec<usize> = (1..n)
        .map(|k| {
            let at = args.len() * k / n;
            (0..=at)
                .rev()
                .find(|&c| args.is_char_boundary(c))
                .unwrap_or(0)
        })
        .collect();
    cuts.push(args.len());
    let mut start = 0;
    cuts.into_iter()
        .map(|end| {
            let piece = &args[start..end.max(start)];
            start = end.max(start);
            piece
        })
        .collect()
}

/// One tool call of an answer, with the argument deltas a stream sends it in.
struct ToolCall {
    id: String,
    name: String,
    arguments: String,
    pieces: Vec<String>,
}

/// What the fake answers a request with (before errors, pacing and faults).
struct Answer {
    words: Vec<String>,
    calls: Vec<ToolCall>,
    finish_reason: &'static str,
}

fn answer(req: &Value, b: &Behavior) -> Answer {
    let ends_with_results = req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .is_some_and(|m| m["role"] == "tool");
    if !ends_with_results {
        let offered =
            req["tools"].as_array().is_some_and(|t| !t.is_empty()) && req["tool_choice"] != "none";
        let mut calls = Vec::new();
        if offered && !b.tool_calls.is_empty() {
            let n = if req["parallel_tool_calls"] == false {
                1
            } else {
                b.tool_calls.len()
            };
            for (i, (name, args)) in b.tool_calls.iter().take(n).enumerate() {
                let arguments = match args {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let pieces = argument_pieces(&arguments, 3)
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                calls.push(ToolCall {
                    id: format!("call_fake{}", i + 1),
                    name: name.clone(),
                    arguments,
                    pieces,
                });
            }
        } else if b.tool_call {
            calls.push(ToolCall {
                id: "call_fake1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
                pieces: vec![r#"{"ci"#.into(), r#"ty":"Pa"#.into(), r#"ris"}"#.into()],
            });
        }
        if !calls.is_empty() {
            return Answer {
                words: Vec::new(),
                calls,
                finish_reason: "tool_calls",
            };
        }
    }
    let (words, finish_reason) = text_reply(req, FAKE_JSON_REPLY, || fake_words(b.chunks));
    Answer {
        words,
        calls: Vec::new(),
        finish_reason,
    }
}

fn complete_body(id: &str, model: &str, a: &Answer, b: &Behavior) -> Value {
    let message = if a.calls.is_empty() {
        json!({"role": "assistant", "content": a.words.join(" "), "refusal": null, "annotations": []})
    } else {
        let calls: Vec<Value> = a
            .calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
        json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": calls})
    };
    let mut body = json!({
        "id": id, "object": "chat.completion", "created": 1_700_000_000u64, "model": model,
        "system_fingerprint": "fp_fake", "service_tier": "default",
        "choices": [{"index": 0, "message": message, "logprobs": null,
            "finish_reason": a.finish_reason}],
    });
    if !b.omit_usage {
        body["usage"] = usage_json(&b.usage);
    }
    body
}

/// The stream's events for a plain request (no tools offered, no limit), in order, as the
/// bytes a real upstream sends.
pub fn stream_events(id: &str, model: &str, b: &Behavior, include_usage: bool) -> Vec<Bytes> {
    stream_events_for(id, model, b, &Value::Null, include_usage)
}

/// The stream's events the fake sends for `request` (a Chat Completions body), in order.
pub fn stream_events_for(
    id: &str,
    model: &str,
    b: &Behavior,
    request: &Value,
    include_usage: bool,
) -> Vec<Bytes> {
    answer_events(id, model, &answer(request, b), b, include_usage)
}

fn answer_events(
    id: &str,
    model: &str,
    a: &Answer,
    b: &Behavior,
    include_usage: bool,
) -> Vec<Bytes> {
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
    for (i, call) in a.calls.iter().enumerate() {
        events.push(chunk(
            json!({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}]}),
            Value::Null,
        ));
        for part in &call.pieces {
            events.push(chunk(
                json!({"tool_calls": [{"index": i, "function": {"arguments": part}}]}),
                Value::Null,
            ));
        }
    }
    for (i, word) in a.words.iter().enumerate() {
        let text = if i == 0 {
            word.clone()
        } else {
            format!(" {word}")
        };
        events.push(chunk(json!({"content": text}), Value::Null));
    }
    events.push(chunk(json!({}), json!(a.finish_reason)));
    if include_usage && !b.omit_usage {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000u64,
            "model": model, "system_fingerprint": "fp_fake", "choices": [], "usage": usage_json(&b.usage)});
        events.push(Bytes::from(format!("data: {c}\n\n")));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// Why OpenAI refuses a Chat Completions body: its error's `message`, `param` and `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn invalid(message: impl Into<String>, param: &str, code: Option<&'static str>) -> Invalid {
    Invalid {
        message: message.into(),
        param: (!param.is_empty()).then(|| param.to_owned()),
        code,
    }
}

fn missing(param: &str) -> Invalid {
    invalid(
        format!("Missing required parameter: '{param}'."),
        param,
        Some("missing_required_parameter"),
    )
}

fn wrong_type(param: &str, expected: &str) -> Invalid {
    invalid(
        format!("Invalid type for '{param}': expected {expected}."),
        param,
        Some("invalid_type"),
    )
}

fn not_among(param: &str, got: &str, supported: &[&str]) -> Invalid {
    let list: Vec<String> = supported.iter().map(|s| format!("'{s}'")).collect();
    invalid(
        format!(
            "Invalid value: '{got}'. Supported values are: {}.",
            list.join(", ")
        ),
        param,
        Some("invalid_value"),
    )
}

fn empty_array(param: &str) -> Invalid {
    invalid(
        format!("Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead."),
        param,
        Some("empty_array"),
    )
}

/// OpenAI's 400 for `invalid`.
fn invalid_response(invalid: &Invalid) -> Response<Body> {
    json_response(
        400,
        &json!({"error": {"message": invalid.message, "type": "invalid_request_error",
            "param": invalid.param, "code": invalid.code}}),
    )
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// Checks a Chat Completions body (all but `model`) the way OpenAI does; the first problem
/// found. Optional parameters set to `null` count as absent.
pub fn validate_chat_body(body: &Value) -> Result<(), Invalid> {
    let obj = body.as_object().ok_or_else(|| {
        invalid(
            "We could not parse the JSON body of your request: expected an object.",
            "",
            None,
        )
    })?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let messages = match get("messages") {
        None => return Err(missing("messages")),
        Some(Value::Array(m)) if m.is_empty() => return Err(empty_array("messages")),
        Some(Value::Array(m)) => m,
        Some(_) => return Err(wrong_type("messages", "an array of objects")),
    };
    validate_messages(messages)?;
    let tool_names = validate_tools(get("tools"))?;
    if let Some(choice) = get("tool_choice") {
        if get("tools").is_none() {
            return Err(invalid(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                "tool_choice",
                None,
            ));
        }
        match choice {
            Value::String(s) if ["none", "auto", "required"].contains(&s.as_str()) => {}
            Value::String(s) => {
                return Err(not_among("tool_choice", s, &["none", "auto", "required"]))
            }
            Value::Object(_) if choice["type"] == "function" => {
                let name = choice["function"]["name"].as_str().unwrap_or_default();
                if !tool_names.contains(&name) {
                    return Err(invalid(
                        format!("Invalid value for 'tool_choice': function '{name}' is not among the tools."),
                        "tool_choice",
                        Some("invalid_value"),
                    ));
                }
            }
            _ => return Err(wrong_type("tool_choice", "a string or a function choice")),
        }
    }
    for (param, max) in [("temperature", 2.0), ("top_p", 1.0)] {
        if let Some(v) = get(param) {
            let t = v.as_f64().ok_or_else(|| wrong_type(param, "a number"))?;
            if t < 0.0 {
                return Err(invalid(
                    format!("Invalid '{param}': decimal below minimum value. Expected a value >= 0, but got {t} instead."),
                    param,
                    Some("decimal_below_min_value"),
                ));
            }
            if t > max {
                return Err(invalid(
                    format!("Invalid '{param}': decimal above maximum value. Expected a value <= {max}, but got {t} instead."),
                    param,
                    Some("decimal_above_max_value"),
                ));
            }
        }
    }
    for param in ["max_tokens", "max_completion_tokens"] {
        if let Some(v) = get(param) {
            let n = v.as_i64().ok_or_else(|| wrong_type(param, "an integer"))?;
            if n < 1 {
                return Err(invalid(
                    format!("Invalid '{param}': integer below minimum value. Expected a value >= 1, but got {n} instead."),
                    param,
                    Some("integer_below_min_value"),
                ));
            }
        }
    }
    if let Some(format) = get("response_format") {
        match format["type"].as_str() {
            Some("text" | "json_object") => {}
            Some("json_schema") => {
                if format["json_schema"]["name"]
                    .as_str()
                    .is_none_or(str::is_empty)
                {
                    return Err(missing("response_format.json_schema.name"));
                }
            }
            Some(other) => {
                return Err(not_among(
                    "response_format.type",
                    other,
                    &["text", "json_object", "json_schema"],
                ))
            }
            None => return Err(missing("response_format.type")),
        }
    }
    if get("stream_options").is_some() && get("stream") != Some(&Value::Bool(true)) {
        return Err(invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
            Some("invalid_value"),
        ));
    }
    Ok(())
}

/// Roles, contents, and tool calls each answered by the `tool` messages right after them.
fn validate_messages(messages: &[Value]) -> Result<(), Invalid> {
    // Ids the last assistant message called and no tool message has answered yet, and whether
    // the messages since then are all tool results (where a `tool` message may stand).
    let mut open: Vec<&str> = Vec::new();
    let mut after_calls = false;
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages.[{i}]");
        if !m.is_object() {
            return Err(wrong_type(&at, "an object"));
        }
        let role = match &m["role"] {
            Value::Null => return Err(missing(&format!("{at}.role"))),
            Value::String(r) => r.as_str(),
            _ => return Err(wrong_type(&format!("{at}.role"), "a string")),
        };
        if role != "tool" && !open.is_empty() {
            return Err(invalid(
                format!("An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}", open.join(", ")),
                &format!("{at}.role"),
                None,
            ));
        }
        match role {
            "system" | "developer" => validate_content(m, &at, &["text"], true)?,
            "user" => {
                validate_content(m, &at, &["text", "image_url", "input_audio", "file"], true)?
            }
            "assistant" => {
                let calls = match &m["tool_calls"] {
                    Value::Null => &[][..],
                    Value::Array(c) => c.as_slice(),
                    _ => return Err(wrong_type(&format!("{at}.tool_calls"), "an array")),
                };
                validate_content(m, &at, &["text", "refusal"], calls.is_empty())?;
                for (j, call) in calls.iter().enumerate() {
                    let call_at = format!("{at}.tool_calls.[{j}]");
                    let id = call["id"]
                        .as_str()
                        .filter(|id| !id.is_empty())
                        .ok_or_else(|| missing(&format!("{call_at}.id")))?;
                    match call["type"].as_str() {
                        Some("function") => {}
                        Some(other) => {
                            return Err(not_among(&format!("{call_at}.type"), other, &["function"]))
                        }
                        None => return Err(missing(&format!("{call_at}.type"))),
                    }
                    if call["function"]["name"].as_str().is_none_or(str::is_empty) {
                        return Err(missing(&format!("{call_at}.function.name")));
                    }
                    match &call["function"]["arguments"] {
                        Value::String(_) => {}
                        Value::Null => {
                            return Err(missing(&format!("{call_at}.function.arguments")))
                        }
                        _ => {
                            return Err(wrong_type(
                                &format!("{call_at}.function.arguments"),
                                "a string",
                            ))
                        }
                    }
                    open.push(id);
                }
                after_calls = !calls.is_empty();
                continue;
            }
            "tool" => {
                let id = m["tool_call_id"]
                    .as_str()
                    .ok_or_else(|| missing(&format!("{at}.tool_call_id")))?;
                if !after_calls {
                    return Err(invalid(
                        "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
                        &format!("{at}.role"),
                        None,
                    ));
                }
                let Some(k) = open.iter().position(|o| *o == id) else {
                    return Err(invalid(
                        format!("Invalid parameter: 'tool_call_id' of '{id}' not found in 'tool_calls' of previous message."),
                        &format!("{at}.tool_call_id"),
                        None,
                    ));
                };
                open.remove(k);
                validate_content(m, &at, &["text"], true)?;
                continue;
            }
            other => return Err(not_among(&format!("{at}.role"), other, ROLES)),
        }
        after_calls = false;
    }
    if !open.is_empty() {
        return Err(invalid(
            format!("An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}", open.join(", ")),
            "messages",
            None,
        ));
    }
    Ok(())
}

/// A message's `content`: a string, or a non-empty array of the `parts` its role allows (text
/// with its `text`, images as an http(s) URL or a base64 data URL); absent only when not
/// `required`.
fn validate_content(m: &Value, at: &str, parts: &[&str], required: bool) -> Result<(), Invalid> {
    let at = format!("{at}.content");
    match &m["content"] {
        Value::Null if required => Err(missing(&at)),
        Value::Null | Value::String(_) => Ok(()),
        Value::Array(list) if list.is_empty() => Err(empty_array(&at)),
        Value::Array(list) => {
            for (j, part) in list.iter().enumerate() {
                let part_at = format!("{at}.[{j}]");
                let kind = part["type"]
                    .as_str()
                    .ok_or_else(|| missing(&format!("{part_at}.type")))?;
                if !parts.contains(&kind) {
                    return Err(not_among(&format!("{part_at}.type"), kind, parts));
                }
                match kind {
                    "text" if !part["text"].is_string() => {
                        return Err(missing(&format!("{part_at}.text")))
                    }
                    "refusal" if !part["refusal"].is_string() => {
                        return Err(missing(&format!("{part_at}.refusal")))
                    }
                    "image_url" => {
                        let url = part["image_url"]["url"]
                            .as_str()
                            .ok_or_else(|| missing(&format!("{part_at}.image_url.url")))?;
                        validate_image_url(url, &format!("{part_at}.image_url.url"))?;
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        _ => Err(wrong_type(&at, "a string or an array of content parts")),
    }
}

/// Image formats OpenAI accepts in a data URL.
const IMAGE_TYPES: &[&str] = &["image/png", "image/jpeg", "image/gif", "image/webp"];

/// An http(s) URL, or `data:<image type>;base64,<valid, non-empty base64>`.
fn validate_image_url(url: &str, param: &str) -> Result<(), Invalid> {
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(());
    }
    let bad = |why: &str| {
        invalid(
            format!("Invalid image URL: '{param}'. Expected a base64-encoded data URL with an image MIME type (e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but {why}."),
            param,
            Some("invalid_image_url"),
        )
    };
    let Some((mime, data)) = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
    else {
        return Err(bad(
            "got a value that is neither an http(s) URL nor a base64 data URL",
        ));
    };
    if !IMAGE_TYPES.contains(&mime) {
        return Err(bad(&format!("got unsupported MIME type '{mime}'")));
    }
    use base64::Engine as _;
    match base64::engine::general_purpose::STANDARD.decode(data) {
        Ok(bytes) if !bytes.is_empty() => Ok(()),
        _ => Err(bad("got invalid base64 data")),
    }
}

/// `tools`: a non-empty array of `{"type": "function", "function": {"name", "parameters"?}}`
/// with names of `[a-zA-Z0-9_-]{1,64}`; their names.
fn validate_tools(tools: Option<&Value>) -> Result<Vec<&str>, Invalid> {
    let list = match tools {
        None => return Ok(Vec::new()),
        Some(Value::Array(t)) if t.is_empty() => return Err(empty_array("tools")),
        Some(Value::Array(t)) => t,
        Some(_) => return Err(wrong_type("tools", "an array of objects")),
    };
    let mut names = Vec::with_capacity(list.len());
    for (j, tool) in list.iter().enumerate() {
        let at = format!("tools.[{j}]");
        match tool["type"].as_str() {
            Some("function") => {}
            Some(other) => return Err(not_among(&format!("{at}.type"), other, &["function"])),
            None => return Err(missing(&format!("{at}.type"))),
        }
        let name = tool["function"]["name"]
            .as_str()
            .ok_or_else(|| missing(&format!("{at}.function.name")))?;
        let name_ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
        if !name_ok {
            return Err(invalid(
                format!("Invalid '{at}.function.name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]{{1,64}}$'."),
                &format!("{at}.function.name"),
                Some("invalid_value"),
            ));
        }
        match &tool["function"]["parameters"] {
            Value::Null | Value::Object(_) => {}
            _ => {
                return Err(wrong_type(
                    &format!("{at}.function.parameters"),
                    "an object",
                ))
            }
        }
        names.push(name);
    }
    Ok(names)
}

fn stream_response(events: Vec<Bytes>, b: &Behavior, guard: InFlightGuard) -> Response<Body> {
    let guard = Arc::new(guard);
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

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests"
)]
mod tests {
    use super::*;

    fn hi() -> Value {
        json!([{"role": "user", "content": "Say hi"}])
    }

    fn tools() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "get_time",
                "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
        ])
    }

    fn weather_and_time() -> Vec<(String, Value)> {
        vec![
            ("get_weather".into(), json!({"city": "Paris"})),
            ("get_time".into(), json!({"tz": "Europe/Paris"})),
        ]
    }

    /// `{"model": "gpt-test", "messages": hi()}` with `extra` on top.
    fn body(extra: Value) -> Value {
        let mut b = json!({"model": "gpt-test", "messages": hi()});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    }

    async fn post(fake: &FakeUpstream, body: &Value) -> (u16, String) {
        let resp = reqwest::Client::new()
            .post(format!("{}/chat/completions", fake.base_url()))
            .bearer_auth("sk-test")
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    async fn whole(fake: &FakeUpstream, body: &Value) -> Value {
        let (status, text) = post(fake, body).await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// A streamed answer reassembled: text, calls by index `(id, name, arguments)`, finish
    /// reason, usage chunk, and the raw SSE.
    struct Streamed {
        text: String,
        calls: Vec<(String, String, String)>,
        /// Deltas per call.
        call_deltas: Vec<usize>,
        finish: Value,
        usage: Option<Value>,
        raw: String,
    }

    async fn streamed(fake: &FakeUpstream, body: &Value) -> Streamed {
        let mut body = body.clone();
        body["stream"] = json!(true);
        let (status, raw) = post(fake, &body).await;
        assert_eq!(status, 200, "{raw}");
        let mut out = Streamed {
            text: String::new(),
            calls: Vec::new(),
            call_deltas: Vec::new(),
            finish: Value::Null,
            usage: None,
            raw: raw.clone(),
        };
        assert!(raw.ends_with("data: [DONE]\n\n"));
        for data in raw.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
            if data == "[DONE]" {
                continue;
            }
            let c: Value = serde_json::from_str(data).unwrap();
            if !c["usage"].is_null() {
                out.usage = Some(c["usage"].clone());
            }
            let Some(choice) = c["choices"].get(0) else {
                continue;
            };
            if !choice["finish_reason"].is_null() {
                out.finish = choice["finish_reason"].clone();
            }
            out.text += choice["delta"]["content"].as_str().unwrap_or_default();
            for tc in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let i = tc["index"].as_u64().unwrap() as usize;
                if i == out.calls.len() {
                    out.calls.push(Default::default());
                    out.call_deltas.push(0);
                }
                out.call_deltas[i] += 1;
                let slot = &mut out.calls[i];
                if let Some(id) = tc["id"].as_str() {
                    slot.0 = id.to_owned();
                }
                if let Some(name) = tc["function"]["name"].as_str() {
                    slot.1 = name.to_owned();
                }
                slot.2 += tc["function"]["arguments"].as_str().unwrap_or_default();
            }
        }
        out
    }

    fn usage_is_default(usage: &Value) -> bool {
        *usage == usage_json(&Behavior::default().usage)
    }

    #[tokio::test]
    async fn the_default_behavior_answers_as_before() {
        let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
        let w = whole(&fake, &body(json!({}))).await;
        assert_eq!(
            w["choices"][0]["message"]["content"],
            "tok0 tok1 tok2 tok3 tok4"
        );
        assert_eq!(w["choices"][0]["finish_reason"], "stop");
        assert_eq!(w["usage"]["prompt_tokens"], 17);
        assert_eq!(w["usage"]["completion_tokens"], 5);
        assert_eq!(w["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
        assert_eq!(
            w["usage"]["completion_tokens_details"]["reasoning_tokens"],
            1
        );

        let s = streamed(&fake, &body(json!({}))).await;
        assert_eq!(s.text, fake_text(5));
        assert_eq!(s.finish, "stop");
        assert!(s.usage.is_none(), "usage only when asked for");
        let expected: String =
            stream_events("chatcmpl-fake", "gpt-test", &Behavior::default(), false)
                .iter()
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
                .collect();
        assert_eq!(s.raw, expected);

        let s = streamed(
            &fake,
            &body(json!({"stream_options": {"include_usage": true}})),
        )
        .await;
        assert!(usage_is_default(&s.usage.unwrap()));
        assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    }

    #[tokio::test]
    async fn the_single_tool_call_behavior_is_unchanged() {
        let behavior = Behavior {
            tool_call: true,
            ..Behavior::default()
        };
        let fake = FakeUpstream::start(behavior.clone()).await.unwrap();
        let req = body(json!({"tools": tools(), "stream_options": {"include_usage": true}}));
        let s = streamed(&fake, &req).await;
        let expected: String = stream_events("chatcmpl-fake", "gpt-test", &behavior, true)
            .iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect();
        assert_eq!(s.raw, expected);
        assert_eq!(
            s.calls,
            [(
                "call_fake1".to_owned(),
                "get_weather".to_owned(),
                r#"{"city":"Paris"}"#.to_owned()
            )]
        );
        assert_eq!(s.finish, "tool_calls");
        // Whatever the request offers, as before.
        let w = whole(&fake, &body(json!({}))).await;
        assert_eq!(w["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            w["choices"][0]["message"]["tool_calls"][0]["id"],
            "call_fake1"
        );
    }

    #[tokio::test]
    async fn parallel_tool_calls_when_tools_are_offered() {
        let fake = FakeUpstream::start(Behavior {
            tool_calls: weather_and_time(),
            ..Behavior::default()
        })
        .await
        .unwrap();
        let w = whole(&fake, &body(json!({"tools": tools()}))).await;
        let choice = &w["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        assert_eq!(
            choice["message"]["tool_calls"],
            json!([
                {"id": "call_fake1", "type": "function",
                    "function": {"name": "get_weather", "arguments": r#"{"city":"Paris"}"#}},
                {"id": "call_fake2", "type": "function",
                    "function": {"name": "get_time", "arguments": r#"{"tz":"Europe/Paris"}"#}},
            ])
        );
        assert!(usage_is_default(&w["usage"]));

        let s = streamed(
            &fake,
            &body(json!({"tools": tools(), "stream_options": {"include_usage": true}})),
        )
        .await;
        assert_eq!(s.finish, "tool_calls");
        assert_eq!(
            s.calls,
            [
                (
                    "call_fake1".into(),
                    "get_weather".into(),
                    r#"{"city":"Paris"}"#.into()
                ),
                (
                    "call_fake2".into(),
                    "get_time".into(),
                    r#"{"tz":"Europe/Paris"}"#.into()
                ),
            ]
        );
        // Each call: one delta with id, type and name, then its arguments over three deltas.
        assert_eq!(s.call_deltas, [4, 4]);
        assert!(usage_is_default(s.usage.as_ref().unwrap()));

        // No tools offered, tool_choice none: text; parallel_tool_calls false: the first call.
        let w = whole(&fake, &body(json!({}))).await;
        assert_eq!(w["choices"][0]["message"]["content"], fake_text(5));
        let w = whole(
            &fake,
            &body(json!({"tools": tools(), "tool_choice": "none"})),
        )
        .await;
        assert_eq!(w["choices"][0]["finish_reason"], "stop");
        let w = whole(
            &fake,
            &body(json!({"tools": tools(), "parallel_tool_calls": false})),
        )
        .await;
        assert_eq!(
            w["choices"][0]["message"]["tool_calls"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    }

    fn follow_up() -> Value {
        json!([
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_fake1", "type": "function",
                    "function": {"name": "get_weather", "arguments": r#"{"city":"Paris"}"#}},
                {"id": "call_fake2", "type": "function",
                    "function": {"name": "get_time", "arguments": r#"{"tz":"Europe/Paris"}"#}}]},
            {"role": "tool", "tool_call_id": "call_fake1", "content": "result-get_weather"},
            {"role": "tool", "tool_call_id": "call_fake2",
                "content": [{"type": "text", "text": "result-get_time"}]},
        ])
    }

    #[tokio::test]
    async fn a_tool_result_turn_is_summarized() {
        let fake = FakeUpstream::start(Behavior {
            tool_calls: weather_and_time(),
            tool_call: true,
            ..Behavior::default()
        })
        .await
        .unwrap();
        let req = body(json!({"messages": follow_up(), "tools": tools()}));
        let w = whole(&fake, &req).await;
        assert_eq!(w["choices"][0]["message"]["content"], TOOL_RESULTS_REPLY);
        assert_eq!(
            TOOL_RESULTS_REPLY,
            "Tool results: result-get_weather; result-get_time."
        );
        assert_eq!(w["choices"][0]["finish_reason"], "stop");
        assert!(usage_is_default(&w["usage"]));
        let s = streamed(&fake, &req).await;
        assert_eq!(s.text, TOOL_RESULTS_REPLY);
        assert!(s.calls.is_empty());
        assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    }

    #[tokio::test]
    async fn json_mode_answers_the_json_reply() {
        let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
        for format in [
            json!({"type": "json_object"}),
            json!({"type": "json_schema", "json_schema": {"name": "answer",
                "schema": {"type": "object"}}}),
        ] {
            let req = body(json!({"response_format": format}));
            let w = whole(&fake, &req).await;
            assert_eq!(w["choices"][0]["message"]["content"], FAKE_JSON_REPLY);
            assert!(usage_is_default(&w["usage"]));
            assert_eq!(streamed(&fake, &req).await.text, FAKE_JSON_REPLY);
        }
        let w = whole(&fake, &body(json!({"response_format": {"type": "text"}}))).await;
        assert_eq!(w["choices"][0]["message"]["content"], fake_text(5));
        assert!(serde_json::from_str::<Value>(FAKE_JSON_REPLY)
            .unwrap()
            .is_object());
    }

    #[tokio::test]
    async fn max_tokens_cut_the_words_with_finish_reason_length() {
        let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
        for limit in ["max_tokens", "max_completion_tokens"] {
            let req = body(json!({limit: 2}));
            let w = whole(&fake, &req).await;
            assert_eq!(w["choices"][0]["message"]["content"], "tok0 tok1");
            assert_eq!(w["choices"][0]["finish_reason"], "length");
            assert!(usage_is_default(&w["usage"]));
            let s = streamed(&fake, &req).await;
            assert_eq!(s.text, fake_text(2));
            assert_eq!(s.finish, "length");
        }
        // max_completion_tokens wins over the deprecated max_tokens.
        let w = whole(
            &fake,
            &body(json!({"max_tokens": 1, "max_completion_tokens": 3})),
        )
        .await;
        assert_eq!(w["choices"][0]["message"]["content"], fake_text(3));
        // A limit at or above the reply leaves it whole.
        for n in [5, 32] {
            let w = whole(&fake, &body(json!({"max_tokens": n}))).await;
            assert_eq!(w["choices"][0]["message"]["content"], fake_text(5));
            assert_eq!(w["choices"][0]["finish_reason"], "stop");
        }
    }

    #[tokio::test]
    async fn images_as_data_urls_are_accepted_when_well_formed() {
        let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
        let with_image = |url: &str| {
            body(json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is it?"},
                {"type": "image_url", "image_url": {"url": url}}]}]}))
        };
        for url in [
            "data:image/png;base64,iVBORw0KGgo=",
            "data:image/jpeg;base64,/9j/4AAQ",
            "https://example.com/cat.png",
        ] {
            let w = whole(&fake, &with_image(url)).await;
            assert_eq!(w["choices"][0]["message"]["content"], fake_text(5), "{url}");
        }
        for url in [
            "data:image/png;base64,not base64!",
            "data:image/png;base64,",
            "data:text/plain;base64,aGk=",
            "data:image/png,iVBORw0KGgo=",
            "iVBORw0KGgo=",
        ] {
            let (status, text) = post(&fake, &with_image(url)).await;
            assert_eq!(status, 400, "{url}: {text}");
            let err: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(err["error"]["code"], "invalid_image_url", "{url}");
        }
        assert_eq!(fake.rejected().len(), 5);
    }

    #[tokio::test]
    async fn invalid_requests_are_refused_like_openai() {
        let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
        let call = |id: &str| {
            json!({"id": id, "type": "function",
                "function": {"name": "get_weather", "arguments": "{}"}})
        };
        let with_call = |c: Value| {
            json!([{"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "tool_calls": [c]},
            {"role": "tool", "tool_call_id": "call_1", "content": "r"}])
        };
        let cases: Vec<(&str, Value, &str)> = vec![
            ("empty messages", body(json!({"messages": []})), "messages"),
            ("missing messages", json!({"model": "gpt-test"}), "messages"),
            (
                "unknown role",
                body(json!({"messages": [{"role": "robot", "content": "x"}]})),
                "messages.[0].role",
            ),
            (
                "no role",
                body(json!({"messages": [{"content": "x"}]})),
                "messages.[0].role",
            ),
            (
                "user without content",
                body(json!({"messages": [{"role": "user"}]})),
                "messages.[0].content",
            ),
            (
                "tool without a call",
                body(json!({"messages": [{"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "call_1", "content": "r"}]})),
                "messages.[1].role",
            ),
            (
                "tool answering an unknown id",
                body(json!({"messages": with_call(call("call_2"))})),
                "messages.[2].tool_call_id",
            ),
            (
                "tool without tool_call_id",
                body(json!({"messages": [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [call("call_1")]},
                {"role": "tool", "content": "r"}]})),
                "messages.[2].tool_call_id",
            ),
            (
                "call left unanswered",
                body(json!({"messages": [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [call("call_1")]},
                {"role": "user", "content": "and?"}]})),
                "messages.[2].role",
            ),
            (
                "call without id",
                body(json!({"messages": with_call(json!({"type": "function",
                "function": {"name": "f", "arguments": "{}"}}))})),
                "messages.[1].tool_calls.[0].id",
            ),
            (
                "call not a function",
                body(
                    json!({"messages": with_call(json!({"id": "call_1", "type": "custom",
                "function": {"name": "f", "arguments": "{}"}}))}),
                ),
                "messages.[1].tool_calls.[0].type",
            ),
            (
                "call without name",
                body(
                    json!({"messages": with_call(json!({"id": "call_1", "type": "function",
                "function": {"arguments": "{}"}}))}),
                ),
                "messages.[1].tool_calls.[0].function.name",
            ),
            (
                "call arguments not a string",
                body(
                    json!({"messages": with_call(json!({"id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": {}}}))}),
                ),
                "messages.[1].tool_calls.[0].function.arguments",
            ),
            (
                "tool not a function",
                body(json!({"tools": [{"type": "retrieval"}]})),
                "tools.[0].type",
            ),
            (
                "tool without name",
                body(json!({"tools": [{"type": "function", "function": {}}]})),
                "tools.[0].function.name",
            ),
            (
                "tool name with a space",
                body(json!({"tools": [{"type": "function", "function": {"name": "get weather"}}]})),
                "tools.[0].function.name",
            ),
            ("empty tools", body(json!({"tools": []})), "tools"),
            (
                "tool_choice without tools",
                body(json!({"tool_choice": "auto"})),
                "tool_choice",
            ),
            (
                "temperature above 2",
                body(json!({"temperature": 2.5})),
                "temperature",
            ),
            (
                "temperature below 0",
                body(json!({"temperature": -0.1})),
                "temperature",
            ),
            (
                "temperature a string",
                body(json!({"temperature": "hot"})),
                "temperature",
            ),
            ("max_tokens 0", body(json!({"max_tokens": 0})), "max_tokens"),
            (
                "max_completion_tokens negative",
                body(json!({"max_completion_tokens": -3})),
                "max_completion_tokens",
            ),
            (
                "stream_options without stream",
                body(json!({"stream_options": {"include_usage": true}})),
                "stream_options",
            ),
        ];
        for (name, req, param) in &cases {
            let (status, text) = post(&fake, req).await;
            assert_eq!(status, 400, "{name}: {text}");
            let err: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(err["error"]["type"], "invalid_request_error", "{name}");
            assert_eq!(err["error"]["param"], *param, "{name}: {text}");
            assert!(err["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
        assert_eq!(fake.rejected().len(), cases.len());
        assert!(fake.received().is_empty());

        // Edges that are valid: temperature 0 and 2, developer role, null optional
        // parameters, an assistant turn with content, tool_choice naming an offered tool.
        let ok = [
            body(json!({"temperature": 0, "top_p": 1})),
            body(json!({"temperature": 2, "max_tokens": null})),
            body(
                json!({"messages": [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "again"}]}]}),
            ),
            body(json!({"tools": tools(), "tool_choice": {"type": "function",
                "function": {"name": "get_time"}}})),
            body(json!({"messages": follow_up()})),
        ];
        for req in &ok {
            whole(&fake, req).await;
        }
        assert_eq!(fake.rejected().len(), cases.len());
        assert_eq!(fake.received().len(), ok.len());
    }

    #[test]
    fn argument_pieces_cover_the_arguments_at_character_boundaries() {
        for args in [r#"{"city":"Paris"}"#, r#"{"city":"Zürich ☀"}"#, "", "ab"] {
            for n in 1..5 {
                let pieces = argument_pieces(args, n);
                assert_eq!(pieces.len(), n);
                assert_eq!(pieces.concat(), args);
            }
        }
        assert_eq!(
            argument_pieces(r#"{"tz":"Europe/Paris"}"#, 2),
            [r#"{"tz":"Eur"#, r#"ope/Paris"}"#]
        );
    }
}
