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

use std::time::Duration;

use serde_json::{json, Value};
use tokn_testkit::control::random_hex32;
use tokn_testkit::harness::temp_dir;
use tokn_testkit::{Behavior, ControlOptions, ControlProcess, FakeUpstream, TestDatabase};

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_pools_reach_the_proxy_within_a_second_in_fleet_mode() {
    let db = TestDatabase::create("fleet").await;
    let redis_prefix = RedisPrefix::new("fleet");
    let prefix = redis_prefix.0.clone();
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
    let status = wait_for_status(&proxy, Duration::from_secs(1), "the pushed version", |s| {
        s["config_version"] == pushed["version"]
    })
    .await;
    assert_eq!(status["config_source"], "control");
    let metrics = proxy_metrics(&proxy).await;
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

/// Both services in embedded mode, a proxy fed by the control plane, and a fresh market.
struct Scene {
    _fake: FakeUpstream,
    control: ControlProcess,
    dir: std::path::PathBuf,
    proxy: tokn_testkit::ProxyProcess,
    c: Client,
    m: Market,
}

async fn scene(tag: &str, options: ControlOptions) -> Scene {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(&control_binary(), options);
    let dir = temp_dir(tag);
    let proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        None,
        "warn",
    );
    let c = Client::new();
    let m = market(&c, &control, &fake, &[]).await;
    Scene {
        _fake: fake,
        control,
        dir,
        proxy,
        c,
        m,
    }
}

/// Lists `credential` for the catalog model `model` through the API (as a fresh seller, with a
/// fresh buyer key) and checks the proxy answers for it within a second. With `verified`, the
/// credential's verification must answer that status first.
async fn served_through_a_listed_pool(
    tag: &str,
    model: Value,
    credential: Value,
    verified: Option<&str>,
    options: ControlOptions,
) {
    let Scene {
        control,
        dir,
        proxy,
        c,
        m,
        ..
    } = scene(tag, options).await;
    let model_id = model["model_id"].as_str().unwrap().to_owned();
    c.api(&control, "POST", "/v1/admin/catalog", &m.admin, Some(model))
        .await;
    let cred = offer_credential(&c, &control, &m.seller, &m.admin, credential).await;
    if let Some(status) = verified {
        assert_eq!(cred["verify_status"], status, "{tag}: {cred}");
    }
    c.api(&control, "POST", "/v1/pools", &m.seller, Some(json!({
        "credential_id": cred["id"], "face_value_micros": 10_000_000, "price_ratio_ppm": 600_000,
        "models": [model_id]
    }))).await;
    let k = c
        .api(&control, "POST", "/v1/keys", &m.buyer, Some(json!({})))
        .await;
    let key = k["secret"].as_str().unwrap().to_owned();
    c.within_a_second(
        &proxy,
        &key,
        &model_id,
        &format!("{tag} pool served"),
        |s, b| s == 200 && b["object"] == "chat.completion",
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `POST /v1/credentials/{id}/verify` for `cred` as `seller`.
async fn verify(c: &Client, control: &ControlProcess, seller: &str, cred: &Value) -> Value {
    let path = format!("/v1/credentials/{}/verify", cred["id"].as_str().unwrap());
    c.api(control, "POST", &path, seller, None).await
}

/// The verification of `credential` created by a fresh seller on a control plane started with
/// `options`.
async fn verification_of(credential: Value, options: ControlOptions) -> Value {
    let control = ControlProcess::start(&control_binary(), options);
    let c = Client::new();
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let m = market(&c, &control, &fake, &[]).await;
    let body = json!({ "credential": credential });
    let cred = c
        .api(&control, "POST", "/v1/credentials", &m.seller, Some(body))
        .await;
    verify(&c, &control, &m.seller, &cred).await
}

/// An Anthropic credential listed through the API is pushed to the proxy and served natively.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_pool_listed_through_the_api_is_served() {
    let anthropic = tokn_testkit::FakeAnthropic::start(Default::default())
        .await
        .unwrap();
    served_through_a_listed_pool(
        "anthropic",
        json!({
            "model_id": "claude-test", "provider": "anthropic", "upstream_model": "claude-upstream",
            "input_price_micros_per_mtok": 3_000_000, "output_price_micros_per_mtok": 15_000_000
        }),
        json!({"provider": "anthropic", "api_key": "sk-ant-fleet", "base_url": anthropic.base_url()}),
        None,
        ControlOptions::default(),
    )
    .await;
}

/// An Azure credential (endpoint, key, deployment, api-version) listed through the API reaches the
/// proxies as an `azure` pool that calls the named deployment with the `api-key` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_pool_listed_through_the_api_is_served() {
    let azure = tokn_testkit::FakeAzure::start(Default::default(), &["gpt4o-fleet"])
        .await
        .unwrap();
    served_through_a_listed_pool(
        "azure",
        json!({
            "model_id": "gpt-az", "provider": "azure", "upstream_model": "gpt-4o",
            "input_price_micros_per_mtok": 2_500_000, "output_price_micros_per_mtok": 10_000_000
        }),
        json!({
            "provider": "azure", "endpoint": azure.base_url(), "api_key": "azure-fleet-key",
            "deployment": "gpt4o-fleet", "api_version": "2024-06-01"
        }),
        None,
        ControlOptions::default(),
    )
    .await;
    let got = azure.received().pop().unwrap();
    assert_eq!(
        got.path,
        "/openai/deployments/gpt4o-fleet/chat/completions?api-version=2024-06-01"
    );
    assert_eq!(got.headers["api-key"], "azure-fleet-key");
}

/// A Bedrock credential (region, AWS keys with a session token) listed through the API is
/// verified with a SigV4-signed read of the model list and reaches the proxies as a `bedrock`
/// pool that signs its Converse calls with SigV4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bedrock_pool_listed_through_the_api_is_verified_and_served() {
    let bedrock = tokn_testkit::FakeBedrock::start("eu-central-1", Default::default())
        .await
        .unwrap();
    bedrock.add_aws_key(
        "AKIDFLEET0001",
        "fleet-secret-key",
        Some("fleet-session-token"),
    );
    served_through_a_listed_pool(
        "bedrock",
        json!({
            "model_id": "bedrock-fleet", "provider": "bedrock",
            "upstream_model": "anthropic.claude-3-5-haiku-20241022-v1:0",
            "input_price_micros_per_mtok": 1_000_000, "output_price_micros_per_mtok": 5_000_000
        }),
        json!({
            "provider": "bedrock", "region": "eu-central-1", "access_key_id": "AKIDFLEET0001",
            "secret_access_key": "fleet-secret-key", "session_token": "fleet-session-token",
            "base_url": bedrock.base_url()
        }),
        Some("valid"),
        ControlOptions {
            verify_bedrock_base: Some(bedrock.base_url()),
            ..ControlOptions::default()
        },
    )
    .await;
    assert!(bedrock.rejected().is_empty(), "{:?}", bedrock.rejected());
    let got = bedrock.received().pop().unwrap();
    assert_eq!(
        got.path,
        "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse"
    );
    assert_eq!(got.headers["x-amz-security-token"], "fleet-session-token");
    assert!(bedrock.rejected().is_empty(), "{:?}", bedrock.rejected());

    // A wrong secret verifies as invalid (the fake checks the signature as AWS does).
    let v = verification_of(
        json!({"provider": "bedrock", "region": "eu-central-1", "access_key_id": "AKIDFLEET0001",
            "secret_access_key": "not-the-secret", "session_token": "fleet-session-token"}),
        ControlOptions {
            verify_bedrock_base: Some(bedrock.base_url()),
            ..ControlOptions::default()
        },
    )
    .await;
    assert_eq!(v["verify_status"], "invalid", "{v}");
}

/// A Gemini API key listed through the API is verified against the model list, pushed, and
/// served with the `x-goog-api-key` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gemini_pool_listed_through_the_api_is_verified_and_served() {
    let google = tokn_testkit::FakeGoogle::start(Default::default())
        .await
        .unwrap();
    google.allow_key("AIzaFleetGeminiKey0001");
    served_through_a_listed_pool(
        "gemini",
        json!({
            "model_id": "gemini-fleet", "provider": "gemini", "upstream_model": "gemini-2.5-flash",
            "input_price_micros_per_mtok": 300_000, "output_price_micros_per_mtok": 2_500_000
        }),
        json!({"provider": "gemini", "api_key": "AIzaFleetGeminiKey0001", "base_url": google.base_url()}),
        Some("valid"),
        ControlOptions::default(),
    )
    .await;
    let got = google.received().pop().unwrap();
    assert_eq!(got.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(got.headers["x-goog-api-key"], "AIzaFleetGeminiKey0001");
    assert!(google.rejected().is_empty(), "{:?}", google.rejected());
}

/// A Vertex service account listed through the API is verified by minting a token, pushed, and
/// served with a bearer token the proxy minted from it; a key file the token endpoint does not
/// know verifies as invalid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_pool_listed_through_the_api_is_verified_and_served() {
    let google = tokn_testkit::FakeGoogle::start(Default::default())
        .await
        .unwrap();
    let sa = google.service_account("fleet-project");
    served_through_a_listed_pool(
        "vertex",
        json!({
            "model_id": "vertex-fleet", "provider": "vertex", "upstream_model": "gemini-2.5-flash",
            "input_price_micros_per_mtok": 300_000, "output_price_micros_per_mtok": 2_500_000
        }),
        json!({"provider": "vertex", "location": "europe-west4",
            "service_account_json": sa.json, "base_url": google.base_url()}),
        Some("valid"),
        ControlOptions::default(),
    )
    .await;
    let got = google.received().pop().unwrap();
    assert_eq!(
        got.path,
        "/v1/projects/fleet-project/locations/europe-west4/publishers/google/models/gemini-2.5-flash:generateContent"
    );
    assert!(got.headers["authorization"].starts_with("Bearer ya29."));
    // One token for the verification, one for the proxy.
    assert_eq!(google.tokens_minted(), 2);

    // A key file whose key the token endpoint never saw.
    let stranger =
        tokn_testkit::TestServiceAccount::generate("stranger", "fleet-project", &sa.token_uri);
    let v = verification_of(
        json!({"provider": "vertex", "location": "europe-west4",
            "service_account_json": stranger.json, "base_url": google.base_url()}),
        ControlOptions::default(),
    )
    .await;
    assert_eq!(v["verify_status"], "invalid", "{v}");
}

/// One table of good and bad credentials, run through both services: the control plane's API
/// accepts exactly the rows every proxy accepts when they are pushed to it
/// (`ValidConfig::with_pushed`, the proxy's own check of every push), and the real proxy,
/// fed by the real control plane, runs every pool listed on an accepted credential that verified — none left
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_and_the_proxies_accept_exactly_the_same_credentials() {
    let key_file = |token_uri: &str| {
        tokn_testkit::TestServiceAccount::generate("sa", "proj-1", token_uri).json
    };
    let vertex_ok = key_file("https://oauth2.googleapis.com/token");
    let aws = |extra: Value| {
        let mut c = json!({"provider": "bedrock", "region": "us-east-1",
            "access_key_id": "AKIDEXAMPLE", "secret_access_key": "s3cr3t/Key+1"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    #[rustfmt::skip]
    let table: Vec<(&str, Value, bool)> = vec![
        ("openai", json!({"provider": "openai", "api_key": "sk-ok"}), true),
        ("openai https base", json!({"provider": "openai", "api_key": "sk-ok", "base_url": "https://llm.example.com/v1"}), true),
        ("openai loopback http", json!({"provider": "openai", "api_key": "sk-ok", "base_url": "http://127.0.0.1:9/v1"}), true),
        ("openai organization", json!({"provider": "openai", "api_key": "sk-ok", "organization": "org-1"}), true),
        ("openai private http", json!({"provider": "openai", "api_key": "sk-ok", "base_url": "http://10.0.0.5/v1"}), false),
        ("openai no key", json!({"provider": "openai"}), false),
        ("openai empty key", json!({"provider": "openai", "api_key": ""}), false),
        ("openai key with a space", json!({"provider": "openai", "api_key": "sk bad"}), false),
        ("openai key too long", json!({"provider": "openai", "api_key": "k".repeat(5000)}), false),
        ("openai unknown field", json!({"provider": "openai", "api_key": "sk-ok", "region": "x"}), false),
        ("openai bad url", json!({"provider": "openai", "api_key": "sk-ok", "base_url": "ftp://x"}), false),
        ("anthropic", json!({"provider": "anthropic", "api_key": "sk-ant"}), true),
        ("anthropic no key", json!({"provider": "anthropic"}), false),
        ("bedrock keys", aws(json!({})), true),
        ("bedrock session token", aws(json!({"session_token": "tok"})), true),
        ("bedrock api key", json!({"provider": "bedrock", "region": "eu-west-1", "api_key": "bedrock-key"}), true),
        ("bedrock key id with /", aws(json!({"access_key_id": "AKID/EXAMPLE"})), false),
        ("bedrock both modes", aws(json!({"api_key": "k"})), false),
        ("bedrock no mode", json!({"provider": "bedrock", "region": "us-east-1"}), false),
        ("bedrock id without secret", json!({"provider": "bedrock", "region": "us-east-1", "access_key_id": "AKID"}), false),
        ("bedrock bad region", aws(json!({"region": "US East"})), false),
        ("gemini", json!({"provider": "gemini", "api_key": "AIza-ok"}), true),
        ("gemini bad base", json!({"provider": "gemini", "api_key": "AIza-ok", "base_url": "gopher://x"}), false),
        ("azure", json!({"provider": "azure", "endpoint": "https://r.openai.azure.com", "api_key": "az"}), true),
        ("azure v1 deployment", json!({"provider": "azure", "endpoint": "https://r.openai.azure.com", "api_key": "az", "deployment": "gpt4o-prod", "api_version": "v1"}), true),
        ("azure bad deployment", json!({"provider": "azure", "endpoint": "https://r.openai.azure.com", "api_key": "az", "deployment": "a/b"}), false),
        ("azure no endpoint", json!({"provider": "azure", "api_key": "az"}), false),
        ("vertex", json!({"provider": "vertex", "service_account_json": vertex_ok, "location": "us-central1"}), true),
        ("vertex global", json!({"provider": "vertex", "service_account_json": vertex_ok, "location": "global", "project": "other-1"}), true),
        ("vertex bad location", json!({"provider": "vertex", "service_account_json": vertex_ok, "location": "US Central"}), false),
        ("vertex bad key file", json!({"provider": "vertex", "service_account_json": "{}", "location": "us-central1"}), false),
        ("vertex http token uri", json!({"provider": "vertex", "service_account_json": key_file("http://oauth2.googleapis.com/token"), "location": "us-central1"}), false),
        ("mock", json!({"provider": "mock"}), true),
        ("mock with a key", json!({"provider": "mock", "api_key": "x"}), false),
        ("unknown provider", json!({"provider": "cohere", "api_key": "x"}), false),
    ];
    let model_of = |provider: &str| match provider {
        "openai" => "gpt-4o-mini",
        "anthropic" => "claude-haiku-4-5",
        "bedrock" => "bedrock/claude-haiku-4-5",
        "gemini" => "gemini-2.5-flash",
        "vertex" => "vertex/gemini-2.5-flash",
        "azure" => "azure/gpt-4o-mini",
        _ => "mock",
    };

    // The proxy's side: every row pushed as a pool, checked as each proxy checks a push.
    let proxy_config = tokn_config::load(
        "[hot_state]\nprefix = \"t:\"\n[server]\nlisten = [\"127.0.0.1:1\"]\n",
        Vec::new(),
        &|_| None,
    )
    .unwrap();
    let providers = [
        "openai",
        "anthropic",
        "bedrock",
        "gemini",
        "vertex",
        "azure",
        "mock",
    ];
    let models: Vec<Value> = providers
        .iter()
        .map(|p| {
            json!({"id": model_of(p), "provider": p, "input_price_micros_per_mtok": 1,
            "output_price_micros_per_mtok": 1})
        })
        .collect();
    let pools: Vec<Value> = table
        .iter()
        .enumerate()
        .map(|(i, (_, credential, _))| {
            let mut pool = credential.clone();
            let provider = credential["provider"].as_str().unwrap();
            let fields = pool.as_object_mut().unwrap();
            fields.insert("id".into(), json!(format!("row-{i}")));
            fields.insert("models".into(), json!([model_of(provider)]));
            fields.insert("price_ratio_ppm".into(), json!(600_000));
            pool
        })
        .collect();
    let pushed: tokn_config::PushedConfig = serde_json::from_value(json!({
        "version": 1, "models": models, "keys": [], "pools": pools,
    }))
    .unwrap_or_else(|e| panic!("the push does not parse: {e}"));
    let (valid, skipped) = proxy_config.with_pushed(pushed).unwrap();
    let proxy_accepts = |i: usize| {
        let id = format!("row-{i}");
        let served = valid.pools.iter().any(|p| p.config.id == id);
        assert_ne!(served, skipped.iter().any(|s| s.id == id));
        served
    };

    // The control plane's side, through its API; then the real proxy runs what it accepted
    // and could verify (here: what OpenAI's fake answers for, and the mock).
    let verifier = FakeUpstream::start(Behavior::default()).await.unwrap();
    let Scene {
        control,
        dir,
        proxy,
        c,
        m,
        ..
    } = scene(
        "credential-table",
        ControlOptions {
            verify_openai_base: Some(verifier.base_url()),
            ..ControlOptions::default()
        },
    )
    .await;
    c.api(
        &control,
        "POST",
        "/v1/admin/catalog",
        &m.admin,
        Some(json!({
            "model_id": "mock", "provider": "mock",
            "input_price_micros_per_mtok": 1, "output_price_micros_per_mtok": 1
        })),
    )
    .await;
    let mut verified = 0;
    let mut verdicts = Vec::new();
    for (i, (name, credential, expected)) in table.iter().enumerate() {
        let (status, body) = c
            .call(
                &control,
                "POST",
                "/v1/credentials",
                &m.seller,
                Some(json!({ "credential": credential })),
            )
            .await;
        let api_accepts = status == 201;
        assert!(api_accepts || status == 400, "{name}: {status} {body}");
        let proxy = proxy_accepts(i);
        verdicts.push(format!("{name:<28} api {api_accepts:<5} proxy {proxy}"));
        assert_eq!(
            (api_accepts, proxy),
            (*expected, *expected),
            "{name}: the API and the proxies must agree, and with the table\n{}",
            verdicts.join("\n")
        );
        if api_accepts {
            let provider = credential["provider"].as_str().unwrap();
            c.api(
                &control,
                "POST",
                "/v1/pools",
                &m.seller,
                Some(json!({
                    "credential_id": body["id"], "face_value_micros": 1_000_000,
                    "price_ratio_ppm": 600_000, "models": [model_of(provider)]
                })),
            )
            .await;
            let path = format!("/v1/credentials/{}/verify", body["id"].as_str().unwrap());
            let v = c.api(&control, "POST", &path, &m.seller, None).await;
            if ["valid", "unchecked"].contains(&v["verify_status"].as_str().unwrap()) {
                if v["custom_endpoint"] == true {
                    let approve = format!(
                        "/v1/admin/credentials/{}/approve",
                        body["id"].as_str().unwrap()
                    );
                    c.api(&control, "POST", &approve, &m.admin, None).await;
                }
                verified += 1;
            }
        }
    }
    eprintln!("{}", verdicts.join("\n"));
    assert!(
        verified >= 3,
        "the openai rows and the mock verify: {verified}"
    );

    // Every verified pool reaches the proxy: none is left out.
    wait_for_status(
        &proxy,
        Duration::from_secs(5),
        "every verified pool runs",
        |s| s["pools"] == verified,
    )
    .await;
    let metrics = proxy_metrics(&proxy).await;
    assert!(
        metrics.contains("tokn_config_pools_skipped 0"),
        "a listed pool was left out"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM to an idle control-plane-fed proxy (sync, shipper and balance feed running): it exits
/// once they have done their shutdown work, not after its 30 s grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fed_proxy_exits_at_once_on_sigterm() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let dir = temp_dir("fed-exit");
    let snapshot_key = random_hex32();
    let body = proxy_body(&control, &dir.join("snapshot.sealed"), None);
    let envs = [("TOKN_LOG", "info"), ("TOKN__SERVER__GRACE_PERIOD_S", "30")];
    let mut proxy = start_proxy_with(&control, &body, &snapshot_key, &envs);
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-seller-a"]).await;
    list_pool(&c, &control, &m, &m.creds[0]).await;
    let key = new_key(&c, &control, &m.buyer).await;
    c.within_a_second(&proxy, &key, "gpt-test", "serving", |s, _| s == 200)
        .await;
    let started = std::time::Instant::now();
    proxy.terminate();
    assert!(
        proxy.wait_exit(Duration::from_secs(5)),
        "the idle proxy waited for its grace period"
    );
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    assert!(proxy.log().contains("Nothing left in flight"));
    drop(control);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A seller's pool whose endpoint is on the operator's own network (here loopback) is never
/// called by a proxy that does not allow internal upstreams: the pool is quarantined and the
/// fake provider sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_never_calls_a_sellers_internal_endpoint_unless_allowed() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let dir = temp_dir("internal-refused");
    let snapshot_key = random_hex32();
    let body = proxy_body(&control, &dir.join("snapshot.sealed"), None).replace(
        "allow_internal_upstreams = true",
        "allow_internal_upstreams = false",
    );
    let proxy = start_proxy_with(&control, &body, &snapshot_key, &[("TOKN_LOG", "warn")]);
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-seller-a"]).await;
    list_pool(&c, &control, &m, &m.creds[0]).await;
    let verified = fake.received().len();
    let key = new_key(&c, &control, &m.buyer).await;
    c.within_a_second(&proxy, &key, "gpt-test", "the pool is refused", |s, _| {
        s == 502 || s == 503
    })
    .await;
    for _ in 0..3 {
        let (status, _) = c.chat(&proxy, &key, "gpt-test").await;
        assert_eq!(status, 503, "quarantined, not retried");
    }
    assert_eq!(
        fake.received().len(),
        verified,
        "the proxy called an internal endpoint"
    );
    assert!(proxy.log().contains("resolves only to internal addresses"));
    drop(control);
    let _ = std::fs::remove_dir_all(&dir);
}
