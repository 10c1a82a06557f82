//! Pieces shared by the adapters that translate OpenAI chat to a native API (Anthropic, Bedrock,
//! Gemini/Vertex): reading OpenAI request parts, writing OpenAI stream chunks, usage objects and
//! error bodies.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, BytesMut};
use pingora::http::RequestHeader;
use serde_json::{json, Map, Value};

use super::CredentialHeader;
use crate::chat::ChatRequest;
pub(super) use crate::clock::unix_secs;
use crate::error::{GatewayError, UpstreamError};
use crate::upstream::Endpoint;
use crate::usage::Usage;

/// Synthesized completion ids: `chatcmpl-{provider}-{unix_secs}-{n}`.
static COMPLETION_SEQ: AtomicU64 = AtomicU64::new(0);

/// The header of a `POST {path}` with a JSON body of `body_len` bytes to `endpoint`: its host,
/// our user agent, identity encoding (streams are relayed as they come), `extra` headers, and
/// `credential` (none when the caller signs the request itself: SigV4, minted tokens).
pub(crate) fn json_post_header(
    path: &str,
    endpoint: &Endpoint,
    credential: Option<&CredentialHeader>,
    extra: &[(&'static str, &'static str)],
    body_len: usize,
) -> Result<RequestHeader, GatewayError> {
    let internal = |_| GatewayError::internal();
    let mut header =
        RequestHeader::build("POST", path.as_bytes(), Some(7 + extra.len())).map_err(internal)?;
    if let Some(c) = credential {
        c.add_to(&mut header)?;
    }
    header
        .insert_header("host", endpoint.host_header.clone())
        .map_err(internal)?;
    let fixed = [
        ("content-type", "application/json"),
        ("accept-encoding", "identity"),
        ("user-agent", concat!("tokn/", env!("CARGO_PKG_VERSION"))),
    ];
    for (name, value) in fixed.iter().chain(extra) {
        header
            .insert_header(*name, http::HeaderValue::from_static(value))
            .map_err(internal)?;
    }
    header
        .insert_header("content-length", body_len.to_string())
        .map_err(internal)?;
    Ok(header)
}

/// One tool call of an assistant message in the request: what native formats echo back.
pub(super) struct ToolCallIn<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// The `arguments` string parsed: always an object (`{}` when empty).
    pub arguments: Value,
}

/// The tool calls of assistant message `m`, checked; `provider` names the models in refusals.
pub(super) fn assistant_tool_calls<'a>(
    m: &'a Value,
    provider: &str,
) -> Result<Vec<ToolCallIn<'a>>, GatewayError> {
    let calls = match m.get("tool_calls") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(calls)) => calls,
        Some(_) => return Err(bad_messages("`tool_calls` must be an array.")),
    };
    calls
        .iter()
        .map(|call| {
            let id = call.get("id").and_then(Value::as_str);
            let function = call.get("function");
            let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
            let (Some(id), Some(name)) = (id, name) else {
                return Err(bad_messages(
                    "Each tool call needs an `id` and a `function.name`.",
                ));
            };
            let text = function
                .and_then(|f| f.get("arguments"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let arguments = if text.trim().is_empty() {
                json!({})
            } else {
                match serde_json::from_str::<Value>(text) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => {
                        return Err(bad_messages(format!(
                            "Tool call `arguments` must be a JSON object for {provider} models."
                        )))
                    }
                }
            };
            Ok(ToolCallIn {
                id,
                name,
                arguments,
            })
        })
        .collect()
}

/// The `tool_call_id` a `tool` message answers.
pub(super) fn tool_call_id(m: &Value) -> Result<&str, GatewayError> {
    m.get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_messages("A `tool` message needs a `tool_call_id`."))
}

/// An OpenAI conversation in a native API's shape: the system and developer texts as
/// `system_part`s, and the other messages as turns `{"role", <parts_key>: [...]}`, each made by
/// `turn` (a user, assistant or tool message → its native role and parts), consecutive turns of
/// one role merged (the native APIs want roles to alternate).
pub(super) fn conversation<'m>(
    list: &'m [Value],
    provider: &str,
    parts_key: &str,
    system_part: impl Fn(&str) -> Value,
    mut turn: impl FnMut(&str, &'m Value) -> Result<(&'static str, Vec<Value>), GatewayError>,
) -> Result<(Vec<Value>, Vec<Value>), GatewayError> {
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::with_capacity(list.len());
    for m in list {
        match m.get("role").and_then(Value::as_str).unwrap_or_default() {
            "system" | "developer" => {
                for text in text_parts(m.get("content"), provider)? {
                    system.push(system_part(&text));
                }
            }
            role @ ("user" | "assistant" | "tool") => {
                let (native_role, parts) = turn(role, m)?;
                push_turn(&mut turns, native_role, parts);
            }
            "function" => {
                return Err(bad_messages(format!(
                    "`function` messages are not supported for {provider} models; use tools."
                )))
            }
            _ => {
                return Err(bad_messages(
                    "Each message needs a `role`: system, developer, user, assistant or tool.",
                ))
            }
        }
    }
    let turns = turns
        .into_iter()
        .map(|(role, parts)| json!({"role": role, parts_key: parts}))
        .collect();
    Ok((system, turns))
}

/// Appends a turn's `parts`, merged into the last turn when it has the same role. Empty turns
/// are dropped.
fn push_turn<'r>(turns: &mut Vec<(&'r str, Vec<Value>)>, role: &'r str, parts: Vec<Value>) {
    if parts.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some((last, existing)) if *last == role => existing.extend(parts),
        _ => turns.push((role, parts)),
    }
}

/// A user message's content as `{"text": …}` parts and, through `image`, image parts; other
/// part types are refused, naming `provider`.
pub(super) fn text_and_image_parts(
    content: Option<&Value>,
    provider: &str,
    image: impl Fn(&str) -> Result<Value, GatewayError>,
) -> Result<Vec<Value>, GatewayError> {
    let Some(Value::Array(parts)) = content else {
        return Ok(text_parts(content, provider)?
            .into_iter()
            .map(|t| json!({ "text": t }))
            .collect());
    };
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        match p.get("type").and_then(Value::as_str) {
            Some("text") => match p.get("text").and_then(Value::as_str) {
                Some("") => {}
                Some(t) => out.push(json!({ "text": t })),
                None => return Err(bad_messages("A `text` part needs a string `text`.")),
            },
            Some("image_url") => out.push(image(image_url(p)?)?),
            _ => {
                return Err(bad_messages(format!(
                    "{provider} models take text and image_url content parts only."
                )))
            }
        }
    }
    Ok(out)
}

/// Appends `segment` to `out` as one path segment: unreserved characters and `@` (a path
/// character: Vertex's Claude ids are `claude-…@date`, sent as the official SDK sends them) as
/// they are, every other byte percent-encoded (model ids may hold `:` or `/`).
pub(crate) fn push_path_segment(out: &mut String, segment: &str) {
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// A 400 about the request's `messages`.
pub(super) fn bad_messages(message: impl Into<Cow<'static, str>>) -> GatewayError {
    GatewayError::bad_field("messages", message)
}

/// The non-empty texts of a string or an array of `text` (or `refusal`) parts; other parts are
/// refused, naming `provider` ("This message may only have text content for {provider} models.").
pub(super) fn text_parts(
    content: Option<&Value>,
    provider: &str,
) -> Result<Vec<String>, GatewayError> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(parts)) => {
            let texts = parts
                .iter()
                .map(|p| part_text(p, provider))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(texts.into_iter().flatten().map(str::to_owned).collect())
        }
        Some(_) => Err(bad_messages(
            "A message's `content` must be a string or an array.",
        )),
    }
}

/// A text (or refusal) part's text; `None` when empty. Any other part is refused.
fn part_text<'a>(part: &'a Value, provider: &str) -> Result<Option<&'a str>, GatewayError> {
    let text = match part.get("type").and_then(Value::as_str) {
        Some("text") => part.get("text"),
        Some("refusal") => part.get("refusal"),
        _ => None,
    };
    match text.and_then(Value::as_str) {
        Some("") => Ok(None),
        Some(t) => Ok(Some(t)),
        None => Err(bad_messages(format!(
            "This message may only have text content for {provider} models."
        ))),
    }
}

/// The `url` of an `image_url` content part (an object with `url`, or a bare string).
pub(super) fn image_url(part: &Value) -> Result<&str, GatewayError> {
    let url = match part.get("image_url") {
        Some(Value::String(u)) => Some(u.as_str()),
        Some(o) => o.get("url").and_then(Value::as_str),
        None => None,
    };
    url.ok_or_else(|| bad_messages("An `image_url` part needs a `url`."))
}

/// `stop` as an array of strings (`None` when absent or empty).
pub(super) fn stop_sequences(stop: Option<&Value>) -> Result<Option<Value>, GatewayError> {
    match stop {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(json!([s]))),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            Ok(Some(Value::Array(a.clone())))
        }
        Some(_) => Err(GatewayError::bad_field(
            "stop",
            "`stop` must be a string or an array of strings.",
        )),
    }
}

/// Refuses, naming the parameter, what a single-choice native API without log probabilities,
/// logit bias, audio, predictions, legacy functions or web search cannot honour.
pub(super) fn refuse_unsupported(
    req: &ChatRequest<'_>,
    params: &Map<String, Value>,
    provider: &str,
) -> Result<(), GatewayError> {
    if req.n > 1 {
        return Err(GatewayError::bad_field(
            "n",
            format!("{provider} models return one choice: `n` must be 1."),
        ));
    }
    let set = |k: &str| params.get(k).filter(|v| !v.is_null());
    let refused: [(&'static str, bool); 8] = [
        (
            "logprobs",
            set("logprobs").is_some_and(|v| v != &Value::Bool(false)),
        ),
        ("top_logprobs", set("top_logprobs").is_some()),
        (
            "logit_bias",
            set("logit_bias").is_some_and(|v| v.as_object().is_none_or(|m| !m.is_empty())),
        ),
        ("audio", set("audio").is_some()),
        (
            "modalities",
            set("modalities").is_some_and(|v| {
                v.as_array()
                    .is_none_or(|a| a.iter().any(|m| m.as_str() != Some("text")))
            }),
        ),
        ("prediction", set("prediction").is_some()),
        (
            "functions",
            set("functions").is_some() || set("function_call").is_some(),
        ),
        ("web_search_options", set("web_search_options").is_some()),
    ];
    for (param, is_set) in refused {
        if is_set {
            return Err(GatewayError::bad_field(
                param,
                format!("`{param}` is not supported for {provider} models."),
            ));
        }
    }
    Ok(())
}

/// A new completion id for an upstream that gives none: `chatcmpl-{provider}-{created}-{n}`.
pub(super) fn completion_id(provider: &str, created: u64) -> String {
    let n = COMPLETION_SEQ.fetch_add(1, Ordering::Relaxed);
    format!("chatcmpl-{provider}-{created}-{n}")
}

/// OpenAI's `usage` object.
pub(super) fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    })
}

/// What a JSON mode asks of a model that has none: a system instruction.
pub(super) const JSON_OBJECT_INSTRUCTION: &str =
    "Respond with one valid JSON object and nothing else: no prose and no code fences.";

pub(super) const JSON_SCHEMA_INSTRUCTION: &str = "Respond with one valid JSON value that conforms to the following JSON Schema, and nothing else: no prose and no code fences.";

/// `response_format` as a system instruction, for providers without a JSON mode (Anthropic,
/// Bedrock): `None` for plain text.
pub(super) fn json_mode_instruction(format: &Value) -> Result<Option<String>, GatewayError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(JSON_OBJECT_INSTRUCTION.to_owned())),
        Some("json_schema") => {
            let schema = format
                .pointer("/json_schema/schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            Ok(Some(format!("{JSON_SCHEMA_INSTRUCTION}\n{schema}")))
        }
        _ => Err(GatewayError::bad_field(
            "response_format",
            "`response_format.type` must be text, json_object or json_schema.",
        )),
    }
}

/// One OpenAI function tool, read.
pub(super) struct FunctionTool<'a> {
    pub name: &'a str,
    pub description: Option<&'a str>,
    /// `parameters`, when it is a JSON Schema object.
    pub parameters: Option<&'a Value>,
}

impl FunctionTool<'_> {
    /// The parameters' schema, or one that takes no arguments.
    pub fn schema_or_empty(&self) -> Value {
        self.parameters
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}))
    }
}

/// The client's tools, which must be function tools with names.
pub(super) fn function_tools<'a>(
    list: &'a [Value],
    provider: &str,
) -> Result<Vec<FunctionTool<'a>>, GatewayError> {
    list.iter()
        .map(|tool| {
            let function = tool
                .get("function")
                .filter(|_| tool.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    GatewayError::bad_field(
                        "tools",
                        format!("{provider} models take `function` tools only."),
                    )
                })?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    GatewayError::bad_field("tools", "Each tool needs a `function.name`.")
                })?;
            Ok(FunctionTool {
                name,
                description: function.get("description").and_then(Value::as_str),
                parameters: function.get("parameters").filter(|p| p.is_object()),
            })
        })
        .collect()
}

/// The client's `tools` when it offers any (`None` for none or an empty list).
pub(super) fn offered_tools(tools: Option<&Value>) -> Result<Option<&[Value]>, GatewayError> {
    match tools {
        Some(Value::Array(list)) if !list.is_empty() => Ok(Some(list)),
        Some(Value::Array(_)) | None => Ok(None),
        Some(_) => Err(GatewayError::bad_field(
            "tools",
            "`tools` must be an array.",
        )),
    }
}

/// Ends a stream with the upstream's error as OpenAI's error event (OpenAI's clients raise on
/// it), rendered like every other error.
pub(super) fn write_error_event(out: &mut BytesMut, status: u16, error: UpstreamError) {
    out.put_slice(&GatewayError::upstream(status, error).to_sse_event());
}

/// Appends `value` as one SSE `data:` event.
fn write_data(out: &mut BytesMut, value: &Value) {
    out.put_slice(b"data: ");
    // Writing a `Value` into memory cannot fail.
    let _ = serde_json::to_writer((&mut *out).writer(), value);
    out.put_slice(b"\n\n");
}

/// The fields every chunk of one streamed completion repeats.
pub(super) struct ChunkHeader<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    /// Whether the client did not ask for usage (then chunks carry no `usage: null`).
    pub hide_usage_chunk: bool,
}

/// Appends one OpenAI `chat.completion.chunk` with a single choice.
pub(super) fn write_chunk(
    out: &mut BytesMut,
    header: &ChunkHeader<'_>,
    delta: Value,
    finish: Option<&str>,
) {
    let mut c = json!({
        "id": header.id, "object": "chat.completion.chunk", "created": header.created,
        "model": header.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    });
    if !header.hide_usage_chunk {
        c["usage"] = Value::Null;
    }
    write_data(out, &c);
}

/// Appends the usage-only chunk (`choices: []`) that ends a stream when the client asked for it.
pub(super) fn write_usage_chunk(out: &mut BytesMut, header: &ChunkHeader<'_>, usage: Value) {
    let c = json!({
        "id": header.id, "object": "chat.completion.chunk", "created": header.created,
        "model": header.model, "choices": [], "usage": usage,
    });
    write_data(out, &c);
}

/// OpenAI numbers streamed tool calls from 0; native APIs number every content block (text ones
/// too). Maps a tool block's native index to its OpenAI tool-call index.
#[derive(Default)]
pub(super) struct ToolCallIndexes(Vec<(u64, u32)>);

impl ToolCallIndexes {
    /// A tool block starts at native index `block`: its OpenAI index.
    pub(super) fn start(&mut self, block: u64) -> u32 {
        let n = self.0.len() as u32;
        self.0.push((block, n));
        n
    }

    /// The OpenAI index of the tool block at native index `block`, if one started there.
    pub(super) fn of(&self, block: u64) -> Option<u32> {
        self.0.iter().find(|(i, _)| *i == block).map(|&(_, n)| n)
    }
}

/// The delta that opens tool call `index` (its id and name, no arguments yet).
pub(super) fn tool_call_start_delta(index: u32, id: &str, name: &str) -> Value {
    tool_call_delta(index, id, name, "")
}

/// The delta of tool call `index` with its id, name and `arguments` (all of them, for APIs that
/// send calls whole).
pub(super) fn tool_call_delta(index: u32, id: &str, name: &str, arguments: &str) -> Value {
    json!({"tool_calls": [{"index": index, "id": id, "type": "function",
        "function": {"name": name, "arguments": arguments}}]})
}

/// The delta that carries more of tool call `index`'s arguments.
pub(super) fn tool_call_arguments_delta(index: u32, arguments: &str) -> Value {
    json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
}
