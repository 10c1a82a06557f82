//! A proxy fed by a control plane: the real binary against a fake control plane that speaks the
//! watch protocol, with buyer keys in the shared Redis (under a random prefix).

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokn_config::{hash_key, hot};

use crate::common::*;

const PROXY_TOKEN: &str = "proxy-token-e2e-0123456789";
const SNAPSHOT_KEY: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf";
const SELLER_KEY: &str = "sk-seller-control-e2e";

/// Speaks `GET /internal/v1/config?after=V&wait_s=N` like the control plane: 200 with the
/// current configuration when it is newer than `after`, else waits for a change up to `wait_s`
/// and answers 204; 401 on a wrong token.
struct FakeControl {
    url: String,
    config: watch::Sender<Option<(u64, String)>>,
    requests: Arc<Mutex<Vec<String>>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeControl {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (config, rx) = watch::channel(None::<(u64, String)>);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(conn, rx.clone(), log.clone()));
            }
        });
        Self {
            url,
            config,
            requests,
            server,
        }
    }

    fn publish(&self, version: u64, config: &Value) {
        self.config
            .send_replace(Some((version, config.to_string())));
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeControl {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(
    mut conn: TcpStream,
    mut config: watch::Receiver<Option<(u64, String)>>,
    log: Arc<Mutex<Vec<String>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let line = head.lines().next().unwrap_or_default().to_owned();
    log.lock().unwrap().push(line.clone());
    let authorized = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {PROXY_TOKEN}")));
    let param = |name: &str| -> u64 {
        line.split(['?', '&', ' '])
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (after, wait_s) = (param("after"), param("wait_s"));
    let (status, body) = if !authorized {
        (
            "401 Unauthorized",
            r#"{"error":{"message":"bad proxy token"}}"#.to_owned(),
        )
    } else {
        let deadline = Instant::now() + Duration::from_secs(wait_s);
        loop {
            let newer = config
                .borrow_and_update()
                .clone()
                .filter(|(v, _)| *v > after);
            if let Some((_, body)) = newer {
                break ("200 OK", body);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || !matches!(
                    tokio::time::timeout(left, config.changed()).await,
                    Ok(Ok(()))
                )
            {
                break ("204 No Content", String::new());
            }
        }
    };
    let resp = if body.is_empty() {
        format!("HTTP/1.1 {status}\r\nconnection: close\r\n\r\n")
    } else {
        format!(
            "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let _ = conn.write_all(resp.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// The catalog the fake control plane pushes: `gpt-test` on the fake upstream, `mock`, and
/// `extra_model` when given. Keys live in Redis.
fn pushed(version: u64, upstream: &str, extra_model: Option<&str>) -> Value {
    let mut models = vec![
        json!({"id": "gpt-test", "provider": "openai", "upstream_model": "gpt-upstream",
               "input_price_micros_per_mtok": 1_000_000, "output_price_micros_per_mtok": 2_000_000,
               "price_version": version}),
        json!({"id": "mock", "provider": "mock", "input_price_micros_per_mtok": 1_000_000,
               "output_price_micros_per_mtok": 2_000_000, "price_version": version}),
    ];
    let mut pool_models = vec!["mock"];
    if let Some(extra) = extra_model {
        models.push(
            json!({"id": extra, "provider": "mock", "input_price_micros_per_mtok": 1,
                           "output_price_micros_per_mtok": 1}),
        );
        pool_models.push(extra);
    }
    json!({
        "version": version,
        "models": models,
        "pools": [
            {"id": "seller-pool", "provider": "openai", "base_url": upstream,
             "api_key": SELLER_KEY, "models": ["gpt-test"], "price_ratio": 0.5,
             "seller": "seller-acct-1"},
            {"id": "mock-pool", "provider": "mock", "models": pool_models, "price_ratio": 0.5},
        ],
        "keys": null,
    })
}

fn proxy_config(control_url: &str, snapshot_path: &std::path::Path, prefix: &str) -> String {
    format!(
        r#"
[control]
url = "{control_url}"
token = "env:TOKN_PROXY_TOKEN"
snapshot_path = "{}"
snapshot_key = "env:TOKN_SNAPSHOT_KEY"
watch_timeout_s = 2

[hot_state]
redis_url = "redis://127.0.0.1:6379"
prefix = "{prefix}"
"#,
        snapshot_path.display()
    )
}

fn start_proxy(name: &str, config: &str, token: &str) -> ProxyProcess {
    ProxyProcess::start(
        binary(),
        name,
        config,
        &[
            ("TOKN_PROXY_TOKEN", token),
            ("TOKN_SNAPSHOT_KEY", SNAPSHOT_KEY),
        ],
    )
}

async fn status(proxy: &ProxyProcess) -> Value {
    get_json(
        &format!("http://127.0.0.1:{}/status", proxy.metrics_port),
        ("accept", "application/json"),
    )
    .await
}

/// Polls `/status` until `config_version` is `version`; returns how long that took.
async fn wait_for_version(proxy: &ProxyProcess, version: u64, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let s = status(proxy).await;
        if s["config_version"] == version {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "config version {version} not reached in {within:?}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn models(proxy: &ProxyProcess, key: &str) -> reqwest::Response {
    client()
        .get(format!("{}/models", proxy.base_url()))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn metric(proxy: &ProxyProcess, line_prefix: &str) -> Option<f64> {
    let text = client()
        .get(proxy.metrics_url())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
}

struct Redis {
    conn: redis::aio::MultiplexedConnection,
    prefix: String,
}

impl Redis {
    async fn new() -> Self {
        let conn = redis::Client::open("redis://127.0.0.1:6379")
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        Self {
            conn,
            prefix: format!("tokn-e2e-{:016x}:", rand::random::<u64>()),
        }
    }

    /// Creates (or changes) a key the way the control plane does: SET, then PUBLISH.
    async fn put_key(&mut self, key: &str, record: Value) {
        let hash = hex::encode(hash_key(key));
        let mut record = record;
        record["key_sha256"] = json!(hash);
        let _: () = self
            .conn
            .set(hot::key_record(&self.prefix, &hash), record.to_string())
            .await
            .unwrap();
        let _: () = self
            .conn
            .publish(hot::key_channel(&self.prefix), &hash)
            .await
            .unwrap();
    }

    async fn revoke_key(&mut self, key: &str) {
        let hash = hex::encode(hash_key(key));
        let _: () = self
            .conn
            .del(hot::key_record(&self.prefix, &hash))
            .await
            .unwrap();
        let _: () = self
            .conn
            .publish(hot::key_channel(&self.prefix), &hash)
            .await
            .unwrap();
    }

    async fn cleanup(&mut self) {
        let keys: Vec<String> = self
            .conn
            .keys(format!("{}*", self.prefix))
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = self.conn.del(keys).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_and_keys_from_the_control_plane_reach_the_proxy_in_under_a_second() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = FakeControl::start().await;
    let mut redis = Redis::new().await;
    let dir = tokn_testkit::harness::temp_dir("control-e2e");
    let snapshot_path = dir.join("snapshot.sealed");
    let config = proxy_config(&control.url, &snapshot_path, &redis.prefix);
    let key = format!("tok_test_cp_key_{:016x}", rand::random::<u64>());
    let key_id = format!("key-cp-{:08x}", rand::random::<u32>());

    let proxy = start_proxy("control", &config, PROXY_TOKEN);
    // Nothing pushed yet: an empty configuration at version 0, and the normal errors.
    let s = status(&proxy).await;
    assert_eq!(s["config_version"], 0);
    assert_eq!(s["config_source"], "none");
    assert_eq!(s["hot_state"], "redis");
    let resp = post(&proxy, &key, &chat_body("mock", false)).await;
    assert_eq!(resp.status(), 401);
    // The proxy is polling, with its token, after version 0.
    let polled = tokio::time::timeout(Duration::from_secs(5), async {
        while control.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(polled.is_ok(), "the proxy never polled");
    assert!(
        control.requests()[0].starts_with("GET /internal/v1/config?after=0&wait_s=2 "),
        "{:?}",
        control.requests()
    );

    // Version 1 and a key: in use well within a second.
    redis
        .put_key(
            &key,
            json!({"id": key_id, "account": "acct-cp", "requests_per_minute": 1000}),
        )
        .await;
    control.publish(1, &pushed(1, &fake.base_url(), None));
    let took = wait_for_version(&proxy, 1, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(1), "propagation took {took:?}");
    let s = status(&proxy).await;
    assert_eq!(s["config_source"], "control");
    assert_eq!(s["last_sync_age_s"], 0);

    let resp = post(&proxy, &key, &chat_body("gpt-test", false)).await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let got = fake.received();
    assert_eq!(
        got[0].headers["authorization"],
        format!("Bearer {SELLER_KEY}")
    );
    let rec = proxy.wait_for_records(2, Duration::from_secs(5));
    let rec = rec.iter().find(|r| r["request_id"] == id.as_str()).unwrap();
    assert_eq!(rec["key_id"], key_id.as_str());
    assert_eq!(rec["account"], "acct-cp");
    assert_eq!(rec["seller"], "seller-acct-1");
    assert_eq!(rec["price_version"], 1);
    assert!(rec["buyer_cost_micros"].as_u64().unwrap() > 0);

    // Version 2 adds a model: listed within a second.
    control.publish(2, &pushed(2, &fake.base_url(), Some("mock-new")));
    let started = Instant::now();
    loop {
        let body: Value = models(&proxy, &key).await.json().await.unwrap();
        if body["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "mock-new")
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "{body}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(metric(&proxy, "tokn_config_version ").await, Some(2.0));
    assert_eq!(
        metric(&proxy, "tokn_config_pools_skipped ").await,
        Some(0.0)
    );

    // The snapshot on disk (sealed right after the swap): private, sealed, opens to version 2.
    let snapshot_key = tokn_config::decode_hex32(SNAPSHOT_KEY).unwrap();
    let started = Instant::now();
    let opened = loop {
        let opened = tokn_proxy::control::read_sealed(&snapshot_path, &snapshot_key)
            .unwrap()
            .unwrap();
        let opened: Value = serde_json::from_slice(&opened).unwrap();
        if opened["version"] == 2 || started.elapsed() > Duration::from_secs(2) {
            break opened;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(opened["version"], 2);
    let sealed = std::fs::read(&snapshot_path).unwrap();
    assert_eq!(
        std::fs::metadata(&snapshot_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    for needle in [SELLER_KEY.as_bytes(), b"mock-new", b"seller-pool"] {
        assert!(!sealed.windows(needle.len()).any(|w| w == needle));
    }

    // A revoked key stops working within a second.
    redis.revoke_key(&key).await;
    let started = Instant::now();
    loop {
        let resp = models(&proxy, &key).await;
        if resp.status() == 401 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Restarted while the control plane is down: serves the persisted version 2 at once.
    drop(proxy);
    drop(control);
    redis
        .put_key(&key, json!({"id": key_id, "account": "acct-cp"}))
        .await;
    let proxy = start_proxy("control-restart", &config, PROXY_TOKEN);
    let s = status(&proxy).await;
    assert_eq!(s["config_version"], 2, "{s}");
    assert_eq!(s["config_source"], "persisted");
    assert_eq!(s["last_sync_age_s"], Value::Null);
    let resp = post(&proxy, &key, &chat_body("mock-new", false)).await;
    assert_eq!(resp.status(), 200);
    // And counts its failed attempts to reach the control plane.
    let started = Instant::now();
    while metric(
        &proxy,
        "tokn_control_sync_errors_total{kind=\"transport\"} ",
    )
    .await
    .is_none()
    {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_counted_and_the_proxy_keeps_its_configuration() {
    let control = FakeControl::start().await;
    let redis = Redis::new().await;
    control.publish(1, &pushed(1, "http://127.0.0.1:9/v1", None));
    let dir = tokn_testkit::harness::temp_dir("control-token");
    let config = proxy_config(&control.url, &dir.join("snapshot.sealed"), &redis.prefix);
    let proxy = start_proxy("control-token", &config, "not-the-proxy-token");
    let started = Instant::now();
    while metric(
        &proxy,
        "tokn_control_sync_errors_total{kind=\"unauthorized\"} ",
    )
    .await
    .is_none()
    {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = status(&proxy).await;
    assert_eq!(s["config_version"], 0);
    assert_eq!(s["config_source"], "none");
    assert!(!dir.join("snapshot.sealed").exists());
    // Backed off, not hammering: a handful of attempts in the first second or so.
    assert!(
        control.requests().len() < 20,
        "{}",
        control.requests().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_key_limits_answer_429_with_openai_codes() {
    let control = FakeControl::start().await;
    let mut redis = Redis::new().await;
    control.publish(1, &pushed(1, "http://127.0.0.1:9/v1", None));
    let dir = tokn_testkit::harness::temp_dir("control-limits");
    let config = proxy_config(&control.url, &dir.join("snapshot.sealed"), &redis.prefix);
    let proxy = start_proxy("control-limits", &config, PROXY_TOKEN);
    wait_for_version(&proxy, 1, Duration::from_secs(5)).await;

    let rpm_key = format!("tok_test_rpm_key_{:016x}", rand::random::<u64>());
    let cap_key = format!("tok_test_cap_key_{:016x}", rand::random::<u64>());
    let cap_id = format!("key-cap-{:08x}", rand::random::<u32>());
    redis
        .put_key(
            &rpm_key,
            json!({"id": format!("key-rpm-{:08x}", rand::random::<u32>()), "account": "a",
                   "requests_per_minute": 2}),
        )
        .await;
    redis
        .put_key(
            &cap_key,
            json!({"id": cap_id, "account": "a", "spend_cap_micros": 1}),
        )
        .await;

    // Stay clear of a minute boundary so the window does not restart mid-test.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second >= 55 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    for _ in 0..2 {
        assert_eq!(
            post(&proxy, &rpm_key, &chat_body("mock", false))
                .await
                .status(),
            200
        );
    }
    let resp = post(&proxy, &rpm_key, &chat_body("mock", false)).await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(assert_openai_error(&body), "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");

    // One request costs more than the 1 µ$ cap: the next one is refused.
    assert_eq!(
        post(&proxy, &cap_key, &chat_body("mock", false))
            .await
            .status(),
        200
    );
    let started = Instant::now();
    loop {
        let resp = post(&proxy, &cap_key, &chat_body("mock", false)).await;
        if resp.status() == 429 {
            let body: Value = resp.json().await.unwrap();
            assert_eq!(assert_openai_error(&body), "insufficient_quota");
            break;
        }
        assert_eq!(resp.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spent: u64 = redis
        .conn
        .get(hot::spend_counter(&redis.prefix, &cap_id))
        .await
        .unwrap();
    assert!(spent > 1);
    redis.cleanup().await;
}
