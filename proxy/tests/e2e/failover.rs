use serde_json::{json, Value};

use crate::common::*;

/// Pool A fails with `status`; the request is served by pool B, and A is then skipped.
async fn fails_over_on(status: u16) {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    fake.set_behavior(
        "sk-a",
        Behavior {
            status,
            ..Behavior::default()
        },
    );
    let proxy = start(
        &format!("failover-{status}"),
        &[
            ("pool-a", &fake.base_url(), "sk-a"),
            ("pool-b", &fake.base_url(), "sk-b"),
        ],
        "",
    );

    for stream in [false, true] {
        let resp = post(&proxy, KEY, &chat_body("gpt-test", stream)).await;
        assert_eq!(resp.status(), 200, "status {status}");
        let id = request_id(&resp);
        let _ = resp.text().await.unwrap();
        let rec = proxy.record_for(&id).unwrap();
        assert_eq!(rec["pool_id"], "pool-b", "status {status}");
        assert_eq!(usage_of(&rec), Behavior::default().usage);
    }
    let keys: Vec<String> = fake
        .received()
        .iter()
        .map(|r| r.headers["authorization"].clone())
        .collect();
    // The first request tried A then B; the second went straight to B (A is backed off).
    assert_eq!(
        keys,
        ["Bearer sk-a", "Bearer sk-b", "Bearer sk-b"],
        "status {status}"
    );
    let first = &proxy.usage_records()[0];
    assert_eq!(first["upstream_attempts"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_revoked_credential() {
    fails_over_on(401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_forbidden_credential() {
    fails_over_on(403).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_throttling() {
    fails_over_on(429).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_overload() {
    fails_over_on(503).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_connection_refused() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let dead = format!("http://127.0.0.1:{}/v1", tokn_testkit::harness::free_port());
    let proxy = start(
        "failover-refused",
        &[
            ("pool-dead", &dead, "sk-dead"),
            ("pool-b", &fake.base_url(), "sk-b"),
        ],
        "",
    );
    let resp = post(&proxy, KEY, &chat_body("gpt-test", true)).await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    let rec = proxy.record_for(&id).unwrap();
    assert_eq!(rec["pool_id"], "pool-b");
    assert_eq!(rec["upstream_attempts"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backed_off_pool_is_used_again_after_its_back_off() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    fake.set_behavior(
        "sk-a",
        Behavior {
            status: 429,
            retry_after_s: Some(1),
            ..Behavior::default()
        },
    );
    let proxy = start(
        "backoff-expiry",
        &[
            ("pool-a", &fake.base_url(), "sk-a"),
            ("pool-b", &fake.base_url(), "sk-b"),
        ],
        "throttle_backoff_max_ms = 300",
    );
    let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    assert_eq!(resp.status(), 200);
    fake.set_behavior("sk-a", Behavior::default());
    // retry-after 1 s is capped at 300 ms by the configuration.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    let id = request_id(&resp);
    assert_eq!(resp.status(), 200);
    assert_eq!(
        proxy.record_for(&id).unwrap()["pool_id"],
        "pool-a",
        "FIFO resumes with the first pool"
    );
}

/// Out of credit is not throttling: the pool stays quarantined after a throttle back-off would
/// have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_is_quarantined_not_just_backed_off() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let exhausted = Behavior {
        status: 429,
        error_type_code: Some((
            "insufficient_quota".into(),
            "credit_balance_exhausted".into(),
        )),
        ..Behavior::default()
    };
    fake.set_behavior("sk-a", exhausted);
    let proxy = start(
        "exhausted",
        &[
            ("pool-a", &fake.base_url(), "sk-a"),
            ("pool-b", &fake.base_url(), "sk-b"),
        ],
        "throttle_backoff_ms = 100\nthrottle_backoff_max_ms = 100",
    );
    let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    let id = request_id(&resp);
    assert_eq!(proxy.record_for(&id).unwrap()["pool_id"], "pool-b");
    let keys: Vec<String> = fake
        .received()
        .iter()
        .map(|r| r.headers["authorization"].clone())
        .collect();
    assert_eq!(keys, ["Bearer sk-a", "Bearer sk-b", "Bearer sk-b"]);
}

/// A pool whose `base_url` is the proxy itself, with a buyer key as its credential (so the
/// request it sends would be served again): one hop, refused with 508 `loop_detected`; the buyer
/// gets an error and pays nothing, and the proxy goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_pointing_back_at_the_proxy_costs_one_hop_not_a_recursion() {
    let proxy = start("loop", &[("pool-self", "http://{PROXY_ADDR}/v1", KEY)], "");
    for stream in [false, true] {
        let resp = post(&proxy, KEY, &chat_body("gpt-test", stream)).await;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(status.is_server_error(), "{status} {body}");
        assert_openai_error(&body);
    }
    let records = proxy.usage_records();
    // The buyer's two requests and each one's single hop back: every hop refused before
    // authentication, and nothing billed.
    assert_eq!(records.len(), 4, "{records:#?}");
    let hops: Vec<_> = records.iter().filter(|r| r["status"] == 508).collect();
    assert_eq!(hops.len(), 2, "{records:#?}");
    for hop in hops {
        assert_eq!(hop["outcome"], "loop_detected");
        assert!(hop["key_id"].is_null());
        assert!(records
            .iter()
            .any(|r| r["upstream_request_id"] == hop["request_id"]));
    }
    assert!(records.iter().all(|r| r["buyer_cost_micros"] == 0));
    // The proxy still answers.
    let resp = post(&proxy, KEY, &chat_body("mock", false)).await;
    assert_eq!(resp.status(), 200);
}

/// One upstream 500 on a model with one pool never takes the model offline: the pool is tried
/// again. Errors in a row eject it; while it is out, one request a second probes it (half-open)
/// and the others get 503 with a `retry-after` that tells the truth; the first probe that
/// succeeds brings the pool back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_error_never_takes_a_model_offline_and_a_half_open_probe_brings_it_back() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let failing = Behavior {
        status: 500,
        ..Behavior::default()
    };
    fake.set_behavior("sk-a", failing);
    let proxy = start(
        "half-open",
        &[("pool-a", &fake.base_url(), "sk-a")],
        "eject_after_failures = 3\nthrottle_backoff_ms = 60000\nthrottle_backoff_max_ms = 60000",
    );
    let seen = statuses_of_five(&proxy).await;
    // Three errors in a row (the third ejects), the half-open probe (a fourth error), then 503
    // until the next probe is due in at most a second.
    let statuses: Vec<u16> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [502, 502, 502, 502, 503], "{seen:?}");
    assert_eq!(seen[4].1.as_deref(), Some("1"), "{seen:?}");
    assert_eq!(fake.received().len(), 4);

    fake.set_behavior("sk-a", Behavior::default());
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    // The probe succeeds: the pool is back for everyone, not after its 60 s ejection.
    for _ in 0..3 {
        let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(fake.received().len(), 7);
}

/// The same for a pool whose upstream refuses connections: one refused connect does not take
/// the model offline; errors in a row eject it, and it is probed half-open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_connect_never_takes_a_model_offline() {
    // A port nothing listens on: port 1 is below the range the system hands out to sockets
    // bound to port 0, so no test running beside this one can be listening there (a port
    // bound and released here could be, and answer).
    let proxy = start(
        "refused-connect",
        &[("pool-a", "http://127.0.0.1:1/v1", "sk-a")],
        "eject_after_failures = 3\nthrottle_backoff_ms = 60000\nthrottle_backoff_max_ms = 60000",
    );
    let seen = statuses_of_five(&proxy).await;
    let statuses: Vec<u16> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [502, 502, 502, 502, 503], "{seen:?}");
    assert_eq!(seen[4].1.as_deref(), Some("1"), "{seen:?}");
}

/// Five requests one after another: each one's status and `retry-after`.
async fn statuses_of_five(proxy: &ProxyProcess) -> Vec<(u16, Option<String>)> {
    let mut seen = Vec::new();
    for _ in 0..5 {
        let resp = post(proxy, KEY, &chat_body("gpt-test", false)).await;
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        seen.push((resp.status().as_u16(), retry_after));
    }
    seen
}

/// A refused credential is quarantined at once and never probed; the 503 says how long the
/// quarantine has left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_sole_pool_is_not_probed_and_the_503_says_when_it_returns() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let refused = Behavior {
        status: 401,
        ..Behavior::default()
    };
    fake.set_behavior("sk-a", refused);
    let proxy = start(
        "quarantine-503",
        &[("pool-a", &fake.base_url(), "sk-a")],
        "credential_quarantine_ms = 120000",
    );
    let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    assert_eq!(resp.status(), 502);
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let resp = post(&proxy, KEY, &chat_body("gpt-test", false)).await;
    assert_eq!(resp.status(), 503);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((115..=120).contains(&retry_after), "{retry_after}");
    assert_eq!(fake.received().len(), 1, "no request with the refused key");
}

/// Sticky routing, the one exception to FIFO: a conversation (named by a session header or
/// `prompt_cache_key`) keeps the pool that served it while that pool serves; unnamed requests
/// and new conversations go FIFO; a pool that fails a conversation releases it to FIFO, which
/// places it again. Counted in `tokn_sticky_routes_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_keeps_its_pool_while_it_serves() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start(
        "sticky",
        &[
            ("pool-a", &fake.base_url(), "sk-a"),
            ("pool-b", &fake.base_url(), "sk-b"),
        ],
        "throttle_backoff_ms = 200\nthrottle_backoff_max_ms = 200",
    );
    let served_by = |conversation: Option<(&'static str, &'static str)>, body: Value| {
        let proxy = &proxy;
        async move {
            let mut req = client()
                .post(format!("{}/chat/completions", proxy.base_url()))
                .bearer_auth(KEY)
                .json(&body);
            if let Some((name, value)) = conversation {
                req = req.header(name, value);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let id = request_id(&resp);
            let _ = resp.text().await.unwrap();
            proxy.record_for(&id).unwrap()["pool_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let chat = || chat_body("gpt-test", false);

    // Pool A throttles once: conversation s1 is placed on B.
    fake.set_behavior(
        "sk-a",
        Behavior {
            status: 429,
            ..Behavior::default()
        },
    );
    assert_eq!(
        served_by(Some(("session_id", "s1")), chat()).await,
        "pool-b"
    );
    fake.set_behavior("sk-a", Behavior::default());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // A serves again: s1 stays on B; unnamed requests and a new conversation go FIFO (A).
    for _ in 0..3 {
        assert_eq!(
            served_by(Some(("session_id", "s1")), chat()).await,
            "pool-b"
        );
    }
    assert_eq!(served_by(None, chat()).await, "pool-a");
    let claude_code = ("x-claude-code-session-id", "4e7d0a52-1c1f");
    assert_eq!(served_by(Some(claude_code), chat()).await, "pool-a");
    let mut keyed = chat();
    keyed["prompt_cache_key"] = json!("thread-9");
    assert_eq!(served_by(None, keyed.clone()).await, "pool-a");

    // B fails s1: it moves to A, and stays there.
    fake.set_behavior(
        "sk-b",
        Behavior {
            status: 500,
            ..Behavior::default()
        },
    );
    assert_eq!(
        served_by(Some(("session_id", "s1")), chat()).await,
        "pool-a"
    );
    fake.set_behavior("sk-b", Behavior::default());
    assert_eq!(
        served_by(Some(("session_id", "s1")), chat()).await,
        "pool-a"
    );

    let metrics = metrics_text(&proxy).await;
    let count = |outcome: &str| -> u64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "tokn_sticky_routes_total{{outcome=\"{outcome}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // placed: s1, the Claude Code session, thread-9; kept: s1 three times on B, once on A;
    // moved: s1 when B failed.
    assert_eq!(
        (count("placed"), count("kept"), count("moved")),
        (3, 4, 1),
        "{metrics}"
    );
}
