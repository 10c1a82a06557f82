//! The proxy's side of the configuration sync, against the real `tokn-control`: what `fleet.rs`
//! leaves out. A proxy holding a wrong token is refused, counts it, backs off and serves the
//! snapshot a correctly configured run sealed; per-key limits set through the API hold across
//! two proxies sharing Redis; a price version scheduled through the API prices each request by
//! the moment it started, even when the configuration changes while it runs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use common::*;
use serde_json::{json, Value};
use tokn_testkit::control::random_hex32;
use tokn_testkit::harness::temp_dir;
use tokn_testkit::{
    Behavior, ControlOptions, ControlProcess, FakeUpstream, ProxyProcess, TestDatabase,
};

const SECOND: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Polls `check` every 10 ms until it yields a value; fails after `within`.
async fn eventually<T>(
    within: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn status(proxy: &ProxyProcess) -> Value {
    reqwest::get(format!("http://127.0.0.1:{}/status", proxy.metrics_port))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The sample of the first line of a Prometheus page that starts with `name{` or `name ` and
/// carries every one of `labels` (`key="value"`).
async fn metric(url: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let page = reqwest::get(url).await.unwrap().text().await.unwrap();
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn sync_errors(proxy: &ProxyProcess, kind: &str) -> Option<f64> {
    metric(
        &proxy.metrics_url(),
        "tokn_control_sync_errors_total",
        &[&format!("kind=\"{kind}\"")],
    )
    .await
}

/// What the control plane publishes now, exactly as proxies receive it.
async fn published(control: &ControlProcess) -> (String, Value) {
    let (_, text) = Client::new().watch(control, 0, false).await;
    let value = serde_json::from_str(&text).unwrap();
    (text, value)
}

/// Opens a sealed snapshot file as CONTROL.md describes it: `"tokn-snapshot-1\n" ‖ nonce (12) ‖
/// AES-256-GCM ciphertext and tag`, the tag line as associated data.
fn unseal(key_hex: &str, sealed: &[u8]) -> Option<Vec<u8>> {
    const MAGIC: &[u8] = b"tokn-snapshot-1\n";
    let rest = sealed.strip_prefix(MAGIC)?;
    if rest.len() < 12 + 16 {
        return None;
    }
    let (nonce, ciphertext) = rest.split_at(12);
    let key: [u8; 32] = hex::decode(key_hex).ok()?.try_into().ok()?;
    Aes256Gcm::new(&key.into())
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: MAGIC,
            },
        )
        .ok()
}

/// One chat completion: (status, `x-request-id`, `retry-after`, body).
async fn chat_full(
    c: &Client,
    proxy: &ProxyProcess,
    key: &str,
    model: &str,
) -> (u16, String, Option<String>, Value) {
    let resp = c
        .http
        .post(format!("{}/chat/completions", proxy.base_url()))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (id, retry) = (
        header("x-request-id").unwrap_or_default(),
        header("retry-after"),
    );
    let status = resp.status().as_u16();
    (status, id, retry, resp.json().await.unwrap_or(Value::Null))
}

/// The usage record of one request, once written.
async fn record(proxy: &ProxyProcess, request_id: &str) -> Value {
    eventually(2 * SECOND, "usage record written", async || {
        proxy.record_for(request_id)
    })
    .await
}

/// Waits (one second at most) until `proxy` knows `key`: `/v1/models` is free of limits, so
/// this spends none of the key's budget.
async fn known(c: &Client, proxy: &ProxyProcess, key: &str) {
    eventually(SECOND, "key known to the proxy", async || {
        let resp = c
            .http
            .get(format!("{}/models", proxy.base_url()))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        (resp.status() == 200).then_some(())
    })
    .await;
}

async fn wait_for_version(proxy: &ProxyProcess, at_least: u64) -> Value {
    eventually(
        SECOND,
        "configuration version reached the proxy",
        async || {
            let s = status(proxy).await;
            (s["config_version"].as_u64().unwrap() >= at_least).then_some(s)
        },
    )
    .await
}

async fn new_key(
    c: &Client,
    control: &ControlProcess,
    m: &Market,
    body: Value,
) -> (String, String) {
    let k = c
        .api(control, "POST", "/v1/keys", &m.buyer, Some(body))
        .await;
    (
        k["id"].as_str().unwrap().to_owned(),
        k["secret"].as_str().unwrap().to_owned(),
    )
}

async fn account_id(c: &Client, control: &ControlProcess, token: &str) -> String {
    c.api(control, "GET", "/v1/account", token, None).await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_a_wrong_token_is_refused_and_serves_its_sealed_snapshot() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let mut control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let dir = temp_dir("proxy-sync-token");
    let snapshot = dir.join("snapshot.sealed");
    let snapshot_key = random_hex32();
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-seller-token"]).await;
    list_pool(&c, &control, &m, &m.creds[0]).await;
    let (_, key) = new_key(&c, &control, &m, json!({})).await;

    // A correctly configured proxy runs what the control plane publishes and seals it to disk:
    // private, and opening under the snapshot key to exactly the published document.
    let proxy = start_proxy(&control, &snapshot, &snapshot_key, None, "warn");
    c.within_a_second(&proxy, &key, "gpt-test", "key accepted", |s, _| s == 200)
        .await;
    let (document, pushed) = published(&control).await;
    let version = pushed["version"].as_u64().unwrap();
    let s = wait_for_version(&proxy, version).await;
    assert_eq!(s["config_source"], "control", "{s}");
    assert_eq!(s["last_sync_age_s"], 0, "{s}");
    eventually(2 * SECOND, "the published version sealed", async || {
        let sealed = std::fs::read(&snapshot).ok()?;
        (unseal(&snapshot_key, &sealed)? == document.as_bytes()).then_some(())
    })
    .await;
    let mode = std::fs::metadata(&snapshot).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(proxy);

    // The same snapshot, a wrong token: the persisted configuration is served at once, the
    // refusals are counted, backed off and logged without the token, and nothing is lost.
    let wrong = format!("proxy-{}", random_hex32());
    let refused_started = Instant::now();
    let wrong_env = |log: &'static str| {
        [
            ("T_PROXY_TOKEN", wrong.clone()),
            ("T_SNAPSHOT_KEY", snapshot_key.clone()),
            ("TOKN_LOG", log.to_owned()),
        ]
    };
    let env = wrong_env("debug");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let refused = ProxyProcess::start(
        &proxy_binary(),
        "proxy-wrong-token",
        &proxy_body(&control, &snapshot, None),
        &env,
    );
    let s = status(&refused).await;
    assert_eq!(s["config_version"], version, "{s}");
    assert_eq!(s["config_source"], "persisted", "{s}");
    assert_eq!(s["last_sync_age_s"], Value::Null, "{s}");
    let (code, body) = c.chat(&refused, &key, "gpt-test").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(last_upstream_key(&fake), "Bearer sk-seller-token");

    // Without a snapshot, a wrong token leaves the proxy empty (every key unknown) and writes
    // no file.
    let fresh = dir.join("fresh.sealed");
    let env = wrong_env("warn");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let empty = ProxyProcess::start(
        &proxy_binary(),
        "proxy-wrong-token-empty",
        &proxy_body(&control, &fresh, None),
        &env,
    );
    let s = status(&empty).await;
    assert_eq!(s["config_version"], 0, "{s}");
    assert_eq!(s["config_source"], "none", "{s}");
    assert_eq!(s["hot_state"], "in_process", "{s}");
    let (code, body) = c.chat(&empty, &key, "gpt-test").await;
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");

    for p in [&refused, &empty] {
        eventually(2 * SECOND, "unauthorized sync counted", async || {
            sync_errors(p, "unauthorized").await
        })
        .await;
    }
    assert!(!fresh.exists(), "a refused proxy wrote a snapshot");
    let s = status(&refused).await;
    assert_eq!(
        (&s["config_version"], &s["config_source"]),
        (&json!(version), &json!("persisted")),
        "{s}"
    );
    assert_eq!(c.chat(&refused, &key, "gpt-test").await.0, 200);
    // The control plane answered 401 each time, at a backed-off pace (100 ms doubling to 2 s:
    // a handful per proxy in this time, not a stream).
    let refusals = metric(
        &format!("{}/metrics", control.url()),
        "tokn_control_requests_total",
        &["route=\"/internal/v1/config\"", "status=\"401\""],
    )
    .await
    .unwrap_or(0.0);
    let elapsed = refused_started.elapsed();
    eprintln!("401 answers to two wrong-token proxies in {elapsed:?}: {refusals}");
    assert!(refusals >= 2.0, "{refusals}");
    assert!(
        refusals <= 2.0 * (6.0 + elapsed.as_secs_f64()),
        "{refusals} refusals in {elapsed:?}: no back-off"
    );
    let log = refused.log();
    assert!(log.contains("refused this proxy's token"), "{log}");
    assert!(!log.contains(&wrong), "the proxy logged its token");
    drop(refused);
    drop(empty);

    // The right token again, from the sealed snapshot: it asks for what is newer than that
    // snapshot (a proxy asking from version 0 would be sent the same version and count it
    // `stale`), takes the next change within a second and reports a live sync.
    let proxy = start_proxy(&control, &snapshot, &snapshot_key, None, "warn");
    assert_eq!(status(&proxy).await["config_source"], "persisted");
    let (_, key2) = new_key(&c, &control, &m, json!({})).await;
    c.within_a_second(&proxy, &key2, "gpt-test", "key after restart", |s, _| {
        s == 200
    })
    .await;
    let s = status(&proxy).await;
    assert!(s["config_version"].as_u64().unwrap() > version, "{s}");
    assert_eq!(s["config_source"], "control", "{s}");
    assert_eq!(s["last_sync_age_s"], 0, "{s}");
    assert_eq!(sync_errors(&proxy, "stale").await, None);

    // key2 came as a delta (only a key changed), persisted in the log beside the sealed file.
    let reached = s["config_version"].clone();
    let log = dir.join("snapshot.sealed.deltas");
    eventually(2 * SECOND, "the delta persisted", async || {
        (std::fs::metadata(&log).ok()?.len() > 0).then_some(())
    })
    .await;

    // The control plane dies: the broken watch is counted and serving goes on.
    control.kill();
    eventually(2 * SECOND, "lost control plane counted", async || {
        sync_errors(&proxy, "transport").await
    })
    .await;
    assert_eq!(c.chat(&proxy, &key2, "gpt-test").await.0, 200);
    drop(proxy);

    // Restarted while the control plane is down: the sealed file and its delta log give the
    // version it ran, key2 included.
    let proxy = start_proxy(&control, &snapshot, &snapshot_key, None, "warn");
    let s = status(&proxy).await;
    assert_eq!(s["config_version"], reached, "{s}");
    assert_eq!(s["config_source"], "persisted", "{s}");
    assert_eq!(c.chat(&proxy, &key2, "gpt-test").await.0, 200);
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_limits_set_through_the_api_hold_across_two_proxies_sharing_redis() {
    let db = TestDatabase::create("proxysync").await;
    let prefix = RedisPrefix::new("sync");
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            database_url: Some(db.url.clone()),
            redis: Some(("redis://127.0.0.1:6379".to_owned(), prefix.0.clone())),
            ..ControlOptions::default()
        },
    );
    let dir = temp_dir("proxy-sync-limits");
    let snapshot_key = random_hex32();
    let a = start_proxy(
        &control,
        &dir.join("a.sealed"),
        &snapshot_key,
        Some(&prefix.0),
        "warn",
    );
    let b = start_proxy(
        &control,
        &dir.join("b.sealed"),
        &snapshot_key,
        Some(&prefix.0),
        "warn",
    );
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-seller-limits"]).await;
    list_pool(&c, &control, &m, &m.creds[0]).await;
    let version = published(&control).await.1["version"].as_u64().unwrap();
    for p in [&a, &b] {
        assert_eq!(wait_for_version(p, version).await["hot_state"], "redis");
    }

    // Two requests a minute, fleet-wide: one through each proxy, then both refuse. A minute
    // boundary crossed mid-way restarts the window, so that attempt is redone with a new key.
    let unix_minute = || now_ms() / 60_000;
    let mut attempts = 0;
    let (code, retry, body) = loop {
        attempts += 1;
        let (_, key) = new_key(&c, &control, &m, json!({"requests_per_minute": 2})).await;
        known(&c, &a, &key).await;
        known(&c, &b, &key).await;
        let minute = unix_minute();
        let first = chat_full(&c, &a, &key, "gpt-test").await;
        let second = chat_full(&c, &b, &key, "gpt-test").await;
        let third = chat_full(&c, &a, &key, "gpt-test").await;
        let fourth = chat_full(&c, &b, &key, "gpt-test").await;
        if unix_minute() != minute {
            assert!(attempts < 3, "three minute boundaries in a row");
            continue;
        }
        assert_eq!((first.0, second.0), (200, 200), "{} {}", first.3, second.3);
        assert_eq!(fourth.0, 429, "{}", fourth.3);
        assert_eq!(fourth.3["error"]["code"], "rate_limit_exceeded");
        break (third.0, third.2, third.3);
    };
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    let retry: u64 = retry.expect("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");

    // Spend is counted fleet-wide: a key that spent through A, capped later through the API,
    // is refused by B (which never served it) within a second, then by A.
    let (key_id, key) = new_key(&c, &control, &m, json!({"name": "capped"})).await;
    known(&c, &a, &key).await;
    known(&c, &b, &key).await;
    let (code, body) = c.chat(&a, &key, "gpt-test").await;
    assert_eq!(code, 200, "{body}");
    let counter = tokn_config::hot::spend_counter(&prefix.0, &key_id);
    let mut conn = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let spent = eventually(2 * SECOND, "spend counted in Redis", async || {
        let spent: Option<u64> = redis::cmd("GET")
            .arg(&counter)
            .query_async(&mut conn)
            .await
            .unwrap();
        spent.filter(|s| *s > 1)
    })
    .await;
    eprintln!("spent {spent} µ$ through proxy A");
    c.api(
        &control,
        "PATCH",
        &format!("/v1/keys/{key_id}"),
        &m.buyer,
        Some(json!({"spend_cap_micros": 1})),
    )
    .await;
    c.within_a_second(
        &b,
        &key,
        "gpt-test",
        "spend cap on the other proxy",
        |s, b| s == 429 && b["error"]["code"] == "insufficient_quota",
    )
    .await;
    let (code, body) = c.chat(&a, &key, "gpt-test").await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    // Lifting the cap through the API lets the key spend again.
    c.api(
        &control,
        "PATCH",
        &format!("/v1/keys/{key_id}"),
        &m.buyer,
        Some(json!({"spend_cap_micros": null})),
    )
    .await;
    c.within_a_second(&b, &key, "gpt-test", "spend cap lifted", |s, _| s == 200)
        .await;

    drop(a);
    drop(b);
    drop(control);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_version_scheduled_through_the_api_bills_requests_by_their_start() {
    let db = TestDatabase::create("proxysync").await;
    let prefix = RedisPrefix::new("sync");
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            database_url: Some(db.url.clone()),
            redis: Some(("redis://127.0.0.1:6379".to_owned(), prefix.0.clone())),
            ..ControlOptions::default()
        },
    );
    let dir = temp_dir("proxy-sync-prices");
    let proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        Some(&prefix.0),
        "warn",
    );
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-seller-prices"]).await;
    let pool = list_pool(&c, &control, &m, &m.creds[0]).await;
    let (key_id, key) = new_key(&c, &control, &m, json!({})).await;
    c.within_a_second(&proxy, &key, "gpt-test", "key accepted", |s, _| s == 200)
        .await;

    // A model added to the catalog is listed within a second of a pool selling it (a model
    // nobody sells is not listed).
    c.api(
        &control,
        "POST",
        "/v1/admin/catalog",
        &m.admin,
        Some(json!({"model_id": "gpt-listed", "provider": "openai",
                    "input_price_micros_per_mtok": 1, "output_price_micros_per_mtok": 1})),
    )
    .await;
    c.api(
        &control,
        "POST",
        "/v1/pools",
        &m.seller,
        Some(
            json!({"credential_id": m.creds[0], "face_value_micros": 100_000_000,
                    "price_ratio_ppm": 600_000, "models": ["gpt-listed"]}),
        ),
    )
    .await;
    let started = Instant::now();
    eventually(SECOND, "new model listed", async || {
        let body: Value = c
            .http
            .get(format!("{}/models", proxy.base_url()))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["data"]
            .as_array()?
            .iter()
            .any(|m| m["id"] == "gpt-listed")
            .then_some(())
    })
    .await;
    eprintln!("propagation: new model listed: {:?}", started.elapsed());

    // gpt-test: a price in force now, and a tenfold one from two seconds ahead.
    let price = |input: u64, at: Option<u64>| {
        let mut body = json!({"model_id": "gpt-test", "provider": "openai",
            "input_price_micros_per_mtok": input, "output_price_micros_per_mtok": 2 * input,
            "cached_input_price_micros_per_mtok": input / 2});
        if let Some(at) = at {
            body["effective_at_ms"] = json!(at);
        }
        Some(body)
    };
    let current = c
        .api(
            &control,
            "POST",
            "/v1/admin/catalog",
            &m.admin,
            price(1_000_000, None),
        )
        .await;
    let effective_at = now_ms() + 2_000;
    let scheduled = c
        .api(
            &control,
            "POST",
            "/v1/admin/catalog",
            &m.admin,
            price(10_000_000, Some(effective_at)),
        )
        .await;
    let (v_now, v_next) = (current["version"].clone(), scheduled["version"].clone());
    assert_eq!(scheduled["effective_at_ms"], effective_at);
    // The proxy holds the schedule before it takes effect (published off the API's path: at
    // once, not before the call returns).
    let (pushed, model) = eventually(SECOND, "the schedule is published", async || {
        let (_, pushed) = published(&control).await;
        let model = pushed["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == "gpt-test")
            .unwrap()
            .clone();
        (model["scheduled_prices"][0]["version"] == v_next).then_some((pushed, model))
    })
    .await;
    assert_eq!(model["price_version"], v_now, "{model}");
    assert_eq!(model["scheduled_prices"][0]["version"], v_next, "{model}");
    let pushed_version = pushed["version"].as_u64().unwrap();
    wait_for_version(&proxy, pushed_version).await;

    // One request starts before the new price and is held by the upstream until a second one
    // arrives. Meanwhile the price comes into force (the proxy applies the pushed schedule on
    // its own: the control plane publishes no new version for it) and another change replaces
    // the configuration the first request started on. Then the second request is sent.
    let seen = fake.received().len();
    fake.set_default(Behavior {
        gate_in_flight: Some(2),
        ..Behavior::default()
    });
    let held = chat_full(&c, &proxy, &key, "gpt-test");
    let later = async {
        eventually(
            SECOND,
            "the first request reached the upstream",
            async || (fake.received().len() > seen).then_some(()),
        )
        .await;
        let left = effective_at.saturating_sub(now_ms());
        assert!(left > 0, "the first request started after the new price");
        tokio::time::sleep(Duration::from_millis(left + 1)).await;
        new_key(&c, &control, &m, json!({"name": "mid-flight change"})).await;
        let version = eventually(SECOND, "the change is published", async || {
            let version = published(&control).await.1["version"].as_u64().unwrap();
            (version > pushed_version).then_some(version)
        })
        .await;
        wait_for_version(&proxy, version).await;
        chat_full(&c, &proxy, &key, "gpt-test").await
    };
    let (before, after) = tokio::join!(held, later);
    fake.set_default(Behavior::default());
    assert_eq!((before.0, after.0), (200, 200), "{} {}", before.3, after.3);

    let seller = account_id(&c, &control, &m.seller).await;
    let buyer = account_id(&c, &control, &m.buyer).await;
    let rec = record(&proxy, &before.1).await;
    assert_eq!(rec["price_version"], v_now, "{rec}");
    // (17-3)×$1/M + 3×$0.50/M + 5×$2/M = 25.5 µ$ → 26.
    assert_eq!(rec["list_cost_micros"], 26, "{rec}");
    assert_eq!(rec["key_id"], key_id.as_str(), "{rec}");
    assert_eq!(rec["account"], buyer.as_str(), "{rec}");
    assert_eq!(rec["seller"], seller.as_str(), "{rec}");
    assert_eq!(rec["pool_id"], pool.as_str(), "{rec}");
    let rec = record(&proxy, &after.1).await;
    assert_eq!(rec["price_version"], v_next, "{rec}");
    assert_eq!(rec["list_cost_micros"], 255, "{rec}");

    drop(proxy);
    drop(control);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `tokn_config_applied_total` count of one form (`full` or `delta`).
async fn applied(proxy: &ProxyProcess, form: &str) -> u64 {
    let text = proxy_metrics(proxy).await;
    let line = format!("tokn_config_applied_total{{form=\"{form}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Waits until the proxy runs the control plane's published version.
async fn caught_up(c: &Client, control: &ControlProcess, proxy: &ProxyProcess) -> u64 {
    let (_, full) = c.watch(control, 0, false).await;
    let version = serde_json::from_str::<Value>(&full).unwrap()["version"]
        .as_u64()
        .unwrap();
    eventually(
        5 * SECOND,
        "the proxy runs the published version",
        async || {
            (status(proxy).await["config_version"].as_u64() >= Some(version)).then_some(version)
        },
    )
    .await
}

/// Pool, catalog and account changes reach a running proxy as deltas — a pool listed, one
/// paused, a price change, a buyer suspended — each in effect within a second, with no whole
/// configuration downloaded; a model new to the catalog (which can change every pool's
/// models) travels whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_catalog_and_account_changes_reach_a_proxy_as_deltas() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let dir = temp_dir("proxy-sync-pool-deltas");
    let proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        None,
        "info",
    );
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-first", "sk-second"]).await;
    let first = list_pool(&c, &control, &m, &m.creds[0]).await;
    let (_, key) = new_key(&c, &control, &m, json!({})).await;
    c.within_a_second(&proxy, &key, "gpt-test", "served", |s, _| s == 200)
        .await;
    assert_eq!(last_upstream_key(&fake), "Bearer sk-first");
    let v0 = caught_up(&c, &control, &proxy).await;
    let full_before = applied(&proxy, "full").await;

    // A second pool listed, the first paused: served by the second at once.
    let second = list_pool(&c, &control, &m, &m.creds[1]).await;
    c.api(
        &control,
        "PATCH",
        &format!("/v1/pools/{first}"),
        &m.seller,
        Some(json!({"status": "paused"})),
    )
    .await;
    c.within_a_second(&proxy, &key, "gpt-test", "the second pool", |s, _| {
        s == 200 && last_upstream_key(&fake) == "Bearer sk-second"
    })
    .await;
    let (kind, text) = c.watch_asking(&control, v0, "delta=true&pools=true").await;
    assert_eq!(kind, "delta", "{text}");
    let delta: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(delta["pools"].as_array().unwrap().len(), 1, "{delta}");
    assert_eq!(delta["pools"][0]["pool"]["id"], second.as_str());
    assert_eq!(
        delta["pools"][0]["after"],
        Value::Null,
        "first in the queue now"
    );
    assert_eq!(delta["pools_removed"], json!([first]));
    assert!(text.len() < 2_000, "{} bytes for two pools", text.len());
    // A proxy of an earlier release (keys-only deltas) gets it whole.
    assert_eq!(c.watch(&control, v0, true).await.0, "full");

    // A new price for the model: the catalog travels, priced from the next request on.
    let v1 = caught_up(&c, &control, &proxy).await;
    c.api(
        &control,
        "POST",
        "/v1/admin/catalog",
        &m.admin,
        Some(json!({
            "model_id": "gpt-test", "provider": "openai",
            "input_price_micros_per_mtok": 300_000, "output_price_micros_per_mtok": 900_000
        })),
    )
    .await;
    let (kind, text) = c.watch_asking(&control, v1, "delta=true&pools=true").await;
    assert_eq!(kind, "delta", "{text}");
    let delta: Value = serde_json::from_str(&text).unwrap();
    let model = delta["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "gpt-test")
        .unwrap();
    assert_eq!(model["input_price_micros_per_mtok"], 300_000, "{delta}");
    assert!(delta.get("pools").is_none(), "{delta}");

    // An alias for Claude Code: served at once under the new name, billed as the model; gone
    // when removed. An alias never shadows a model id, nor names a model not in the catalog.
    let alias = |name: &str| format!("/v1/admin/catalog/aliases/{name}");
    let target = json!({"model_id": "gpt-test"});
    let put = c
        .api(
            &control,
            "PUT",
            &alias("claude-gpt"),
            &m.admin,
            Some(target.clone()),
        )
        .await;
    assert_eq!(put, json!({"alias": "claude-gpt", "model_id": "gpt-test"}));
    c.within_a_second(&proxy, &key, "claude-gpt", "served by its alias", |s, _| {
        s == 200
    })
    .await;
    let listed = c
        .api(&control, "GET", "/v1/admin/catalog/aliases", &m.admin, None)
        .await;
    assert!(
        listed.as_array().unwrap().contains(&put),
        "beside the catalog's own: {listed}"
    );
    for (path, body, status) in [
        (alias("gpt-test"), target.clone(), 409),
        (alias("claude-x"), json!({"model_id": "no-such-model"}), 404),
        (alias("claude-x"), json!({"model": "gpt-test"}), 400),
    ] {
        let (got, error) = c.call(&control, "PUT", &path, &m.admin, Some(body)).await;
        assert_eq!(got, status, "{path} {error}");
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    let (gone, _) = c
        .call(&control, "DELETE", &alias("claude-gpt"), &m.admin, None)
        .await;
    assert_eq!(gone, 204);
    let (again, _) = c
        .call(&control, "DELETE", &alias("claude-gpt"), &m.admin, None)
        .await;
    assert_eq!(again, 404);
    c.within_a_second(&proxy, &key, "claude-gpt", "the alias gone", |s, _| {
        s == 404
    })
    .await;

    // The buyer suspended: its keys revoked by a delta.
    let v2 = caught_up(&c, &control, &proxy).await;
    let buyer = account_id(&c, &control, &m.buyer).await;
    c.api(
        &control,
        "PATCH",
        &format!("/v1/admin/accounts/{buyer}"),
        &m.admin,
        Some(json!({"status": "suspended"})),
    )
    .await;
    c.within_a_second(&proxy, &key, "gpt-test", "the key refused", |s, _| s == 401)
        .await;
    let (kind, text) = c.watch_asking(&control, v2, "delta=true&pools=true").await;
    assert_eq!(kind, "delta", "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["revoked"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    caught_up(&c, &control, &proxy).await;
    assert_eq!(
        applied(&proxy, "full").await,
        full_before,
        "no whole configuration for any of these"
    );
    assert!(applied(&proxy, "delta").await >= 4);

    // A model new to the catalog: whole.
    let v3 = caught_up(&c, &control, &proxy).await;
    c.api(
        &control,
        "POST",
        "/v1/admin/catalog",
        &m.admin,
        Some(json!({
            "model_id": "gpt-new", "provider": "openai",
            "input_price_micros_per_mtok": 1, "output_price_micros_per_mtok": 1
        })),
    )
    .await;
    let (kind, _) = c.watch_asking(&control, v3, "delta=true&pools=true").await;
    assert_eq!(kind, "full");
    caught_up(&c, &control, &proxy).await;
    assert_eq!(applied(&proxy, "full").await, full_before + 1);
    let metrics = proxy_metrics(&proxy).await;
    assert!(!metrics.contains("kind=\"unplaced\""), "{metrics}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pool quarantined for a refused credential stays quarantined across a hundred unrelated
/// configuration changes: the seller's provider sees no further request with that credential,
/// while the buyer is served by the next pool throughout. Replaced, the credential is tried at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_pool_stays_quarantined_across_a_hundred_changes_until_replaced() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let dir = temp_dir("proxy-sync-quarantine");
    let proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        None,
        "info",
    );
    let c = Client::new();
    c.set_setting(&control, "keys_per_account_max", json!(200))
        .await;
    let m = market(&c, &control, &fake, &["sk-soon-refused", "sk-good"]).await;
    let mut pools = Vec::new();
    for cred in &m.creds {
        pools.push(list_pool(&c, &control, &m, cred).await);
    }
    let (_, key) = new_key(&c, &control, &m, json!({})).await;
    c.within_a_second(&proxy, &key, "gpt-test", "served", |s, _| s == 200)
        .await;
    assert_eq!(last_upstream_key(&fake), "Bearer sk-soon-refused");
    // The seller's provider now refuses the first pool's credential.
    fake.set_behavior(
        "sk-soon-refused",
        Behavior {
            status: 401,
            ..Behavior::default()
        },
    );
    let refused = || {
        fake.received()
            .iter()
            .filter(|r| {
                r.headers.get("authorization").map(String::as_str) == Some("Bearer sk-soon-refused")
            })
            .count()
    };
    let before = refused();
    let (status, body) = c.chat(&proxy, &key, "gpt-test").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(refused(), before + 1, "tried once, then quarantined");
    for i in 0..100 {
        // Key creations and, every other change, the good pool's price lowered (a pool change
        // travelling as a delta).
        if i % 2 == 1 {
            c.api(
                &control,
                "PATCH",
                &format!("/v1/pools/{}", pools[1]),
                &m.seller,
                Some(json!({"price_ratio_ppm": 590_000 - i * 1_000})),
            )
            .await;
        }
        let (_, new) = new_key(&c, &control, &m, json!({})).await;
        if i % 10 == 9 {
            // The change is in effect at the proxy: the new key is served, by the good pool.
            c.within_a_second(&proxy, &new, "gpt-test", "new key served", |s, _| s == 200)
                .await;
            assert_eq!(last_upstream_key(&fake), "Bearer sk-good");
        }
    }
    assert_eq!(
        refused(),
        before + 1,
        "no request with the refused credential"
    );
    // The seller rotates the refused key. Its pool waits for the new one to verify (the same
    // endpoint keeps its approval); then it is tried at once, its back-off forgotten.
    let path = format!("/v1/credentials/{}", m.creds[0]);
    let rotated = json!({"credential": {"provider": "openai", "api_key": "sk-rotated",
        "base_url": fake.base_url()}});
    let replaced = c
        .api(&control, "PUT", &path, &m.seller, Some(rotated))
        .await;
    assert_eq!(replaced["verify_status"], Value::Null, "{replaced}");
    assert!(replaced["approved_at_ms"].is_i64(), "{replaced}");
    let verified = c
        .api(&control, "POST", &format!("{path}/verify"), &m.seller, None)
        .await;
    assert_eq!(verified["verify_status"], "valid", "{verified}");
    c.within_a_second(
        &proxy,
        &key,
        "gpt-test",
        "the rotated credential",
        |s, _| s == 200 && last_upstream_key(&fake) == "Bearer sk-rotated",
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
