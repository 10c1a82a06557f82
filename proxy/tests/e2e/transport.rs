//! The transport both ways: HTTPS with HTTP/2 by ALPN to clients and to upstreams, and pooled
//! keep-alive upstream connections.

use std::time::Duration;

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

/// Sends raw HTTP/1.1 requests one after another on one TCP connection; returns each response
/// head (status line and headers), reading each body by its framing.
async fn exchange_on_one_connection(port: u16, requests: &[String]) -> Vec<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut stream = BufReader::new(stream);
    let mut heads = Vec::new();
    for req in requests {
        stream.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if stream.read_line(&mut line).await.unwrap() == 0 {
                heads.push(format!("{head}<connection closed>"));
                return heads;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let lower = head.to_ascii_lowercase();
        if let Some(len) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            let mut body = vec![0; len.trim().parse().unwrap()];
            stream.read_exact(&mut body).await.unwrap();
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                let mut size = String::new();
                stream.read_line(&mut size).await.unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                stream.read_exact(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
            }
        } else {
            panic!("response without framing: {head}");
        }
        heads.push(head);
    }
    heads
}

fn raw_post(key: &str, body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Streams are chunked over HTTP/1.1, and neither a stream nor an early rejection costs the
/// client its keep-alive connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_keep_their_connection_across_streams_and_rejections() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start("keepalive", &[("pool-a", &fake.base_url(), "sk-a")], "");
    let stream = chat_body("gpt-test", true).to_string();
    let plain = chat_body("gpt-test", false).to_string();
    let heads = exchange_on_one_connection(
        proxy.port,
        &[
            raw_post(KEY, &stream),
            raw_post("tok_wrong_key_0000000", &plain),
            raw_post(KEY, &plain),
            raw_post(KEY, &stream),
        ],
    )
    .await;
    let statuses: Vec<&str> = heads
        .iter()
        .map(|h| h.lines().next().unwrap_or(""))
        .collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 401 Unauthorized",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK"
        ],
        "{heads:?}"
    );
    assert!(heads[0]
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked"));
    assert!(
        heads
            .iter()
            .all(|h| !h.to_ascii_lowercase().contains("connection: close")),
        "{heads:?}"
    );
}

/// A chunked body whose framing is broken is refused and ends the connection: what follows it
/// on the wire is never read as another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunked_body_is_refused_and_closes_the_connection() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start("bad-chunk", &[("pool-a", &fake.base_url(), "sk-a")], "");
    let broken = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
    );
    let plain = chat_body("gpt-test", false).to_string();
    let heads = exchange_on_one_connection(proxy.port, &[broken, raw_post(KEY, &plain)]).await;
    assert!(heads[0].starts_with("HTTP/1.1 400"), "{heads:?}");
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads[1].ends_with("<connection closed>"), "{heads:?}");
    assert!(fake.received().is_empty(), "nothing reached the upstream");
}

/// A body that stops coming is answered 408 (an OpenAI error) at `request_body_timeout_ms` —
/// not at twice that, as when Pingora's own read timeout ran first — and nothing goes upstream.
#[tokio::test]
async fn a_stalled_body_gets_408_at_its_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start(
        "stalled-body",
        &[("pool-a", &fake.base_url(), "sk-a")],
        "request_body_timeout_ms = 1500\n",
    );
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the answer is whole (the connection closes after it), 10 s at most.
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(2900),
        "answered after {took:?}, the deadline being 1.5 s"
    );
    assert!(fake.received().is_empty(), "nothing reached the upstream");
}
