//! What the tests that run both services share: the binaries, an HTTP client for the API and
//! the proxy, and the marketplace every scenario starts from.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokn_testkit::{ControlProcess, FakeUpstream, ProxyProcess};

/// The proxy binary next to this package's binaries. A workspace test run has just built it;
/// it is built here only when missing or older than its sources (`cargo test -p tokn-control`
/// alone). Building it unconditionally would rebuild shared dependencies with another feature
/// set than the test build's, and back again on the next run.
pub fn proxy_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let control = PathBuf::from(env!("CARGO_BIN_EXE_tokn-control"));
            let dir = control.parent().unwrap().to_owned();
            let binary = dir.join("tokn-proxy");
            let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
            let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
            let sources = ["proxy", "config", "sigv4", "Cargo.lock"]
                .iter()
                .filter_map(|p| newest_mtime(&root.join(p)))
                .max();
            if built.is_none() || sources > built {
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
                let mut build = Command::new(cargo);
                build.current_dir(&root).args([
                    "build",
                    "--quiet",
                    "-p",
                    "tokn-proxy",
                    "--bin",
                    "tokn-proxy",
                ]);
                if dir.ends_with("release") {
                    build.arg("--release");
                }
                assert!(
                    build.status().unwrap().success(),
                    "building tokn-proxy failed"
                );
            }
            binary
        })
        .clone()
}

/// The latest modification time of a file or of any file under a directory (`tests/` and
/// `target/` excluded: they do not go into the binary).
fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter(|e| !matches!(e.file_name().to_str(), Some("tests" | "target")))
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

pub fn control_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tokn-control"))
}

pub struct Client {
    pub http: reqwest::Client,
}

impl Client {
    pub fn new() -> Self {
        Self {
            http: reqwest::Client::new(),
        }
    }

    /// What the configuration watch answers a proxy at version `after` (`delta`: one that
    /// applies deltas), at once or within 5 s: its `x-tokn-config` kind and its body.
    pub async fn watch(
        &self,
        control: &ControlProcess,
        after: u64,
        delta: bool,
    ) -> (String, String) {
        self.watch_asking(control, after, &format!("delta={delta}"))
            .await
    }

    /// The watch's answer to a proxy at `after` asking with `query` (`delta=true&pools=true`):
    /// its `x-tokn-config` kind and body.
    pub async fn watch_asking(
        &self,
        control: &ControlProcess,
        after: u64,
        query: &str,
    ) -> (String, String) {
        let resp = self
            .http
            .get(format!(
                "{}/internal/v1/config?after={after}&wait_s=5&{query}",
                control.url()
            ))
            .bearer_auth(&control.proxy_token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let kind = resp.headers()["x-tokn-config"].to_str().unwrap().to_owned();
        (kind, resp.text().await.unwrap())
    }

    /// Sets one of the operator's settings, keeping the others.
    pub async fn set_setting(&self, control: &ControlProcess, name: &str, value: Value) {
        let admin = &control.admin_token;
        let mut settings = self
            .api(control, "GET", "/v1/admin/settings", admin, None)
            .await;
        settings[name] = value;
        self.api(control, "PUT", "/v1/admin/settings", admin, Some(settings))
            .await;
    }

    /// An API call that must succeed: its body.
    pub async fn api(
        &self,
        control: &ControlProcess,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Value {
        let (status, v) = self.call(control, method, path, token, body).await;
        assert!((200..300).contains(&status), "{path}: {status} {v}");
        v
    }

    /// An API call: (status, body).
    pub async fn call(
        &self,
        control: &ControlProcess,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", control.url()))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// One chat completion through the proxy: (status, body).
    pub async fn chat(&self, proxy: &ProxyProcess, key: &str, model: &str) -> (u16, Value) {
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
    pub async fn within_a_second(
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
pub fn proxy_body(control: &ControlProcess, snapshot: &Path, redis_prefix: Option<&str>) -> String {
    proxy_body_on(
        control,
        snapshot,
        redis_prefix.map(|p| ("redis://127.0.0.1:6379", p)),
    )
}

/// The same, on the Redis at `redis` (`(url, prefix)`).
pub fn proxy_body_on(
    control: &ControlProcess,
    snapshot: &Path,
    redis: Option<(&str, &str)>,
) -> String {
    // The fake providers listen on loopback.
    let mut body = format!(
        "[limits]\nallow_internal_upstreams = true\n[control]\nurl = \"{}\"\ntoken = \"env:T_PROXY_TOKEN\"\nsnapshot_path = \"{}\"\nsnapshot_key = \"env:T_SNAPSHOT_KEY\"\n",
        control.url(),
        snapshot.display()
    );
    if let Some((url, prefix)) = redis {
        body.push_str(&format!(
            "[hot_state]\nredis_url = \"{url}\"\nprefix = \"{prefix}\"\n"
        ));
    }
    body
}

pub fn start_proxy(
    control: &ControlProcess,
    snapshot: &Path,
    snapshot_key: &str,
    redis_prefix: Option<&str>,
    log: &str,
) -> ProxyProcess {
    start_proxy_on(
        control,
        snapshot,
        snapshot_key,
        redis_prefix.map(|p| ("redis://127.0.0.1:6379", p)),
        log,
    )
}

/// A control-plane-fed proxy on the Redis at `redis` (`(url, prefix)`), if any.
pub fn start_proxy_on(
    control: &ControlProcess,
    snapshot: &Path,
    snapshot_key: &str,
    redis: Option<(&str, &str)>,
    log: &str,
) -> ProxyProcess {
    start_proxy_with(
        control,
        &proxy_body_on(control, snapshot, redis),
        snapshot_key,
        &[("TOKN_LOG", log)],
    )
}

/// A control-plane-fed proxy on `body` (a [`proxy_body_on`] the caller may have edited), with
/// `envs` besides its two secrets.
pub fn start_proxy_with(
    control: &ControlProcess,
    body: &str,
    snapshot_key: &str,
    envs: &[(&str, &str)],
) -> ProxyProcess {
    let mut all = vec![
        ("T_PROXY_TOKEN", control.proxy_token.as_str()),
        ("T_SNAPSHOT_KEY", snapshot_key),
    ];
    all.extend_from_slice(envs);
    ProxyProcess::start(&proxy_binary(), "fleet-proxy", body, &all)
}

/// A new key of the account `token` opens; its secret.
pub async fn new_key(c: &Client, control: &ControlProcess, token: &str) -> String {
    let k = c
        .api(control, "POST", "/v1/keys", token, Some(json!({})))
        .await;
    k["secret"].as_str().unwrap().to_owned()
}

/// Accounts, the `gpt-test` model and one seller credential per fake key.
pub struct Market {
    pub admin: String,
    pub buyer: String,
    pub seller: String,
    pub creds: Vec<String>,
}

pub async fn market(
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
        let credential = json!({"provider": "openai", "api_key": key, "base_url": fake.base_url()});
        let cred = offer_credential(c, control, &seller, &admin, credential).await;
        creds.push(cred["id"].as_str().unwrap().to_owned());
    }
    Market {
        admin,
        buyer: b["token"].as_str().unwrap().to_owned(),
        seller,
        creds,
    }
}

/// What a seller's credential goes through before its pools serve: stored, verified against
/// its provider (which must accept it), and — when the seller chose the endpoint, as every
/// fake's base URL is — approved by the operator. Returns the credential as the API shows it.
pub async fn offer_credential(
    c: &Client,
    control: &ControlProcess,
    seller: &str,
    admin: &str,
    credential: Value,
) -> Value {
    let cred = c
        .api(
            control,
            "POST",
            "/v1/credentials",
            seller,
            Some(json!({ "credential": credential })),
        )
        .await;
    let id = cred["id"].as_str().unwrap().to_owned();
    let verified = c
        .api(
            control,
            "POST",
            &format!("/v1/credentials/{id}/verify"),
            seller,
            None,
        )
        .await;
    let status = verified["verify_status"].as_str().unwrap_or_default();
    assert!(
        status == "valid" || status == "unchecked",
        "the credential must verify: {verified}"
    );
    if verified["custom_endpoint"] == true {
        let path = format!("/v1/admin/credentials/{id}/approve");
        return c.api(control, "POST", &path, admin, None).await;
    }
    verified
}

pub async fn list_pool(c: &Client, control: &ControlProcess, m: &Market, cred: &str) -> String {
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
pub fn last_upstream_key(fake: &FakeUpstream) -> String {
    fake.received()
        .last()
        .and_then(|r| r.headers.get("authorization").cloned())
        .unwrap_or_default()
}

/// This test's Redis key prefix. Its keys are deleted when it drops, also after a failure:
/// declare it before the services that write under it, so that it drops after them.
/// A fleet's stores for one test: a fresh Postgres database, a Redis key prefix, and the control
/// plane's options naming both. `tag` names both (hyphens become underscores in the database's).
pub async fn fleet_stores(
    tag: &str,
) -> (
    tokn_testkit::TestDatabase,
    RedisPrefix,
    tokn_testkit::ControlOptions,
) {
    let db = tokn_testkit::TestDatabase::create(&tag.replace('-', "_")).await;
    let prefix = RedisPrefix::new(tag);
    let options = tokn_testkit::ControlOptions {
        database_url: Some(db.url.clone()),
        redis: Some(("redis://127.0.0.1:6379".to_owned(), prefix.0.clone())),
        ..tokn_testkit::ControlOptions::default()
    };
    (db, prefix, options)
}

pub struct RedisPrefix(pub String);

impl RedisPrefix {
    pub fn new(tag: &str) -> Self {
        Self(format!(
            "tokn-{tag}-{}:",
            &tokn_testkit::control::random_hex32()[..12]
        ))
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open("redis://127.0.0.1:6379") else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
            return;
        };
        let names: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.0))
            .query(&mut conn)
            .unwrap_or_default();
        if !names.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(names).query(&mut conn);
        }
    }
}

/// A GET on the proxy's operations port, as text.
async fn ops_text(url: String) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// The proxy's `/status`.
pub async fn proxy_status(proxy: &ProxyProcess) -> Value {
    serde_json::from_str(&ops_text(proxy.status_url()).await).unwrap()
}

/// The proxy's `/metrics` text.
pub async fn proxy_metrics(proxy: &ProxyProcess) -> String {
    ops_text(proxy.metrics_url()).await
}

/// Polls the proxy's `/status` until `done` holds (at most `within`); returns that status.
pub async fn wait_for_status(
    proxy: &ProxyProcess,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let status = proxy_status(proxy).await;
        if done(&status) {
            return status;
        }
        assert!(started.elapsed() < within, "{what}: {status}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The ledger check, asserted to hold (no unbalanced transaction or usage, no imbalance, no
/// balance or pool mismatch); its body.
pub async fn assert_ledger_holds(c: &Client, control: &ControlProcess) -> Value {
    let check = c
        .api(
            control,
            "GET",
            "/v1/admin/ledger/check",
            &control.admin_token,
            None,
        )
        .await;
    for field in [
        "unbalanced_transactions",
        "unbalanced_usage",
        "imbalance_micros",
    ] {
        assert_eq!(check[field], 0, "ledger check: {check}");
    }
    for field in ["balance_mismatches", "pool_mismatches"] {
        assert_eq!(check[field], json!([]), "ledger check: {check}");
    }
    check
}
