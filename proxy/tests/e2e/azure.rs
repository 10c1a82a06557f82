//! The Azure OpenAI adapter end to end: the real proxy binary with `azure` pools in front of the
//! fake Azure resource, which refuses requests with the wrong path, api-version or key header.

use serde_json::{json, Value};
use tokn_testkit::fake_azure::{AZURE_MODEL, AZURE_REPLY};
use tokn_testkit::{AzureBehavior, FakeAzure};

use crate::common::*;

const SELLER_KEY: &str = "azure-seller-secret-key-0001";

/// The resource's deployments: one named by the pools, one named like the model.
const DEPLOYMENTS: &[&str] = &["gpt4o-prod", "gpt-4o"];

/// `gpt-az` (upstream `gpt-4o`) served by `pools` `(id, endpoint, key, extra TOML)` in order.
fn start_azure(name: &str, pools: &[(&str, &str, &str, &str)]) -> ProxyProcess {
    let mut toml = String::from(
        r#"
[[models]]
id = "gpt-az"
provider = "azure"
upstream_model = "gpt-4o"
input_price_micros_per_mtok = 2_500_000
output_price_micros_per_mtok = 10_000_000
cached_input_price_micros_per_mtok = 1_250_000
"#,
    );
    for (id, url, key, extra) in pools {
        toml.push_str(&format!(
            "\n[[pools]]\nid = \"{id}\"\nprovider = \"azure\"\nendpoint = \"{url}\"\napi_key = \"{key}\"\nmodels = [\"gpt-az\"]\nprice_ratio = 0.6\n{extra}\n"
        ));
    }
    start_with_buyer_key(name, &toml)
}

/// One pool on the deployments surface with deployment `gpt4o-prod`.
async fn one_pool(name: &str, behavior: AzureBehavior) -> (FakeAzure, ProxyProcess) {
    let fake = FakeAzure::start(behavior, DEPLOYMENTS).await.unwrap();
    let proxy = start_azure(
        name,
        &[(
            "az-a",
            &fake.base_url(),
            SELLER_KEY,
            "deployment = \"gpt4o-prod\"",
        )],
    );
    (fake, proxy)
}

fn ask(extra: Value) -> Value {
    brief_chat("gpt-az", extra)
}

fn usage_in(body: &Value) -> FakeUsage {
    let u = &body["usage"];
    FakeUsage {
        prompt_tokens: u["prompt_tokens"].as_u64().unwrap(),
        completion_tokens: u["completion_tokens"].as_u64().unwrap(),
        cached_tokens: u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        reasoning_tokens: u["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap(),
    }
}

/// Every chunk a client gets is a well-formed OpenAI chunk: an id, and either a usage chunk
/// (`choices: []`) or choices that all carry a `delta`.
fn assert_clean(chunks: &[Value]) {
    for c in chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert!(!c["id"].as_str().unwrap().is_empty(), "{c}");
        let choices = c["choices"].as_array().unwrap();
        if choices.is_empty() {
            assert!(c["usage"].is_object(), "{c}");
        }
        assert!(choices.iter().all(|ch| ch["delta"].is_object()), "{c}");
    }
}

fn finish_reason(chunks: &[Value]) -> String {
    chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_on_the_deployments_surface_with_usage() {
    let (fake, proxy) = one_pool("az-text", AzureBehavior::default()).await;
    let resp = post(&proxy, KEY, &ask(json!({}))).await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], AZURE_MODEL);
    assert_eq!(body["choices"][0]["message"]["content"], AZURE_REPLY);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let want = AzureBehavior::default().usage;
    assert_eq!(usage_in(&body), want);
    assert_eq!(usage_of(&proxy.record_for(&id).unwrap()), want);

    let got = &fake.received()[0];
    assert_eq!(
        got.path,
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(got.headers["api-key"], SELLER_KEY);
    assert!(!got.headers.contains_key("authorization"));
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    proxy.assert_log_free_of(&[SELLER_KEY], &["\"api-key\""]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_drop_filter_chunks_and_keep_usage() {
    let (fake, proxy) = one_pool("az-stream", AzureBehavior::default()).await;
    let want = AzureBehavior::default().usage;

    // The client did not ask for usage: none reaches it, but the proxy counts it.
    let (chunks, done, id) = stream_chunks(&proxy, &ask(json!({"stream": true}))).await;
    assert!(done);
    assert_clean(&chunks);
    assert_eq!(streamed_text(&chunks), AZURE_REPLY);
    assert_eq!(finish_reason(&chunks), "stop");
    assert!(chunks
        .iter()
        .all(|c| c.get("prompt_filter_results").is_none()));
    assert!(chunks.iter().all(|c| c["usage"].is_null()));
    assert_eq!(usage_of(&proxy.record_for(&id).unwrap()), want);

    let (chunks, done, id) = stream_chunks(
        &proxy,
        &ask(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert!(done);
    assert_clean(&chunks);
    assert_eq!(usage_in(chunks.last().unwrap()), want);
    assert_eq!(usage_of(&proxy.record_for(&id).unwrap()), want);
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    assert_eq!(
        fake.received()[0].body["stream_options"]["include_usage"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_streamed_and_whole() {
    let (_fake, proxy) = one_pool(
        "az-tools",
        AzureBehavior {
            tool_call: true,
            ..AzureBehavior::default()
        },
    )
    .await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let (chunks, done, _) =
        stream_chunks(&proxy, &ask(json!({"stream": true, "tools": tools}))).await;
    assert!(done);
    assert_clean(&chunks);
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(calls[0]["id"], "call_azure_1");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, r#"{"city":"Paris"}"#);
    assert_eq!(finish_reason(&chunks), "tool_calls");

    let resp = post(&proxy, KEY, &ask(json!({"tools": tools}))).await;
    let body: Value = resp.json().await.unwrap();
    let call = &body["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_and_output_filter_finish_reasons() {
    let (_fake, proxy) = one_pool("az-finish", AzureBehavior::default()).await;
    let resp = post(&proxy, KEY, &ask(json!({"max_tokens": 2}))).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hello from");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let (chunks, _, _) =
        stream_chunks(&proxy, &ask(json!({"max_tokens": 2, "stream": true}))).await;
    assert_eq!(streamed_text(&chunks), "Hello from");
    assert_eq!(finish_reason(&chunks), "length");

    let (_fake, proxy) = one_pool(
        "az-filtered",
        AzureBehavior {
            filter_output: true,
            ..AzureBehavior::default()
        },
    )
    .await;
    let resp = post(&proxy, KEY, &ask(json!({}))).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "content_filter");
    let (chunks, done, _) = stream_chunks(&proxy, &ask(json!({"stream": true}))).await;
    assert!(done);
    assert_clean(&chunks);
    assert_eq!(streamed_text(&chunks), "Hello");
    assert_eq!(finish_reason(&chunks), "content_filter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_url_surfaces_with_and_without_a_configured_deployment() {
    let fake = FakeAzure::start(AzureBehavior::default(), DEPLOYMENTS)
        .await
        .unwrap();
    let url = fake.base_url();
    let v1_url = format!("{url}/openai/v1");
    let cases: [(&str, &str, &str, &str); 4] = [
        (
            "",
            &url,
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            "gpt-4o",
        ),
        (
            "api_version = \"2025-04-01-preview\"\ndeployment = \"gpt4o-prod\"",
            &url,
            "/openai/deployments/gpt4o-prod/chat/completions?api-version=2025-04-01-preview",
            "gpt4o-prod",
        ),
        (
            "api_version = \"v1\"",
            &url,
            "/openai/v1/chat/completions",
            "gpt-4o",
        ),
        (
            "api_version = \"v1\"\ndeployment = \"gpt4o-prod\"",
            &v1_url,
            "/openai/v1/chat/completions",
            "gpt4o-prod",
        ),
    ];
    for (i, (extra, base, path, model)) in cases.iter().enumerate() {
        let proxy = start_azure(
            &format!("az-surface-{i}"),
            &[("az-a", base, SELLER_KEY, extra)],
        );
        for stream in [false, true] {
            let resp = post(&proxy, KEY, &ask(json!({"stream": stream}))).await;
            assert_eq!(resp.status(), 200, "{extra}");
            let _ = resp.text().await.unwrap();
            let got = fake.received().pop().unwrap();
            assert_eq!(got.path, *path, "{extra}");
            assert_eq!(got.body["model"], *model, "{extra}");
        }
    }
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_prompt_is_an_openai_content_filter_400_without_failover() {
    let fake = FakeAzure::start(AzureBehavior::default(), DEPLOYMENTS)
        .await
        .unwrap();
    fake.set_behavior(
        "az-key-a",
        AzureBehavior {
            status: 400,
            ..AzureBehavior::default()
        },
    );
    let proxy = start_azure(
        "az-filter-400",
        &[
            ("az-a", &fake.base_url(), "az-key-a", ""),
            ("az-b", &fake.base_url(), "az-key-b", ""),
        ],
    );
    let resp = post(&proxy, KEY, &ask(json!({}))).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(assert_openai_error(&body), "content_filter");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "prompt");
    assert_eq!(fake.received().len(), 1, "a refused prompt is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_pools_throttling_keeps_429_and_retry_after() {
    let (_fake, proxy) = one_pool(
        "az-429",
        AzureBehavior {
            status: 429,
            retry_after_s: Some(7),
            ..AzureBehavior::default()
        },
    )
    .await;
    let resp = post(&proxy, KEY, &ask(json!({}))).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_openai_error(&resp.json().await.unwrap());

    let (_fake, proxy) = one_pool(
        "az-500",
        AzureBehavior {
            status: 500,
            ..AzureBehavior::default()
        },
    )
    .await;
    let resp = post(&proxy, KEY, &ask(json!({}))).await;
    assert_eq!(resp.status(), 502);
    assert_openai_error(&resp.json().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_a_refused_key_401_and_on_throttling() {
    for status in [401, 429, 500] {
        let fake = FakeAzure::start(AzureBehavior::default(), DEPLOYMENTS)
            .await
            .unwrap();
        fake.set_behavior(
            "az-key-a",
            AzureBehavior {
                status,
                ..AzureBehavior::default()
            },
        );
        let proxy = start_azure(
            &format!("az-failover-{status}"),
            &[
                ("az-a", &fake.base_url(), "az-key-a", ""),
                ("az-b", &fake.base_url(), "az-key-b", ""),
            ],
        );
        for stream in [false, true] {
            let resp = post(&proxy, KEY, &ask(json!({"stream": stream}))).await;
            assert_eq!(resp.status(), 200, "{status}");
            let id = request_id(&resp);
            let _ = resp.text().await.unwrap();
            let rec = proxy.record_for(&id).unwrap();
            assert_eq!(rec["pool_id"], "az-b", "{status}");
            assert_eq!(usage_of(&rec), AzureBehavior::default().usage);
        }
        let keys: Vec<String> = fake
            .received()
            .iter()
            .map(|r| r.headers["api-key"].clone())
            .collect();
        // A refused key is quarantined and a throttled one paused at once; one 500 is one error,
        // and the pool stays in rotation until errors in a row eject it.
        let expected: &[&str] = if status == 500 {
            &["az-key-a", "az-key-b", "az-key-a", "az-key-b"]
        } else {
            &["az-key-a", "az-key-b", "az-key-b"]
        };
        assert_eq!(keys, expected, "{status}");
        proxy.assert_log_free_of(&["az-key-a"], &["\"api-key\""]);
    }
}

/// The fake refuses what Azure refuses, so a translation bug fails the tests above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_refuses_wrong_paths_versions_and_key_headers() {
    let fake = FakeAzure::start(AzureBehavior::default(), DEPLOYMENTS)
        .await
        .unwrap();
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let url = fake.base_url();
    let cases = [
        (
            format!("{url}/openai/deployments/gpt-4o/chat/completions"),
            true,
            false,
            404,
        ),
        (
            format!("{url}/openai/deployments/gpt-4o/chat/completions?api-version=1999-01-01"),
            true,
            false,
            404,
        ),
        (
            format!("{url}/openai/deployments/nope/chat/completions?api-version=2024-10-21"),
            true,
            false,
            404,
        ),
        (
            format!("{url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"),
            false,
            false,
            401,
        ),
        (
            format!("{url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"),
            true,
            true,
            401,
        ),
        (
            format!("{url}/openai/v1/chat/completions"),
            true,
            false,
            400,
        ),
        (format!("{url}/v1/chat/completions"), true, false, 404),
    ];
    for (target, api_key, bearer, want) in cases {
        let mut req = client().post(&target).json(&body);
        if api_key {
            req = req.header("api-key", "k");
        }
        if bearer {
            req = req.bearer_auth("k");
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), want, "{target}");
        let err: Value = resp.json().await.unwrap();
        assert!(err["error"]["code"].is_string(), "{err}");
        assert!(err["error"]["message"].is_string(), "{err}");
    }
    assert_eq!(fake.rejected().len(), 7);
    assert!(fake.received().is_empty());
}

/// An api-version too old for `stream_options` fails a stream with a relayed 400 (the proxy
/// always asks for usage), while whole answers work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_version_without_stream_options_refuses_streams() {
    let fake = FakeAzure::start(AzureBehavior::default(), DEPLOYMENTS)
        .await
        .unwrap();
    let proxy = start_azure(
        "az-old-version",
        &[(
            "az-a",
            &fake.base_url(),
            SELLER_KEY,
            "api_version = \"2024-06-01\"",
        )],
    );
    let resp = post(&proxy, KEY, &ask(json!({}))).await;
    assert_eq!(resp.status(), 200);
    let resp = post(&proxy, KEY, &ask(json!({"stream": true}))).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_openai_error(&body);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("stream_options"));
}
