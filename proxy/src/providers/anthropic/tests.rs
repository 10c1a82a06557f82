use super::*;
use crate::providers::client_error;
use crate::providers::translate::{JSON_OBJECT_INSTRUCTION, JSON_SCHEMA_INSTRUCTION};

fn adapter() -> AnthropicAdapter {
    AnthropicAdapter::new(&ApiKeyCredential {
        api_key: tokn_config::Secret::new("sk-ant-test"),
        base_url: None,
    })
    .unwrap()
}

fn translate(body: Value) -> Result<Value, GatewayError> {
    let bytes = serde_json::to_vec(&body).unwrap();
    let req = ChatRequest::parse(&bytes).unwrap();
    messages_body(&req, &bytes, "claude-up")
}

#[test]
fn builds_the_messages_body_from_a_whole_conversation() {
    let out = translate(json!({
        "model": "claude", "max_completion_tokens": 300, "temperature": 0.5, "top_p": 0.9,
        "stop": "END", "user": "u-1", "stream": true, "parallel_tool_calls": false,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "get_time"}}],
        "tool_choice": "required",
    }))
    .unwrap();
    assert_eq!(
        out,
        json!({
            "model": "claude-up", "max_tokens": 300, "temperature": 0.5, "top_p": 0.9,
            "stop_sequences": ["END"], "stream": true, "metadata": {"user_id": "u-1"},
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "noon"},
                    {"type": "text", "text": "Thanks"},
                ]},
            ],
            "tools": [
                {"name": "get_weather", "description": "d", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
                {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        })
    );
}

#[test]
fn maps_defaults_tool_choices_and_json_modes() {
    let base = || json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let out = translate(base()).unwrap();
    assert_eq!(out["max_tokens"], MAX_TOKENS_DEFAULT);
    assert_eq!(
        out["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    );
    assert!(out.get("system").is_none() && out.get("stream").is_none());

    let tool = json!([{"type": "function", "function": {"name": "f"}}]);
    for (choice, want) in [
        (json!("auto"), json!({"type": "auto"})),
        (json!("none"), json!({"type": "none"})),
        (json!("required"), json!({"type": "any"})),
        (
            json!({"type": "function", "function": {"name": "f"}}),
            json!({"type": "tool", "name": "f"}),
        ),
    ] {
        let mut b = base();
        b["tools"] = tool.clone();
        b["tool_choice"] = choice;
        assert_eq!(translate(b).unwrap()["tool_choice"], want);
    }

    let mut b = base();
    b["response_format"] = json!({"type": "json_object"});
    assert_eq!(
        translate(b).unwrap()["system"][0]["text"],
        JSON_OBJECT_INSTRUCTION
    );
    let mut b = base();
    b["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x",
        "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}});
    let text = translate(b).unwrap()["system"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        text.starts_with(JSON_SCHEMA_INSTRUCTION) && text.contains(r#""a":{"type":"integer"}"#)
    );
}

#[test]
fn refuses_what_anthropic_cannot_do_naming_the_parameter() {
    let cases = [
        (json!({"n": 2}), "n"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"logit_bias": {"1": 2}}), "logit_bias"),
        (json!({"temperature": 1.5}), "temperature"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (
            json!({"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tool_choice",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
            "messages",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AA"}}]}]}),
            "messages",
        ),
        (
            json!({"messages": [{"role": "system", "content": "only a system prompt"}]}),
            "messages",
        ),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}),
            "messages",
        ),
    ];
    for (extra, param) in cases {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let e = translate(body.clone()).expect_err(&body.to_string());
        assert_eq!(
            (e.status(), e.param()),
            (400, Some(param)),
            "{body}: {}",
            e.message()
        );
    }
    // Accepted at the edges of Anthropic's range, and ignored hints do not fail.
    let ok = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1,
        "seed": 3, "presence_penalty": 0.5, "logprobs": false, "n": 1});
    assert_eq!(translate(ok).unwrap()["temperature"], 1.0);
}

#[test]
fn translates_a_complete_message_with_usage_including_cache_tokens() {
    let body = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
        "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}}],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 7, "cache_creation_input_tokens": 4,
                  "cache_read_input_tokens": 3,
                  "cache_creation": {"ephemeral_5m_input_tokens": 1, "ephemeral_1h_input_tokens": 3}}});
    let (out, usage) = adapter()
        .complete_body(Bytes::from(body.to_string()), "m")
        .unwrap();
    let out: Value = serde_json::from_slice(&out).unwrap();
    let choice = &out["choices"][0];
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "Let me check.");
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([{"id": "toolu_9", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}])
    );
    assert_eq!(
        usage,
        Some(Usage {
            prompt_tokens: 17,
            completion_tokens: 7,
            cached_tokens: 3,
            cache_write_tokens: 4,
            cache_write_1h_tokens: 3,
            reasoning_tokens: 0
        })
    );
    assert_eq!(out["usage"]["total_tokens"], 24);
    assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
    for (reason, want) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ] {
        assert_eq!(finish_reason(Some(reason)), want);
    }
    assert!(adapter()
        .complete_body(Bytes::from_static(b"nope"), "m")
        .is_err());
}

const STREAM: &str = concat!(
    "event: message_start\n",
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_s\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-up\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":20,\"cache_creation_input_tokens\":2,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\ndata: {\"type\": \"ping\"}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Checking\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_a\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\":\"}}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"Paris\\\"}\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_b\",\"name\":\"get_time\",\"input\":{}}}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{}\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
    "event: message_delta\n",
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":30}}\n\n",
    "event: message_delta\n",
    "data: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":42}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

fn run_stream(input: &str, hide: bool, piece: usize) -> (Vec<String>, MessagesStream) {
    let mut t = MessagesStream::new(hide);
    let mut out = Vec::new();
    for chunk in input.as_bytes().chunks(piece) {
        out.extend_from_slice(&t.feed(chunk).unwrap());
    }
    out.extend_from_slice(&t.finish());
    let text = String::from_utf8(out).unwrap();
    let data = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect();
    (data, t)
}

#[test]
fn streams_text_and_parallel_tool_calls_with_openai_indices() {
    for piece in [1, 9, 100, 100_000] {
        let (data, t) = run_stream(STREAM, false, piece);
        assert!(t.is_done());
        assert_eq!(data.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0).map(|c| &c["delta"]))
            .collect();
        assert_eq!(deltas[0], &json!({"role": "assistant", "content": ""}));
        assert_eq!(deltas[1], &json!({"content": "Checking"}));
        assert_eq!(
            deltas[2],
            &json!({"tool_calls": [{"index": 0, "id": "toolu_a", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}]})
        );
        assert_eq!(
            deltas[3]["tool_calls"][0],
            json!({"index": 0, "function": {"arguments": "{\"city\":"}})
        );
        assert_eq!(
            deltas[4]["tool_calls"][0]["function"]["arguments"],
            "\"Paris\"}"
        );
        assert_eq!(deltas[5]["tool_calls"][0]["index"], 1);
        assert_eq!(
            deltas[6]["tool_calls"][0],
            json!({"index": 1, "function": {"arguments": "{}"}})
        );
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
        let usage = &chunks[chunks.len() - 1];
        assert_eq!(usage["choices"], json!([]));
        // Output usage is cumulative: the last value (42) wins, never the sum.
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 27, "completion_tokens": 42, "total_tokens": 69,
                "prompt_tokens_details": {"cached_tokens": 5},
                "completion_tokens_details": {"reasoning_tokens": 0}})
        );
        assert_eq!(
            t.usage(),
            Some(Usage {
                prompt_tokens: 27,
                completion_tokens: 42,
                cached_tokens: 5,
                cache_write_tokens: 2,
                cache_write_1h_tokens: 0,
                reasoning_tokens: 0
            })
        );
        assert!(chunks
            .iter()
            .all(|c| c["id"] == "msg_s" && c["model"] == "claude-up"));
    }
}

#[test]
fn hides_the_usage_chunk_when_the_client_did_not_ask() {
    let (data, t) = run_stream(STREAM, true, 64);
    assert!(data
        .iter()
        .all(|d| !d.contains("prompt_tokens") && !d.contains("\"usage\"")));
    assert_eq!(t.usage().unwrap().completion_tokens, 42);
    assert!(t.generated_bytes() > 0);
}

#[test]
fn a_mid_stream_error_event_becomes_an_openai_error_event() {
    let head = STREAM.split("event: content_block_stop").next().unwrap();
    let input = format!(
        "{head}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n"
    );
    let (data, t) = run_stream(&input, false, 17);
    assert!(t.is_done());
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(
        last,
        json!({"error": {"message": "Overloaded", "type": "server_error", "param": null, "code": "overloaded"}})
    );
    assert_eq!(t.usage().unwrap().prompt_tokens, 27);
}

#[test]
fn a_stream_without_message_stop_is_not_done() {
    let head = STREAM.split("event: message_stop").next().unwrap();
    let (data, t) = run_stream(head, false, 50);
    assert!(!t.is_done());
    assert!(!data.iter().any(|d| d == "[DONE]"));
}

#[test]
fn classifies_failures_and_maps_error_bodies() {
    let a = adapter();
    let body = |kind: &str, message: &str| {
        format!(
            r#"{{"type":"error","error":{{"type":"{kind}","message":"{message}"}},"request_id":"req_1"}}"#
        )
    };
    let cases = [
        (
            401,
            body("authentication_error", "invalid x-api-key"),
            FailureClass::Credential,
        ),
        (
            403,
            body("permission_error", "no"),
            FailureClass::Credential,
        ),
        (
            400,
            body(
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API.",
            ),
            FailureClass::Credential,
        ),
        (402, body("billing_error", "pay"), FailureClass::Credential),
        (
            404,
            body("not_found_error", "model: claude-x"),
            FailureClass::Credential,
        ),
        (
            429,
            body("rate_limit_error", "slow down"),
            FailureClass::Transient,
        ),
        (
            529,
            body("overloaded_error", "Overloaded"),
            FailureClass::Transient,
        ),
        (500, body("api_error", "oops"), FailureClass::Transient),
        (
            400,
            body("invalid_request_error", "messages: empty"),
            FailureClass::Request,
        ),
        (413, body("request_too_large", "big"), FailureClass::Request),
    ];
    for (status, body, want) in cases {
        assert_eq!(
            a.classify_failure(status, None, body.as_bytes()),
            want,
            "{status} {body}"
        );
    }
    for (status, kind, want_status, want_type) in [
        (400, "invalid_request_error", 400, "invalid_request_error"),
        (429, "rate_limit_error", 429, "rate_limit_error"),
        (529, "overloaded_error", 503, "server_error"),
        (500, "api_error", 502, "server_error"),
    ] {
        let (s, out) = client_error(&a, status, None, body(kind, "why").as_bytes());
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (s, out["error"]["type"].as_str().unwrap()),
            (want_status, want_type)
        );
        assert_eq!(out["error"]["message"], "why");
        assert!(out["error"].get("param").is_some() && out["error"].get("code").is_some());
    }
    let (s, out) = client_error(&a, 502, None, b"<html>");
    assert_eq!(s, 502);
    assert!(serde_json::from_slice::<Value>(&out).unwrap()["error"]["message"].is_string());
}

#[test]
fn each_event_is_translated_as_soon_as_it_is_complete() {
    let mut t = MessagesStream::new(true);
    let events: Vec<&str> = STREAM.split_inclusive("\n\n").collect();
    // message_start → the role chunk at once.
    assert!(
        String::from_utf8(t.feed(events[0].as_bytes()).unwrap().to_vec())
            .unwrap()
            .contains("\"role\":\"assistant\"")
    );
    // Half an event → nothing yet; its second half → its chunk.
    let delta = events[3];
    let (a, b) = delta.split_at(delta.len() / 2);
    assert!(t.feed(events[1].as_bytes()).unwrap().is_empty());
    assert!(t.feed(events[2].as_bytes()).unwrap().is_empty());
    assert!(t.feed(a.as_bytes()).unwrap().is_empty());
    let out = String::from_utf8(t.feed(b.as_bytes()).unwrap().to_vec()).unwrap();
    assert!(out.contains("\"content\":\"Checking\""), "{out}");
}
