//! The Gemini/Vertex adapter end to end: the real proxy binary with `gemini` pools (API key in
//! `x-goog-api-key`) and `vertex` pools (service-account OAuth, tokens minted at the fake's
//! `token_uri`) in front of the fake Google API, which refuses any body that breaks
//! `generateContent`'s rules.

use std::time::Duration;

use serde_json::{json, Value};
use tokn_testkit::fake_google::{GOOGLE_JSON_REPLY, GOOGLE_REPLY};
use tokn_testkit::{FakeGoogle, GoogleBehavior, GoogleUsage, TestServiceAccount};

use crate::common::*;

const UPSTREAM_MODEL: &str = "gemini-2.5-flash";
const GEMINI_PATH: &str = "/v1beta/models/gemini-2.5-flash";
const PROJECT: &str = "tokn-e2e";
const LOCATION: &str = "us-central1";

const KEY_A: &str = "AIzaSyFakeGeminiKeyA000000000000000001";
const KEY_B: &str = "AIzaSyFakeGeminiKeyB000000000000000002";
/// A seller key that must never reach the proxy's log.
const CANARY: &str = "AIzaSyCanaryKeyNeverLogged0000000009";

/// One pool of the test catalog.
enum Pool<'a> {
    Gemini(&'a str, &'a str),
    Vertex(&'a str, &'a TestServiceAccount),
}

/// `gemini-test` (gemini pools) and `vertex-test` (vertex pools), both upstream
/// [`UPSTREAM_MODEL`], served by `pools` in order; key files go in through the environment.
fn start_google(name: &str, fake: &FakeGoogle, pools: &[Pool<'_>]) -> ProxyProcess {
    let mut toml = String::new();
    for (model, provider) in [("gemini-test", "gemini"), ("vertex-test", "vertex")] {
        toml.push_str(&format!(
            r#"
[[models]]
id = "{model}"
provider = "{provider}"
upstream_model = "{UPSTREAM_MODEL}"
input_price_micros_per_mtok = 300_000
output_price_micros_per_mtok = 2_500_000
cached_input_price_micros_per_mtok = 75_000
"#
        ));
    }
    let url = fake.base_url();
    let mut envs: Vec<(String, String)> = vec![("TEST_BUYER_KEY".into(), KEY.into())];
    for (i, pool) in pools.iter().enumerate() {
        let body = match pool {
            Pool::Gemini(id, key) => format!(
                "id = \"{id}\"\nprovider = \"gemini\"\napi_key = \"{key}\"\nmodels = [\"gemini-test\"]\n"
            ),
            Pool::Vertex(id, sa) => {
                let env = format!("TEST_VERTEX_SA_{i}");
                envs.push((env.clone(), sa.json.clone()));
                format!(
                    "id = \"{id}\"\nprovider = \"vertex\"\nservice_account_json = \"env:{env}\"\nlocation = \"{LOCATION}\"\nmodels = [\"vertex-test\"]\n"
                )
            }
        };
        toml.push_str(&format!(
            "\n[[pools]]\n{body}base_url = \"{url}\"\nprice_ratio = 0.7\n"
        ));
    }
    toml.push_str(
        "\n[[keys]]\nid = \"key-main\"\naccount = \"acct-1\"\nkey = \"env:TEST_BUYER_KEY\"\n",
    );
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ProxyProcess::start(binary(), name, &toml, &envs)
}

async fn fake(behavior: GoogleBehavior) -> FakeGoogle {
    let fake = FakeGoogle::start(behavior).await.unwrap();
    fake.allow_key(KEY_A);
    fake.allow_key(KEY_B);
    fake
}

/// A fake and a proxy with one gemini pool (`KEY_A`) and one vertex pool.
async fn both_apis(name: &str, behavior: GoogleBehavior) -> (FakeGoogle, ProxyProcess) {
    let fake = fake(behavior).await;
    let sa = fake.service_account(PROJECT);
    let proxy = start_google(
        name,
        &fake,
        &[Pool::Gemini("gm-a", KEY_A), Pool::Vertex("vx-a", &sa)],
    );
    (fake, proxy)
}

/// The fake's usage in OpenAI terms: thinking counts as (reasoning) completion tokens.
fn expected_usage(u: GoogleUsage) -> FakeUsage {
    FakeUsage {
        prompt_tokens: u.prompt_token_count,
        completion_tokens: u.candidates_token_count + u.thoughts_token_count,
        cached_tokens: u.cached_content_token_count,
        reasoning_tokens: u.thoughts_token_count,
    }
}

fn tools_behavior() -> GoogleBehavior {
    GoogleBehavior {
        tool_calls: vec![
            ("get_weather".into(), json!({"city": "Paris"})),
            ("get_time".into(), json!({"tz": "Europe/Paris"})),
        ],
        ..GoogleBehavior::default()
    }
}

/// The fake refused nothing but what `expected` names, and no seller secret reached the log.
fn assert_clean(fake: &FakeGoogle, proxy: &ProxyProcess, expected: &[&str]) {
    let unexpected: Vec<String> = fake
        .rejected()
        .into_iter()
        .filter(|r| !expected.iter().any(|e| r.contains(e)))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    proxy.assert_log_free_of(
        &[KEY_A, KEY_B, CANARY, "ya29.", "PRIVATE KEY"],
        &["x-goog-api-key", "authorization"],
    );
}

fn assert_usage(usage: &Value, want: FakeUsage) {
    assert_eq!(usage["prompt_tokens"], want.prompt_tokens, "{usage}");
    assert_eq!(
        usage["completion_tokens"], want.completion_tokens,
        "{usage}"
    );
    assert_eq!(
        usage["total_tokens"],
        want.prompt_tokens + want.completion_tokens
    );
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"],
        want.cached_tokens
    );
    assert_eq!(
        usage["completion_tokens_details"]["reasoning_tokens"],
        want.reasoning_tokens
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_with_usage_and_native_credentials() {
    let (fake, proxy) = both_apis("gg-text", GoogleBehavior::default()).await;
    let want = expected_usage(GoogleBehavior::default().usage);
    for model in ["gemini-test", "vertex-test"] {
        let body = brief_chat(
            model,
            json!({"temperature": 0.2, "top_p": 0.9, "stop": ["\n\n"], "max_tokens": 64, "seed": 3}),
        );
        let resp = post(&proxy, KEY, &body).await;
        assert_eq!(resp.status(), 200, "{model}");
        let id = request_id(&resp);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(body["model"], UPSTREAM_MODEL);
        assert_eq!(body["choices"][0]["message"]["content"], GOOGLE_REPLY);
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_usage(&body["usage"], want);
        assert_eq!(usage_of(&proxy.record_for(&id).unwrap()), want);
    }
    let received = fake.received();
    let gemini = &received[0];
    assert_eq!(gemini.path, format!("{GEMINI_PATH}:generateContent"));
    assert_eq!(gemini.headers["x-goog-api-key"], KEY_A);
    assert!(!gemini.headers.contains_key("authorization"));
    assert_eq!(
        gemini.body,
        json!({
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "contents": [{"role": "user", "parts": [{"text": "Say hi"}]}],
            "generationConfig": {"maxOutputTokens": 64, "temperature": 0.2, "topP": 0.9,
                "stopSequences": ["\n\n"], "seed": 3},
        })
    );
    let vertex = &received[1];
    assert_eq!(
        vertex.path,
        format!("/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/{UPSTREAM_MODEL}:generateContent")
    );
    assert!(vertex.headers["authorization"].starts_with("Bearer ya29."));
    assert!(!vertex.headers.contains_key("x-goog-api-key"));
    assert_eq!(vertex.body, gemini.body);
    // A second Vertex request reuses the token.
    let resp = post(&proxy, KEY, &brief_chat("vertex-test", json!({}))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(fake.tokens_minted(), 1);
    assert_clean(&fake, &proxy, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_ends_with_usage_and_done() {
    let (fake, proxy) = both_apis("gg-stream", GoogleBehavior::default()).await;
    let want = expected_usage(GoogleBehavior::default().usage);
    for model in ["gemini-test", "vertex-test"] {
        for include_usage in [true, false] {
            let mut body = brief_chat(model, json!({"stream": true}));
            if include_usage {
                body["stream_options"] = json!({"include_usage": true});
            }
            let (chunks, done, id) = stream_chunks(&proxy, &body).await;
            assert!(done, "{model}");
            assert_eq!(streamed_text(&chunks), GOOGLE_REPLY);
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
            let finish: Vec<&Value> = chunks
                .iter()
                .filter(|c| c["choices"][0]["finish_reason"].is_string())
                .collect();
            assert_eq!(finish.len(), 1);
            assert_eq!(finish[0]["choices"][0]["finish_reason"], "stop");
            let usage_chunk = chunks.iter().find(|c| c["choices"] == json!([]));
            assert_eq!(usage_chunk.is_some(), include_usage);
            if let Some(u) = usage_chunk {
                assert_usage(&u["usage"], want);
                assert!(chunks.last().unwrap()["choices"] == json!([]));
            }
            assert_eq!(usage_of(&proxy.record_for(&id).unwrap()), want);
        }
    }
    let paths: Vec<String> = fake.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths[0],
        format!("{GEMINI_PATH}:streamGenerateContent?alt=sse")
    );
    assert!(paths[3].ends_with(":streamGenerateContent?alt=sse"));
    assert_clean(&fake, &proxy, &[]);
}

/// The calls of a stream, joined by index: `(id, name, arguments)`.
fn streamed_calls(chunks: &[Value]) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for c in chunks {
        for call in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = call["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                calls.push(Default::default());
            }
            let entry = &mut calls[i];
            entry.0.push_str(call["id"].as_str().unwrap_or_default());
            entry
                .1
                .push_str(call["function"]["name"].as_str().unwrap_or_default());
            entry
                .2
                .push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_tool_calls_whole_and_streamed_then_tool_results() {
    let (fake, proxy) = both_apis("gg-tools", tools_behavior()).await;
    for model in ["gemini-test", "vertex-test"] {
        let body = brief_chat(
            model,
            json!({"tools": weather_tools(), "tool_choice": "required",
            "parallel_tool_calls": true}),
        );
        let resp: Value = post(&proxy, KEY, &body).await.json().await.unwrap();
        let choice = &resp["choices"][0];
        // Google says STOP after a function call; OpenAI clients need tool_calls.
        assert_eq!(choice["finish_reason"], "tool_calls", "{resp}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap().clone();
        assert_eq!(calls.len(), 2);
        assert_ne!(calls[0]["id"], calls[1]["id"]);
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[1]["function"]["name"], "get_time");
        let args: Value =
            serde_json::from_str(calls[1]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"tz": "Europe/Paris"}));
        let sent = last_body(&fake);
        assert_eq!(
            sent["tools"][0]["functionDeclarations"][0],
            json!({"name": "get_weather", "description": "Weather in a city",
                "parametersJsonSchema": {"type": "object",
                    "properties": {"city": {"type": "string"}}, "required": ["city"]}})
        );
        assert_eq!(
            sent["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY"}})
        );

        // Streamed: each call whole at its index, with id and name.
        let mut streamed = body.clone();
        streamed["stream"] = true.into();
        streamed["stream_options"] = json!({"include_usage": true});
        let (chunks, done, _) = stream_chunks(&proxy, &streamed).await;
        assert!(done);
        let got = streamed_calls(&chunks);
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].1.as_str(), got[1].1.as_str()),
            ("get_weather", "get_time")
        );
        assert!(got[0].0.starts_with("call_") && got[0].0 != got[1].0);
        assert_eq!(
            serde_json::from_str::<Value>(&got[0].2).unwrap(),
            json!({"city": "Paris"})
        );
        let finish = chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str())
            .unwrap();
        assert_eq!(finish, "tool_calls");

        // The follow-up turn: results go back named by function, found through the call ids.
        let mut follow = brief_chat(model, json!({"tools": weather_tools()}));
        let messages = follow["messages"].as_array_mut().unwrap();
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": calls}));
        messages.push(json!({"role": "tool", "tool_call_id": calls[0]["id"], "content": "18C"}));
        messages.push(json!({"role": "tool", "tool_call_id": calls[1]["id"],
            "content": "{\"time\": \"12:00\"}"}));
        let resp: Value = post(&proxy, KEY, &follow).await.json().await.unwrap();
        assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp}");
        assert_eq!(
            resp["choices"][0]["message"]["content"],
            r#"Function results: get_weather={"result":"18C"}; get_time={"time":"12:00"}."#
        );
        let sent = last_body(&fake);
        assert_eq!(
            sent["contents"][1]["parts"],
            json!([{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_time", "args": {"tz": "Europe/Paris"}}}])
        );
        assert_eq!(
            sent["contents"][2],
            json!({"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"result": "18C"}}},
                {"functionResponse": {"name": "get_time", "response": {"time": "12:00"}}}]})
        );
    }
    assert_clean(&fake, &proxy, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thought_signature_survives_the_round_trip() {
    let behavior = GoogleBehavior {
        thought_signature: Some("c2lnbmVkLXRob3VnaHQ=".into()),
        ..tools_behavior()
    };
    let (fake, proxy) = both_apis("gg-signature", behavior).await;
    let body = brief_chat("gemini-test", json!({"tools": weather_tools()}));
    let resp: Value = post(&proxy, KEY, &body).await.json().await.unwrap();
    let calls = resp["choices"][0]["message"]["tool_calls"].clone();
    let mut follow = body.clone();
    let messages = follow["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": calls}));
    for call in calls.as_array().unwrap() {
        messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "ok"}));
    }
    let resp = post(&proxy, KEY, &follow).await;
    assert_eq!(resp.status(), 200, "{:?}", fake.rejected());
    let sent = last_body(&fake);
    assert_eq!(
        sent["contents"][1]["parts"][0]["thoughtSignature"],
        "c2lnbmVkLXRob3VnaHQ="
    );
    assert_clean(&fake, &proxy, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_input_json_mode_and_max_tokens() {
    let (fake, proxy) = both_apis("gg-image", GoogleBehavior::default()).await;
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";
    for model in ["gemini-test", "vertex-test"] {
        let body = brief_chat(
            model,
            json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}}]}]}),
        );
        let resp: Value = post(&proxy, KEY, &body).await.json().await.unwrap();
        assert_eq!(
            resp["choices"][0]["message"]["content"],
            format!("Received image/png (70 bytes). {GOOGLE_REPLY}")
        );
        let sent = last_body(&fake);
        assert_eq!(
            sent["contents"][0]["parts"][1],
            json!({"inlineData": {"mimeType": "image/png", "data": png}})
        );

        let body = brief_chat(model, json!({"response_format": {"type": "json_object"}}));
        let resp: Value = post(&proxy, KEY, &body).await.json().await.unwrap();
        assert_eq!(resp["choices"][0]["message"]["content"], GOOGLE_JSON_REPLY);
        let schema = json!({"type": "object", "properties": {"answer": {"type": "string"}}});
        let body = brief_chat(
            model,
            json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "a", "schema": schema}}}),
        );
        let resp: Value = post(&proxy, KEY, &body).await.json().await.unwrap();
        assert_eq!(resp["choices"][0]["message"]["content"], GOOGLE_JSON_REPLY);
        let sent = last_body(&fake);
        assert_eq!(
            sent["generationConfig"],
            json!({"responseMimeType": "application/json", "responseJsonSchema": schema})
        );

        let body = brief_chat(model, json!({"max_completion_tokens": 3}));
        let resp: Value = post(&proxy, KEY, &body).await.json().await.unwrap();
        assert_eq!(resp["choices"][0]["finish_reason"], "length");
        assert_eq!(resp["choices"][0]["message"]["content"], "Hello from the");
        let (chunks, done, _) = stream_chunks(
            &proxy,
            &brief_chat(model, json!({"max_tokens": 3, "stream": true})),
        )
        .await;
        assert!(done);
        assert_eq!(streamed_text(&chunks), "Hello from the");
        assert!(chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "length"));
    }
    assert_clean(&fake, &proxy, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mid_stream_error_and_a_blocked_prompt() {
    let fake = fake(GoogleBehavior::default()).await;
    fake.set_behavior(
        KEY_A,
        GoogleBehavior {
            stream_error: true,
            ..GoogleBehavior::default()
        },
    );
    fake.set_behavior(
        KEY_B,
        GoogleBehavior {
            prompt_blocked: true,
            ..GoogleBehavior::default()
        },
    );
    let proxy = start_google("gg-stream-error", &fake, &[Pool::Gemini("gm-a", KEY_A)]);
    let resp = post(
        &proxy,
        KEY,
        &brief_chat("gemini-test", json!({"stream": true})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let data = sse_data(&resp.text().await.unwrap());
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_openai_error(&last);
    assert_eq!(last["error"]["type"], "server_error");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    assert_clean(&fake, &proxy, &[]);
    drop(proxy);

    let proxy = start_google("gg-blocked", &fake, &[Pool::Gemini("gm-b", KEY_B)]);
    let resp: Value = post(&proxy, KEY, &brief_chat("gemini-test", json!({})))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(resp["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(resp["choices"][0]["message"]["content"], "");
    let (chunks, done, _) =
        stream_chunks(&proxy, &brief_chat("gemini-test", json!({"stream": true}))).await;
    assert!(done);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "content_filter"));
    assert_clean(&fake, &proxy, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_throttling_and_overload_fail_over() {
    // KEY_A unknown to the fake: Gemini's 400 API_KEY_INVALID, a credential failure.
    let fake = FakeGoogle::start(GoogleBehavior::default()).await.unwrap();
    fake.allow_key(KEY_B);
    let proxy = start_google(
        "gg-revoked",
        &fake,
        &[Pool::Gemini("gm-a", KEY_A), Pool::Gemini("gm-b", KEY_B)],
    );
    for stream in [false, true] {
        let resp = post(
            &proxy,
            KEY,
            &brief_chat("gemini-test", json!({"stream": stream})),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let id = request_id(&resp);
        let _ = resp.text().await.unwrap();
        assert_eq!(proxy.record_for(&id).unwrap()["pool_id"], "gm-b");
    }
    // Quarantined: the second request did not try the revoked key again.
    let refused = fake.rejected();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_clean(&fake, &proxy, &["API_KEY_INVALID"]);
    drop(proxy);

    for (status, name) in [(429, "throttled"), (503, "overloaded")] {
        let fake = fake_with(KEY_A, status, None).await;
        let sa = fake.service_account(PROJECT);
        let other = fake.service_account(PROJECT);
        fake.set_behavior(
            &sa.client_email,
            GoogleBehavior {
                status,
                ..GoogleBehavior::default()
            },
        );
        let proxy = start_google(
            &format!("gg-failover-{name}"),
            &fake,
            &[
                Pool::Gemini("gm-a", KEY_A),
                Pool::Gemini("gm-b", KEY_B),
                Pool::Vertex("vx-a", &sa),
                Pool::Vertex("vx-b", &other),
            ],
        );
        for (model, want_pool) in [("gemini-test", "gm-b"), ("vertex-test", "vx-b")] {
            let resp = post(&proxy, KEY, &brief_chat(model, json!({}))).await;
            assert_eq!(resp.status(), 200, "{name} {model}");
            let id = request_id(&resp);
            let _ = resp.text().await.unwrap();
            let rec = proxy.record_for(&id).unwrap();
            assert_eq!(rec["pool_id"], want_pool, "{name}");
            assert_eq!(
                usage_of(&rec),
                expected_usage(GoogleBehavior::default().usage)
            );
        }
        assert_clean(&fake, &proxy, &[]);
    }

    // The last pool's 429 reaches the client with the delay Google named in the body
    // (`RetryInfo`), as a `retry-after` header.
    let fake = fake_with(KEY_A, 429, Some(7)).await;
    let proxy = start_google("gg-last-429", &fake, &[Pool::Gemini("gm-a", KEY_A)]);
    let resp = post(&proxy, KEY, &brief_chat("gemini-test", json!({}))).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    let body: Value = resp.json().await.unwrap();
    assert_openai_error(&body);

    // A request Google refuses is relayed as an OpenAI 400, no failover.
    let fake = fake_with(KEY_A, 400, None).await;
    let proxy = start_google(
        "gg-400",
        &fake,
        &[Pool::Gemini("gm-a", KEY_A), Pool::Gemini("gm-b", KEY_B)],
    );
    let resp = post(&proxy, KEY, &brief_chat("gemini-test", json!({}))).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_openai_error(&body);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(
        body["error"]["message"],
        "Request contains an invalid argument."
    );
    assert_eq!(fake.received().len(), 1);
    // Refused before any upstream call.
    let resp = post(&proxy, KEY, &brief_chat("gemini-test", json!({"n": 2}))).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(fake.received().len(), 1);
}

/// The body of the last request the fake accepted.
fn last_body(fake: &FakeGoogle) -> Value {
    fake.received().pop().unwrap().body
}

/// A fake where `key` answers `status` (with `retry_after_s`) and [`KEY_B`] is healthy.
async fn fake_with(key: &str, status: u16, retry_after_s: Option<u64>) -> FakeGoogle {
    let fake = fake(GoogleBehavior::default()).await;
    fake.set_behavior(
        key,
        GoogleBehavior {
            status,
            retry_after_s,
            ..GoogleBehavior::default()
        },
    );
    fake
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vertex_tokens_are_refreshed_before_they_expire() {
    let fake = fake(GoogleBehavior::default()).await;
    fake.set_token_lifetime(Duration::from_secs(2));
    let sa = fake.service_account(PROJECT);
    let proxy = start_google("gg-refresh", &fake, &[Pool::Vertex("vx-a", &sa)]);
    let started = std::time::Instant::now();
    let mut sent = 0;
    // ~3.2 s of requests, one every 200 ms, streamed and not.
    while started.elapsed() < Duration::from_millis(3200) && sent < 40 {
        let body = brief_chat("vertex-test", json!({"stream": sent % 2 == 1}));
        let resp = post(&proxy, KEY, &body).await;
        assert_eq!(resp.status(), 200, "request {sent}: {:?}", fake.rejected());
        let _ = resp.text().await.unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sent >= 8, "{sent}");
    assert!(fake.tokens_minted() >= 2, "{}", fake.tokens_minted());
    assert_eq!(fake.received().len(), sent);
    // Never an expired (or unknown) token.
    assert_clean(&fake, &proxy, &[]);
}

/// A minted token the provider stops accepting is dropped: the request fails over, the pool only
/// rests (no credential quarantine), and its next use mints a new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_access_token_is_dropped_not_quarantined() {
    let fake = fake(GoogleBehavior::default()).await;
    let (a, b) = (fake.service_account(PROJECT), fake.service_account(PROJECT));
    let proxy = start_google(
        "gg-revoked-token",
        &fake,
        &[Pool::Vertex("vx-a", &a), Pool::Vertex("vx-b", &b)],
    );
    let body = brief_chat("vertex-test", json!({}));
    let ask = || post(&proxy, KEY, &body);
    let resp = ask().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        proxy.record_for(&request_id(&resp)).unwrap()["pool_id"],
        "vx-a"
    );
    assert_eq!(fake.tokens_minted(), 1);

    fake.revoke_tokens();
    let resp = ask().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        proxy.record_for(&request_id(&resp)).unwrap()["pool_id"],
        "vx-b"
    );
    assert_eq!(fake.tokens_minted(), 2);
    let log = proxy.log();
    assert!(
        log.lines()
            .any(|l| l.contains("vx-a") && l.contains("token_refused")),
        "{log}"
    );
    assert!(!log.contains("kind=\"credential\""), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_service_account_backs_its_pool_off() {
    let fake = fake(GoogleBehavior::default()).await;
    // A key file the token endpoint does not know (a deleted key, say).
    let unknown = TestServiceAccount::generate("deleted", PROJECT, &fake.token_uri());
    let good = fake.service_account(PROJECT);
    let proxy = start_google(
        "gg-bad-sa",
        &fake,
        &[
            Pool::Vertex("vx-bad", &unknown),
            Pool::Vertex("vx-good", &good),
        ],
    );
    // Eight at once, all queued on the bad pool's first mint, then more after it: the waiters
    // share the refusal instead of minting again one by one.
    let ask = |stream: bool| {
        let proxy = &proxy;
        async move {
            let resp = post(
                proxy,
                KEY,
                &brief_chat("vertex-test", json!({"stream": stream})),
            )
            .await;
            assert_eq!(resp.status(), 200);
            let id = request_id(&resp);
            let _ = resp.text().await.unwrap();
            assert_eq!(proxy.record_for(&id).unwrap()["pool_id"], "vx-good");
        }
    };
    futures_util::future::join_all((0..8).map(|i| ask(i % 2 == 0))).await;
    for stream in [false, true] {
        ask(stream).await;
    }
    // One refused mint, however many requests followed.
    let refused: Vec<String> = fake
        .rejected()
        .into_iter()
        .filter(|r| r.starts_with("token:"))
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("invalid_grant"));
    assert_eq!(fake.received().len(), 10);
    assert_clean(&fake, &proxy, &["invalid_grant"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gemini_key_reaches_the_log() {
    // The canary key is revoked (so its failure is logged) and a client puts it in the URL.
    let fake = fake(GoogleBehavior::default()).await;
    let proxy = start_google(
        "gg-canary",
        &fake,
        &[
            Pool::Gemini("gm-canary", CANARY),
            Pool::Gemini("gm-b", KEY_B),
        ],
    );
    for stream in [false, true] {
        let resp = post(
            &proxy,
            KEY,
            &brief_chat("gemini-test", json!({"stream": stream})),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let _ = resp.text().await.unwrap();
    }
    for path in [
        format!("/chat/completions?key={CANARY}"),
        format!("/models/gemini-test:generateContent?key={CANARY}"),
    ] {
        let resp = client()
            .post(format!("{}{path}", proxy.base_url()))
            .bearer_auth(KEY)
            .header("x-goog-api-key", CANARY)
            .json(&brief_chat("gemini-test", json!({})))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(!text.contains(CANARY), "{status} {text}");
    }
    // The request log is written before the response ends; give the logger a moment anyway.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = proxy.log();
    // The revoked key's quarantine was logged (by pool id, not by key).
    assert!(log.contains("gm-canary"), "{log}");
    assert!(!log.contains(CANARY), "the canary key is in the log");
    assert!(
        !log.contains(&CANARY[10..]),
        "part of the canary key is in the log"
    );
    assert_clean(&fake, &proxy, &["API_KEY_INVALID"]);
}
