//! The fake OpenAI upstream's Responses API (`POST /v1/responses`), for the proxy's Responses
//! pass-through lane.
//!
//! It validates a body the way the API does — a string `model`; `input` a string or a list of
//! known items (`message` with a known role and content parts, `function_call`,
//! `function_call_output` answering an earlier call, `custom_tool_call` and its output,
//! `reasoning` with `encrypted_content`); `tools` of known types (`function` with a name,
//! `custom` for freeform tools such as Codex's `apply_patch`); no unknown top-level parameter —
//! and answers from the request and the fake's [`Behavior`]: function calls when function tools
//! are offered and the behavior names some, a summary of tool outputs when the input ends with
//! them, and otherwise the fake's words; usage in Responses' terms, as one JSON object or as the
//! event sequence (`response.created` … `response.completed`) the OpenAI SDK and Codex consume.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::fake::{fake_words, Behavior, FakeUsage};

const TOP_LEVEL: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning",
    "store",
    "stream",
    "stream_options",
    "include",
    "prompt_cache_key",
    "prompt_cache_retention",
    "text",
    "service_tier",
    "max_output_tokens",
    "max_tool_calls",
    "temperature",
    "top_p",
    "metadata",
    "previous_response_id",
    "conversation",
    "truncation",
    "user",
    "safety_identifier",
    "background",
    "prompt",
    "top_logprobs",
];

/// The first problem with a Responses body, in the API's words.
pub fn validate_responses_body(body: &Value) -> Result<(), String> {
    let obj = body.as_object().ok_or("body: not a JSON object")?;
    if let Some(k) = obj.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
        return Err(format!("Unknown parameter: '{k}'."));
    }
    if !obj.get("model").is_some_and(Value::is_string) {
        return Err("Missing required parameter: 'model'.".into());
    }
    for (name, ok) in [
        ("stream", obj.get("stream").is_none_or(Value::is_boolean)),
        ("store", obj.get("store").is_none_or(Value::is_boolean)),
        (
            "instructions",
            obj.get("instructions")
                .is_none_or(|v| v.is_string() || v.is_null()),
        ),
        (
            "max_output_tokens",
            obj.get("max_output_tokens")
                .is_none_or(|v| v.as_u64().is_some_and(|n| n >= 16) || v.is_null()),
        ),
    ] {
        if !ok {
            return Err(format!("Invalid value for '{name}'."));
        }
    }
    if let Some(tools) = obj.get("tools") {
        for (i, t) in tools
            .as_array()
            .ok_or("Invalid type for 'tools': expected an array.")?
            .iter()
            .enumerate()
        {
            match t["type"].as_str() {
                Some("function" | "custom") if t["name"].is_string() => {}
                Some("function" | "custom") => {
                    return Err(format!("Missing required parameter: 'tools[{i}].name'."))
                }
                Some("web_search" | "file_search" | "code_interpreter" | "local_shell") => {}
                _ => return Err(format!("Invalid value for 'tools[{i}].type'.")),
            }
        }
    }
    match obj.get("input") {
        None => Err("Missing required parameter: 'input'.".into()),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) => validate_items(items),
        Some(_) => Err("Invalid type for 'input': expected a string or an array.".into()),
    }
}

fn validate_items(items: &[Value]) -> Result<(), String> {
    let mut calls: Vec<&str> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = item["type"]
            .as_str()
            .unwrap_or(if item.get("role").is_some() {
                "message"
            } else {
                ""
            });
        match kind {
            "message" => {
                let role = item["role"].as_str().unwrap_or_default();
                if !matches!(role, "user" | "assistant" | "system" | "developer") {
                    return Err(format!("Invalid value for '{at}.role'."));
                }
                match &item["content"] {
                    Value::String(_) => {}
                    Value::Array(parts) => {
                        for (j, p) in parts.iter().enumerate() {
                            let ok = match p["type"].as_str() {
                                Some("input_text" | "output_text") => p["text"].is_string(),
                                Some("input_image") => {
                                    p["image_url"].is_string() || p["file_id"].is_string()
                                }
                                Some("refusal") => p["refusal"].is_string(),
                                _ => false,
                            };
                            if !ok {
                                return Err(format!("Invalid value for '{at}.content[{j}]'."));
                            }
                        }
                    }
                    _ => return Err(format!("Invalid type for '{at}.content'.")),
                }
            }
            "function_call" | "custom_tool_call" => {
                let call_id = item["call_id"]
                    .as_str()
                    .ok_or(format!("Missing required parameter: '{at}.call_id'."))?;
                let payload = if kind == "function_call" {
                    "arguments"
                } else {
                    "input"
                };
                if !item["name"].is_string() || !item[payload].is_string() {
                    return Err(format!("Invalid value for '{at}'."));
                }
                calls.push(call_id);
            }
            "function_call_output" | "custom_tool_call_output" => {
                let call_id = item["call_id"].as_str().unwrap_or_default();
                if !calls.contains(&call_id) {
                    return Err(format!(
                        "No tool call found for {kind} with call_id {call_id}."
                    ));
                }
            }
            "reasoning" => {
                if !item["summary"].is_array() {
                    return Err(format!("Missing required parameter: '{at}.summary'."));
                }
            }
            _ => return Err(format!("Invalid value for '{at}.type'.")),
        }
    }
    Ok(())
}

/// What the fake answers: output items, and the output token count.
fn output(req: &Value, b: &Behavior) -> (Vec<Value>, u64) {
    let items = req["input"].as_array().map_or(&[][..], Vec::as_slice);
    let outputs: Vec<String> = items
        .iter()
        .rev()
        .take_while(|i| {
            matches!(
                i["type"].as_str(),
                Some("function_call_output" | "custom_tool_call_output")
            )
        })
        .map(|i| i["output"].as_str().unwrap_or_default().to_owned())
        .collect();
    let text = if !outputs.is_empty() {
        let outputs: Vec<String> = outputs.into_iter().rev().collect();
        format!("Tool results: {}.", outputs.join("; "))
    } else {
        let offered = req["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["type"] == "function"));
        if offered && !b.tool_calls.is_empty() {
            let calls = b
                .tool_calls
                .iter()
                .enumerate()
                .map(|(i, (name, args))| {
                    json!({"type": "function_call", "id": format!("fc_fake{}", i + 1),
                        "call_id": format!("call_fake{}", i + 1), "name": name,
                        "arguments": args.to_string(), "status": "completed"})
                })
                .collect();
            return (calls, b.usage.completion_tokens);
        }
        fake_words(b.chunks).join(" ")
    };
    let message = json!({"type": "message", "id": "msg_fake1", "status": "completed",
        "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]});
    (vec![message], b.usage.completion_tokens)
}

fn usage(u: &FakeUsage, output_tokens: u64) -> Value {
    json!({"input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.prompt_tokens + output_tokens})
}

/// The response object, `status` and `output` as given.
fn response(req: &Value, status: &str, output: Vec<Value>, usage: Value) -> Value {
    json!({"id": "resp_fake1", "object": "response", "created_at": 1_700_000_000,
        "status": status, "model": req["model"], "output": output, "usage": usage,
        "error": null, "incomplete_details": null, "instructions": req["instructions"],
        "metadata": {}, "parallel_tool_calls": true, "temperature": 1.0, "top_p": 1.0,
        "tool_choice": req.get("tool_choice").cloned().unwrap_or(json!("auto")),
        "tools": req.get("tools").cloned().unwrap_or(json!([])),
        "text": {"format": {"type": "text"}}, "truncation": "disabled",
        "store": req.get("store").cloned().unwrap_or(json!(true))})
}

/// The whole answer to `req`.
pub fn response_json(req: &Value, b: &Behavior) -> Value {
    let (items, output_tokens) = output(req, b);
    response(req, "completed", items, usage(&b.usage, output_tokens))
}

/// The answer to `req` as its event sequence.
pub fn response_events(req: &Value, b: &Behavior) -> Vec<Bytes> {
    let (items, output_tokens) = output(req, b);
    let mut events: Vec<Value> = Vec::new();
    let mut push = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        events.push(data);
    };
    push(
        "response.created",
        json!({"response": response(req, "in_progress", vec![], Value::Null)}),
    );
    push(
        "response.in_progress",
        json!({"response": response(req, "in_progress", vec![], Value::Null)}),
    );
    for (index, item) in items.iter().enumerate() {
        let id = item["id"].clone();
        let mut open = item.clone();
        open["status"] = json!("in_progress");
        if item["type"] == "message" {
            open["content"] = json!([]);
            push(
                "response.output_item.added",
                json!({"output_index": index, "item": open}),
            );
            let text = item["content"][0]["text"].as_str().unwrap_or_default();
            let part = json!({"type": "output_text", "text": "", "annotations": []});
            push(
                "response.content_part.added",
                json!({"item_id": id,
                "output_index": index, "content_index": 0, "part": part}),
            );
            for (i, word) in text.split(' ').enumerate() {
                let delta = if i == 0 {
                    word.to_owned()
                } else {
                    format!(" {word}")
                };
                push(
                    "response.output_text.delta",
                    json!({"item_id": id,
                    "output_index": index, "content_index": 0, "delta": delta, "logprobs": []}),
                );
            }
            push(
                "response.output_text.done",
                json!({"item_id": id,
                "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
            );
            push(
                "response.content_part.done",
                json!({"item_id": id,
                "output_index": index, "content_index": 0, "part": item["content"][0]}),
            );
        } else {
            open["arguments"] = json!("");
            push(
                "response.output_item.added",
                json!({"output_index": index, "item": open}),
            );
            let arguments = item["arguments"].as_str().unwrap_or_default();
            push(
                "response.function_call_arguments.delta",
                json!({"item_id": id,
                "output_index": index, "delta": arguments}),
            );
            push(
                "response.function_call_arguments.done",
                json!({"item_id": id,
                "output_index": index, "arguments": arguments}),
            );
        }
        push(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
    }
    push(
        "response.completed",
        json!({"response": response(req, "completed", items, usage(&b.usage, output_tokens))}),
    );
    events
        .into_iter()
        .enumerate()
        .map(|(n, mut data)| {
            data["sequence_number"] = json!(n);
            let kind = data["type"].as_str().unwrap_or_default().to_owned();
            Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
        })
        .collect()
}

/// The fake OpenAI upstream's embeddings API (`POST /v1/embeddings`): the first problem with
/// a body, in the API's words.
pub fn validate_embeddings_body(body: &Value) -> Result<(), String> {
    let obj = body.as_object().ok_or("body: not a JSON object")?;
    const KNOWN: &[&str] = &["model", "input", "encoding_format", "dimensions", "user"];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("Unrecognized request argument supplied: {k}"));
    }
    if !obj.get("model").is_some_and(Value::is_string) {
        return Err("You must provide a model parameter.".into());
    }
    let valid_input = match obj.get("input") {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(items)) => {
            !items.is_empty()
                && (items
                    .iter()
                    .all(|i| i.as_str().is_some_and(|s| !s.is_empty()))
                    || items.iter().all(Value::is_u64)
                    || items
                        .iter()
                        .all(|i| i.as_array().is_some_and(|t| t.iter().all(Value::is_u64))))
        }
        _ => false,
    };
    if !valid_input {
        return Err(
            "'input' must be a non-empty string, array of strings, or token arrays.".into(),
        );
    }
    if !obj
        .get("encoding_format")
        .is_none_or(|f| f == "float" || f == "base64")
    {
        return Err("'encoding_format' must be 'float' or 'base64'.".into());
    }
    if obj
        .get("dimensions")
        .is_some_and(|d| d.as_u64().is_none_or(|n| n == 0))
    {
        return Err("'dimensions' must be a positive integer.".into());
    }
    Ok(())
}

/// The embeddings of `req`'s inputs: a vector of `dimensions` (8 by default) per input.
pub fn embeddings_json(req: &Value, b: &Behavior) -> Value {
    let inputs = match &req["input"] {
        Value::Array(items) if !items.iter().all(Value::is_u64) => items.len(),
        _ => 1,
    };
    let dimensions = req["dimensions"].as_u64().unwrap_or(8) as usize;
    let vectors: Vec<Vec<f32>> = (0..inputs)
        .map(|index| {
            (0..dimensions)
                .map(|d| ((index * 31 + d) % 17) as f32 / 17.0)
                .collect()
        })
        .collect();
    crate::fake_embeddings::openai_embeddings_list(
        &vectors,
        req["encoding_format"] == "base64",
        &req["model"],
        b.usage.prompt_tokens,
    )
}
