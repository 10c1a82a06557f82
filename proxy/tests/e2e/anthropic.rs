//! The native Anthropic adapter end to end: the real proxy binary with `anthropic` pools in front
//! of the fake Messages API, which refuses any request that breaks Anthropic's rules.

use serde_json::{json, Value};
use tokn_testkit::fake_anthropic::{ANTHROPIC_JSON_REPLY, ANTHROPIC_REPLY};
use tokn_testkit::{AnthropicBehavior, AnthropicUsage, FakeAnthropic};

use crate::common::*;

const SELLER_KEY: &str = "sk-ant-seller-secret-0001";

/// `claude-test` (upstream `claude-upstream`) served by `pools` `(id, base_url, key)` in order.
fn start_anthropic(name: &str, pools: &[(&str, &str, &str)]) -> ProxyProcess {
    let mut toml = String::from(
        r#"
[[models]]
id = "claude-test"
provider = "anthropic"
upstream_model = "claude-upstream"
input_price_micros_per_mtok = 3_000_000
output_price_micros_per_mtok = 15_000_000
cached_input_price_micros_per_mtok = 300_000
"#,
    );
    for (id, url, key) in pools {
        toml.push_str(&format!(
            "\n[[pools]]\nid = \"{id}\"\nprovider = \"anthropic\"\nbase_url = \"{url}\"\napi_key = \"{key}\"\nmodels = [\"claude-test\"]\nprice_ratio = 0.6\n"
        ));
    }
    start_with_buyer_key(name, &toml)
}

async fn one_pool(name: &str, behavior: AnthropicBehavior) -> (FakeAnthropic, ProxyProcess) {
    let fake = FakeAnthropic::start(behavior).await.unwrap();
    let proxy = start_anthropic(name, &[("ant-a", &fake.base_url(), SELLER_KEY)]);
    (fake, proxy)
}

fn ask(extra: Value) -> Value {
    brief_chat("claude-test", extra)
}

/// What the fake's default usage is in OpenAI terms: prompt = input + cache writes + cache reads.
fn expected_usage(u: AnthropicUsage) -> FakeUsage {
    FakeUsage {
        prompt_tokens: u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens,
        completion_tokens: u.output_tokens,
        cached_tokens: u.cache_read_input_tokens,
        reasoning_tokens: 0,
    }
}

fn parallel_tools_behavior() -> AnthropicBehavior {
    AnthropicBehavior {
        tool_calls: vec![
            ("get_weather".into(), json!({"city": "Paris"})),
            ("get_time".into(), json!({"tz": "Europe/Paris"})),
        ],
        ..AnthropicBehavior::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_with_usage_and_native_headers() {
    let (fake, proxy) = one_pool("ant-text", AnthropicBehavior::default()).await;
    let resp = post(
        &proxy,
        KEY,
        &ask(json!({"temperature": 0.2, "stop": ["\n\n"]})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], ANTHROPIC_REPLY);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let want = expected_usage(AnthropicBehavior::default().usage);
    assert_eq!(body["usage"]["prompt_tokens"], want.prompt_tokens);
    assert_eq!(body["usage"]["completion_tokens"], want.completion_tokens);
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"],
        want.cached_tokens
    );
    assert_eq!(usage_of(&proxy.record_for(&id).unwrap()), want);

    let got = &fake.received()[0];
    assert_eq!(got.path, "/v1/messages");
    assert_eq!(got.headers["x-api-key"], SELLER_KEY);
    assert_eq!(got.headers["anthropic-version"], "2023-06-01");
    assert!(!got.headers.contains_key("authorization"));
    assert_eq!(got.body["model"], "claude-upstream");
    assert_eq!(got.body["max_tokens"], 4096);
    assert_eq!(
        got.body["system"],
        json!([{"type": "text", "text": "Be brief."}])
    );
    assert_eq!(got.body["stop_sequences"], json!(["\n\n"]));
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    proxy.assert_log_free_of(&[SELLER_KEY], &["x-api-key"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_ends_with_usage_and_done() {
    let (fake, proxy) = one_pool("ant-stream", AnthropicBehavior::default()).await;
    let want = expected_usage(AnthropicBehavior::default().usage);
    for include_usage in [true, false] {
        let mut body = ask(json!({"stream": true}));
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let (chunks, done, id) = stream_chunks(&proxy, &body).await;
        assert!(done);
        assert_eq!(streamed_text(&chunks), ANTHROPIC_REPLY);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let finish: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str().map(|_| c))
            .collect();
        assert_eq!(finish.len(), 1);
        assert_eq!(finish[0]["choices"][0]["finish_reason"], "stop");
        let usage_chunk = chunks.iter().find(|c| c["choices"] == json!([]));
        assert_eq!(usage_chunk.is_some(), include_usage);
        if let Some(u) = usage_chunk {
            // Cumulative output usage: the last message_delta's value, not the sum.
            assert_eq!(u["usage"]["completion_tokens"], want.completion_tokens);
            assert_eq!(u["usage"]["prompt_tokens"], want.prompt_tokens);
        }
        assert_eq!(usage_of(&proxy.record_for(&id).unwrap()), want);
    }
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_tool_calls_whole_and_streamed() {
    let (fake, proxy) = one_pool("ant-tools", parallel_tools_behavior()).await;
    let body = ask(json!({"tools": weather_tools(), "tool_choice": "auto"}));
    let resp: Value = post(&proxy, KEY, &body).await.json().await.unwrap();
    let choice = &resp["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["id"], "toolu_fake00");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert_eq!(calls[1]["function"]["name"], "get_time");
    let sent = &fake.received()[0].body;
    assert_eq!(
        sent["tools"][0]["input_schema"]["required"],
        json!(["city"])
    );
    assert_eq!(sent["tool_choice"], json!({"type": "auto"}));

    // Streamed: arguments arrive as fragments under OpenAI's per-call index (0, 1), even though
    // Anthropic numbers the text block first.
    let mut body = body.clone();
    body["stream"] = json!(true);
    let (chunks, done, _) = stream_chunks(&proxy, &body).await;
    assert!(done);
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for c in &chunks {
        for tc in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                calls.push(Default::default());
            }
            let call = &mut calls[i];
            if let Some(id) = tc["id"].as_str() {
                call.0 = id.to_owned();
            }
            if let Some(name) = tc["function"]["name"].as_str() {
                call.1 = name.to_owned();
            }
            call.2
                .push_str(tc["function"]["arguments"].as_str().unwrap_or_default());
        }
    }
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[1].0.as_str(), calls[1].1.as_str()),
        ("toolu_fake01", "get_time")
    );
    let args: Value = serde_json::from_str(&calls[0].2).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));

    // `parallel_tool_calls: false` reaches Anthropic as `disable_parallel_tool_use`.
    let body = ask(
        json!({"tools": weather_tools(), "parallel_tool_calls": false,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    );
    let resp: Value = post(&proxy, KEY, &body).await.json().await.unwrap();
    assert_eq!(
        resp["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let sent = fake.received().last().unwrap().body.clone();
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})
    );
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_results_follow_up_turn() {
    let (fake, proxy) = one_pool("ant-tool-result", parallel_tools_behavior()).await;
    let body = json!({"model": "claude-test", "tools": weather_tools(), "messages": [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "toolu_fake00", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "toolu_fake01", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_fake00", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_fake01", "content": "noon"},
    ]});
    let resp = post(&proxy, KEY, &body).await;
    assert_eq!(resp.status(), 200);
    let resp: Value = resp.json().await.unwrap();
    assert_eq!(
        resp["choices"][0]["message"]["content"],
        "Tool results: sunny; noon."
    );
    assert_eq!(resp["choices"][0]["finish_reason"], "stop");
    let sent = &fake.received()[0].body;
    assert_eq!(sent["messages"].as_array().unwrap().len(), 3);
    assert_eq!(
        sent["messages"][2]["content"][1],
        json!({"type": "tool_result", "tool_use_id": "toolu_fake01", "content": "noon"})
    );
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_input_max_tokens_and_json_mode() {
    let (fake, proxy) = one_pool("ant-misc", AnthropicBehavior::default()).await;
    let body = json!({"model": "claude-test", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}}]}]});
    let resp = post(&proxy, KEY, &body).await;
    assert_eq!(resp.status(), 200);
    let sent = &fake.received()[0].body;
    assert_eq!(
        sent["messages"][0]["content"][1]["source"],
        json!({"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="})
    );

    // A max-tokens stop is OpenAI's `length`.
    let resp: Value = post(&proxy, KEY, &ask(json!({"max_tokens": 3})))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(resp["choices"][0]["finish_reason"], "length");
    assert_eq!(resp["choices"][0]["message"]["content"], "Hello from the");
    let (chunks, _, _) = stream_chunks(
        &proxy,
        &ask(json!({"max_completion_tokens": 2, "stream": true})),
    )
    .await;
    assert_eq!(streamed_text(&chunks), "Hello from");
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "length"));

    // JSON mode becomes a system instruction; the answer is the model's JSON.
    let resp: Value = post(
        &proxy,
        KEY,
        &ask(json!({"response_format": {"type": "json_object"}})),
    )
    .await
    .json()
    .await
    .unwrap();
    let content = resp["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content, ANTHROPIC_JSON_REPLY);
    assert!(serde_json::from_str::<Value>(content).unwrap().is_object());
    let sent = fake.received().last().unwrap().body.clone();
    assert!(sent["system"][1]["text"].as_str().unwrap().contains("JSON"));
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_parameters_and_relayed_provider_errors() {
    let (fake, proxy) = one_pool("ant-errors", AnthropicBehavior::default()).await;
    for (extra, param) in [
        (json!({"temperature": 1.5}), "temperature"),
        (json!({"n": 2}), "n"),
        (json!({"logprobs": true}), "logprobs"),
    ] {
        let resp = post(&proxy, KEY, &ask(extra)).await;
        assert_eq!(resp.status(), 400);
        let body: Value = resp.json().await.unwrap();
        assert_openai_error(&body);
        assert_eq!(body["error"]["param"], param);
    }
    assert!(fake.received().is_empty());

    // An Anthropic 400 about the request is relayed in OpenAI's shape.
    fake.set_behavior(
        SELLER_KEY,
        AnthropicBehavior {
            status: 400,
            error_message: Some("messages.0.content: prompt is too long".into()),
            ..AnthropicBehavior::default()
        },
    );
    let resp = post(&proxy, KEY, &ask(json!({}))).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_openai_error(&body);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(
        body["error"]["message"],
        "messages.0.content: prompt is too long"
    );

    // An `error` event mid-stream becomes an OpenAI error event.
    fake.set_behavior(
        SELLER_KEY,
        AnthropicBehavior {
            stream_error: true,
            ..AnthropicBehavior::default()
        },
    );
    let resp = post(&proxy, KEY, &ask(json!({"stream": true}))).await;
    let data = sse_data(&resp.text().await.unwrap());
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "overloaded");
    proxy.assert_log_free_of(&[SELLER_KEY], &["x-api-key"]);
}

/// Pool A fails with `behavior`; pool B (another key) serves, with B's usage.
async fn fails_over(name: &str, behavior: AnthropicBehavior) {
    let fake = FakeAnthropic::start(AnthropicBehavior::default())
        .await
        .unwrap();
    fake.set_behavior("sk-ant-a", behavior);
    let proxy = start_anthropic(
        name,
        &[
            ("ant-a", &fake.base_url(), "sk-ant-a"),
            ("ant-b", &fake.base_url(), "sk-ant-b"),
        ],
    );
    for stream in [false, true] {
        let resp = post(&proxy, KEY, &ask(json!({"stream": stream}))).await;
        assert_eq!(resp.status(), 200, "{name}");
        let id = request_id(&resp);
        let _ = resp.text().await.unwrap();
        let rec = proxy.record_for(&id).unwrap();
        assert_eq!(rec["pool_id"], "ant-b", "{name}");
        assert_eq!(
            usage_of(&rec),
            expected_usage(AnthropicBehavior::default().usage)
        );
    }
    let keys: Vec<String> = fake
        .received()
        .iter()
        .map(|r| r.headers["x-api-key"].clone())
        .collect();
    assert_eq!(keys, ["sk-ant-a", "sk-ant-b", "sk-ant-b"], "{name}");
    proxy.assert_log_free_of(&["sk-ant-a"], &["x-api-key"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_overloaded_529() {
    fails_over(
        "ant-529",
        AnthropicBehavior {
            status: 529,
            ..AnthropicBehavior::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_revoked_key_401() {
    fails_over(
        "ant-401",
        AnthropicBehavior {
            status: 401,
            ..AnthropicBehavior::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_throttling_429_and_low_credit() {
    fails_over(
        "ant-429",
        AnthropicBehavior {
            status: 429,
            retry_after_s: Some(7),
            ..AnthropicBehavior::default()
        },
    )
    .await;
    fails_over(
        "ant-credit",
        AnthropicBehavior {
            status: 400,
            error_message: Some(
                "Your credit balance is too low to access the Anthropic API.".into(),
            ),
            ..AnthropicBehavior::default()
        },
    )
    .await;
}

/// With no pool left to try, throttling stays 429 (with the provider's `retry-after`) and
/// Anthropic's 529 overload becomes 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_pools_throttling_and_overload_reach_the_client() {
    for (status, want, retry_after) in [(429, 429, Some(7)), (529, 503, None)] {
        let (_fake, proxy) = one_pool(
            &format!("ant-last-{status}"),
            AnthropicBehavior {
                status,
                retry_after_s: retry_after,
                ..AnthropicBehavior::default()
            },
        )
        .await;
        let resp = post(&proxy, KEY, &ask(json!({}))).await;
        assert_eq!(resp.status(), want, "{status}");
        let header = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(header, retry_after.map(|s| s.to_string()), "{status}");
        assert_openai_error(&resp.json().await.unwrap());
    }
}
