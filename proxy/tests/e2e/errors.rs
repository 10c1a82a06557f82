use serde_json::{json, Value};

use crate::common::*;

/// Every bad request gets the right status and an OpenAI error body, reaches no upstream, and
/// still leaves exactly one usage record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_never_reach_an_upstream() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start(
        "errors",
        &[("pool-a", &fake.base_url(), "sk-a")],
        "request_body_bytes_max = 65536",
    );
    let url = format!("{}/chat/completions", proxy.base_url());
    let c = client();
    let ok_body = chat_body("gpt-test", false).to_string();
    let big = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "x".repeat(100_000)}]}).to_string();
    // Bodies an upstream would refuse, blaming the seller's pool: refused at the edge.
    let content = |raw: &[u8]| {
        let mut body = br#"{"model":"gpt-test","messages":[{"role":"user","content":"#.to_vec();
        body.extend_from_slice(raw);
        body.extend_from_slice(b"}]}");
        body
    };
    let lone_surrogate = content(br#""a\ud800b""#);
    let deep = content(format!("{}1{}", "[".repeat(20_000), "]".repeat(20_000)).as_bytes());
    let not_utf8 = content(&[b'"', 0xff, 0xfe, b'"']);

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("no key", c.post(&url).body(ok_body.clone()), 401, "missing_api_key"),
        ("wrong key", c.post(&url).bearer_auth("tok_wrong_key_000000").body(ok_body.clone()), 401, "invalid_api_key"),
        ("hostile key", c.post(&url).header("authorization", "Bearer ' OR 1=1;-- \"<script>").body(ok_body.clone()), 401, "invalid_api_key"),
        ("live key with a bad checksum", c.post(&url).bearer_auth(format!("tok_live_{}", "A".repeat(38))).body(ok_body.clone()), 401, "invalid_api_key"),
        ("unknown model", c.post(&url).bearer_auth(KEY).json(&chat_body("gpt-nope", false)), 404, "model_not_found"),
        ("model not allowed for key", c.post(&url).bearer_auth(LIMITED_KEY).json(&chat_body("gpt-test", false)), 404, "model_not_found"),
        ("malformed json", c.post(&url).bearer_auth(KEY).body("{\"model\": \"gpt-test\","), 400, "invalid_json"),
        ("not an object", c.post(&url).bearer_auth(KEY).body("[]"), 400, "invalid_json"),
        ("lone surrogate", c.post(&url).bearer_auth(KEY).body(lone_surrogate), 400, "invalid_json"),
        ("nested 20,000 deep", c.post(&url).bearer_auth(KEY).body(deep), 400, "invalid_json"),
        ("invalid UTF-8", c.post(&url).bearer_auth(KEY).body(not_utf8), 400, "invalid_json"),
        ("missing messages", c.post(&url).bearer_auth(KEY).json(&json!({"model": "gpt-test"})), 400, "invalid_value"),
        ("wrong type", c.post(&url).bearer_auth(KEY).json(&json!({"model": "gpt-test", "messages": "hi"})), 400, "invalid_value"),
        ("unknown field", c.post(&url).bearer_auth(KEY).json(&json!({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "frobnicate": true})), 400, "invalid_request"),
        ("body too large", c.post(&url).bearer_auth(KEY).body(big.clone()), 413, "request_too_large"),
        ("body too large, chunked", c.post(&url).bearer_auth(KEY).body(reqwest::Body::wrap_stream(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(big.clone())]))), 413, "request_too_large"),
        ("no live pool", c.post(&url).bearer_auth(KEY).json(&chat_body("paused-model", false)), 503, "no_capacity"),
        ("unknown route", c.get(format!("{}/v1/nope", proxy.base_url().trim_end_matches("/v1"))).bearer_auth(KEY), 404, "unknown_url"),
        ("wrong method", c.get(&url).bearer_auth(KEY), 405, "method_not_allowed"),
    ];
    let n = cases.len();
    for (name, req, status, code) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        assert!(resp.headers().contains_key("x-request-id"), "{name}");
        let id = request_id(&resp);
        let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(assert_openai_error(&body), code, "{name}: {body}");
        let rec = proxy
            .record_for(&id)
            .unwrap_or_else(|| panic!("{name}: no usage record"));
        assert_eq!(rec["status"], status, "{name}");
        assert_eq!(rec["buyer_cost_micros"], 0, "{name}");
    }
    assert!(fake.received().is_empty(), "bad input reached the upstream");
    assert_eq!(proxy.usage_records().len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_request_errors_are_relayed_and_failures_mapped() {
    // 400 from the upstream is about the request: relayed as is, no failover.
    let fake = FakeUpstream::start(Behavior {
        status: 400,
        ..Behavior::default()
    })
    .await
    .unwrap();
    let proxy = start(
        "upstream-400",
        &[
            ("pool-a", &fake.base_url(), "sk-a"),
            ("pool-b", &fake.base_url(), "sk-b"),
        ],
        "",
    );
    let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(assert_openai_error(&body), "invalid_request");
    assert_eq!(fake.received().len(), 1);

    // Every pool failing with 5xx: 502.
    fake.set_default(Behavior {
        status: 500,
        ..Behavior::default()
    });
    let proxy = start(
        "upstream-500",
        &[
            ("pool-a", &fake.base_url(), "sk-a"),
            ("pool-b", &fake.base_url(), "sk-b"),
        ],
        "",
    );
    let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    assert_eq!(resp.status(), 502);
    let id = request_id(&resp);
    assert_eq!(
        assert_openai_error(&resp.json().await.unwrap()),
        "upstream_unavailable"
    );
    assert_eq!(proxy.record_for(&id).unwrap()["upstream_attempts"], 2);

    // An upstream that never answers: 504 after the header timeout, and no fan-out.
    let hang = FakeUpstream::start(Behavior {
        hang: true,
        ..Behavior::default()
    })
    .await
    .unwrap();
    let proxy = start(
        "upstream-hang",
        &[
            ("pool-a", &hang.base_url(), "sk-a"),
            ("pool-b", &hang.base_url(), "sk-b"),
        ],
        "upstream_header_timeout_ms = 300",
    );
    let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    assert_eq!(resp.status(), 504);
    assert_eq!(
        assert_openai_error(&resp.json().await.unwrap()),
        "upstream_timeout"
    );
    assert_eq!(hang.received().len(), 1);
}
