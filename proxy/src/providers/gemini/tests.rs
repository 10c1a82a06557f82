use super::*;
use crate::providers::client_error;

fn adapter() -> GeminiAdapter {
    GeminiAdapter::gemini(&ApiKeyCredential {
        api_key: tokn_config::Secret::new("k"),
        base_url: None,
    })
    .unwrap()
}

fn translate(body: Value) -> Result<Value, GatewayError> {
    let bytes = serde_json::to_vec(&body).unwrap();
    let req = ChatRequest::parse(&bytes).unwrap();
    generate_content_body(&req, &bytes)
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

#[test]
fn builds_the_body_from_a_whole_conversation() {
    let out = translate(json!({
        "model": "gemini", "max_completion_tokens": 300, "max_tokens": 50, "temperature": 1.5,
        "top_p": 0.9, "stop": "END", "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0,
        "stream": true, "parallel_tool_calls": false, "user": "u-1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.PNG?x=1"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/photo"}},
            ]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2~ts~c2lnbmF0dXJl", "type": "function", "function": {"name": "get_time", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 18}"},
            {"role": "tool", "tool_call_id": "call_2~ts~c2lnbmF0dXJl", "content": [{"type": "text", "text": "noon"}]},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "d", "strict": true,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"], "additionalProperties": false}}},
            {"type": "function", "function": {"name": "get_time"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "w",
            "schema": {"type": "object", "properties": {"t": {"type": "number"}}}}},
    }))
    .unwrap();
    assert_eq!(
        out,
        json!({
            "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Use tools."}]},
            "contents": [
                {"role": "user", "parts": [
                    {"text": "Weather here?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                    {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/a.PNG?x=1"}},
                    {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/photo"}},
                ]},
                {"role": "model", "parts": [
                    {"text": "Checking."},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"name": "get_time", "args": {}}, "thoughtSignature": "c2lnbmF0dXJl"},
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
                    {"functionResponse": {"name": "get_time", "response": {"result": "noon"}}},
                    {"text": "Thanks"},
                ]},
            ],
            "generationConfig": {
                "maxOutputTokens": 300, "temperature": 1.5, "topP": 0.9, "stopSequences": ["END"],
                "seed": 7, "presencePenalty": 0.5, "responseMimeType": "application/json",
                "responseJsonSchema": {"type": "object", "properties": {"t": {"type": "number"}}},
            },
            "tools": [{"functionDeclarations": [
                {"name": "get_weather", "description": "d", "parametersJsonSchema": {"type": "object",
                    "properties": {"city": {"type": "string"}}, "required": ["city"],
                    "additionalProperties": false}},
                {"name": "get_time"},
            ]}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        })
    );
}

#[test]
fn a_minimal_request_has_contents_only() {
    let out = translate(json!({"model": "m", "max_tokens": 20, "messages": [user("hi")]})).unwrap();
    assert_eq!(
        out,
        json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "generationConfig": {"maxOutputTokens": 20}})
    );
    let out = translate(json!({"model": "m", "messages": [user("hi")]})).unwrap();
    assert!(out.get("generationConfig").is_none() && out.get("systemInstruction").is_none());
}

#[test]
fn maps_tool_choices_json_modes_and_stops() {
    let base = || json!({"model": "m", "messages": [user("hi")]});
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    for (choice, want) in [
        (json!("none"), json!({"mode": "NONE"})),
        (json!("auto"), json!({"mode": "AUTO"})),
        (json!("required"), json!({"mode": "ANY"})),
        (
            json!({"type": "function", "function": {"name": "f"}}),
            json!({"mode": "ANY", "allowedFunctionNames": ["f"]}),
        ),
    ] {
        let mut b = base();
        b["tools"] = tools.clone();
        b["tool_choice"] = choice;
        let out = translate(b).unwrap();
        assert_eq!(out["toolConfig"]["functionCallingConfig"], want);
        assert_eq!(
            out["tools"][0]["functionDeclarations"][0],
            json!({"name": "f"})
        );
    }
    // Without tools, none and auto say nothing.
    let mut b = base();
    b["tool_choice"] = json!("none");
    let out = translate(b).unwrap();
    assert!(out.get("toolConfig").is_none() && out.get("tools").is_none());

    let mut b = base();
    b["response_format"] = json!({"type": "json_object"});
    assert_eq!(
        translate(b).unwrap()["generationConfig"],
        json!({"responseMimeType": "application/json"})
    );
    let mut b = base();
    b["response_format"] = json!({"type": "text"});
    assert!(translate(b).unwrap().get("generationConfig").is_none());

    let mut b = base();
    b["stop"] = json!(["a", "b", "c", "d", "e"]);
    assert_eq!(
        translate(b).unwrap()["generationConfig"]["stopSequences"],
        json!(["a", "b", "c", "d", "e"])
    );
    let mut b = base();
    b["stop"] = json!([]);
    assert!(translate(b).unwrap().get("generationConfig").is_none());
}

#[test]
fn merges_consecutive_turns_of_one_role_and_skips_empty_ones() {
    let out = translate(json!({"model": "m", "messages": [
        user("a"), user("b"),
        {"role": "assistant", "content": "c"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": [{"type": "text", "text": "d"}]},
        {"role": "system", "content": "late system"},
        user("e"),
    ]}))
    .unwrap();
    assert_eq!(
        out["contents"],
        json!([
            {"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
            {"role": "model", "parts": [{"text": "c"}, {"text": "d"}]},
            {"role": "user", "parts": [{"text": "e"}]},
        ])
    );
    assert_eq!(
        out["systemInstruction"],
        json!({"parts": [{"text": "late system"}]})
    );
}

#[test]
fn tool_results_wrap_anything_but_a_json_object() {
    for (content, want) in [
        (json!("18C"), json!({"result": "18C"})),
        (json!("[1,2]"), json!({"result": "[1,2]"})),
        (json!("42"), json!({"result": "42"})),
        (json!(""), json!({"result": ""})),
        (json!("{\"a\": {\"b\": 1}}"), json!({"a": {"b": 1}})),
        (
            json!([{"type": "text", "text": "{\"a\":"}, {"type": "text", "text": "1}"}]),
            json!({"a": 1}),
        ),
    ] {
        let out = translate(json!({"model": "m", "messages": [
            user("q"),
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": content},
        ]}))
        .unwrap();
        assert_eq!(
            out["contents"][2]["parts"][0]["functionResponse"],
            json!({"name": "f", "response": want})
        );
    }
}

#[test]
fn guesses_image_types_from_url_extensions() {
    for (url, want) in [
        ("https://x.test/a.png", "image/png"),
        ("https://x.test/a.JPG", "image/jpeg"),
        ("http://x.test/dir.v2/a.webp#frag", "image/webp"),
        ("https://x.test/a.gif?size=2", "image/gif"),
        ("gs://bucket/a.heic", "image/heic"),
        ("https://x.test/a.heif", "image/heif"),
        ("https://x.test/dir.png/photo", "image/jpeg"),
        ("https://x.test/", "image/jpeg"),
    ] {
        assert_eq!(image_mime_type(url), want, "{url}");
    }
}

#[test]
fn refuses_image_urls_that_belong_to_a_project() {
    for url in [
        "gs://bucket/a.png",
        "https://generativelanguage.googleapis.com/v1beta/files/abc123",
        "ftp://x.test/a.png",
    ] {
        let err = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]}),
        )
        .unwrap_err();
        assert_eq!(err.status(), 400, "{url}");
    }
}

#[test]
fn refuses_what_cannot_be_translated_naming_the_parameter() {
    let cases = [
        (json!({"n": 2}), "n"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"logit_bias": {"1": 2}}), "logit_bias"),
        (json!({"audio": {"voice": "x"}}), "audio"),
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"stop": ["a", "b", "c", "d", "e", "f"]}), "stop"),
        (json!({"stop": 3}), "stop"),
        (json!({"seed": 1.5}), "seed"),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
        ),
        (json!({"tools": {"f": 1}}), "tools"),
        (
            json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]}),
            "tools",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}),
            "tool_choice",
        ),
    ];
    for (extra, param) in cases {
        let mut b = json!({"model": "m", "messages": [user("hi")]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let e = translate(b).unwrap_err();
        assert_eq!((e.status(), e.param()), (400, Some(param)), "{extra}");
    }
    let bad_messages = [
        json!([{"role": "system", "content": "only system"}]),
        json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]),
        json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}]}]),
        json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}]),
        json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        json!([user("q"), {"role": "tool", "tool_call_id": "nowhere", "content": "x"}]),
        json!([user("q"), {"role": "tool", "content": "x"}]),
        json!([user("q"), {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
            "function": {"name": "f", "arguments": "[1]"}}]}]),
        json!([user("q"), {"role": "assistant", "tool_calls": [{"type": "function",
            "function": {"name": "f", "arguments": "{}"}}]}]),
        json!([{"role": "function", "name": "f", "content": "x"}]),
    ];
    for messages in bad_messages {
        let e = translate(json!({"model": "m", "messages": messages})).unwrap_err();
        assert_eq!(
            (e.status(), e.param()),
            (400, Some("messages")),
            "{messages}"
        );
    }
}

// === Response ===

fn complete(body: Value) -> (Value, Usage) {
    let (out, usage) = adapter()
        .complete_body(Bytes::from(body.to_string()), "m")
        .unwrap();
    (serde_json::from_slice(&out).unwrap(), usage.unwrap())
}

#[test]
fn translates_a_complete_response_with_tool_calls_and_usage() {
    let (out, usage) = complete(json!({
        "candidates": [{"content": {"role": "model", "parts": [
            {"text": "Let me think.", "thought": true},
            {"text": "Checking "},
            {"text": "both."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            {"functionCall": {"id": "fc-7", "name": "get_time"}},
            {"functionCall": {"name": "get_date", "args": {}}, "thoughtSignature": "c2ln"},
        ]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 20,
            "thoughtsTokenCount": 30, "cachedContentTokenCount": 40,
            "toolUsePromptTokenCount": 5, "totalTokenCount": 155},
        "modelVersion": "gemini-2.5-flash", "responseId": "resp-1",
    }));
    assert!(out["created"].as_u64().unwrap() > 0);
    let mut out = out;
    out["created"] = json!(0);
    assert_eq!(
        out,
        json!({
            "id": "chatcmpl-resp-1", "object": "chat.completion", "created": 0,
            "model": "gemini-2.5-flash",
            "choices": [{"index": 0, "logprobs": null, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": "Checking both.", "refusal": null,
                    "tool_calls": [
                        {"id": "call_resp-1_0", "type": "function",
                            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                        {"id": "fc-7", "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"}},
                        {"id": "call_resp-1_2~ts~c2ln", "type": "function",
                            "function": {"name": "get_date", "arguments": "{}"}},
                    ]}}],
            "usage": {"prompt_tokens": 105, "completion_tokens": 50, "total_tokens": 155,
                "prompt_tokens_details": {"cached_tokens": 40},
                "completion_tokens_details": {"reasoning_tokens": 30}},
        })
    );
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: 105,
            completion_tokens: 50,
            cached_tokens: 40,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            reasoning_tokens: 30
        }
    );
}

#[test]
fn a_signed_tool_call_id_gives_google_its_signature_back() {
    let (out, _) = complete(json!({"candidates": [{"content": {"parts": [
        {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "c2ln+/="},
    ]}, "finishReason": "STOP"}], "responseId": "r"}));
    let call = out["choices"][0]["message"]["tool_calls"][0].clone();
    let next = translate(json!({"model": "m", "messages": [
        user("q"),
        {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
        {"role": "tool", "tool_call_id": call["id"], "content": "ok"},
    ]}))
    .unwrap();
    assert_eq!(
        next["contents"][1]["parts"][0],
        json!({"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "c2ln+/="})
    );
    assert_eq!(
        next["contents"][2]["parts"][0]["functionResponse"]["name"],
        "f"
    );
}

#[test]
fn maps_finish_reasons() {
    for (reason, calls, blocked, want) in [
        (Some("STOP"), false, false, "stop"),
        (None, false, false, "stop"),
        (Some("MAX_TOKENS"), false, false, "length"),
        (Some("MAX_TOKENS"), true, false, "tool_calls"),
        (Some("STOP"), true, false, "tool_calls"),
        (Some("SAFETY"), false, false, "content_filter"),
        (Some("RECITATION"), false, false, "content_filter"),
        (Some("PROHIBITED_CONTENT"), false, false, "content_filter"),
        (Some("IMAGE_SAFETY"), false, false, "content_filter"),
        (Some("MALFORMED_FUNCTION_CALL"), false, false, "stop"),
        (Some("FINISH_REASON_UNSPECIFIED"), false, false, "stop"),
        (None, false, true, "content_filter"),
    ] {
        assert_eq!(finish_reason(reason, calls, blocked), want, "{reason:?}");
    }
}

#[test]
fn a_plain_answer_without_an_id_gets_one_and_keeps_partial_usage() {
    let (out, usage) = complete(
        json!({"candidates": [{"content": {"parts": [{"text": "Hi"}]},
        "finishReason": "MAX_TOKENS"}], "usageMetadata": {"promptTokenCount": 3}}),
    );
    assert!(out["id"].as_str().unwrap().starts_with("chatcmpl-gemini-"));
    // No `modelVersion`: the pool's upstream model names it.
    assert_eq!(out["model"], "m");
    assert_eq!(out["choices"][0]["finish_reason"], "length");
    assert_eq!(out["choices"][0]["message"]["content"], "Hi");
    assert!(out["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 0));
    assert!(adapter()
        .complete_body(Bytes::from_static(b"not json"), "m")
        .is_err());
}

#[test]
fn a_blocked_prompt_is_an_empty_content_filter_answer() {
    let (out, usage) = complete(json!({"promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
        "modelVersion": "gemini-2.5-flash", "responseId": "b"}));
    assert_eq!(out["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(out["choices"][0]["message"]["content"], "");
    assert_eq!(usage.prompt_tokens, 8);
}

// === Streaming ===

fn sse(events: &[Value], separator: &str) -> String {
    events
        .iter()
        .map(|e| format!("data: {e}{separator}"))
        .collect()
}

fn tool_stream() -> Vec<Value> {
    vec![
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}}],
            "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10},
            "modelVersion": "gemini-2.5-flash", "responseId": "r1"}),
        json!({"candidates": [{"content": {"role": "model", "parts": [
                {"text": "pondering", "thought": true}, {"text": "lo"}]}}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 2, "totalTokenCount": 12},
            "modelVersion": "gemini-2.5-flash", "responseId": "r1"}),
        json!({"candidates": [{"content": {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_time", "args": {}}}]}}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 6, "totalTokenCount": 16},
            "modelVersion": "gemini-2.5-flash", "responseId": "r1"}),
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]},
                "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 7,
                "thoughtsTokenCount": 3, "cachedContentTokenCount": 4, "totalTokenCount": 20},
            "modelVersion": "gemini-2.5-flash", "responseId": "r1"}),
    ]
}

fn data_lines(out: &[u8]) -> Vec<String> {
    String::from_utf8(out.to_vec())
        .unwrap()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// Feeds `input` in pieces of `step` bytes, then ends the body.
fn run_stream(input: &[u8], hide: bool, step: usize) -> (Vec<u8>, GenerateContentStream) {
    let mut t = GenerateContentStream::new(hide, "gemini-upstream");
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        out.extend_from_slice(&t.feed(piece).unwrap());
    }
    out.extend_from_slice(&t.finish());
    (out, t)
}

/// Chunks with `created` zeroed (the clock may tick between two runs).
fn chunks(out: &[u8]) -> Vec<Value> {
    data_lines(out)
        .iter()
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(mut v) => {
                if v.get("created").is_some() {
                    v["created"] = json!(0);
                }
                v
            }
            Err(_) => Value::String(l.clone()),
        })
        .collect()
}

#[test]
fn streams_text_and_whole_tool_calls_finishing_when_the_body_ends() {
    let input = sse(&tool_stream(), "\r\n\r\n");
    let (out, t) = run_stream(input.as_bytes(), false, input.len());
    let head = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 0,
            "model": "gemini-2.5-flash", "usage": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    assert_eq!(
        chunks(&out),
        vec![
            head(json!({"role": "assistant", "content": ""}), Value::Null),
            head(json!({"content": "Hel"}), Value::Null),
            head(json!({"content": "lo"}), Value::Null),
            head(
                json!({"tool_calls": [{"index": 0, "id": "call_r1_0", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}),
                Value::Null
            ),
            head(
                json!({"tool_calls": [{"index": 1, "id": "call_r1_1", "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"}}]}),
                Value::Null
            ),
            head(json!({}), json!("tool_calls")),
            json!({"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 0,
                "model": "gemini-2.5-flash", "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20,
                    "prompt_tokens_details": {"cached_tokens": 4},
                    "completion_tokens_details": {"reasoning_tokens": 3}}}),
            json!("[DONE]"),
        ]
    );
    assert!(t.is_done());
    assert_eq!(
        t.usage(),
        Some(Usage {
            prompt_tokens: 10,
            completion_tokens: 10,
            cached_tokens: 4,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            reasoning_tokens: 3
        })
    );
    assert!(t.generated_bytes() >= 5);
}

#[test]
fn any_split_and_either_line_ending_give_the_same_chunks() {
    let crlf = sse(&tool_stream(), "\r\n\r\n");
    let (whole, _) = run_stream(crlf.as_bytes(), false, crlf.len());
    let expected = chunks(&whole);
    for input in [crlf.clone(), sse(&tool_stream(), "\n\n")] {
        for step in [1, 2, 3, 7, 64] {
            let (out, t) = run_stream(input.as_bytes(), false, step);
            assert_eq!(chunks(&out), expected, "step {step}");
            assert!(t.is_done());
        }
    }
}

#[test]
fn each_event_is_translated_as_soon_as_it_is_complete() {
    let events = tool_stream();
    let mut t = GenerateContentStream::new(false, "gemini-upstream");
    for (i, e) in events.iter().take(2).enumerate() {
        let text = format!("data: {e}\r\n\r\n");
        let (head, last) = text.as_bytes().split_at(text.len() - 1);
        assert!(t.feed(head).unwrap().is_empty(), "event {i} emitted early");
        assert!(!t.feed(last).unwrap().is_empty(), "event {i} held back");
    }
}

#[test]
fn usage_is_the_last_snapshot_never_a_sum() {
    let events = [
        json!({"candidates": [{"content": {"parts": [{"text": "a"}]}}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1}}),
        json!({"candidates": [{"content": {"parts": [{"text": "b"}]}}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2}}),
        json!({"candidates": [{"content": {"parts": [{"text": "c"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3}}),
    ];
    let input = sse(&events, "\n\n");
    let (out, t) = run_stream(input.as_bytes(), true, 5);
    let u = t.usage().unwrap();
    assert_eq!((u.prompt_tokens, u.completion_tokens), (5, 3));
    // Hidden usage: no usage chunk and no `usage: null`, but the stream still ends.
    let out = String::from_utf8(out).unwrap();
    assert!(!out.contains("usage") && out.ends_with("data: [DONE]\n\n"));
    assert!(out.contains(r#""finish_reason":"stop""#));
}

#[test]
fn a_mid_stream_error_becomes_an_openai_error_event_at_once() {
    let first = format!("data: {}\r\n\r\n", tool_stream()[0]);
    let error = "{\n  \"error\": {\n    \"code\": 429,\n    \"message\": \"Resource has been exhausted {quota}.\",\n    \"status\": \"RESOURCE_EXHAUSTED\"\n  }\n}\n";
    let input = format!("{first}{error}");
    for step in [1, 4, input.len()] {
        let mut t = GenerateContentStream::new(false, "gemini-upstream");
        let mut out = Vec::new();
        for piece in input.as_bytes().chunks(step) {
            out.extend_from_slice(&t.feed(piece).unwrap());
        }
        // Complete JSON: the error is out before the body ends.
        assert!(t.is_done(), "step {step}");
        assert!(t.finish().is_empty());
        let lines = data_lines(&out);
        assert_eq!(lines.len(), 3, "step {step}");
        let e: Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(
            e,
            json!({"error": {"message": "Resource has been exhausted {quota}.",
                "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}})
        );
        assert!(!String::from_utf8(out).unwrap().contains("[DONE]"));
    }
}

#[test]
fn an_error_as_a_data_event_or_at_the_body_end_also_ends_the_stream() {
    let mut t = GenerateContentStream::new(false, "gemini-upstream");
    let out = t
        .feed(b"data: {\"error\":{\"code\":503,\"message\":\"The model is overloaded.\",\"status\":\"UNAVAILABLE\"}}\n\n")
        .unwrap();
    let e: Value = serde_json::from_str(&data_lines(&out)[0]).unwrap();
    assert_eq!(e["error"]["code"], "overloaded");
    assert!(t.is_done());

    let mut t = GenerateContentStream::new(false, "gemini-upstream");
    assert!(t
        .feed(b"{\"error\": {\"code\": 500, \"status\": \"INTERNAL\"")
        .unwrap()
        .is_empty());
    assert!(!t.is_done());
    let out = t.feed(b"}}").unwrap();
    assert_eq!(data_lines(&out).len(), 1);
    assert!(t.is_done());
}

#[test]
fn a_blocked_prompt_streams_a_content_filter_finish() {
    let input = sse(
        &[
            json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
            "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
            "modelVersion": "gemini-2.5-flash", "responseId": "b1"}),
        ],
        "\r\n\r\n",
    );
    let (out, t) = run_stream(input.as_bytes(), false, 9);
    let c = chunks(&out);
    assert_eq!(c.len(), 4);
    assert_eq!(c[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(c[1]["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(c[2]["usage"]["prompt_tokens"], 7);
    assert_eq!(c[3], json!("[DONE]"));
    assert!(t.is_done());
}

#[test]
fn a_stream_without_a_finish_reason_is_truncated() {
    let events = &tool_stream()[..2];
    // The last event also lacks its blank line: still translated when the body ends.
    let input = sse(events, "\n\n");
    let input = input.trim_end();
    let (out, t) = run_stream(input.as_bytes(), false, 11);
    assert!(!t.is_done());
    let c = chunks(&out);
    assert_eq!(c.len(), 3);
    assert_eq!(c[2]["choices"][0]["delta"]["content"], "lo");
    assert!(c.iter().all(|c| c != "[DONE]"));
    assert_eq!(t.usage().unwrap().completion_tokens, 2);
}

#[test]
fn an_endless_event_is_a_framing_error() {
    let mut t = GenerateContentStream::new(false, "gemini-upstream");
    let big = vec![b'x'; SSE_EVENT_BYTES_MAX + 1];
    assert!(t.feed(&big).is_err());
}

// === Errors ===

fn google_error(code: u16, status: &str, reason: Option<&str>) -> Vec<u8> {
    let mut e =
        json!({"error": {"code": code, "message": format!("{status} happened"), "status": status}});
    if let Some(r) = reason {
        e["error"]["details"] = json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": r, "domain": "googleapis.com"}]);
    }
    e.to_string().into_bytes()
}

#[test]
fn classifies_failures_from_status_and_body() {
    use FailureClass::{Credential, Request, Transient};
    for (status, body, want) in [
        (
            400,
            google_error(400, "INVALID_ARGUMENT", Some("API_KEY_INVALID")),
            Credential,
        ),
        (
            400,
            google_error(400, "INVALID_ARGUMENT", Some("API_KEY_EXPIRED")),
            Credential,
        ),
        (
            400,
            google_error(400, "FAILED_PRECONDITION", None),
            Credential,
        ),
        (401, google_error(401, "UNAUTHENTICATED", None), Credential),
        (
            403,
            google_error(403, "PERMISSION_DENIED", Some("BILLING_DISABLED")),
            Credential,
        ),
        (
            403,
            google_error(403, "PERMISSION_DENIED", Some("SERVICE_DISABLED")),
            Credential,
        ),
        (
            403,
            google_error(403, "PERMISSION_DENIED", Some("CONSUMER_SUSPENDED")),
            Credential,
        ),
        (403, b"<html>forbidden</html>".to_vec(), Credential),
        (
            403,
            google_error(403, "PERMISSION_DENIED", Some("IAM_PERMISSION_DENIED")),
            Credential,
        ),
        // "You do not have permission to access the File …": the request's file, not the pool.
        (403, google_error(403, "PERMISSION_DENIED", None), Request),
        (404, google_error(404, "NOT_FOUND", None), Credential),
        (
            429,
            google_error(429, "RESOURCE_EXHAUSTED", None),
            Transient,
        ),
        (500, google_error(500, "INTERNAL", None), Transient),
        (503, google_error(503, "UNAVAILABLE", None), Transient),
        (504, google_error(504, "DEADLINE_EXCEEDED", None), Transient),
        (502, b"bad gateway".to_vec(), Transient),
        (400, google_error(400, "INVALID_ARGUMENT", None), Request),
        (413, b"".to_vec(), Request),
        (
            400,
            format!(
                "[{}]",
                String::from_utf8(google_error(
                    400,
                    "INVALID_ARGUMENT",
                    Some("API_KEY_INVALID")
                ))
                .unwrap()
            )
            .into_bytes(),
            Credential,
        ),
    ] {
        assert_eq!(
            adapter().classify_failure(status, None, &body),
            want,
            "{status} {}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn maps_google_errors_to_openai_errors() {
    for (status, body, want_status, kind, code) in [
        (
            400,
            google_error(400, "INVALID_ARGUMENT", None),
            400,
            "invalid_request_error",
            "invalid_request_error",
        ),
        (
            400,
            google_error(400, "INVALID_ARGUMENT", Some("API_KEY_INVALID")),
            400,
            "authentication_error",
            "invalid_api_key",
        ),
        (
            400,
            google_error(400, "FAILED_PRECONDITION", None),
            400,
            "invalid_request_error",
            "failed_precondition",
        ),
        (
            403,
            google_error(403, "PERMISSION_DENIED", None),
            403,
            "permission_error",
            "permission_error",
        ),
        (
            404,
            google_error(404, "NOT_FOUND", None),
            404,
            "invalid_request_error",
            "not_found_error",
        ),
        (
            429,
            google_error(429, "RESOURCE_EXHAUSTED", None),
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
        ),
        (
            500,
            google_error(500, "INTERNAL", None),
            502,
            "server_error",
            "upstream_error",
        ),
        (
            503,
            google_error(503, "UNAVAILABLE", None),
            503,
            "server_error",
            "overloaded",
        ),
        (
            504,
            google_error(504, "DEADLINE_EXCEEDED", None),
            504,
            "timeout_error",
            "timeout",
        ),
        (
            422,
            b"not json".to_vec(),
            422,
            "invalid_request_error",
            "upstream_error",
        ),
    ] {
        let (s, body) = client_error(&adapter(), status, None, &body);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(s, want_status, "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert_eq!(v["error"]["param"], Value::Null);
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // Messages are bounded and stripped of control characters.
    let long = json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
        "message": format!("bad\u{1b}[31m{}", "x".repeat(5000))}});
    let (_, body) = client_error(&adapter(), 400, None, long.to_string().as_bytes());
    let v: Value = serde_json::from_slice(&body).unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.chars().count() <= 1000 && !message.contains('\u{1b}'));
}

#[test]
fn paths_name_the_model_and_the_method() {
    let gemini = GeminiAdapter::gemini(&ApiKeyCredential {
        api_key: tokn_config::Secret::new("k"),
        base_url: Some("https://generativelanguage.googleapis.com/v1beta".into()),
    })
    .unwrap();
    assert_eq!(
        gemini.path("gemini-2.5-flash", false),
        "/v1beta/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(
        gemini.path("gemini-2.5-flash", true),
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    );
}

#[test]
fn reads_the_retry_delay_google_names_in_the_body() {
    let with_delay = |delay: &str| {
        json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
        ]}})
        .to_string()
    };
    let a = adapter();
    assert_eq!(a.retry_after_in_body(with_delay("7s").as_bytes()), Some(7));
    assert_eq!(
        a.retry_after_in_body(with_delay("0.2s").as_bytes()),
        Some(1)
    );
    assert_eq!(a.retry_after_in_body(with_delay("soon").as_bytes()), None);
    assert_eq!(a.retry_after_in_body(with_delay("-1s").as_bytes()), None);
    assert_eq!(
        a.retry_after_in_body(&google_error(429, "RESOURCE_EXHAUSTED", None)),
        None
    );
    assert_eq!(a.retry_after_in_body(b"not json"), None);
}
