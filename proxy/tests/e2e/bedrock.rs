//! The native Bedrock adapter end to end: the real proxy binary with `bedrock` pools in front of
//! the fake Converse API, which verifies SigV4 signatures (with its own verifier) or Bedrock API
//! keys and refuses any body that breaks Converse's rules.

use serde_json::{json, Value};
use tokn_testkit::fake_bedrock::BEDROCK_REPLY;
use tokn_testkit::{BedrockBehavior, BedrockUsage, FakeBedrock};

use crate::common::*;

const REGION: &str = "us-west-2";
const MODEL_ID: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";
const MODEL_PATH: &str = "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0";

const KEY_ID_A: &str = "AKIDEXAMPLEA0000001";
const SECRET_A: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYsecretA01";
const KEY_ID_B: &str = "AKIDEXAMPLEB0000002";
const SECRET_B: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYsecretB02";
const TEMP_KEY_ID: &str = "ASIATEMPORARY000003";
const TEMP_SECRET: &str = "tempSecretKeyForStsCredentials0000003";
const SESSION_TOKEN: &str = "IQoJb3JpZ2luX2VjEFakeSessionToken//0003==";
const API_KEY: &str = "ABSKQmVkcm9ja0FQSUtleS1mYWtlLWtleS0wMDAx";

/// How a pool authenticates.
enum Auth<'a> {
    Keys(&'a str, &'a str, Option<&'a str>),
    ApiKey(&'a str),
}

/// `bedrock-test` (upstream [`MODEL_ID`]) served by `pools` `(id, base_url, auth)` in order.
fn start_bedrock(name: &str, pools: &[(&str, &str, Auth<'_>)]) -> ProxyProcess {
    let mut toml = format!(
        r#"
[[models]]
id = "bedrock-test"
provider = "bedrock"
upstream_model = "{MODEL_ID}"
input_price_micros_per_mtok = 1_000_000
output_price_micros_per_mtok = 5_000_000
cached_input_price_micros_per_mtok = 100_000
"#
    );
    for (id, url, auth) in pools {
        let auth = match auth {
            Auth::Keys(key_id, secret, token) => {
                let mut s =
                    format!("access_key_id = \"{key_id}\"\nsecret_access_key = \"{secret}\"\n");
                if let Some(t) = token {
                    s.push_str(&format!("session_token = \"{t}\"\n"));
                }
                s
            }
            Auth::ApiKey(k) => format!("api_key = \"{k}\"\n"),
        };
        toml.push_str(&format!(
            "\n[[pools]]\nid = \"{id}\"\nprovider = \"bedrock\"\nbase_url = \"{url}\"\nregion = \"{REGION}\"\n{auth}models = [\"bedrock-test\"]\nprice_ratio = 0.7\n"
        ));
    }
    start_with_buyer_key(name, &toml)
}

async fn fake(behavior: BedrockBehavior) -> FakeBedrock {
    let fake = FakeBedrock::start(REGION, behavior).await.unwrap();
    fake.add_aws_key(KEY_ID_A, SECRET_A, None);
    fake.add_aws_key(KEY_ID_B, SECRET_B, None);
    fake.add_aws_key(TEMP_KEY_ID, TEMP_SECRET, Some(SESSION_TOKEN));
    fake.add_api_key(API_KEY);
    fake
}

async fn one_pool(name: &str, behavior: BedrockBehavior) -> (FakeBedrock, ProxyProcess) {
    let fake = fake(behavior).await;
    let proxy = start_bedrock(
        name,
        &[(
            "br-a",
            &fake.base_url(),
            Auth::Keys(KEY_ID_A, SECRET_A, None),
        )],
    );
    (fake, proxy)
}

fn ask(extra: Value) -> Value {
    brief_chat("bedrock-test", extra)
}

/// The fake's usage in OpenAI terms: prompt = input + cache reads + cache writes.
fn expected_usage(u: BedrockUsage) -> FakeUsage {
    FakeUsage {
        prompt_tokens: u.input_tokens + u.cache_read_input_tokens + u.cache_write_input_tokens,
        completion_tokens: u.output_tokens,
        cached_tokens: u.cache_read_input_tokens,
        reasoning_tokens: 0,
    }
}

fn tools_behavior() -> BedrockBehavior {
    BedrockBehavior {
        tool_calls: vec![
            ("get_weather".into(), json!({"city": "Paris"})),
            ("get_time".into(), json!({"tz": "Europe/Paris"})),
        ],
        ..BedrockBehavior::default()
    }
}

fn assert_clean(fake: &FakeBedrock, proxy: &ProxyProcess) {
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    proxy.assert_log_free_of(
        &[SECRET_A, SECRET_B, TEMP_SECRET, SESSION_TOKEN, API_KEY],
        &["authorization"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_signed_with_sigv4_and_a_colon_model_id() {
    let (fake, proxy) = one_pool("br-text", BedrockBehavior::default()).await;
    let resp = post(
        &proxy,
        KEY,
        &ask(json!({"temperature": 0.2, "top_p": 0.9, "stop": ["\n\n"], "max_tokens": 64})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], BEDROCK_REPLY);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let want = expected_usage(BedrockBehavior::default().usage);
    assert_eq!(body["usage"]["prompt_tokens"], want.prompt_tokens);
    assert_eq!(body["usage"]["completion_tokens"], want.completion_tokens);
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"],
        want.cached_tokens
    );
    assert_eq!(usage_of(&proxy.record_for(&id).unwrap()), want);

    let got = &fake.received()[0];
    assert_eq!(got.path, format!("{MODEL_PATH}/converse"));
    assert!(got.headers["authorization"]
        .starts_with(&format!("AWS4-HMAC-SHA256 Credential={KEY_ID_A}/")));
    assert!(!got.headers.contains_key("x-amz-security-token"));
    assert_eq!(got.body["system"], json!([{"text": "Be brief."}]));
    assert_eq!(
        got.body["messages"],
        json!([{"role": "user", "content": [{"text": "Say hi"}]}])
    );
    assert_eq!(
        got.body["inferenceConfig"],
        json!({"maxTokens": 64, "temperature": 0.2, "topP": 0.9, "stopSequences": ["\n\n"]})
    );
    assert_clean(&fake, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_ends_with_usage_after_message_stop() {
    let (fake, proxy) = one_pool("br-stream", BedrockBehavior::default()).await;
    let want = expected_usage(BedrockBehavior::default().usage);
    for include_usage in [true, false] {
        let mut body = ask(json!({"stream": true}));
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let (chunks, done, id) = stream_chunks(&proxy, &body).await;
        assert!(done);
        assert_eq!(streamed_text(&chunks), BEDROCK_REPLY);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let finish: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["finish_reason"].is_string())
            .collect();
        assert_eq!(finish.len(), 1);
        assert_eq!(finish[0]["choices"][0]["finish_reason"], "stop");
        let usage_chunk = chunks.iter().find(|c| c["choices"] == json!([]));
        assert_eq!(usage_chunk.is_some(), include_usage);
        if let Some(u) = usage_chunk {
            assert_eq!(u["usage"]["prompt_tokens"], want.prompt_tokens);
            assert_eq!(u["usage"]["completion_tokens"], want.completion_tokens);
            assert_eq!(
                u["usage"]["prompt_tokens_details"]["cached_tokens"],
                want.cached_tokens
            );
            // The usage chunk comes last, after the finish chunk.
            assert!(chunks.last().unwrap()["choices"] == json!([]));
        }
        assert_eq!(usage_of(&proxy.record_for(&id).unwrap()), want);
    }
    let paths: Vec<String> = fake.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, vec![format!("{MODEL_PATH}/converse-stream"); 2]);
    assert_clean(&fake, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_whole_and_streamed_then_tool_results() {
    let (fake, proxy) = one_pool("br-tools", tools_behavior()).await;
    let body = ask(json!({"tools": weather_tools(), "tool_choice": "required"}));
    let resp: Value = post(&proxy, KEY, &body).await.json().await.unwrap();
    let choice = &resp["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let calls = choice["message"]["tool_calls"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["id"], "tooluse_fake00");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert_eq!(calls[1]["function"]["name"], "get_time");
    let sent = &fake.received()[0].body;
    assert_eq!(
        sent["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"]["required"],
        json!(["city"])
    );
    assert_eq!(
        sent["toolConfig"]["tools"][0]["toolSpec"]["description"],
        "Weather in a city"
    );
    assert_eq!(sent["toolConfig"]["toolChoice"], json!({"any": {}}));

    // Streamed: each call announced with id and name at its OpenAI index, then its arguments.
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    streamed["tool_choice"] = json!({"type": "function", "function": {"name": "get_weather"}});
    let (chunks, done, _) = stream_chunks(&proxy, &streamed).await;
    assert!(done);
    let mut names = vec![String::new(); 2];
    let mut arguments = vec![String::new(); 2];
    for c in &chunks {
        for call in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = call["index"].as_u64().unwrap() as usize;
            if let Some(n) = call["function"]["name"].as_str() {
                names[i].push_str(n);
                assert!(call["id"].is_string());
            }
            arguments[i].push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
    }
    assert_eq!(names, ["get_weather", "get_time"]);
    assert_eq!(
        serde_json::from_str::<Value>(&arguments[1]).unwrap(),
        json!({"tz": "Europe/Paris"})
    );
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap();
    assert_eq!(finish, "tool_calls");
    assert_eq!(
        fake.received()[1].body["toolConfig"]["toolChoice"],
        json!({"tool": {"name": "get_weather"}})
    );

    // The follow-up turn: the assistant's calls and the tool results go back natively.
    let mut follow = ask(json!({"tools": weather_tools()}));
    let messages = follow["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": calls}));
    messages.push(json!({"role": "tool", "tool_call_id": "tooluse_fake00", "content": "18C"}));
    messages.push(json!({"role": "tool", "tool_call_id": "tooluse_fake01", "content": "noon"}));
    let resp: Value = post(&proxy, KEY, &follow).await.json().await.unwrap();
    assert_eq!(
        resp["choices"][0]["message"]["content"],
        "Tool results: 18C; noon."
    );
    let sent = &fake.received()[2].body;
    assert_eq!(
        sent["messages"][1]["content"][0]["toolUse"],
        json!({"toolUseId": "tooluse_fake00", "name": "get_weather", "input": {"city": "Paris"}})
    );
    assert_eq!(
        sent["messages"][2]["content"][1]["toolResult"],
        json!({"toolUseId": "tooluse_fake01", "content": [{"text": "noon"}], "status": "success"})
    );
    assert_clean(&fake, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_input_and_max_tokens_stop() {
    let (fake, proxy) = one_pool("br-image", BedrockBehavior::default()).await;
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";
    let body = ask(
        json!({"max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}}]}]}),
    );
    let resp: Value = post(&proxy, KEY, &body).await.json().await.unwrap();
    assert_eq!(resp["choices"][0]["finish_reason"], "length");
    assert_eq!(resp["choices"][0]["message"]["content"], "Hello from the");
    assert_eq!(resp["usage"]["completion_tokens"], 3);
    let sent = &fake.received()[0].body;
    assert_eq!(
        sent["messages"][0]["content"][1],
        json!({"image": {"format": "png", "source": {"bytes": png}}})
    );
    assert_clean(&fake, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_token_and_api_key_modes() {
    let fake = fake(BedrockBehavior::default()).await;
    let proxy = start_bedrock(
        "br-auth",
        &[(
            "br-temp",
            &fake.base_url(),
            Auth::Keys(TEMP_KEY_ID, TEMP_SECRET, Some(SESSION_TOKEN)),
        )],
    );
    for stream in [false, true] {
        let resp = post(&proxy, KEY, &ask(json!({"stream": stream}))).await;
        assert_eq!(resp.status(), 200);
        let _ = resp.text().await.unwrap();
    }
    for got in fake.received() {
        assert_eq!(got.headers["x-amz-security-token"], SESSION_TOKEN);
        assert!(got.headers["authorization"].contains("x-amz-security-token"));
    }
    assert_clean(&fake, &proxy);
    drop(proxy);

    let proxy = start_bedrock(
        "br-apikey",
        &[("br-key", &fake.base_url(), Auth::ApiKey(API_KEY))],
    );
    for stream in [false, true] {
        let resp = post(&proxy, KEY, &ask(json!({"stream": stream}))).await;
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(text.contains("Hello") || text.contains("from"), "{text}");
    }
    let last = fake.received().pop().unwrap();
    assert_eq!(last.headers["authorization"], format!("Bearer {API_KEY}"));
    assert!(!last.headers.contains_key("x-amz-date"));
    assert_clean(&fake, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_refused_by_the_fakes_verifier() {
    let fake = fake(BedrockBehavior::default()).await;
    let proxy = start_bedrock(
        "br-badsig",
        &[(
            "br-bad",
            &fake.base_url(),
            Auth::Keys(KEY_ID_A, SECRET_B, None),
        )],
    );
    let resp = post(&proxy, KEY, &ask(json!({}))).await;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    assert!(
        fake.rejected()[0].contains("signature"),
        "{:?}",
        fake.rejected()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_fail_over_or_are_relayed() {
    // The exception is named only in `x-amzn-ErrorType`: a quota 400 fails over, unlike a
    // ValidationException 400.
    for (status, exception, name) in [
        (403, None, "denied"),
        (429, None, "throttled"),
        (503, None, "unavailable"),
        (400, Some("ServiceQuotaExceededException"), "quota"),
    ] {
        let fake = fake(BedrockBehavior::default()).await;
        fake.set_behavior(
            KEY_ID_A,
            BedrockBehavior {
                status,
                exception,
                ..BedrockBehavior::default()
            },
        );
        let proxy = start_bedrock(
            &format!("br-failover-{name}"),
            &[
                (
                    "br-a",
                    &fake.base_url(),
                    Auth::Keys(KEY_ID_A, SECRET_A, None),
                ),
                (
                    "br-b",
                    &fake.base_url(),
                    Auth::Keys(KEY_ID_B, SECRET_B, None),
                ),
            ],
        );
        let resp = post(&proxy, KEY, &ask(json!({}))).await;
        assert_eq!(resp.status(), 200, "{name}");
        let id = request_id(&resp);
        let _ = resp.text().await.unwrap();
        let rec = proxy.record_for(&id).unwrap();
        assert_eq!(rec["pool_id"], "br-b", "{name}");
        assert_eq!(
            usage_of(&rec),
            expected_usage(BedrockBehavior::default().usage)
        );
        assert_clean(&fake, &proxy);
    }

    // A ValidationException is about the request: relayed as an OpenAI 400, no failover.
    let (fake, proxy) = one_pool("br-400", BedrockBehavior::default()).await;
    fake.set_behavior(
        KEY_ID_A,
        BedrockBehavior {
            status: 400,
            ..BedrockBehavior::default()
        },
    );
    let resp = post(&proxy, KEY, &ask(json!({}))).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_openai_error(&body);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(
        body["error"]["message"],
        "The provided request is not valid."
    );

    // Refused before any upstream call.
    let resp = post(&proxy, KEY, &ask(json!({"temperature": 1.5}))).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(fake.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_mid_stream_becomes_an_error_event() {
    let (fake, proxy) = one_pool(
        "br-exception",
        BedrockBehavior {
            stream_exception: true,
            ..BedrockBehavior::default()
        },
    )
    .await;
    let resp = post(&proxy, KEY, &ask(json!({"stream": true}))).await;
    assert_eq!(resp.status(), 200);
    let data = sse_data(&resp.text().await.unwrap());
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_openai_error(&last);
    assert_eq!(last["error"]["message"], "The model stream failed.");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    assert_clean(&fake, &proxy);
}
