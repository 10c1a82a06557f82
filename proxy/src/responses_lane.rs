//! The Responses API's translation lane: a Responses call for a model no pool serves natively
//! (Claude, Gemini, the mock) becomes a chat completion for the pools' adapters, and the chat
//! answer — whole, or streamed chunk by chunk — becomes a response object and the event sequence
//! Codex consumes, through the mandatory `response.completed` with its usage.
//!
//! Custom (freeform) tools such as Codex's `apply_patch` become function tools taking one string,
//! `input`, and their calls come back as `custom_tool_call` items with that string. Reasoning
//! items in the input are left out (encrypted reasoning goes back only to the kind of upstream
//! that produced it), and so are `store`, `include` and `metadata`, which only the Responses
//! API has. Built-in tools (web search, file search, …) are refused: no chat pool runs them.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Map, Value};

use crate::error::GatewayError;
use crate::relay::FromChat;
use crate::usage::Usage;

// === Request ===

/// A Responses body as a chat completion body, and the names of its custom tools (their calls
/// come back as `custom_tool_call` items).
pub fn chat_body(body: &[u8]) -> Result<(Bytes, Vec<String>), GatewayError> {
    let r: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|_| GatewayError::invalid_json("The body must be a JSON object."))?;
    let mut messages = Vec::new();
    if let Some(instructions) = r.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    match r.get("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for item in items {
                add_item(item, &mut messages)?;
            }
        }
        _ => {
            return Err(GatewayError::bad_field(
                "input",
                "`input` must be a string or an array of input items.",
            ))
        }
    }
    let mut out = Map::new();
    out.insert(
        "model".into(),
        r.get("model").cloned().unwrap_or(Value::Null),
    );
    out.insert("messages".into(), Value::Array(messages));
    let (tools, custom) = chat_tools(r.get("tools"))?;
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
    }
    let renamed = [
        ("max_output_tokens", "max_completion_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("parallel_tool_calls", "parallel_tool_calls"),
        ("prompt_cache_key", "prompt_cache_key"),
    ];
    for (from, to) in renamed {
        if let Some(v) = r.get(from).filter(|v| !v.is_null()) {
            out.insert(to.into(), v.clone());
        }
    }
    if let Some(effort) = r.get("reasoning").and_then(|v| v.get("effort")) {
        if effort.is_string() {
            out.insert("reasoning_effort".into(), effort.clone());
        }
    }
    if let Some(choice) = r.get("tool_choice").filter(|c| !c.is_null()) {
        let chat = match choice {
            Value::String(_) => choice.clone(),
            _ => json!({"type": "function", "function": {"name": choice["name"]}}),
        };
        out.insert("tool_choice".into(), chat);
    }
    if let Some(format) = r.get("text").and_then(|t| t.get("format")) {
        match format["type"].as_str() {
            Some("json_schema") => {
                let mut schema = json!({"name": format["name"], "schema": format["schema"]});
                if let Some(strict) = format.get("strict") {
                    schema["strict"] = strict.clone();
                }
                out.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": schema}),
                );
            }
            Some("json_object") => {
                out.insert("response_format".into(), json!({"type": "json_object"}));
            }
            _ => {}
        }
    }
    if r.get("stream") == Some(&Value::Bool(true)) {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let body = serde_json::to_vec(&out).map_err(|_| GatewayError::internal())?;
    Ok((Bytes::from(body), custom))
}

/// One input item as chat messages: calls join the assistant turn before them, outputs are
/// `tool` messages.
fn add_item(item: &Value, out: &mut Vec<Value>) -> Result<(), GatewayError> {
    let kind = item["type"].as_str().unwrap_or("message");
    match kind {
        "message" => {
            let role = match item["role"].as_str() {
                Some(r @ ("user" | "assistant" | "system" | "developer")) => r,
                _ => {
                    return Err(bad_item(
                        "a message's `role` must be user, assistant, system or developer",
                    ))
                }
            };
            let content = match &item["content"] {
                Value::String(s) => Value::String(s.clone()),
                Value::Array(parts) if role == "assistant" => {
                    let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
                    Value::String(text)
                }
                Value::Array(parts) => {
                    Value::Array(parts.iter().map(chat_part).collect::<Result<Vec<_>, _>>()?)
                }
                _ => return Err(bad_item("a message's `content` must be a string or parts")),
            };
            out.push(json!({"role": role, "content": content}));
        }
        "function_call" | "custom_tool_call" => {
            let arguments = if kind == "function_call" {
                item["arguments"].as_str().unwrap_or("{}").to_owned()
            } else {
                json!({"input": item["input"]}).to_string()
            };
            let call = json!({"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": arguments}});
            match out.last_mut() {
                Some(last) if last["role"] == "assistant" => {
                    if !last["tool_calls"].is_array() {
                        last["tool_calls"] = json!([]);
                    }
                    if let Some(calls) = last["tool_calls"].as_array_mut() {
                        calls.push(call);
                    }
                }
                _ => out.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" | "custom_tool_call_output" => {
            let output = match &item["output"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push(json!({"role": "tool", "tool_call_id": item["call_id"], "content": output}));
        }
        // Reasoning goes back only to the kind of upstream that produced it.
        "reasoning" => {}
        other => {
            let shown: String = other.chars().take(64).filter(|c| !c.is_control()).collect();
            return Err(bad_item(&format!(
                "input items of type `{shown}` are not supported for this model"
            )));
        }
    }
    Ok(())
}

fn bad_item(why: &str) -> GatewayError {
    GatewayError::bad_field("input", format!("Invalid input item: {why}."))
}

/// A Responses content part as a chat content part.
fn chat_part(part: &Value) -> Result<Value, GatewayError> {
    match part["type"].as_str() {
        Some("input_text" | "output_text") => Ok(json!({"type": "text", "text": part["text"]})),
        Some("input_image") => match part["image_url"].as_str() {
            Some(url) => Ok(json!({"type": "image_url", "image_url": {"url": url}})),
            None => Err(bad_item("images must be given by `image_url`")),
        },
        _ => Err(bad_item("content parts must be input_text or input_image")),
    }
}

/// Responses tools as chat function tools; custom tools take one string, `input`.
fn chat_tools(tools: Option<&Value>) -> Result<(Vec<Value>, Vec<String>), GatewayError> {
    let mut out = Vec::new();
    let mut custom = Vec::new();
    for t in tools.and_then(Value::as_array).into_iter().flatten() {
        let mut function = json!({"name": t["name"]});
        if let Some(d) = t.get("description") {
            function["description"] = d.clone();
        }
        match t["type"].as_str() {
            Some("function") => {
                function["parameters"] = t
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                if let Some(strict) = t.get("strict") {
                    function["strict"] = strict.clone();
                }
            }
            Some("custom") => {
                function["parameters"] = json!({"type": "object",
                    "properties": {"input": {"type": "string",
                        "description": "The tool's whole input, as free-form text."}},
                    "required": ["input"]});
                custom.push(t["name"].as_str().unwrap_or_default().to_owned());
            }
            _ => return Err(GatewayError::bad_field(
                "tools",
                "Built-in tools are not supported for this model; function and custom tools are.",
            )),
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok((out, custom))
}

// === Response ===

/// Responses' usage for chat's.
fn usage_json(u: &Usage) -> Value {
    json!({"input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens})
}

/// A finished call as an output item: a `custom_tool_call` for a custom tool (its `input`
/// unwrapped), else a `function_call`.
fn call_item(id: &str, name: &str, arguments: &str, custom: &[String]) -> Value {
    if custom.iter().any(|c| c == name) {
        let input = serde_json::from_str::<Value>(arguments)
            .ok()
            .and_then(|a| a["input"].as_str().map(str::to_owned))
            .unwrap_or_default();
        return json!({"type": "custom_tool_call", "id": format!("ctc_{id}"), "call_id": id,
            "name": name, "input": input, "status": "completed"});
    }
    json!({"type": "function_call", "id": format!("fc_{id}"), "call_id": id, "name": name,
        "arguments": arguments, "status": "completed"})
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

/// The response object around `output`.
fn response_object(id: &str, model: &str, status: &str, output: Vec<Value>, usage: Value) -> Value {
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    json!({"id": id, "object": "response", "created_at": crate::clock::unix_millis() / 1000,
        "status": status, "model": model, "output": output, "usage": usage, "error": null,
        "incomplete_details": incomplete, "instructions": null, "metadata": {},
        "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
        "text": {"format": {"type": "text"}}, "truncation": "disabled", "store": false})
}

/// A complete chat completion (already the client's) as a response object.
fn response_body(
    chat: &[u8],
    model: &str,
    usage: &Usage,
    custom: &[String],
) -> Result<Bytes, GatewayError> {
    let c: Value =
        serde_json::from_slice(chat).map_err(|_| GatewayError::upstream_bad_response())?;
    let id = c["id"].as_str().unwrap_or_default();
    let choice = &c["choices"][0];
    let mut output = Vec::new();
    if let Some(text) = choice["message"]["content"]
        .as_str()
        .filter(|t| !t.is_empty())
    {
        output.push(message_item(&format!("msg_{id}"), text, "completed"));
    }
    for call in choice["message"]["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
    {
        output.push(call_item(
            call["id"].as_str().unwrap_or_default(),
            call["function"]["name"].as_str().unwrap_or_default(),
            call["function"]["arguments"].as_str().unwrap_or("{}"),
            custom,
        ));
    }
    let status = match choice["finish_reason"].as_str() {
        Some("length") => "incomplete",
        _ => "completed",
    };
    let body = response_object(
        &format!("resp_{id}"),
        model,
        status,
        output,
        usage_json(usage),
    );
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|_| GatewayError::internal())
}

/// The output item a translated stream has open.
enum Open {
    Text {
        id: String,
        text: String,
    },
    Call {
        index: u64,
        id: String,
        name: String,
        arguments: String,
    },
}

/// Turns a chat stream (the adapter's own translator's output) into the Responses event
/// sequence: `response.created`, a `message` item per text run (`response.output_text.delta`),
/// an item per tool call (arguments streamed for functions; custom tool calls whole at their
/// end), then `response.completed` with the response and its usage.
pub struct ResponsesFromChat {
    model: String,
    custom: Vec<String>,
    id: String,
    started: bool,
    open: Option<Open>,
    /// Finished output items, for `response.completed`.
    done_items: Vec<Value>,
    finish: Option<String>,
    sequence: u64,
}

impl FromChat for ResponsesFromChat {
    fn chunk(&mut self, data: &[u8], usage: Option<Usage>, out: &mut BytesMut) -> bool {
        if data == b"[DONE]" {
            self.complete(out, usage.unwrap_or_default());
            return true;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
            return false;
        };
        self.chat_chunk(&chunk, out)
    }

    fn whole(&self, chat: &[u8], usage: &Usage) -> Result<Bytes, GatewayError> {
        response_body(chat, &self.model, usage, &self.custom)
    }
}

impl ResponsesFromChat {
    pub fn new(model: &str, custom: Vec<String>) -> Self {
        Self {
            model: model.to_owned(),
            custom,
            id: String::new(),
            started: false,
            open: None,
            done_items: Vec::new(),
            finish: None,
            sequence: 0,
        }
    }

    fn event(&mut self, out: &mut BytesMut, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        out.put_slice(b"event: ");
        out.put_slice(kind.as_bytes());
        out.put_slice(b"\ndata: ");
        out.put_slice(data.to_string().as_bytes());
        out.put_slice(b"\n\n");
    }

    /// One chat chunk's events; `true` when it ended the stream (an error).
    fn chat_chunk(&mut self, chunk: &Value, out: &mut BytesMut) -> bool {
        if let Some(error) = chunk.get("error") {
            let message = error["message"].as_str().unwrap_or("The upstream failed.");
            let failed = response_object(&self.id, &self.model, "failed", Vec::new(), Value::Null);
            let mut failed = failed;
            failed["error"] = json!({"code": "server_error", "message": message});
            self.event(out, "response.failed", json!({"response": failed}));
            return true;
        }
        if !self.started {
            self.started = true;
            self.id = format!("resp_{}", chunk["id"].as_str().unwrap_or_default());
            let created =
                response_object(&self.id, &self.model, "in_progress", vec![], Value::Null);
            self.event(
                out,
                "response.created",
                json!({"response": created.clone()}),
            );
            self.event(out, "response.in_progress", json!({"response": created}));
        }
        let choice = &chunk["choices"][0];
        if let Some(text) = choice["delta"]["content"]
            .as_str()
            .filter(|t| !t.is_empty())
        {
            self.text(out, text);
        }
        for call in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            self.call(out, call);
        }
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.finish = Some(finish.to_owned());
        }
        false
    }

    fn output_index(&self) -> usize {
        self.done_items.len()
    }

    fn text(&mut self, out: &mut BytesMut, text: &str) {
        if !matches!(self.open, Some(Open::Text { .. })) {
            self.close(out);
            let id = format!("msg_{}_{}", self.id, self.output_index());
            let mut item = message_item(&id, "", "in_progress");
            item["content"] = json!([]);
            let index = self.output_index();
            self.event(
                out,
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            self.event(
                out,
                "response.content_part.added",
                json!({"item_id": id,
                "output_index": index, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
            );
            self.open = Some(Open::Text {
                id,
                text: String::new(),
            });
        }
        let index = self.output_index();
        if let Some(Open::Text { id, text: all }) = &mut self.open {
            all.push_str(text);
            let id = id.clone();
            self.event(
                out,
                "response.output_text.delta",
                json!({"item_id": id,
                "output_index": index, "content_index": 0, "delta": text, "logprobs": []}),
            );
        }
    }

    fn call(&mut self, out: &mut BytesMut, call: &Value) {
        let index = call["index"].as_u64().unwrap_or(0);
        if !matches!(&self.open, Some(Open::Call { index: i, .. }) if *i == index) {
            self.close(out);
            let id = call["id"].as_str().unwrap_or_default().to_owned();
            let name = call["function"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if !self.custom.contains(&name) {
                let mut item = call_item(&id, &name, "", &self.custom);
                item["status"] = json!("in_progress");
                let output_index = self.output_index();
                self.event(
                    out,
                    "response.output_item.added",
                    json!({"output_index": output_index, "item": item}),
                );
            }
            self.open = Some(Open::Call {
                index,
                id,
                name,
                arguments: String::new(),
            });
        }
        let Some(piece) = call["function"]["arguments"]
            .as_str()
            .filter(|a| !a.is_empty())
        else {
            return;
        };
        let output_index = self.output_index();
        if let Some(Open::Call {
            id,
            name,
            arguments,
            ..
        }) = &mut self.open
        {
            arguments.push_str(piece);
            let (id, custom) = (format!("fc_{id}"), self.custom.contains(name));
            if !custom {
                self.event(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": output_index, "delta": piece}),
                );
            }
        }
    }

    /// Ends the open item: its `.done` events, and it joins the finished output.
    fn close(&mut self, out: &mut BytesMut) {
        let index = self.output_index();
        match self.open.take() {
            None => {}
            Some(Open::Text { id, text }) => {
                self.event(
                    out,
                    "response.output_text.done",
                    json!({"item_id": id,
                    "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                );
                self.event(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id,
                    "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": []}}),
                );
                let item = message_item(&id, &text, "completed");
                self.event(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.done_items.push(item);
            }
            Some(Open::Call {
                id,
                name,
                arguments,
                ..
            }) => {
                let item = call_item(&id, &name, &arguments, &self.custom);
                if item["type"] == "function_call" {
                    self.event(
                        out,
                        "response.function_call_arguments.done",
                        json!({
                        "item_id": item["id"], "output_index": index, "arguments": arguments}),
                    );
                } else {
                    self.event(
                        out,
                        "response.output_item.added",
                        json!({"output_index": index, "item": item}),
                    );
                }
                self.event(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.done_items.push(item);
            }
        }
    }

    /// The chat stream ended (`[DONE]`): the open item closes and `response.completed` (or
    /// `.incomplete`, cut at the output cap) carries the whole response and its usage.
    fn complete(&mut self, out: &mut BytesMut, usage: Usage) {
        self.close(out);
        let usage = usage_json(&usage);
        let (status, kind) = match self.finish.as_deref() {
            Some("length") => ("incomplete", "response.incomplete"),
            _ => ("completed", "response.completed"),
        };
        let items = std::mem::take(&mut self.done_items);
        let response = response_object(&self.id, &self.model, status, items, usage);
        self.event(out, kind, json!({"response": response}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::StreamTranslator;

    #[test]
    fn codexs_request_becomes_chat_with_its_custom_tool_as_a_function() {
        let body = json!({
            "model": "claude-test", "instructions": "You are Codex.", "store": false,
            "include": ["reasoning.encrypted_content"], "reasoning": {"effort": "high"},
            "prompt_cache_key": "thread-1", "stream": true, "parallel_tool_calls": false,
            "tools": [{"type": "custom", "name": "apply_patch", "description": "Patch files"},
                      {"type": "function", "name": "shell", "parameters": {"type": "object"}}],
            "input": [
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Fix it"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
                {"type": "custom_tool_call", "call_id": "call_1", "name": "apply_patch", "input": "*** Begin Patch"},
                {"type": "custom_tool_call_output", "call_id": "call_1", "output": "Done"}
            ]
        });
        let (chat, custom) = chat_body(body.to_string().as_bytes()).unwrap();
        let chat: Value = serde_json::from_slice(&chat).unwrap();
        assert_eq!(custom, ["apply_patch"]);
        assert_eq!(
            chat["messages"][0],
            json!({"role": "system", "content": "You are Codex."})
        );
        assert_eq!(
            chat["messages"][1]["content"][0],
            json!({"type": "text", "text": "Fix it"})
        );
        assert_eq!(
            chat["messages"][2]["tool_calls"][0]["function"],
            json!({"name": "apply_patch", "arguments": "{\"input\":\"*** Begin Patch\"}"})
        );
        assert_eq!(
            chat["messages"][3],
            json!({"role": "tool", "tool_call_id": "call_1", "content": "Done"})
        );
        assert_eq!(
            chat["tools"][0]["function"]["parameters"]["required"],
            json!(["input"])
        );
        assert_eq!(chat["reasoning_effort"], "high");
        assert_eq!(chat["prompt_cache_key"], "thread-1");
        assert_eq!(chat["parallel_tool_calls"], false);
        assert!(chat.get("store").is_none() && chat.get("include").is_none());
    }

    #[test]
    fn a_chat_stream_becomes_the_events_codex_consumes() {
        let chat = [
            r#"{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":"Patching."}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_9","type":"function","function":{"name":"apply_patch","arguments":"{\"input\":"}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"*** Begin Patch\"}"}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":30,"completion_tokens":9}}"#,
            "[DONE]",
        ];
        let sse: String = chat.iter().map(|c| format!("data: {c}\n\n")).collect();
        let mut t = crate::relay::ThroughChat::new(
            Box::new(crate::relay::SseRelay::new(false)),
            Box::new(ResponsesFromChat::new(
                "claude-test",
                vec!["apply_patch".into()],
            )),
        );
        let out = t.feed(sse.as_bytes()).unwrap();
        assert!(t.is_done());
        let text = String::from_utf8(out.to_vec()).unwrap();
        let events: Vec<Value> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| serde_json::from_str(e.split_once("\ndata: ").unwrap().1).unwrap())
            .collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.output_item.done",
                "response.completed"
            ]
        );
        let done = &events[10]["response"];
        assert_eq!(done["output"][1]["type"], "custom_tool_call");
        assert_eq!(done["output"][1]["input"], "*** Begin Patch");
        assert_eq!(done["output"][1]["call_id"], "call_9");
        assert_eq!(done["usage"]["input_tokens"], 30);
        assert_eq!(done["usage"]["output_tokens"], 9);
        let sequence: Vec<u64> = events
            .iter()
            .map(|e| e["sequence_number"].as_u64().unwrap())
            .collect();
        assert_eq!(sequence, (0..11).collect::<Vec<u64>>());
    }
}
