//! The transport both ways: HTTPS with HTTP/2 by ALPN to clients and to upstreams, and pooled
//! keep-alive upstream connections.

use serde_json::{json, Value};
use tokn_testkit::tls::TestCa;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_http2_on_both_legs_with_streaming_and_exact_usage() {
    let dir = tokn_testkit::harness::temp_dir("tls-ca");
    let ca = TestCa::create(&dir).unwrap();
    let fake = FakeUpstream::start_tls(Behavior::default(), &ca.leaf_cert_pem, &ca.leaf_key_pem)
        .await
        .unwrap();
    let config = config(&[("pool-tls", &fake.tls_base_url(), "sk-tls")], "");
    let proxy = ProxyProcess::start_tls(binary(), "tls", &config, &[("TEST_BUYER_KEY", KEY)], &ca);

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.ca_cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let base = format!("https://localhost:{}/v1", proxy.tls_port.unwrap());
    let mut ids = Vec::new();
    for stream in [false, true, false, true, false, true] {
        let mut body = chat_body("gpt-test", stream);
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        let resp = client
            .post(format!("{base}/chat/completions"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.version(),
            reqwest::Version::HTTP_2,
            "client leg negotiates h2"
        );
        ids.push(request_id(&resp));
        let text = resp.text().await.unwrap();
        if stream {
            let data = sse_data(&text);
            assert_eq!(data.last().unwrap(), "[DONE]");
            let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
            assert_eq!(usage["usage"]["completion_tokens"], 5);
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["usage"]["prompt_tokens"], 17);
        }
    }
    let received = fake.received();
    assert_eq!(received.len(), 6);
    assert!(
        received.iter().all(|r| r.version == "HTTP/2.0"),
        "upstream leg negotiates h2"
    );
    assert_eq!(
        fake.connections(),
        1,
        "one pooled h2 connection carries every request"
    );
    for id in ids {
        assert_eq!(
            usage_of(&proxy.record_for(&id).unwrap()),
            Behavior::default().usage
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_http1_connections_are_pooled_and_reused() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start("pooling", &[("pool-a", &fake.base_url(), "sk-a")], "");
    for i in 0..10 {
        let resp = post(&proxy, KEY, &chat_body("gpt-test", i % 2 == 1)).await;
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await.unwrap();
    }
    assert_eq!(fake.received().len(), 10);
    assert!(fake.received().iter().all(|r| r.version == "HTTP/1.1"));
    // Two worker threads may each open one; never one per request.
    assert!(
        fake.connections() <= 2,
        "connections: {}",
        fake.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_upstream_certificate_is_refused() {
    let dir = tokn_testkit::harness::temp_dir("tls-untrusted");
    let trusted = TestCa::create(&dir.join("trusted")).unwrap();
    let other = TestCa::create(&dir.join("other")).unwrap();
    // The upstream presents a certificate from a CA the proxy does not trust.
    let fake = FakeUpstream::start_tls(
        Behavior::default(),
        &other.leaf_cert_pem,
        &other.leaf_key_pem,
    )
    .await
    .unwrap();
    let config = config(&[("pool-tls", &fake.tls_base_url(), "sk-tls")], "");
    let proxy = ProxyProcess::start_tls(
        binary(),
        "tls-untrusted",
        &config,
        &[("TEST_BUYER_KEY", KEY)],
        &trusted,
    );
    let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    assert_eq!(resp.status(), 502);
    assert!(
        fake.received().is_empty(),
        "no request went to an unverified upstream"
    );
}
