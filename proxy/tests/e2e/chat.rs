use serde_json::{json, Value};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_chat_is_relayed_and_metered_exactly() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start(
        "nonstream",
        &[("pool-a", &fake.base_url(), "sk-seller-a")],
        "",
    );

    let resp = client()
        .post(format!("{}/chat/completions", proxy.base_url()))
        .bearer_auth(KEY)
        .header("x-client-secret-header", "must-not-reach-upstream")
        .json(&chat_body("gpt-test", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let cost_header: u64 = resp.headers()["x-tokn-cost-micros"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        tokn_testkit::fake::fake_text(5)
    );
    assert_eq!(body["usage"]["prompt_tokens"], 17);

    // What the upstream saw: its own model name, the seller's key, nothing of the client's.
    let got = fake.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["model"], "gpt-upstream");
    assert_eq!(got[0].headers["authorization"], "Bearer sk-seller-a");
    assert!(!got[0].headers.contains_key("x-client-secret-header"));
    assert!(got[0].body.get("stream_options").is_none());
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());

    let rec = proxy.record_for(&id).expect("usage record");
    assert_eq!(usage_of(&rec), Behavior::default().usage);
    assert_eq!(rec["usage_source"], "reported");
    assert_eq!(rec["pool_id"], "pool-a");
    assert_eq!(rec["key_id"], "key-main");
    assert_eq!(rec["account"], "acct-1");
    assert_eq!(rec["provider"], "openai");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["upstream_request_id"], "fake-upstream-req-1");
    // (17-3)×$1/M + 3×$0.50/M + 5×$2/M = 25.5 µ$ → 26 list; ×0.6 = 15.3 → 16 buyer.
    assert_eq!(rec["list_cost_micros"], 26);
    assert_eq!(rec["buyer_cost_micros"], 16);
    assert_eq!(cost_header, 16);
    assert_eq!(proxy.usage_records().len(), 1);
}

async fn stream_text(proxy: &ProxyProcess, body: &Value) -> (String, String) {
    let resp = post(proxy, KEY, body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert!(resp.headers().get("content-length").is_none());
    let id = request_id(&resp);
    (id, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_hides_the_usage_chunk_the_gateway_asked_for() {
    let fake = FakeUpstream::start(Behavior {
        chunks: 8,
        ..Behavior::default()
    })
    .await
    .unwrap();
    let proxy = start("stream-hide", &[("pool-a", &fake.base_url(), "sk-a")], "");

    let (id, text) = stream_text(&proxy, &chat_body("gpt-test", true)).await;
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks.iter().all(|c| c["usage"].is_null()),
        "usage chunk leaked: {text}"
    );
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, tokn_testkit::fake::fake_text(8));

    assert_eq!(
        fake.received()[0].body["stream_options"],
        json!({"include_usage": true})
    );
    let rec = proxy.record_for(&id).unwrap();
    assert_eq!(usage_of(&rec), Behavior::default().usage);
    assert_eq!(rec["stream"], true);
    assert!(rec["ttft_ms"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_passes_usage_through_when_the_client_asked() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start("stream-pass", &[("pool-a", &fake.base_url(), "sk-a")], "");
    let mut body = chat_body("gpt-test", true);
    body["stream_options"] = json!({"include_usage": true});
    let (id, text) = stream_text(&proxy, &body).await;

    let data = sse_data(&text);
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 17);
    assert_eq!(
        usage_chunk["usage"]["completion_tokens_details"]["reasoning_tokens"],
        1
    );
    assert_eq!(
        usage_of(&proxy.record_for(&id).unwrap()),
        Behavior::default().usage
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_deltas_arrive_byte_for_byte() {
    let behavior = Behavior {
        tool_call: true,
        ..Behavior::default()
    };
    let fake = FakeUpstream::start(behavior.clone()).await.unwrap();
    let proxy = start("toolcalls", &[("pool-a", &fake.base_url(), "sk-a")], "");
    let mut body = chat_body("gpt-test", true);
    body["stream_options"] = json!({"include_usage": true});
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let (_, text) = stream_text(&proxy, &body).await;

    let expected: String =
        tokn_testkit::fake::stream_events("chatcmpl-fake", "gpt-upstream", &behavior, true)
            .iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect();
    assert_eq!(text, expected);
    let args: String = sse_data(&text)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(args, r#"{"city":"Paris"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_model_answers_without_network_and_models_are_listed_per_key() {
    let proxy = start("mock", &[], "");
    let resp = post(&proxy, KEY, &chat_body("mock", false)).await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Hello from the tokn$ mock"));
    let rec = proxy.record_for(&id).unwrap();
    assert_eq!(
        rec["usage"]["completion_tokens"],
        body["usage"]["completion_tokens"]
    );
    assert_eq!(rec["provider"], "mock");

    let url = format!("{}/models", proxy.base_url());
    let ids = |list: Value| -> Vec<String> {
        let data = list["data"].as_array().unwrap().iter();
        data.map(|m| m["id"].as_str().unwrap().to_owned()).collect()
    };
    let bearer = format!("Bearer {KEY}");
    // Only what can be served: this proxy runs no `gpt-test` pool, and `paused-model`'s one
    // pool is paused.
    assert_eq!(
        ids(get_json(&url, ("authorization", &bearer)).await),
        ["mock"]
    );
    assert_eq!(
        ids(get_json(&url, ("x-api-key", LIMITED_KEY)).await),
        ["mock"]
    );
    let one = get_json(&format!("{url}/mock"), ("authorization", &bearer)).await;
    assert_eq!(
        one,
        json!({"id": "mock", "object": "model", "created": 0, "owned_by": "mock"})
    );

    let metrics = metrics_text(&proxy).await;
    assert!(metrics.contains("tokn_requests_total{model=\"mock\",outcome=\"ok\",provider=\"mock\",status_class=\"2xx\"} 1"), "{metrics}");
    assert!(!metrics.contains(KEY) && !metrics.contains("acct-1"));
    let ops = format!("http://127.0.0.1:{}", proxy.metrics_port);
    let status = get_json(&format!("{ops}/status"), ("accept", "application/json")).await;
    assert_eq!(status["status"], "ok");
    assert_eq!(status["config_version"], 1);
    assert_eq!(
        client()
            .get(format!("{ops}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Probes on the operations port are not API requests: no usage records for them.
    assert_eq!(proxy.usage_records().len(), 4);
}

/// The README's first command: the binary on its embedded default answers with `mock`.
/// The mock answers in well under a millisecond: its latency must still reach the histograms
/// (they were fed whole milliseconds, so every such request added 0), and the gateway's own
/// time is observed beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_histograms_keep_sub_millisecond_requests() {
    let proxy = start("mock", &[], "");
    for stream in [false, true] {
        let resp = post(&proxy, KEY, &chat_body("mock", stream)).await;
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let metrics = metrics_text(&proxy).await;
    let sample = |series: &str| -> f64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("no {series} in {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    for stream in ["false", "true"] {
        let labels = format!("{{model=\"mock\",stream=\"{stream}\"}}");
        let total = sample(&format!("tokn_request_duration_seconds_sum{labels}"));
        let overhead = sample(&format!("tokn_gateway_overhead_seconds_sum{labels}"));
        assert!(total > 0.0, "stream={stream}: {total}");
        assert!(overhead > 0.0 && overhead <= total, "{overhead} of {total}");
        assert_eq!(
            sample(&format!("tokn_gateway_overhead_seconds_count{labels}")),
            1.0
        );
    }
    assert!(sample("tokn_time_to_first_token_seconds_sum{model=\"mock\"}") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_serves_the_mock_model_with_the_demo_key() {
    let proxy = ProxyProcess::start_default(binary(), "default");
    for stream in [false, true] {
        let resp = post(&proxy, tokn_config::DEMO_KEY, &chat_body("mock", stream)).await;
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(text.contains("Hello"), "{text}");
    }
    let records = proxy.usage_records();
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|r| r["usage_source"] == "reported" && r["account"] == "demo-buyer"));
}
