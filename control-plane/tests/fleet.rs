//! The control plane and the proxy together, as operators run them: the real `tokn-control`
//! and `tokn-proxy` binaries, Postgres + Redis (fleet) or SQLite + in-process hot state
//! (embedded), the fake OpenAI upstream standing in for the providers.
//!
//! Propagation is measured, printed, and bounded by the one-second promise of the design: each
//! wait polls at most for one second.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokn_testkit::control::random_hex32;
use tokn_testkit::harness::temp_dir;
use tokn_testkit::{
    Behavior, ControlOptions, ControlProcess, FakeUpstream, ProxyProcess, TestDatabase,
};

/// The proxy binary, built next to this package's binaries (once per test process).
fn proxy_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let control = PathBuf::from(env!("CARGO_BIN_EXE_tokn-control"));
            let dir = control.parent().unwrap().to_owned();
            let release = dir.ends_with("release");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut build = Command::new(cargo);
            build
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .args([
                    "build",
                    "--quiet",
                    "-p",
                    "tokn-proxy",
                    "--bin",
                    "tokn-proxy",
                ]);
            if release {
                build.arg("--release");
            }
            assert!(
                build.status().unwrap().success(),
                "building tokn-proxy failed"
            );
            dir.join("tokn-proxy")
        })
        .clone()
}

fn control_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tokn-control"))
}

struct Client {
    http: reqwest::Client,
}

impl Client {
    fn new() -> Self {
        Self {
            http: reqwest::Client::new(),
        }
    }

    async fn api(
        &self,
        control: &ControlProcess,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Value {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", control.url()))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    /// One chat completion through the proxy: (status, body).
    async fn chat(&self, proxy: &ProxyProcess, key: &str, model: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/chat/completions", proxy.base_url()))
            .bearer_auth(key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Polls (at most one second) until `pred` holds for a chat; returns how long it took.
    async fn within_a_second(
        &self,
        proxy: &ProxyProcess,
        key: &str,
        model: &str,
        what: &str,
        pred: impl Fn(u16, &Value) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let (status, body) = self.chat(proxy, key, model).await;
            if pred(status, &body) {
                let took = started.elapsed();
                eprintln!("propagation: {what}: {took:?}");
                return took;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{what}: not within 1 s (last: {status} {body})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The proxy configuration of a control-plane-fed proxy.
fn proxy_body(control: &ControlProcess, snapshot: &Path, redis_prefix: Option<&str>) -> String {
    let mut body = format!(
        "[control]\nurl = \"{}\"\ntoken = \"env:T_PROXY_TOKEN\"\nsnapshot_path = \"{}\"\nsnapshot_key = \"env:T_SNAPSHOT_KEY\"\n",
        control.url(),
        snapshot.display()
    );
    if let Some(prefix) = redis_prefix {
        body.push_str(&format!(
            "[hot_state]\nredis_url = \"redis://127.0.0.1:6379\"\nprefix = \"{prefix}\"\n"
        ));
    }
    body
}

fn start_proxy(
    control: &ControlProcess,
    snapshot: &Path,
    snapshot_key: &str,
    redis_prefix: Option<&str>,
    log: &str,
) -> ProxyProcess {
    ProxyProcess::start(
        &proxy_binary(),
        "fleet-proxy",
        &proxy_body(control, snapshot, redis_prefix),
        &[
            ("T_PROXY_TOKEN", &control.proxy_token),
            ("T_SNAPSHOT_KEY", snapshot_key),
            ("TOKN_LOG", log),
        ],
    )
}

/// Accounts, the `gpt-test` model and one seller credential per fake key.
struct Market {
    admin: String,
    buyer: String,
    seller: String,
    creds: Vec<String>,
}

async fn market(
    c: &Client,
    control: &ControlProcess,
    fake: &FakeUpstream,
    seller_keys: &[&str],
) -> Market {
    let admin = control.admin_token.clone();
    c.api(
        control,
        "POST",
        "/v1/admin/catalog",
        &admin,
        Some(json!({
            "model_id": "gpt-test", "provider": "openai",
            "input_price_micros_per_mtok": 150_000, "output_price_micros_per_mtok": 600_000
        })),
    )
    .await;
    let b = c
        .api(
            control,
            "POST",
            "/v1/admin/accounts",
            &admin,
            Some(json!({"email": "b@example.com", "role": "buyer"})),
        )
        .await;
    let s = c
        .api(
            control,
            "POST",
            "/v1/admin/accounts",
            &admin,
            Some(json!({"email": "s@example.com", "role": "seller"})),
        )
        .await;
    let seller = s["token"].as_str().unwrap().to_owned();
    let mut creds = Vec::new();
    for key in seller_keys {
        let cred = c
            .api(
                control,
                "POST",
                "/v1/credentials",
                &seller,
                Some(json!({"credential": {
                    "provider": "openai", "api_key": key, "base_url": fake.base_url()
                }})),
            )
            .await;
        creds.push(cred["id"].as_str().unwrap().to_owned());
    }
    Market {
        admin,
        buyer: b["token"].as_str().unwrap().to_owned(),
        seller,
        creds,
    }
}

async fn list_pool(c: &Client, control: &ControlProcess, m: &Market, cred: &str) -> String {
    let pool = c
        .api(
            control,
            "POST",
            "/v1/pools",
            &m.seller,
            Some(json!({
                "credential_id": cred, "face_value_micros": 100_000_000, "price_ratio_ppm": 600_000,
                "models": ["gpt-test"]
            })),
        )
        .await;
    pool["id"].as_str().unwrap().to_owned()
}

/// The seller key the fake upstream saw on its last request.
fn last_upstream_key(fake: &FakeUpstream) -> String {
    fake.received()
        .last()
        .and_then(|r| r.headers.get("authorization").cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_pools_reach_the_proxy_within_a_second_in_fleet_mode() {
    let db = TestDatabase::create("fleet").await;
    let prefix = format!("tokn-fleet-{}:", &random_hex32()[..12]);
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            database_url: Some(db.url.clone()),
            redis: Some(("redis://127.0.0.1:6379".to_owned(), prefix.clone())),
            ..ControlOptions::default()
        },
    );
    let dir = temp_dir("fleet");
    let proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        Some(&prefix),
        "warn",
    );
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-seller-a", "sk-seller-b"]).await;
    let pool_a = list_pool(&c, &control, &m, &m.creds[0]).await;

    // A new key works within a second.
    let k = c
        .api(
            &control,
            "POST",
            "/v1/keys",
            &m.buyer,
            Some(json!({"name": "new"})),
        )
        .await;
    let key = k["secret"].as_str().unwrap().to_owned();
    c.within_a_second(&proxy, &key, "gpt-test", "new key accepted", |s, _| {
        s == 200
    })
    .await;
    assert_eq!(last_upstream_key(&fake), "Bearer sk-seller-a");

    // A pool listed later waits its turn (FIFO) ...
    let pool_b = list_pool(&c, &control, &m, &m.creds[1]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        assert_eq!(c.chat(&proxy, &key, "gpt-test").await.0, 200);
        assert_eq!(
            last_upstream_key(&fake),
            "Bearer sk-seller-a",
            "the first-listed pool is used first"
        );
    }
    // ... and takes over within a second once the first is exhausted.
    c.api(
        &control,
        "PATCH",
        &format!("/v1/pools/{pool_a}"),
        &m.seller,
        Some(json!({"status": "exhausted"})),
    )
    .await;
    c.within_a_second(
        &proxy,
        &key,
        "gpt-test",
        "next pool in FIFO order used",
        |s, _| s == 200 && last_upstream_key(&fake) == "Bearer sk-seller-b",
    )
    .await;
    let records = proxy.usage_records();
    assert_eq!(records.last().unwrap()["pool_id"], pool_b.as_str());

    // Limits changed through the API apply within a second (hot state in Redis).
    let key_id = k["id"].as_str().unwrap();
    c.api(
        &control,
        "PATCH",
        &format!("/v1/keys/{key_id}"),
        &m.buyer,
        Some(json!({"allowed_models": ["mock"]})),
    )
    .await;
    c.within_a_second(
        &proxy,
        &key,
        "gpt-test",
        "allowed models narrowed",
        |s, _| s == 404 || s == 403,
    )
    .await;
    c.api(
        &control,
        "PATCH",
        &format!("/v1/keys/{key_id}"),
        &m.buyer,
        Some(json!({"allowed_models": null})),
    )
    .await;
    c.within_a_second(
        &proxy,
        &key,
        "gpt-test",
        "allowed models widened",
        |s, _| s == 200,
    )
    .await;

    // A revoked key is refused within a second, everywhere.
    c.api(
        &control,
        "DELETE",
        &format!("/v1/keys/{key_id}"),
        &m.buyer,
        None,
    )
    .await;
    c.within_a_second(&proxy, &key, "gpt-test", "revoked key refused", |s, b| {
        s == 401 && b["error"]["code"] == "invalid_api_key"
    })
    .await;

    // Suspending the buyer refuses all its keys.
    let k2 = c
        .api(&control, "POST", "/v1/keys", &m.buyer, Some(json!({})))
        .await;
    let key2 = k2["secret"].as_str().unwrap().to_owned();
    c.within_a_second(&proxy, &key2, "gpt-test", "second key accepted", |s, _| {
        s == 200
    })
    .await;
    let buyer_id = c.api(&control, "GET", "/v1/account", &m.buyer, None).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.api(
        &control,
        "PATCH",
        &format!("/v1/admin/accounts/{buyer_id}"),
        &m.admin,
        Some(json!({"status": "suspended"})),
    )
    .await;
    c.within_a_second(
        &proxy,
        &key2,
        "gpt-test",
        "suspended account's key refused",
        |s, _| s == 401,
    )
    .await;

    // The proxy reports the version it runs, on /status and /metrics.
    let pushed: Value = reqwest::Client::new()
        .get(format!("{}/internal/v1/config?after=0", control.url()))
        .bearer_auth(&control.proxy_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let status: Value = reqwest::get(format!("http://127.0.0.1:{}/status", proxy.metrics_port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["config_version"] == pushed["version"] {
            assert_eq!(status["config_source"], "control");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{status} vs {}",
            pushed["version"]
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = reqwest::get(proxy.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("tokn_config_version {}", pushed["version"])),
        "version in /metrics"
    );

    drop(proxy);
    drop(control);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_keeps_serving_without_the_control_plane_in_embedded_mode() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let mut control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let dir = temp_dir("embedded");
    let snapshot = dir.join("snapshot.sealed");
    let snapshot_key = random_hex32();
    let proxy = start_proxy(&control, &snapshot, &snapshot_key, None, "warn");
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-seller-a"]).await;
    list_pool(&c, &control, &m, &m.creds[0]).await;
    let k = c
        .api(&control, "POST", "/v1/keys", &m.buyer, Some(json!({})))
        .await;
    let key = k["secret"].as_str().unwrap().to_owned();
    c.within_a_second(
        &proxy,
        &key,
        "gpt-test",
        "new key accepted (in-process hot state)",
        |s, _| s == 200,
    )
    .await;

    // The control plane dies: the proxy serves on.
    control.kill();
    for _ in 0..3 {
        assert_eq!(c.chat(&proxy, &key, "gpt-test").await.0, 200);
    }
    // A proxy started while the control plane is down serves from the sealed snapshot.
    drop(proxy);
    let sealed = std::fs::read(&snapshot).unwrap();
    assert!(
        !sealed.windows(11).any(|w| w == b"sk-seller-a"),
        "the snapshot on disk is sealed"
    );
    let proxy = start_proxy(&control, &snapshot, &snapshot_key, None, "warn");
    let (status, body) = c.chat(&proxy, &key, "gpt-test").await;
    assert_eq!(
        status, 200,
        "restarted proxy serves from its last snapshot: {body}"
    );
    assert_eq!(last_upstream_key(&fake), "Bearer sk-seller-a");

    // With the control plane back (same store), changes flow again.
    control.restart();
    // The proxy retries a lost control plane with back-off capped at 2 s; let it reconnect.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let k2 = c
        .api(&control, "POST", "/v1/keys", &m.buyer, Some(json!({})))
        .await;
    let key2 = k2["secret"].as_str().unwrap().to_owned();
    c.within_a_second(
        &proxy,
        &key2,
        "gpt-test",
        "key created after the control plane returned",
        |s, _| s == 200,
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
