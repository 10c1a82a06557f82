//! Anthropic's Messages API (`POST /v1/messages`, `x-api-key`, `anthropic-version: 2023-06-01`)
//! behind OpenAI's Chat Completions surface.
//!
//! Requests are rebuilt (the two formats share no shape): system and developer messages become
//! the top-level `system`, tool calls become `tool_use` blocks and tool messages `tool_result`
//! blocks in a user turn, consecutive turns of one role are merged (Anthropic wants them
//! alternating). Choices, documented in ARCHITECTURE.md: `max_tokens` defaults to
//! [`MAX_TOKENS_DEFAULT`]; a `temperature` above 1 is refused (Anthropic's range is 0–1, and
//! clamping would silently give less randomness than asked); `response_format` JSON modes are a
//! system instruction (carrying the schema for `json_schema`); parameters Anthropic cannot honour
//! (`n` > 1, `logprobs`, `logit_bias`, `audio`, …) are refused with a 400 naming the parameter,
//! and penalties, `seed`, `store` and similar hints are ignored.
//!
//! Responses are translated whole or, for streams, event by event as they arrive: each
//! Anthropic SSE event yields its OpenAI chunk at once (no buffering beyond one event).
//!
//! Clients of Anthropic's own API (`/v1/messages`) take the pass-through lane instead: their
//! body goes up with only `model` renamed, with their `anthropic-version` and `anthropic-beta`
//! headers, and the answer comes back as it is (`MessagesRelay` reads the usage on the way).

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokn_config::credential::ApiKeyCredential;

use super::translate::{
    assistant_tool_calls, bad_messages, conversation, function_tools, image_url,
    json_mode_instruction, json_post_header, offered_tools, refuse_unsupported, stop_sequences,
    text_parts, tool_call_arguments_delta, tool_call_id, tool_call_start_delta, unix_secs,
    usage_json, write_chunk, write_error_event, write_usage_chunk, ChunkHeader, ToolCallIndexes,
};
use super::{
    ChatCall, CredentialHeader, FailureClass, MessagesCall, Outbound, ProviderAdapter, StreamTally,
    StreamTranslator,
};
use crate::chat::ChatRequest;
use crate::error::{ErrorKind, GatewayError, UpstreamError};
use crate::relay::{event_data, find_event_end, FramingError, SSE_EVENT_BYTES_MAX};
use crate::upstream::Endpoint;
use crate::usage::Usage;

/// Where a pool without a `base_url` goes.
const BASE_URL: &str = "https://api.anthropic.com";

/// The API version this adapter speaks (sent as `anthropic-version`).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// `max_tokens` when the client sent neither `max_tokens` nor `max_completion_tokens`
/// (Anthropic requires it; 4096 fits every current Claude model's output limit).
pub const MAX_TOKENS_DEFAULT: u64 = 4096;

pub struct AnthropicAdapter {
    endpoint: Endpoint,
    /// `{root}/v1/messages`.
    messages_path: String,
    /// `{root}/v1/messages/count_tokens`.
    count_tokens_path: String,
    key: CredentialHeader,
}

impl AnthropicAdapter {
    pub fn new(c: &ApiKeyCredential) -> Result<Self, String> {
        let endpoint = Endpoint::new(c.base_url.as_deref().unwrap_or(BASE_URL))?;
        // `https://api.anthropic.com` and `…/v1` both name the API's root.
        let base = &endpoint.url.base_path;
        let root = base.strip_suffix("/v1").unwrap_or(base);
        Ok(Self {
            messages_path: format!("{root}/v1/messages"),
            count_tokens_path: format!("{root}/v1/messages/count_tokens"),
            endpoint,
            key: CredentialHeader::new("x-api-key", c.api_key.expose())?,
        })
    }
}

impl ProviderAdapter for AnthropicAdapter {
    fn chat_request(&self, call: &ChatCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let messages = messages_body(call.req, call.body, call.upstream_model)?;
        let body =
            Bytes::from(serde_json::to_vec(&messages).map_err(|_| GatewayError::internal())?);
        let header = json_post_header(
            &self.messages_path,
            &self.endpoint,
            Some(&self.key),
            &[("anthropic-version", ANTHROPIC_VERSION)],
            body.len(),
        )?;
        Ok(Outbound::Http {
            endpoint: &self.endpoint,
            header: Box::new(header),
            body,
        })
    }

    fn serves_messages(&self, _upstream_model: &str) -> bool {
        true
    }

    fn counts_message_tokens(&self) -> bool {
        true
    }

    /// The client's body with the upstream's model name, and its `anthropic-version` (ours
    /// when it sent none) and `anthropic-beta` as they are: betas are the client's to choose.
    fn messages_request(&self, call: &MessagesCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let body = call.req.upstream_body(call.body, call.upstream_model);
        let path = if call.count_tokens {
            &self.count_tokens_path
        } else {
            &self.messages_path
        };
        let mut header = json_post_header(path, &self.endpoint, Some(&self.key), &[], body.len())?;
        let version = call
            .req
            .version
            .clone()
            .unwrap_or(http::HeaderValue::from_static(ANTHROPIC_VERSION));
        let passed = [
            ("anthropic-version", Some(version)),
            ("anthropic-beta", call.req.beta.clone()),
        ];
        for (name, value) in passed {
            if let Some(value) = value {
                header
                    .insert_header(name, value)
                    .map_err(|_| GatewayError::internal())?;
            }
        }
        Ok(Outbound::Http {
            endpoint: &self.endpoint,
            header: Box::new(header),
            body,
        })
    }

    fn complete_body(
        &self,
        body: Bytes,
        _upstream_model: &str,
    ) -> Result<(Bytes, Option<Usage>), GatewayError> {
        let message: MessageWire =
            serde_json::from_slice(&body).map_err(|_| GatewayError::upstream_bad_response())?;
        let usage = message.usage.merged_into(UsageParts::default()).usage();
        let completion = completion_object(message, unix_secs());
        let out = serde_json::to_vec(&completion).map_err(|_| GatewayError::internal())?;
        Ok((Bytes::from(out), Some(usage)))
    }

    fn stream_translator(
        &self,
        hide_usage_chunk: bool,
        _upstream_model: &str,
    ) -> Box<dyn StreamTranslator> {
        Box::new(MessagesStream::new(hide_usage_chunk))
    }

    fn classify_failure(
        &self,
        status: u16,
        _error_type: Option<&str>,
        body: &[u8],
    ) -> FailureClass {
        let error = serde_json::from_slice::<ErrorEnvelope>(body)
            .map(|e| e.error)
            .unwrap_or_default();
        let kind = error.kind.as_deref().unwrap_or_default();
        let message = error.message.as_deref().unwrap_or_default().to_lowercase();
        let cannot_pay = kind == "billing_error"
            || message.contains("credit balance")
            || message.contains("billing");
        match status {
            _ if cannot_pay => FailureClass::Credential,
            // The catalog says this pool serves the model; its key disagrees.
            404 if kind == "not_found_error" && message.contains("model") => {
                FailureClass::Credential
            }
            _ => FailureClass::of_status(status),
        }
    }

    fn upstream_error(&self, status: u16, _error_type: Option<&str>, body: &[u8]) -> UpstreamError {
        match serde_json::from_slice::<ErrorEnvelope>(body) {
            Ok(e) => upstream_error(status, &e.error),
            Err(_) => UpstreamError::unreadable(status),
        }
    }
}

// === Request ===

/// The Messages API body for an OpenAI chat request (already checked by `ChatRequest::parse`).
pub(crate) fn messages_body(
    req: &ChatRequest<'_>,
    body: &[u8],
    upstream_model: &str,
) -> Result<Value, GatewayError> {
    let params: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|_| GatewayError::invalid_json("The request body is not a JSON object."))?;
    refuse_unsupported(req, &params, "Anthropic")?;
    let get = |k: &str| params.get(k).filter(|v| !v.is_null());

    let mut out = Map::new();
    out.insert("model".into(), upstream_model.into());
    let max_tokens = req.max_output_tokens.unwrap_or(MAX_TOKENS_DEFAULT);
    if max_tokens == 0 {
        return Err(GatewayError::bad_field(
            "max_tokens",
            "Anthropic models need `max_tokens` of at least 1.",
        ));
    }
    out.insert("max_tokens".into(), max_tokens.into());
    add_conversation(&get, &mut out)?;
    add_sampling(&get, &mut out)?;
    if req.stream {
        out.insert("stream".into(), true.into());
    }
    if let Some(user) = get("user")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    add_tools(&get, &mut out)?;
    Ok(Value::Object(out))
}

/// `system` (with a JSON mode's instruction) and `messages`.
fn add_conversation<'a>(
    get: &impl Fn(&str) -> Option<&'a Value>,
    out: &mut Map<String, Value>,
) -> Result<(), GatewayError> {
    let list = get("messages").and_then(Value::as_array);
    let (mut system, messages) = translate_messages(list.map_or(&[][..], Vec::as_slice))?;
    if messages.is_empty() {
        return Err(bad_messages(
            "Anthropic models need at least one non-empty user or assistant message.",
        ));
    }
    if let Some(format) = get("response_format") {
        if let Some(instruction) = json_mode_instruction(format)? {
            system.push(json!({"type": "text", "text": instruction}));
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    Ok(())
}

/// `temperature` (Anthropic's range is 0–1), `top_p` and `stop_sequences`.
fn add_sampling<'a>(
    get: &impl Fn(&str) -> Option<&'a Value>,
    out: &mut Map<String, Value>,
) -> Result<(), GatewayError> {
    if let Some(t) = get("temperature").and_then(Value::as_f64) {
        if t > 1.0 {
            return Err(GatewayError::bad_field(
                "temperature",
                "Anthropic models take a `temperature` between 0 and 1.",
            ));
        }
        out.insert("temperature".into(), t.into());
    }
    if let Some(p) = get("top_p") {
        out.insert("top_p".into(), p.clone());
    }
    if let Some(stop) = stop_sequences(get("stop"))? {
        out.insert("stop_sequences".into(), stop);
    }
    Ok(())
}

/// `tools` and `tool_choice` (with `disable_parallel_tool_use` for `parallel_tool_calls: false`).
fn add_tools<'a>(
    get: &impl Fn(&str) -> Option<&'a Value>,
    out: &mut Map<String, Value>,
) -> Result<(), GatewayError> {
    let Some(tools) = offered_tools(get("tools"))? else {
        return Ok(());
    };
    let tools = translate_tools(tools)?;
    let parallel = get("parallel_tool_calls").and_then(Value::as_bool) != Some(false);
    let mut choice = match get("tool_choice") {
        None => json!({"type": "auto"}),
        Some(c) => translate_tool_choice(c)?,
    };
    if !parallel && choice["type"] != "none" {
        choice["disable_parallel_tool_use"] = true.into();
    }
    out.insert("tools".into(), Value::Array(tools));
    out.insert("tool_choice".into(), choice);
    Ok(())
}

/// OpenAI messages → (`system` blocks, alternating Anthropic turns).
fn translate_messages(list: &[Value]) -> Result<(Vec<Value>, Vec<Value>), GatewayError> {
    conversation(list, "Anthropic", "content", text_block, |role, m| {
        Ok(match role {
            "user" => ("user", user_blocks(m.get("content"))?),
            "assistant" => ("assistant", assistant_blocks(m)?),
            _ => ("user", vec![tool_result(m)?]),
        })
    })
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

fn user_blocks(content: Option<&Value>) -> Result<Vec<Value>, GatewayError> {
    let Some(Value::Array(parts)) = content else {
        return Ok(text_parts(content, "Anthropic")?
            .iter()
            .map(|t| text_block(t))
            .collect());
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for p in parts {
        match p.get("type").and_then(Value::as_str) {
            Some("text") => match p.get("text").and_then(Value::as_str) {
                Some("") => {}
                Some(t) => blocks.push(text_block(t)),
                None => return Err(bad_messages("A `text` part needs a string `text`.")),
            },
            Some("image_url") => blocks.push(image_block(image_url(p)?)?),
            _ => {
                return Err(bad_messages(
                    "Anthropic models take text and image_url content parts only.",
                ))
            }
        }
    }
    Ok(blocks)
}

/// A `data:` URL → a base64 image block; an http(s) URL → a url image block.
fn image_block(url: &str) -> Result<Value, GatewayError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = rest.split_once(";base64,").ok_or_else(|| {
            bad_messages("Image data URLs must be base64 (`data:<type>;base64,…`).")
        })?;
        if !["image/jpeg", "image/png", "image/gif", "image/webp"].contains(&media_type) {
            return Err(bad_messages(
                "Anthropic models take JPEG, PNG, GIF and WebP images.",
            ));
        }
        return Ok(json!({"type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data}}));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(bad_messages(
        "An image URL must be a data: URL or an http(s) URL.",
    ))
}

fn assistant_blocks(m: &Value) -> Result<Vec<Value>, GatewayError> {
    let mut blocks: Vec<Value> = text_parts(m.get("content"), "Anthropic")?
        .iter()
        .map(|t| text_block(t))
        .collect();
    for call in assistant_tool_calls(m, "Anthropic")? {
        blocks.push(json!({"type": "tool_use", "id": call.id, "name": call.name,
            "input": call.arguments}));
    }
    Ok(blocks)
}

fn tool_result(m: &Value) -> Result<Value, GatewayError> {
    let id = tool_call_id(m)?;
    let mut block = json!({"type": "tool_result", "tool_use_id": id});
    let texts = text_parts(m.get("content"), "Anthropic")?;
    match texts.len() {
        0 => {}
        1 => block["content"] = texts[0].clone().into(),
        _ => block["content"] = texts.iter().map(|t| text_block(t)).collect(),
    }
    Ok(block)
}

fn translate_tools(list: &[Value]) -> Result<Vec<Value>, GatewayError> {
    let tools = function_tools(list, "Anthropic")?;
    Ok(tools
        .iter()
        .map(|t| {
            let mut tool = json!({"name": t.name, "input_schema": t.schema_or_empty()});
            if let Some(d) = t.description {
                tool["description"] = d.into();
            }
            tool
        })
        .collect())
}

fn translate_tool_choice(choice: &Value) -> Result<Value, GatewayError> {
    let named = choice
        .get("function")
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str);
    match (choice.as_str(), named) {
        (Some("auto"), _) => Ok(json!({"type": "auto"})),
        (Some("none"), _) => Ok(json!({"type": "none"})),
        (Some("required"), _) => Ok(json!({"type": "any"})),
        (None, Some(name)) => Ok(json!({"type": "tool", "name": name})),
        _ => Err(GatewayError::bad_field(
            "tool_choice",
            "`tool_choice` must be auto, none, required or a named function.",
        )),
    }
}

// === Response ===

#[derive(Deserialize)]
struct MessageWire {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    content: Vec<BlockWire>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: UsageWire,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockWire {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    #[serde(other)]
    Other,
}

/// Anthropic usage; every field optional because stream events carry subsets.
#[derive(Deserialize, Default, Clone, Copy)]
struct UsageWire {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    /// The writes by lifetime (`ephemeral_5m_input_tokens`, `ephemeral_1h_input_tokens`).
    #[serde(default)]
    cache_creation: Option<CacheCreationWire>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct CacheCreationWire {
    #[serde(default)]
    ephemeral_1h_input_tokens: Option<u64>,
}

/// Usage accumulated over a stream: each reported field overwrites the last (the values are
/// cumulative, never increments).
#[derive(Default, Clone, Copy)]
struct UsageParts {
    input: u64,
    output: u64,
    cache_creation: u64,
    /// Of `cache_creation`, those written to the 1-hour cache.
    cache_creation_1h: u64,
    cache_read: u64,
}

impl UsageWire {
    fn merged_into(self, mut parts: UsageParts) -> UsageParts {
        parts.input = self.input_tokens.unwrap_or(parts.input);
        parts.output = self.output_tokens.unwrap_or(parts.output);
        parts.cache_creation = self
            .cache_creation_input_tokens
            .unwrap_or(parts.cache_creation);
        parts.cache_read = self.cache_read_input_tokens.unwrap_or(parts.cache_read);
        parts.cache_creation_1h = self
            .cache_creation
            .and_then(|c| c.ephemeral_1h_input_tokens)
            .unwrap_or(parts.cache_creation_1h);
        parts
    }
}

impl UsageParts {
    /// Anthropic's `input_tokens` excludes cache reads and writes; OpenAI's prompt count
    /// includes them, with the reads reported as cached.
    fn usage(self) -> Usage {
        Usage {
            prompt_tokens: self.input + self.cache_creation + self.cache_read,
            completion_tokens: self.output,
            cached_tokens: self.cache_read,
            cache_write_tokens: self.cache_creation,
            cache_write_1h_tokens: self.cache_creation_1h,
            reasoning_tokens: 0,
        }
    }

    fn openai_json(self) -> Value {
        usage_json(self.usage())
    }
}

fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

fn completion_object(message: MessageWire, created: u64) -> Value {
    let usage = message.usage.merged_into(UsageParts::default());
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in message.content {
        match block {
            BlockWire::Text { text: t } => text.push_str(&t),
            BlockWire::ToolUse { id, name, input } => {
                let arguments = if input.is_null() {
                    "{}".to_owned()
                } else {
                    input.to_string()
                };
                tool_calls.push(json!({"id": id, "type": "function",
                    "function": {"name": name, "arguments": arguments}}));
            }
            BlockWire::Other => {}
        }
    }
    let mut msg = json!({"role": "assistant",
        "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { text.into() },
        "refusal": null});
    if !tool_calls.is_empty() {
        msg["tool_calls"] = Value::Array(tool_calls);
    }
    json!({
        "id": message.id,
        "object": "chat.completion",
        "created": created,
        "model": message.model,
        "choices": [{
            "index": 0,
            "message": msg,
            "logprobs": null,
            "finish_reason": finish_reason(message.stop_reason.as_deref()),
        }],
        "usage": usage.openai_json(),
    })
}

// === Streaming ===

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum EventWire {
    MessageStart {
        message: StartWire,
    },
    ContentBlockStart {
        index: u64,
        content_block: StartBlockWire,
    },
    ContentBlockDelta {
        index: u64,
        delta: DeltaWire,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaWire,
        #[serde(default)]
        usage: Option<UsageWire>,
    },
    MessageStop {},
    Error {
        #[serde(default)]
        error: ErrorFields,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartWire {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: UsageWire,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlockWire {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum DeltaWire {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    #[serde(other)]
    Other,
}

impl DeltaWire {
    /// Bytes of generated text the delta carries (for estimates when no usage comes).
    fn generated_len(&self) -> u64 {
        match self {
            Self::TextDelta { text } => text.len() as u64,
            Self::InputJsonDelta { partial_json } => partial_json.len() as u64,
            Self::ThinkingDelta { thinking } => thinking.len() as u64,
            Self::Other => 0,
        }
    }
}

#[derive(Deserialize, Default)]
struct MessageDeltaWire {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Translates an Anthropic Messages stream into OpenAI chat completion chunks, event by event.
pub struct MessagesStream {
    hide_usage_chunk: bool,
    pending: BytesMut,
    id: String,
    model: String,
    created: u64,
    tool_calls: ToolCallIndexes,
    usage: Option<UsageParts>,
    stop_reason: Option<String>,
    tally: StreamTally,
}

impl MessagesStream {
    pub fn new(hide_usage_chunk: bool) -> Self {
        Self {
            hide_usage_chunk,
            pending: BytesMut::new(),
            id: String::new(),
            model: String::new(),
            created: unix_secs(),
            tool_calls: ToolCallIndexes::default(),
            usage: None,
            stop_reason: None,
            tally: StreamTally::default(),
        }
    }

    fn header(&self) -> ChunkHeader<'_> {
        ChunkHeader {
            id: &self.id,
            created: self.created,
            model: &self.model,
            hide_usage_chunk: self.hide_usage_chunk,
        }
    }

    fn chunk(&self, out: &mut BytesMut, delta: Value, finish: Option<&str>) {
        write_chunk(out, &self.header(), delta, finish);
    }

    /// One Anthropic event in, its OpenAI bytes appended to `out`.
    fn event(&mut self, data: &[u8], out: &mut BytesMut) {
        let Ok(event) = serde_json::from_slice::<EventWire>(data) else {
            return;
        };
        match event {
            EventWire::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                self.add_usage(message.usage);
                self.chunk(out, json!({"role": "assistant", "content": ""}), None);
            }
            EventWire::ContentBlockStart {
                index,
                content_block,
            } => self.block_start(index, content_block, out),
            EventWire::ContentBlockDelta { index, delta } => self.block_delta(index, delta, out),
            EventWire::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
                if let Some(u) = usage {
                    self.add_usage(u);
                }
            }
            EventWire::MessageStop {} => self.message_stop(out),
            EventWire::Error { error } => {
                // The stream ends here: OpenAI's clients raise on an error event.
                let status = match error.kind.as_deref() {
                    Some("overloaded_error") => 529,
                    Some("rate_limit_error") => 429,
                    _ => 500,
                };
                write_error_event(out, status, upstream_error(status, &error));
                self.tally.done = true;
            }
            EventWire::Other => {}
        }
    }

    fn add_usage(&mut self, reported: UsageWire) {
        self.usage = Some(reported.merged_into(self.usage.unwrap_or_default()));
        self.tally.usage = self.usage.map(UsageParts::usage);
    }

    fn block_start(&mut self, index: u64, block: StartBlockWire, out: &mut BytesMut) {
        match block {
            StartBlockWire::Text { text } if !text.is_empty() => {
                self.tally.generated_bytes += text.len() as u64;
                self.chunk(out, json!({"content": text}), None);
            }
            StartBlockWire::ToolUse { id, name } => {
                let n = self.tool_calls.start(index);
                self.tally.generated_bytes += name.len() as u64;
                self.chunk(out, tool_call_start_delta(n, &id, &name), None);
            }
            _ => {}
        }
    }

    fn block_delta(&mut self, index: u64, delta: DeltaWire, out: &mut BytesMut) {
        match delta {
            DeltaWire::TextDelta { text } if !text.is_empty() => {
                self.tally.generated_bytes += text.len() as u64;
                self.chunk(out, json!({"content": text}), None);
            }
            DeltaWire::InputJsonDelta { partial_json } if !partial_json.is_empty() => {
                let Some(n) = self.tool_calls.of(index) else {
                    return;
                };
                self.tally.generated_bytes += partial_json.len() as u64;
                self.chunk(out, tool_call_arguments_delta(n, &partial_json), None);
            }
            _ => {}
        }
    }

    /// The finish chunk, the usage chunk (if the client asked for it) and `[DONE]`.
    fn message_stop(&mut self, out: &mut BytesMut) {
        let finish = finish_reason(self.stop_reason.as_deref());
        self.chunk(out, json!({}), Some(finish));
        if let (Some(usage), false) = (self.usage, self.hide_usage_chunk) {
            write_usage_chunk(out, &self.header(), usage.openai_json());
        }
        out.put_slice(b"data: [DONE]\n\n");
        self.tally.done = true;
    }
}

impl StreamTranslator for MessagesStream {
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError> {
        self.pending.extend_from_slice(input);
        let mut out = BytesMut::new();
        while let Some((event_end, next)) = find_event_end(&self.pending) {
            let event = self.pending.split_to(next);
            if self.tally.done {
                continue;
            }
            if let Some(data) = event_data(&event[..event_end]) {
                self.event(&data, &mut out);
            }
        }
        if self.pending.len() > SSE_EVENT_BYTES_MAX {
            return Err(FramingError);
        }
        Ok(out.freeze())
    }

    fn finish(&mut self) -> Bytes {
        let rest = self.pending.split();
        let mut out = BytesMut::new();
        if !self.tally.done {
            if let Some(data) = event_data(&rest) {
                self.event(&data, &mut out);
            }
        }
        out.freeze()
    }

    fn tally(&self) -> &StreamTally {
        &self.tally
    }
}

// === The Messages pass-through lane ===

/// Relays an Anthropic Messages stream to an Anthropic client as it came, event by event,
/// counting usage from `message_start` and `message_delta` (cumulative counts: the last one
/// wins). `message_delta` events are held until `message_stop`, so the stream's last write
/// carries the final usage, where the gateway adds what the call cost.
pub(crate) struct MessagesRelay {
    pending: BytesMut,
    held: BytesMut,
    usage: Option<UsageParts>,
    tally: StreamTally,
}

impl Default for MessagesRelay {
    fn default() -> Self {
        Self {
            pending: BytesMut::new(),
            held: BytesMut::new(),
            usage: None,
            tally: StreamTally::default(),
        }
    }
}

impl MessagesRelay {
    /// Looks at one event: counts it, and appends it to `out` now or holds it.
    fn pass(&mut self, event: &[u8], out: &mut BytesMut) {
        let parsed = event_data(event).and_then(|d| serde_json::from_slice::<EventWire>(&d).ok());
        match parsed {
            Some(EventWire::MessageStart { message }) => self.add_usage(message.usage),
            Some(EventWire::ContentBlockStart {
                content_block: StartBlockWire::ToolUse { name, .. },
                ..
            }) => self.tally.generated_bytes += name.len() as u64,
            Some(EventWire::ContentBlockDelta { delta, .. }) => {
                self.tally.generated_bytes += delta.generated_len();
            }
            Some(EventWire::MessageDelta { usage, .. }) => {
                if let Some(u) = usage {
                    self.add_usage(u);
                }
                self.held.extend_from_slice(event);
                return;
            }
            Some(EventWire::MessageStop {} | EventWire::Error { .. }) => {
                out.extend_from_slice(&self.held.split());
                self.tally.done = true;
            }
            _ => {}
        }
        out.extend_from_slice(event);
    }

    fn add_usage(&mut self, reported: UsageWire) {
        self.usage = Some(reported.merged_into(self.usage.unwrap_or_default()));
        self.tally.usage = self.usage.map(UsageParts::usage);
    }
}

impl StreamTranslator for MessagesRelay {
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError> {
        self.pending.extend_from_slice(input);
        let mut out = BytesMut::with_capacity(self.pending.len());
        while let Some((_, next)) = find_event_end(&self.pending) {
            let event = self.pending.split_to(next);
            if !self.tally.done {
                self.pass(&event, &mut out);
            }
        }
        if self.pending.len() > SSE_EVENT_BYTES_MAX {
            return Err(FramingError);
        }
        Ok(out.freeze())
    }

    /// What the upstream left when it closed: held events and an unterminated tail, as they are.
    fn finish(&mut self) -> Bytes {
        let mut out = self.held.split();
        let rest = self.pending.split();
        if !self.tally.done && !rest.is_empty() {
            self.pass(&rest, &mut out);
            out.extend_from_slice(&self.held.split());
        }
        out.freeze()
    }

    fn tally(&self) -> &StreamTally {
        &self.tally
    }
}

/// The usage a complete Messages answer reports (`None` when it reports none).
pub(crate) fn message_usage(body: &[u8]) -> Result<Option<Usage>, GatewayError> {
    #[derive(Deserialize)]
    struct View {
        #[serde(default)]
        usage: Option<UsageWire>,
    }
    let view: View =
        serde_json::from_slice(body).map_err(|_| GatewayError::upstream_bad_response())?;
    Ok(view
        .usage
        .map(|u| u.merged_into(UsageParts::default()).usage()))
}

// === Errors ===

#[derive(Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: ErrorFields,
}

#[derive(Deserialize, Default)]
struct ErrorFields {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// An Anthropic error in OpenAI's terms.
fn upstream_error(status: u16, error: &ErrorFields) -> UpstreamError {
    let (kind, code) = match error.kind.as_deref() {
        Some("invalid_request_error") => (ErrorKind::InvalidRequest, "invalid_request_error"),
        Some("authentication_error") => (ErrorKind::Authentication, "authentication_error"),
        Some("permission_error") => (ErrorKind::Permission, "permission_error"),
        Some("not_found_error") => (ErrorKind::InvalidRequest, "not_found_error"),
        Some("request_too_large") => (ErrorKind::InvalidRequest, "request_too_large"),
        Some("rate_limit_error") => (ErrorKind::RateLimit, "rate_limit_exceeded"),
        Some("billing_error") => (ErrorKind::InsufficientQuota, "insufficient_quota"),
        Some("overloaded_error") => (ErrorKind::Server, "overloaded"),
        Some("timeout_error") => (ErrorKind::Timeout, "timeout"),
        _ => (ErrorKind::of_status(status), "upstream_error"),
    };
    UpstreamError::new(kind, code, error.message.as_deref())
}

#[cfg(test)]
mod tests;
