use std::time::Duration;

use futures_util::StreamExt;

use crate::common::*;

/// A client that leaves mid-stream is billed: the upstream reported nothing yet, so an estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_is_billed_by_estimate() {
    let fake = FakeUpstream::start(Behavior {
        chunks: 40,
        chunk_interval: Duration::from_millis(25),
        ..Behavior::default()
    })
    .await
    .unwrap();
    let proxy = start("client-gone", &[("pool-a", &fake.base_url(), "sk-a")], "");
    let resp = post(&proxy, KEY, &chat_body("gpt-test", true)).await;
    let id = request_id(&resp);
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        let chunk = body.next().await.unwrap().unwrap();
        seen += chunk.iter().filter(|&&b| b == b'\n').count() / 2;
    }
    drop(body);

    let records = proxy.wait_for_records(1, Duration::from_secs(10));
    assert_eq!(records.len(), 1);
    let rec = &records[0];
    assert_eq!(rec["request_id"], id.as_str());
    assert_eq!(rec["status"], 499);
    assert_eq!(rec["outcome"], "client_disconnected");
    assert_eq!(rec["usage_source"], "estimated");
    assert!(rec["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(rec["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(rec["buyer_cost_micros"].as_u64().unwrap() > 0);
    // Exactly one record, even after the upstream would have finished.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(proxy.usage_records().len(), 1);
}

/// A client that leaves while the upstream is still thinking is noticed (not logged as 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_before_the_first_byte_is_noticed() {
    let fake = FakeUpstream::start(Behavior {
        ttft: Duration::from_secs(3),
        ..Behavior::default()
    })
    .await
    .unwrap();
    let proxy = start(
        "client-gone-early",
        &[("pool-a", &fake.base_url(), "sk-a")],
        "",
    );
    let c = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = c
        .post(format!("{}/chat/completions", proxy.base_url()))
        .bearer_auth(KEY)
        .json(&chat_body("gpt-test", false))
        .send()
        .await
        .expect_err("client times out");
    assert!(err.is_timeout());
    let records = proxy.wait_for_records(1, Duration::from_secs(2));
    assert_eq!(
        records.len(),
        1,
        "the departure was noticed before the upstream answered"
    );
    assert_eq!(records[0]["status"], 499);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_disconnect_mid_stream_ends_with_an_error_event() {
    let fake = FakeUpstream::start(Behavior {
        chunks: 10,
        disconnect_after_chunks: Some(4),
        ..Behavior::default()
    })
    .await
    .unwrap();
    let proxy = start("upstream-cut", &[("pool-a", &fake.base_url(), "sk-a")], "");
    let resp = post(&proxy, KEY, &chat_body("gpt-test", true)).await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let text = resp.text().await.unwrap();
    let data = sse_data(&text);
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_openai_error(&last);
    assert!(text.contains("tok3"));
    let rec = proxy.record_for(&id).unwrap();
    assert_eq!(rec["usage_source"], "estimated");
    assert_ne!(rec["outcome"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_stream_is_cut_after_the_idle_timeout() {
    let fake = FakeUpstream::start(Behavior {
        chunks: 10,
        hang_after_chunks: Some(2),
        ..Behavior::default()
    })
    .await
    .unwrap();
    let proxy = start(
        "upstream-hang-mid",
        &[("pool-a", &fake.base_url(), "sk-a")],
        "upstream_idle_read_timeout_ms = 400",
    );
    let resp = post(&proxy, KEY, &chat_body("gpt-test", true)).await;
    let id = request_id(&resp);
    let text = resp.text().await.unwrap();
    let last: serde_json::Value = serde_json::from_str(sse_data(&text).last().unwrap()).unwrap();
    assert_eq!(assert_openai_error(&last), "upstream_timeout");
    assert_eq!(
        proxy.record_for(&id).unwrap()["outcome"],
        "upstream_timeout"
    );
}

/// SIGTERM stops new connections but lets a stream in flight finish, metered; then the process
/// exits at once, not at the end of the grace period (30 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_an_in_flight_stream_finish_then_exits() {
    let fake = FakeUpstream::start(Behavior {
        chunks: 20,
        chunk_interval: Duration::from_millis(50),
        ..Behavior::default()
    })
    .await
    .unwrap();
    let mut proxy = ProxyProcess::start(
        binary(),
        "graceful",
        &config(&[("pool-a", &fake.base_url(), "sk-a")], ""),
        &[
            ("TEST_BUYER_KEY", KEY),
            ("TOKN__SERVER__GRACE_PERIOD_S", "30"),
        ],
    );
    let resp = post(&proxy, KEY, &chat_body("gpt-test", true)).await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    proxy.terminate();
    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "stream cut short: {text}"
    );
    assert!(text.contains("tok19"));
    let rec = proxy.record_for(&id).unwrap();
    assert_eq!(rec["outcome"], "ok");
    assert_eq!(usage_of(&rec), Behavior::default().usage);
    assert!(
        proxy.wait_exit(Duration::from_secs(5)),
        "the proxy waited for the grace period with nothing in flight"
    );
}

/// SIGTERM to an idle proxy: it exits at once, not after its 30 s grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxy_exits_at_once_on_sigterm() {
    let mut proxy = ProxyProcess::start(
        binary(),
        "idle-exit",
        &config(&[], ""),
        &[
            ("TEST_BUYER_KEY", KEY),
            ("TOKN__SERVER__GRACE_PERIOD_S", "30"),
        ],
    );
    // One request served first: an open keep-alive connection does not hold the exit.
    let resp = post(&proxy, KEY, &chat_body("mock", false)).await;
    assert_eq!(resp.status(), 200);
    let started = std::time::Instant::now();
    proxy.terminate();
    assert!(
        proxy.wait_exit(Duration::from_secs(5)),
        "the idle proxy waited for its grace period"
    );
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
}

/// A graceful upgrade under load (SIGQUIT, and a new process with `--upgrade`): every request
/// on every keep-alive connection is answered, the hand-over socket lives in the proxy's own
/// private directory (not a fixed path in the shared temporary directory), and the old process
/// exits once it has handed over and finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_under_load_drops_no_request() {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let mut proxy = start("upgrade", &[], "");
    let sock_dir = proxy.dir.join("spool.upgrade");
    let mode = std::fs::metadata(&sock_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let url = format!("{}/chat/completions", proxy.base_url());
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            // One keep-alive connection per client, reused from request to request.
            let client = client();
            let started = std::time::Instant::now();
            let mut errors = Vec::new();
            for _ in 0..600 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(20) {
                    break;
                }
                let sent = client
                    .post(&url)
                    .bearer_auth(KEY)
                    .json(&chat_body("mock", false))
                    .send()
                    .await;
                let answered = match sent {
                    Ok(r) => {
                        let status = r.status();
                        r.bytes()
                            .await
                            .map(|_| status)
                            .map_err(|e| format!("{e:?}"))
                    }
                    Err(e) => Err(format!("{e:?}")),
                };
                match answered {
                    Ok(status) if status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(status) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("status {status}"));
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(e);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    let mut old = proxy.upgrade();
    // The old process hands over, keeps its connections a while (Pingora: 5 s), then drains.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline && matches!(old.try_wait(), Ok(None)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old_exited = matches!(old.try_wait(), Ok(Some(_)));
    let _ = old.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.await.unwrap());
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("upgrade under load: {ok} answered (200), {failed} failed: {errors:?}");
    assert!(old_exited, "the old process did not exit after the upgrade");
    assert!(
        ok > before + 100,
        "too little traffic crossed the upgrade: {ok}"
    );
    assert_eq!(failed, 0, "{errors:?}");
    // The new process serves on the same address.
    assert_eq!(
        post(&proxy, KEY, &chat_body("mock", false)).await.status(),
        200
    );
}

/// Slow clients (slowloris): a header still arriving after `request_header_timeout_ms` closes
/// its connection, one address may have only `header_connections_per_ip_max` connections
/// mid-header, and a keep-alive connection idle between requests is not cut by the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_at_their_deadline_and_capped_per_address() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let proxy = start(
        "slowloris",
        &[],
        "request_header_timeout_ms = 1000\nheader_connections_per_ip_max = 4",
    );
    let addr = format!("127.0.0.1:{}", proxy.port);
    /// Whether the server closed `c` within `within` (EOF or reset on read).
    async fn closed_within(c: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 256];
        matches!(
            tokio::time::timeout(within, c.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }
    // Four connections start a header and trickle it.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(c);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A fifth one from the same address is refused as soon as its header starts.
    let mut fifth = TcpStream::connect(&addr).await.unwrap();
    fifth
        .write_all(b"GET /v1/models HTTP/1.1\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_millis(500)).await,
        "the fifth was served"
    );
    // The four trickle on, a byte every 200 ms: each is closed at its deadline, not later.
    let started = std::time::Instant::now();
    for c in &mut slow {
        for _ in 0..3 {
            let _ = c.write_all(b"X").await;
        }
    }
    for c in &mut slow {
        let mut alive = true;
        for _ in 0..20 {
            if c.write_all(b"-").await.is_err()
                || closed_within(c, Duration::from_millis(200)).await
            {
                alive = false;
                break;
            }
        }
        assert!(!alive, "a slow header outlived its deadline");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // With the slow ones gone, the address is served again; a keep-alive connection idle
    // between two requests for longer than the header deadline keeps working.
    let mut c = TcpStream::connect(&addr).await.unwrap();
    let request =
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n");
    for _ in 0..2 {
        c.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\"object\":\"list\"") {
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    let metrics = metrics_text(&proxy).await;
    assert!(
        metrics.contains("tokn_slow_headers_total{reason=\"per_ip_cap\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tokn_slow_headers_total{reason=\"deadline\"} 4"),
        "{metrics}"
    );
}

/// A header of 1 MB, or of 1,000 lines, is answered 431 with an OpenAI error body (not
/// Pingora's empty 400) and its connection closed; nothing goes upstream, and the next client
/// is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_gets_an_openai_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start("big-headers", &[("pool-a", &fake.base_url(), "sk-a")], "");
    let start_line =
        format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n");
    let huge = format!("{start_line}x-big: {}\r\n\r\n", "a".repeat(1 << 20));
    let many = format!(
        "{start_line}{}\r\n",
        (0..1000)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>()
    );
    for head in [huge, many] {
        let (mut r, mut w) = TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap()
            .into_split();
        // The proxy answers before it has read everything: the rest may meet a closed socket.
        let writer = tokio::spawn(async move {
            let _ = w.write_all(head.as_bytes()).await;
            w
        });
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut answer)).await;
        writer.abort();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
        let body: serde_json::Value =
            serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "request_header_too_large", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
    assert!(fake.received().is_empty(), "nothing reached the upstream");
    let ok = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    assert_eq!(ok.status(), 200);
    let metrics = reqwest::get(proxy.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tokn_slow_headers_total{reason=\"too_large\"} 2"),
        "{metrics}"
    );
}
