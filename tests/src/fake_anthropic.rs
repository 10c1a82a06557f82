//! A fake Anthropic Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), for the
//! proxy's Anthropic adapter and its pass-through lane.
//!
//! It answers in the native format (JSON and named SSE events, with cache token counts) and
//! validates what it receives the way the API does: `x-api-key`, `anthropic-version:
//! 2023-06-01`, a JSON body with a string `model`, an integer `max_tokens` ≥ 1, non-empty
//! `messages` alternating user/assistant from a user turn, no `system` role inside them, known
//! content blocks (`tool_use` only from the assistant, each answered by a `tool_result` in the
//! next user turn), `temperature` and `top_p` within 0–1, well-formed `tools` and `tool_choice`,
//! and no unknown top-level field (`context_management` only with its `anthropic-beta`);
//! `cache_control` of type `ephemeral`; `thinking` with a budget below `max_tokens`, and a
//! thinking block sent back only with the signature this fake gave it. A refusal is Anthropic's
//! error JSON, so a translation bug fails a test instead of passing silently.
//!
//! What it answers follows the request and the per-key [`AnthropicBehavior`]: tool calls when the
//! request offers tools and the behavior names some, a summary of the tool results when the last
//! turn carries them, a JSON object when the system prompt asks for JSON, and otherwise words
//! cut at `max_tokens` (stop reason `max_tokens`); a thinking block (with its signature, streamed
//! as `thinking_delta` and `signature_delta`) first when the request enables thinking.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use serde_json::{json, Value};

use crate::fake::Received;
use crate::serve::{
    fake_server, json_response_with_request_id, lock, paced_stream, refuse, Body, FakeLog,
    FakeServer, Pace, ReadRequest,
};

/// The version gateways pin (and the fake's first).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The version today's official SDKs send by default; under it the API refuses `temperature`,
/// `top_p` and `top_k`.
pub const ANTHROPIC_VERSION_2026: &str = "2026-10-21";

/// Whether the API knows `version`.
fn known_version(version: Option<&String>) -> bool {
    matches!(
        version.map(String::as_str),
        Some(ANTHROPIC_VERSION | ANTHROPIC_VERSION_2026)
    )
}

/// The text reply, one output word per token.
pub const ANTHROPIC_REPLY: &str = "Hello from the fake Claude model.";

/// The reply when the system prompt asks for JSON.
pub const ANTHROPIC_JSON_REPLY: &str = r#"{"answer":"hi","confidence":1}"#;

/// The input tokens the fake reports by default: the `usage.input_tokens` of its answers and its
/// `count_tokens` answer (`{"input_tokens": N}`), also what Claude on the Bedrock and Vertex
/// fakes reports, answers and token counts alike.
pub const ANTHROPIC_INPUT_TOKENS: u64 = 21;

/// Usage the fake reports, in Anthropic's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnthropicUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

/// What the fake does for a request.
#[derive(Debug, Clone)]
pub struct AnthropicBehavior {
    /// Non-2xx answers with Anthropic's error body (type from the status).
    pub status: u16,
    /// The error message (e.g. Anthropic's "Your credit balance is too low…").
    pub error_message: Option<String>,
    pub retry_after_s: Option<u64>,
    /// Tool calls `(name, input)` made when the request offers tools.
    pub tool_calls: Vec<(String, Value)>,
    pub usage: AnthropicUsage,
    /// Streams send an `error` event (overloaded) after the first text delta.
    pub stream_error: bool,
    /// Delay before a stream's first content delta (its time to first token).
    pub ttft: Duration,
    /// Pause before each later content delta.
    pub chunk_interval: Duration,
    /// The text reply as this many words (`tok0 tok1 …`, one delta each) instead of
    /// [`ANTHROPIC_REPLY`]: the benchmark's stream, as long as the chat fake's.
    pub reply_words: Option<usize>,
}

impl Default for AnthropicBehavior {
    fn default() -> Self {
        Self {
            status: 200,
            error_message: None,
            retry_after_s: None,
            tool_calls: Vec::new(),
            usage: AnthropicUsage {
                input_tokens: ANTHROPIC_INPUT_TOKENS,
                output_tokens: 9,
                cache_creation_input_tokens: 4,
                cache_read_input_tokens: 6,
            },
            stream_error: false,
            ttft: Duration::ZERO,
            chunk_interval: Duration::ZERO,
            reply_words: None,
        }
    }
}

#[derive(Default)]
/// What the fake keeps between requests, its log among it.
pub struct AnthropicState {
    default: AnthropicBehavior,
    by_key: HashMap<String, AnthropicBehavior>,
    log: FakeLog,
    next_id: u64,
}

fake_server!(
    /// A running fake; stops when dropped.
    FakeAnthropic = AnthropicState
);

impl FakeServer<AnthropicState> {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(default: AnthropicBehavior) -> std::io::Result<Self> {
        Self::start_on(([127, 0, 0, 1], 0).into(), default).await
    }

    /// Starts on `addr` (the benchmark's fixed port).
    pub async fn start_on(
        addr: std::net::SocketAddr,
        default: AnthropicBehavior,
    ) -> std::io::Result<Self> {
        Self::serve_on(
            addr,
            |_| AnthropicState {
                default,
                ..AnthropicState::default()
            },
            handle,
        )
        .await
    }

    /// Requests carrying `x-api-key: <key>` get `behavior`.
    pub fn set_behavior(&self, key: &str, behavior: AnthropicBehavior) {
        self.state().by_key.insert(key.to_owned(), behavior);
    }
}

fn full(status: u16, body: &Value) -> Response<Body> {
    json_response_with_request_id(status, body, "request-id", "req_fake_anthropic")
}

/// Anthropic's error body: `{"type":"error","error":{"type","message"},"request_id"}`.
pub fn anthropic_error(status: u16, message: &str) -> Response<Body> {
    let kind = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    full(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message},
            "request_id": "req_fake_anthropic"}),
    )
}

const TOP_LEVEL: &[&str] = &[
    "model",
    "max_tokens",
    "messages",
    "system",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "stream",
    "tools",
    "tool_choice",
    "metadata",
    "thinking",
    "service_tier",
    "output_config",
    // Accepted only with its beta (`anthropic-beta: context-management-…`).
    "context_management",
];

/// The signature the fake gives a thinking block: an answer's thinking comes back in the next
/// turn only with it, as Anthropic requires (a client or gateway that drops or alters either
/// is refused).
pub fn thinking_signature(thinking: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in thinking.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("EqFakeSig{h:016x}")
}

/// The thinking the fake does when asked to.
pub const ANTHROPIC_THINKING: &str = "The user greets me; a short greeting back will do.";

/// `cache_control`, where present: `{"type": "ephemeral"}` with an optional `ttl` of 5m or 1h.
fn check_cache_control(block: &Value, at: &str) -> Result<(), String> {
    match block.get("cache_control") {
        None => Ok(()),
        Some(c)
            if c["type"] == "ephemeral"
                && matches!(
                    c.get("ttl").map(|t| t.as_str()),
                    None | Some(Some("5m" | "1h"))
                ) =>
        {
            Ok(())
        }
        Some(_) => Err(format!("{at}.cache_control: type must be ephemeral")),
    }
}

/// Checks a Messages body against the API's rules; the first problem found.
pub fn validate_messages_body(body: &Value) -> Result<(), String> {
    let obj = body.as_object().ok_or("body: not a JSON object")?;
    if let Some(k) = obj.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
        return Err(format!("{k}: Extra inputs are not permitted"));
    }
    if obj
        .get("model")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("model: Field required".into());
    }
    if obj
        .get("max_tokens")
        .and_then(Value::as_u64)
        .is_none_or(|n| n == 0)
    {
        return Err("max_tokens: Field required (an integer ≥ 1)".into());
    }
    for param in ["temperature", "top_p"] {
        if let Some(v) = obj.get(param) {
            if !v.as_f64().is_some_and(|t| (0.0..=1.0).contains(&t)) {
                return Err(format!("{param}: range: 0..1"));
            }
        }
    }
    if let Some(s) = obj.get("stop_sequences") {
        if !s.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
            return Err("stop_sequences: must be an array of strings".into());
        }
    }
    if let Some(s) = obj.get("stream") {
        if !s.is_boolean() {
            return Err("stream: must be a boolean".into());
        }
    }
    match obj.get("system") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(blocks)) => {
            for b in blocks {
                if b["type"] != "text" || b["text"].as_str().is_none_or(str::is_empty) {
                    return Err("system: text blocks with non-empty text only".into());
                }
                check_cache_control(b, "system")?;
            }
        }
        Some(_) => return Err("system: must be a string or text blocks".into()),
    }
    let mut tool_names = HashSet::new();
    if let Some(tools) = obj.get("tools") {
        for t in tools.as_array().ok_or("tools: must be an array")? {
            let name = t["name"].as_str().ok_or("tools.name: Field required")?;
            if t["input_schema"]["type"] != "object" {
                return Err("tools.input_schema: must be an object schema".into());
            }
            if t.get("parameters").is_some() || t.get("function").is_some() {
                return Err("tools: OpenAI-style tool definition".into());
            }
            check_cache_control(t, "tools")?;
            tool_names.insert(name.to_owned());
        }
    }
    if let Some(choice) = obj.get("tool_choice") {
        if obj.get("tools").is_none() {
            return Err("tool_choice: may only be set with tools".into());
        }
        match choice["type"].as_str() {
            Some("auto" | "any" | "none") => {}
            Some("tool")
                if choice["name"]
                    .as_str()
                    .is_some_and(|n| tool_names.contains(n)) => {}
            _ => return Err("tool_choice: invalid".into()),
        }
    }
    match obj.get("thinking") {
        None => {}
        // Adaptive thinking (Claude 4.6+) picks its own budget.
        Some(t) if t["type"] == "disabled" || t["type"] == "adaptive" => {}
        Some(t) if t["type"] == "enabled" => {
            let budget = t["budget_tokens"].as_u64().unwrap_or(0);
            let max = obj.get("max_tokens").and_then(Value::as_u64).unwrap_or(0);
            if budget < 1024 || budget >= max {
                return Err(
                    "thinking.budget_tokens: must be ≥ 1024 and less than max_tokens".into(),
                );
            }
        }
        Some(_) => return Err("thinking: type must be enabled or disabled".into()),
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or("messages: at least one message is required")?;
    let mut open_tool_uses: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        let want = if i % 2 == 0 { "user" } else { "assistant" };
        if role == "system" {
            return Err(format!("messages.{i}.role: system is not a message role; use the top-level system parameter"));
        }
        if role != want {
            return Err(format!(
                "messages.{i}: roles must alternate between user and assistant, starting with user"
            ));
        }
        let blocks = match &m["content"] {
            Value::String(s) if !s.is_empty() => Vec::new(),
            Value::Array(b) if !b.is_empty() => b.clone(),
            _ => return Err(format!("messages.{i}.content: must be non-empty")),
        };
        let mut answered = HashSet::new();
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("messages.{i}.content.{j}");
            check_cache_control(b, &at)?;
            match (b["type"].as_str().unwrap_or_default(), role) {
                ("thinking", "assistant") => {
                    let thinking = b["thinking"].as_str().unwrap_or_default();
                    if b["signature"].as_str() != Some(&thinking_signature(thinking)) {
                        return Err(format!("{at}: Invalid `signature` in `thinking` block"));
                    }
                }
                ("redacted_thinking", "assistant") => {
                    if !b["data"].is_string() {
                        return Err(format!("{at}.data: Field required"));
                    }
                }
                ("text", _) => {
                    if b["text"].as_str().is_none_or(str::is_empty) {
                        return Err(format!("{at}: text content blocks must be non-empty"));
                    }
                }
                ("image", "user") => {
                    validate_image(&b["source"]).map_err(|e| format!("{at}: {e}"))?
                }
                ("tool_use", "assistant") => {
                    let id = b["id"].as_str().ok_or(format!("{at}.id: Field required"))?;
                    if !b["name"].is_string() || !b["input"].is_object() {
                        return Err(format!("{at}: tool_use needs a name and an object input"));
                    }
                    open_tool_uses.push(id.to_owned());
                }
                ("tool_result", "user") => {
                    let id = b["tool_use_id"].as_str().unwrap_or_default();
                    if !open_tool_uses.iter().any(|u| u == id) {
                        return Err(format!(
                            "{at}: unexpected `tool_use_id` found in `tool_result` blocks: {id}"
                        ));
                    }
                    answered.insert(id.to_owned());
                }
                (kind, role) => return Err(format!("{at}: a `{kind}` block in a {role} turn")),
            }
        }
        if role == "user" {
            if let Some(missing) = open_tool_uses.iter().find(|u| !answered.contains(*u)) {
                return Err(format!(
                    "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {missing}"
                ));
            }
            open_tool_uses.clear();
        }
    }
    Ok(())
}

fn validate_image(source: &Value) -> Result<(), String> {
    match source["type"].as_str() {
        Some("base64") => {
            let media = source["media_type"].as_str().unwrap_or_default();
            if !["image/jpeg", "image/png", "image/gif", "image/webp"].contains(&media) {
                return Err(format!("image.source.media_type: unsupported `{media}`"));
            }
            let data = source["data"].as_str().unwrap_or_default();
            let base64 = |b: u8| b.is_ascii_alphanumeric() || b"+/=".contains(&b);
            if data.is_empty() || !data.bytes().all(base64) {
                return Err("image.source.data: not base64".into());
            }
            Ok(())
        }
        Some("url")
            if source["url"]
                .as_str()
                .is_some_and(|u| u.starts_with("http")) =>
        {
            Ok(())
        }
        _ => Err("image.source: base64 or url".into()),
    }
}

/// `GET /v1/models`, what a credential check calls: a key set to fail with 401 fails here too.
fn list_models(
    state: &Mutex<AnthropicState>,
    headers: &std::collections::HashMap<String, String>,
) -> Response<Body> {
    let Some(key) = headers.get("x-api-key").filter(|k| !k.is_empty()) else {
        return anthropic_error(401, "x-api-key header is required");
    };
    if !known_version(headers.get("anthropic-version")) {
        return anthropic_error(400, "anthropic-version: header is required (2023-06-01)");
    }
    match lock(state).by_key.get(key).map_or(200, |b| b.status) {
        401 => anthropic_error(401, "invalid x-api-key"),
        _ => crate::serve::json_response(
            200,
            &json!({"data": [{"type": "model", "id": "claude-test", "display_name": "Claude Test",
                "created_at": "2025-01-01T00:00:00Z"}],
                "has_more": false, "first_id": "claude-test", "last_id": "claude-test"}),
        ),
    }
}

async fn handle(
    req: ReadRequest,
    state: Arc<Mutex<AnthropicState>>,
) -> Result<Response<Body>, Infallible> {
    let (method, path, version, headers, body) = req.parts();
    let reject = |status: u16, why: String| refuse(&state, &why, anthropic_error(status, &why));
    if method == http::Method::GET && path == "/v1/models" {
        return Ok(list_models(&state, &headers));
    }
    let count_tokens = path == "/v1/messages/count_tokens";
    if method != http::Method::POST || !(path == "/v1/messages" || count_tokens) {
        return reject(404, format!("Not found: {method} {path}"));
    }
    let Some(key) = headers.get("x-api-key").filter(|k| !k.is_empty()).cloned() else {
        return reject(401, "x-api-key header is required".into());
    };
    if !known_version(headers.get("anthropic-version")) {
        return reject(
            400,
            "anthropic-version: header is required (2023-06-01)".into(),
        );
    }
    if headers.get("content-type").map(String::as_str) != Some("application/json") {
        return reject(400, "content-type must be application/json".into());
    }
    let Some(parsed) = body.and_then(|b| serde_json::from_slice::<Value>(&b).ok()) else {
        return reject(400, "body: invalid JSON".into());
    };
    if let Err(why) = validate_request(&parsed, &headers, count_tokens) {
        return reject(400, why);
    }
    let (behavior, id) = {
        let mut st = lock(&state);
        st.log.keep(Received {
            version,
            path,
            headers,
            body: parsed.clone(),
        });
        st.next_id += 1;
        let b = st
            .by_key
            .get(&key)
            .cloned()
            .unwrap_or_else(|| st.default.clone());
        (b, format!("msg_fake{:04}", st.next_id))
    };
    if behavior.status != 200 {
        let message = behavior.error_message.clone().unwrap_or_else(|| {
            match behavior.status {
                401 => "invalid x-api-key",
                429 => "Number of request tokens has exceeded your per-minute rate limit",
                529 => "Overloaded",
                _ => "fake failure",
            }
            .to_owned()
        });
        let mut resp = anthropic_error(behavior.status, &message);
        if let Some(s) = behavior.retry_after_s {
            if let Ok(v) = http::HeaderValue::try_from(s.to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        return Ok(resp);
    }
    if count_tokens {
        return Ok(full(
            200,
            &json!({"input_tokens": behavior.usage.input_tokens}),
        ));
    }
    if parsed["stream"] == true {
        return Ok(stream_response(&id, &parsed, &behavior));
    }
    Ok(full(200, &message_json(&parsed, &behavior, &id)))
}

/// The whole Messages answer to `req` (its `model` named as asked).
pub fn message_json(req: &Value, behavior: &AnthropicBehavior, id: &str) -> Value {
    let answer = answer(req, behavior);
    let mut content = Vec::new();
    if answer.thinking {
        content.push(json!({"type": "thinking", "thinking": ANTHROPIC_THINKING,
            "signature": thinking_signature(ANTHROPIC_THINKING)}));
    }
    if !answer.text.is_empty() {
        content.push(json!({"type": "text", "text": answer.text}));
    }
    for (tool_id, name, input) in &answer.tools {
        content.push(json!({"type": "tool_use", "id": tool_id, "name": name, "input": input}));
    }
    json!({"id": id, "type": "message", "role": "assistant", "model": req["model"],
        "content": content, "stop_reason": answer.stop_reason, "stop_sequence": null,
        "usage": usage_json(req, &behavior.usage, behavior.usage.output_tokens)})
}

/// A Messages body (or a `count_tokens` one) against the API's rules and the betas its
/// headers name.
fn validate_request(
    body: &Value,
    headers: &HashMap<String, String>,
    count_tokens: bool,
) -> Result<(), String> {
    let betas = headers.get("anthropic-beta").map_or("", String::as_str);
    if headers.get("anthropic-version").map(String::as_str) == Some(ANTHROPIC_VERSION_2026) {
        for param in ["temperature", "top_p", "top_k"] {
            if body.get(param).is_some() {
                return Err(format!(
                    "{param}: not supported with anthropic-version {ANTHROPIC_VERSION_2026}"
                ));
            }
        }
    }
    if body.get("context_management").is_some() && !betas.contains("context-management-") {
        return Err("context_management: Extra inputs are not permitted".into());
    }
    if !count_tokens {
        return validate_messages_body(body);
    }
    validate_count_tokens_body(body)
}

/// Checks a `count_tokens` body (`POST /v1/messages/count_tokens`): a Messages body less the
/// generation parameters (`max_tokens`, `stream`, `temperature`, `top_p`, `top_k`,
/// `stop_sequences` are refused); the first problem found.
pub fn validate_count_tokens_body(body: &Value) -> Result<(), String> {
    let obj = body.as_object().ok_or("body: not a JSON object")?;
    for param in [
        "max_tokens",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
    ] {
        if obj.contains_key(param) {
            return Err(format!("{param}: Extra inputs are not permitted"));
        }
    }
    let mut as_messages = obj.clone();
    as_messages.insert("max_tokens".into(), json!(64_000));
    validate_messages_body(&Value::Object(as_messages))
}

struct Answer {
    /// The answer starts with a thinking block (the request enabled thinking).
    thinking: bool,
    text: String,
    tools: Vec<(String, String, Value)>,
    stop_reason: &'static str,
}

fn answer(req: &Value, b: &AnthropicBehavior) -> Answer {
    let thinking = matches!(
        req["thinking"]["type"].as_str(),
        Some("enabled" | "adaptive")
    );
    let messages = req["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let results: Vec<String> = last["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter(|x| x["type"] == "tool_result")
                .map(|x| match &x["content"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    let system = req["system"].to_string();
    if !results.is_empty() {
        return Answer {
            thinking,
            text: format!("Tool results: {}.", results.join("; ")),
            tools: Vec::new(),
            stop_reason: "end_turn",
        };
    }
    let offers_tools = req["tools"].as_array().is_some_and(|t| !t.is_empty())
        && req["tool_choice"]["type"] != "none";
    if offers_tools && !b.tool_calls.is_empty() {
        let calls = if req["tool_choice"]["disable_parallel_tool_use"] == true {
            &b.tool_calls[..1]
        } else {
            &b.tool_calls[..]
        };
        return Answer {
            thinking,
            text: "Let me check.".into(),
            tools: calls
                .iter()
                .enumerate()
                .map(|(i, (name, input))| {
                    (format!("toolu_fake{i:02}"), name.clone(), input.clone())
                })
                .collect(),
            stop_reason: "tool_use",
        };
    }
    if system.contains("JSON") {
        return Answer {
            thinking,
            text: ANTHROPIC_JSON_REPLY.into(),
            tools: Vec::new(),
            stop_reason: "end_turn",
        };
    }
    let generated = b.reply_words.map(crate::fake::fake_words);
    let words: Vec<&str> = match &generated {
        Some(words) => words.iter().map(String::as_str).collect(),
        None => ANTHROPIC_REPLY.split(' ').collect(),
    };
    let limit = req["max_tokens"].as_u64().unwrap_or(0) as usize;
    let (words, stop_reason) = if limit < words.len() {
        (&words[..limit], "max_tokens")
    } else {
        (&words[..], "end_turn")
    };
    Answer {
        thinking,
        text: words.join(" "),
        tools: Vec::new(),
        stop_reason,
    }
}

/// The usage of an answer to `req`: its cache writes go to the 1-hour cache when a breakpoint
/// asks for it (`cache_control.ttl: "1h"`), to the 5-minute one otherwise.
fn usage_json(req: &Value, u: &AnthropicUsage, output_tokens: u64) -> Value {
    let hour = req.to_string().contains(r#""ttl":"1h""#);
    let (five, sixty) = if hour {
        (0, u.cache_creation_input_tokens)
    } else {
        (u.cache_creation_input_tokens, 0)
    };
    json!({"input_tokens": u.input_tokens, "output_tokens": output_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": five, "ephemeral_1h_input_tokens": sixty},
        "service_tier": "standard"})
}

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The native event sequence for an answer to `req`, each event's name and data.
pub fn message_events(req: &Value, b: &AnthropicBehavior, id: &str) -> Vec<(&'static str, Value)> {
    let a = &answer(req, b);
    let model = req["model"].as_str().unwrap_or_default();
    let mut out = vec![(
        "message_start",
        json!({"type": "message_start", "message": {"id": id, "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": usage_json(req, &b.usage, 1)}}),
    )];
    let mut index = 0;
    if a.thinking {
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ));
        out.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "thinking_delta", "thinking": ANTHROPIC_THINKING}}),
        ));
        out.push(("content_block_delta", json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "signature_delta", "signature": thinking_signature(ANTHROPIC_THINKING)}}),
        ));
        out.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    if !a.text.is_empty() {
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""}}),
        ));
        out.push(("ping", json!({"type": "ping"})));
        for (i, word) in a.text.split(' ').enumerate() {
            let text = if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            };
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
            ));
            if b.stream_error {
                out.push(("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
                ));
                return out;
            }
        }
        out.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    for (tool_id, name, input) in &a.tools {
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}}}),
        ));
        let args = input.to_string();
        let cut = args.len() / 2;
        let cut = (0..=cut)
            .rev()
            .find(|&c| args.is_char_boundary(c))
            .unwrap_or(0);
        for piece in ["", &args[..cut], &args[cut..]] {
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": piece}}),
            ));
        }
        out.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    // Output usage is cumulative: an early partial count, then the final one.
    out.push((
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": null, "stop_sequence": null},
            "usage": {"output_tokens": b.usage.output_tokens / 2}}),
    ));
    out.push(("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": a.stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": b.usage.output_tokens}}),
    ));
    out.push(("message_stop", json!({"type": "message_stop"})));
    out
}

fn stream_response(id: &str, req: &Value, b: &AnthropicBehavior) -> Response<Body> {
    let events = message_events(req, b, id)
        .into_iter()
        .map(|(name, data)| (name == "content_block_delta", event(name, &data)))
        .collect();
    let pace = Pace {
        ttft: b.ttft,
        interval: b.chunk_interval,
    };
    let mut resp = paced_stream(events, pace, "text/event-stream; charset=utf-8");
    resp.headers_mut()
        .insert("cache-control", http::HeaderValue::from_static("no-cache"));
    resp
}
