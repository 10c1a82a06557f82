//! The Messages API's translation lane: a Messages call for a model no pool serves natively
//! (GPT, Gemini, the mock) becomes a chat completion for the pools' adapters, and the chat answer
//! — whole, or streamed chunk by chunk — becomes Anthropic's message and events.
//!
//! What has no chat equivalent is left out, not refused: `cache_control` (chat providers cache
//! prompts on their own), `thinking` and the thinking blocks of earlier turns (reasoning goes
//! back only to the kind of upstream that produced it), `top_k`, `metadata`. Server tools (a
//! tool with a `type`, such as web search) and documents are refused: no chat pool can run or
//! read them.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Map, Value};

use crate::error::GatewayError;
use crate::relay::FromChat;
use crate::usage::Usage;

// === Request ===

/// The chat completion body for a Messages body (already checked by `MessagesRequest::parse`).
pub fn chat_body(body: &[u8]) -> Result<Bytes, GatewayError> {
    let m: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|_| GatewayError::invalid_json("The body must be a JSON object."))?;
    let mut messages = Vec::new();
    if let Some(system) = m.get("system") {
        let text = text_of(system, "system")?;
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    let turns = m.get("messages").and_then(Value::as_array);
    for turn in turns.into_iter().flatten() {
        add_turn(turn, &mut messages)?;
    }
    let mut out = Map::new();
    out.insert(
        "model".into(),
        m.get("model").cloned().unwrap_or(Value::Null),
    );
    out.insert("messages".into(), Value::Array(messages));
    let renamed = [
        ("max_tokens", "max_completion_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stop_sequences", "stop"),
    ];
    for (from, to) in renamed {
        if let Some(v) = m.get(from).filter(|v| !v.is_null()) {
            out.insert(to.into(), v.clone());
        }
    }
    if m.get("stream") == Some(&Value::Bool(true)) {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = m.get("tools").filter(|t| !t.is_null()) {
        out.insert("tools".into(), chat_tools(tools)?);
    }
    if let Some(choice) = m.get("tool_choice").filter(|c| !c.is_null()) {
        add_tool_choice(choice, &mut out)?;
    }
    serde_json::to_vec(&out)
        .map(Bytes::from)
        .map_err(|_| GatewayError::internal())
}

/// A string, or the text of text blocks joined by newlines.
fn text_of(v: &Value, param: &'static str) -> Result<String, GatewayError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let texts: Vec<&str> = blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .collect();
            Ok(texts.join("\n"))
        }
        _ => Err(GatewayError::bad_field(
            param,
            format!("{param}: must be a string or an array of text blocks"),
        )),
    }
}

/// One Messages turn as chat messages: a user turn's tool results become `tool` messages
/// (before the rest of the turn, right after the assistant's calls, as chat requires).
fn add_turn(turn: &Value, out: &mut Vec<Value>) -> Result<(), GatewayError> {
    let role = turn["role"].as_str().unwrap_or_default();
    if !matches!(role, "user" | "assistant") {
        return Err(bad_role());
    }
    let blocks = match &turn["content"] {
        Value::String(s) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => {
            return Err(GatewayError::bad_field(
                "messages",
                "messages.content: must be a string or an array of content blocks",
            ))
        }
    };
    match role {
        "user" => {
            let mut parts = Vec::new();
            for b in blocks {
                match b["type"].as_str().unwrap_or_default() {
                    "text" => parts.push(json!({"type": "text", "text": b["text"]})),
                    "image" => parts.push(json!({"type": "image_url",
                        "image_url": {"url": image_url(&b["source"])?}})),
                    "tool_result" => out.push(json!({"role": "tool",
                        "tool_call_id": b["tool_use_id"],
                        "content": text_of(&b["content"], "messages").unwrap_or_default()})),
                    kind => return Err(unsupported_block(kind)),
                }
            }
            if !parts.is_empty() {
                out.push(json!({"role": "user", "content": parts}));
            }
        }
        "assistant" => {
            let mut text = String::new();
            let mut calls = Vec::new();
            for b in blocks {
                match b["type"].as_str().unwrap_or_default() {
                    "text" => text.push_str(b["text"].as_str().unwrap_or_default()),
                    "tool_use" => calls.push(json!({"id": b["id"], "type": "function",
                        "function": {"name": b["name"], "arguments": b["input"].to_string()}})),
                    // Reasoning goes back only to the kind of upstream that produced it.
                    "thinking" | "redacted_thinking" => {}
                    kind => return Err(unsupported_block(kind)),
                }
            }
            let mut message = json!({"role": "assistant",
                "content": if text.is_empty() { Value::Null } else { Value::String(text) }});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls);
            }
            out.push(message);
        }
        _ => return Err(bad_role()),
    }
    Ok(())
}

fn bad_role() -> GatewayError {
    GatewayError::bad_field(
        "messages",
        "messages.role: must be `user` or `assistant` (the system prompt is the top-level `system`)",
    )
}

fn unsupported_block(kind: &str) -> GatewayError {
    let shown: String = kind.chars().take(64).filter(|c| !c.is_control()).collect();
    GatewayError::bad_field(
        "messages",
        format!("Content blocks of type `{shown}` are not supported for this model."),
    )
}

/// An image block's source as a chat image URL (`data:` for base64).
fn image_url(source: &Value) -> Result<String, GatewayError> {
    match source["type"].as_str() {
        Some("base64") => Ok(format!(
            "data:{};base64,{}",
            source["media_type"].as_str().unwrap_or("image/png"),
            source["data"].as_str().unwrap_or_default()
        )),
        Some("url") => Ok(source["url"].as_str().unwrap_or_default().to_owned()),
        _ => Err(GatewayError::bad_field(
            "messages",
            "image.source: must be a base64 or url source",
        )),
    }
}

/// Messages tools as chat function tools; server tools (a `type` of their own) are refused.
fn chat_tools(tools: &Value) -> Result<Value, GatewayError> {
    let list = tools
        .as_array()
        .ok_or_else(|| GatewayError::bad_field("tools", "tools: must be an array"))?;
    let mut out = Vec::with_capacity(list.len());
    for t in list {
        if t.get("type").is_some_and(|k| k != "custom") {
            return Err(GatewayError::bad_field(
                "tools",
                "Server tools are not supported for this model; only custom tools are.",
            ));
        }
        let mut function = json!({"name": t["name"], "parameters": t["input_schema"]});
        if let Some(d) = t.get("description") {
            function["description"] = d.clone();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

fn add_tool_choice(choice: &Value, out: &mut Map<String, Value>) -> Result<(), GatewayError> {
    let chat = match choice["type"].as_str() {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
        _ => {
            return Err(GatewayError::bad_field(
                "tool_choice",
                "tool_choice.type: must be auto, any, tool or none",
            ))
        }
    };
    out.insert("tool_choice".into(), chat);
    if choice["disable_parallel_tool_use"] == true {
        out.insert("parallel_tool_calls".into(), Value::Bool(false));
    }
    Ok(())
}

// === Response ===

/// Anthropic's stop reason for a chat finish reason.
fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's usage for chat's: its input excludes cache reads and writes, which it reports
/// apart.
fn usage_json(u: &Usage) -> Value {
    let read = u.cached_tokens.min(u.prompt_tokens);
    let written = u.cache_write_tokens.min(u.prompt_tokens - read);
    json!({"input_tokens": u.prompt_tokens - read - written,
        "output_tokens": u.completion_tokens,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read})
}

/// A complete chat completion (already the client's, with `usage`) as Anthropic's message.
fn message_body(chat: &[u8], model: &str, usage: &Usage) -> Result<Bytes, GatewayError> {
    let c: Value =
        serde_json::from_slice(chat).map_err(|_| GatewayError::upstream_bad_response())?;
    let choice = &c["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
        let input: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
        content.push(json!({"type": "tool_use", "id": call["id"],
            "name": call["function"]["name"], "input": input}));
    }
    let body = json!({
        "id": format!("msg_{}", c["id"].as_str().unwrap_or_default()),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice["finish_reason"].as_str()),
        "stop_sequence": null,
        "usage": usage_json(usage),
    });
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|_| GatewayError::internal())
}

/// The content block a translated stream has open.
#[derive(Clone, Copy)]
enum Open {
    Text,
    /// A tool call, with its index among the chat stream's tool calls.
    Tool(u64),
}

/// Anthropic's answers from chat's, for one request: a whole message, or the events of a stream
/// chunk by chunk — `message_start`, a content block per text run and per tool call
/// (`text_delta`, `input_json_delta`), then `message_delta` with the stop reason and usage, and
/// `message_stop`.
pub struct MessagesFromChat {
    model: String,
    started: bool,
    open: Option<Open>,
    /// Index of the next content block.
    next_block: u64,
    stop_reason: &'static str,
}

impl FromChat for MessagesFromChat {
    fn chunk(&mut self, data: &[u8], usage: Option<Usage>, out: &mut BytesMut) -> bool {
        if data == b"[DONE]" {
            self.message_stop(out, usage.unwrap_or_default());
            return true;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
            return false;
        };
        if let Some(error) = chunk.get("error") {
            let message = error["message"].as_str().unwrap_or("The upstream failed.");
            event(
                out,
                "error",
                &json!({"type": "error", "error": {"type": "api_error", "message": message}}),
            );
            return true;
        }
        if !self.started {
            self.started = true;
            let id = format!("msg_{}", chunk["id"].as_str().unwrap_or_default());
            event(
                out,
                "message_start",
                &json!({"type": "message_start", "message": {"id": id, "type": "message",
                    "role": "assistant", "model": self.model, "content": [],
                    "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            );
        }
        let choice = &chunk["choices"][0];
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            if !matches!(self.open, Some(Open::Text)) {
                self.start_block(out, json!({"type": "text", "text": ""}), Open::Text);
            }
            self.delta(out, json!({"type": "text_delta", "text": text}));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap_or(0);
            if !matches!(self.open, Some(Open::Tool(i)) if i == index) {
                let block = json!({"type": "tool_use", "id": call["id"],
                    "name": call["function"]["name"], "input": {}});
                self.start_block(out, block, Open::Tool(index));
            }
            if let Some(args) = call["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                self.delta(
                    out,
                    json!({"type": "input_json_delta", "partial_json": args}),
                );
            }
        }
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.stop_reason = stop_reason(Some(finish));
        }
        false
    }

    fn whole(&self, chat: &[u8], usage: &Usage) -> Result<Bytes, GatewayError> {
        message_body(chat, &self.model, usage)
    }
}

impl MessagesFromChat {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            started: false,
            open: None,
            next_block: 0,
            stop_reason: "end_turn",
        }
    }

    fn start_block(&mut self, out: &mut BytesMut, block: Value, open: Open) {
        self.stop_block(out);
        event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": self.next_block,
                "content_block": block}),
        );
        self.open = Some(open);
    }

    fn delta(&self, out: &mut BytesMut, delta: Value) {
        event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": self.next_block, "delta": delta}),
        );
    }

    fn stop_block(&mut self, out: &mut BytesMut) {
        if self.open.take().is_some() {
            event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": self.next_block}),
            );
            self.next_block += 1;
        }
    }

    /// The chat stream ended (`[DONE]`): the last block closes, the stop reason and the usage
    /// follow, then `message_stop`.
    fn message_stop(&mut self, out: &mut BytesMut, usage: Usage) {
        self.stop_block(out);
        event(
            out,
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": null},
                "usage": usage_json(&usage)}),
        );
        event(out, "message_stop", &json!({"type": "message_stop"}));
    }
}

fn event(out: &mut BytesMut, name: &str, data: &Value) {
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(data.to_string().as_bytes());
    out.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::StreamTranslator;

    #[test]
    fn a_conversation_with_tools_becomes_chat_messages_in_chats_order() {
        let body = json!({
            "model": "gpt-test", "max_tokens": 100, "stream": true, "top_k": 5,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "get_weather", "description": "Weather",
                "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "Thanks"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}}]}
            ]
        });
        let chat: Value =
            serde_json::from_slice(&chat_body(body.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(
            chat,
            json!({
                "model": "gpt-test", "max_completion_tokens": 100, "stream": true,
                "stream_options": {"include_usage": true},
                "tools": [{"type": "function", "function": {"name": "get_weather",
                    "description": "Weather", "parameters": {"type": "object"}}}],
                "tool_choice": "required", "parallel_tool_calls": false,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "toolu_1",
                        "type": "function", "function": {"name": "get_weather",
                        "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
                    {"role": "user", "content": [{"type": "text", "text": "Thanks"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]}
                ]
            })
        );
    }

    #[test]
    fn what_no_chat_pool_can_do_is_refused() {
        for body in [
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "text", "data": "x"}}]}]}),
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}),
        ] {
            let e = chat_body(body.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.status(), 400, "{body}");
        }
    }

    #[test]
    fn a_chat_stream_becomes_anthropic_events() {
        let chat = [
            r#"{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"content":"Let me check."}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":30,"completion_tokens":9,"prompt_tokens_details":{"cached_tokens":10}}}"#,
            "[DONE]",
        ];
        let sse: String = chat.iter().map(|c| format!("data: {c}\n\n")).collect();
        let mut t = crate::relay::ThroughChat::new(
            Box::new(crate::relay::SseRelay::new(false)),
            Box::new(MessagesFromChat::new("gpt-test")),
        );
        let out = t.feed(sse.as_bytes()).unwrap();
        assert!(t.is_done());
        assert_eq!(t.usage().unwrap().completion_tokens, 9);
        let text = String::from_utf8(out.to_vec()).unwrap();
        let events: Vec<(&str, Value)> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap();
                (
                    name,
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[0].1["message"]["model"], "gpt-test");
        assert_eq!(events[4].1["content_block"]["name"], "get_weather");
        assert_eq!(events[4].1["index"], 1);
        assert_eq!(events[6].1["delta"]["partial_json"], "\"Paris\"}");
        assert_eq!(
            events[8].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"input_tokens": 20, "output_tokens": 9, "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 10}})
        );
    }
}
