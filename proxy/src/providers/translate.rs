//! Pieces shared by the adapters that translate OpenAI chat to a native API (Anthropic, Bedrock):
//! reading OpenAI message text and writing OpenAI stream chunks.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use serde_json::{json, Value};

use crate::error::GatewayError;

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
            let mut texts = Vec::with_capacity(parts.len());
            for p in parts {
                let text = match p.get("type").and_then(Value::as_str) {
                    Some("text") => p.get("text"),
                    Some("refusal") => p.get("refusal"),
                    _ => None,
                };
                match text.and_then(Value::as_str) {
                    Some("") => {}
                    Some(t) => texts.push(t.to_owned()),
                    None => {
                        return Err(bad_messages(format!(
                            "This message may only have text content for {provider} models."
                        )))
                    }
                }
            }
            Ok(texts)
        }
        Some(_) => Err(bad_messages(
            "A message's `content` must be a string or an array.",
        )),
    }
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

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(super) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
    json!({"tool_calls": [{"index": index, "id": id, "type": "function",
        "function": {"name": name, "arguments": ""}}]})
}

/// The delta that carries more of tool call `index`'s arguments.
pub(super) fn tool_call_arguments_delta(index: u32, arguments: &str) -> Value {
    json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
}
