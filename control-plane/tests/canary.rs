//! Secrets stay secret: canary seller credentials of every provider and a canary buyer key are
//! planted through the API, used through the proxy (successes, a refused credential, failover,
//! bad keys), and then searched for, byte for byte, in everything the system keeps or says:
//! every table of the store (Postgres rows, or the SQLite file and its WAL), every Redis key
//! and value under the run's prefix, both services' logs at debug level, the files the proxy
//! writes (usage records, sealed snapshot), both `/metrics` pages and every API response.
//!
//! Two places legitimately carry a secret and are left out of the search: the one response
//! that shows a new buyer key, and the proxies' authenticated configuration watch, which must
//! carry seller credentials to the proxy (the test asserts they are there, proving the search
//! would have found them).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};
use sqlx::{Connection, Row};
use tokn_testkit::control::random_hex32;
use tokn_testkit::harness::temp_dir;
use tokn_testkit::{Behavior, ControlOptions, ControlProcess, FakeUpstream, TestDatabase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_postgres_redis_logs_files_or_responses() {
    let db = TestDatabase::create("canary").await;
    let redis_prefix = RedisPrefix::new("canary");
    let prefix = redis_prefix.0.clone();
    let places = plant_and_use(Some(&db), Some(&prefix)).await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(tables.len() >= 8, "{tables:?}");
    let mut rows = String::new();
    for t in &tables {
        for r in sqlx::query(&format!("SELECT t::text FROM \"{t}\" t"))
            .fetch_all(&mut conn)
            .await
            .unwrap()
        {
            rows.push_str(&r.get::<String, _>(0));
            rows.push('\n');
        }
    }
    let _ = conn.close().await;
    let redis = redis_dump(&prefix, true).await;
    places.assert_clean(&[
        ("Postgres rows", rows.into_bytes()),
        ("Redis at the end", redis.into_bytes()),
    ]);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_sqlite_logs_files_or_responses() {
    let places = plant_and_use(None, None).await;
    // The SQLite file (and its write-ahead log) is searched as raw bytes by `assert_clean`.
    places.assert_clean(&[]);
}

/// Every key and string value under `prefix`; with `delete`, removes them afterwards.
async fn redis_dump(prefix: &str, delete: bool) -> String {
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let names: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = String::new();
    for name in names {
        let kind: String = redis::cmd("TYPE")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        let value: String = if kind == "string" {
            redis::cmd("GET")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .unwrap()
        } else {
            format!("<{kind}>")
        };
        out.push_str(&format!("{name} = {value}\n"));
        if delete {
            let _: () = redis::cmd("DEL")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    out
}

/// Where secrets could surface, collected while the services ran.
struct Places {
    canaries: Vec<(String, String)>,
    /// (what, bytes) gathered from the services.
    gathered: Vec<(String, Vec<u8>)>,
}

impl Places {
    fn assert_clean(mut self, more: &[(&str, Vec<u8>)]) {
        self.gathered
            .extend(more.iter().map(|(w, b)| (w.to_string(), b.clone())));
        let total: usize = self.gathered.iter().map(|(_, b)| b.len()).sum();
        eprintln!(
            "searched {} places ({} KiB) for {} canaries",
            self.gathered.len(),
            total / 1024,
            self.canaries.len()
        );
        for (what, bytes) in &self.gathered {
            for (name, canary) in &self.canaries {
                assert!(
                    memchr::memmem::find(bytes, canary.as_bytes()).is_none(),
                    "the {name} canary leaked into {what}"
                );
            }
        }
    }
}

fn read_tree(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            read_tree(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
}

async fn plant_and_use(db: Option<&TestDatabase>, redis_prefix: Option<&str>) -> Places {
    let tag = &random_hex32()[..16];
    let canary = |name: &str| format!("CANARY{name}{tag}");
    let openai_key = format!("sk-{}", canary("openai"));
    let refused_key = format!("sk-{}", canary("refused"));
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            database_url: db.map(|d| d.url.clone()),
            redis: redis_prefix.map(|p| ("redis://127.0.0.1:6379".to_owned(), p.to_owned())),
            verify_openai_base: Some(fake.base_url()),
            log: Some("debug".to_owned()),
            ..ControlOptions::default()
        },
    );
    let dir = temp_dir("canary");
    let proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        redis_prefix,
        "debug",
    );
    let c = Client::new();
    let mut responses: Vec<String> = Vec::new();
    let call = |method: &'static str, path: String, token: String, body: Option<Value>| {
        let c = &c;
        let control = &control;
        async move {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut req = c
                .http
                .request(method, format!("{}{path}", control.url()))
                .bearer_auth(token);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.unwrap();
            resp.text().await.unwrap()
        }
    };
    let admin = control.admin_token.clone();
    let seller_id_token = {
        let s = call(
            "POST",
            "/v1/admin/accounts".into(),
            admin.clone(),
            Some(json!({"email": "s@example.com", "role": "seller"})),
        )
        .await;
        serde_json::from_str::<Value>(&s).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let buyer_token = {
        let b = call(
            "POST",
            "/v1/admin/accounts".into(),
            admin.clone(),
            Some(json!({"email": "b@example.com", "role": "buyer"})),
        )
        .await;
        serde_json::from_str::<Value>(&b).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    responses.push(
        call(
            "POST",
            "/v1/admin/catalog".into(),
            admin.clone(),
            Some(json!({
                "model_id": "gpt-test", "provider": "openai",
                "input_price_micros_per_mtok": 150_000, "output_price_micros_per_mtok": 600_000
            })),
        )
        .await,
    );

    // Credentials of every provider, each carrying canaries in every secret field.
    // A real key file (the control plane refuses one whose key cannot sign); its canary is a
    // run of the key's own base64.
    let vertex_sa = tokn_testkit::TestServiceAccount::generate(
        "canary",
        "p1",
        "https://oauth2.googleapis.com/token",
    );
    let planted = [
        json!({"provider": "openai", "api_key": refused_key, "base_url": fake.base_url()}),
        json!({"provider": "openai", "api_key": openai_key, "base_url": fake.base_url()}),
        json!({"provider": "anthropic", "api_key": canary("anthropic")}),
        json!({"provider": "bedrock", "region": "us-east-1", "access_key_id": canary("awsid"),
               "secret_access_key": canary("awssecret"), "session_token": canary("awssession")}),
        json!({"provider": "bedrock", "region": "us-west-2", "api_key": canary("bedrockkey")}),
        json!({"provider": "vertex", "location": "us-central1", "service_account_json": vertex_sa.json}),
        json!({"provider": "gemini", "api_key": canary("gemini")}),
        json!({"provider": "azure", "endpoint": "https://r1.openai.azure.com", "api_key": canary("azure")}),
    ];
    let mut cred_ids = Vec::new();
    for cred in &planted {
        let r = call(
            "POST",
            "/v1/credentials".into(),
            seller_id_token.clone(),
            Some(json!({"label": "x", "credential": cred})),
        )
        .await;
        cred_ids.push(
            serde_json::from_str::<Value>(&r).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        responses.push(r);
    }
    // Verified and approved (their base URL is the seller's): the two pointing at the fake
    // (the others would call the real providers).
    for id in &cred_ids[..2] {
        responses.push(
            call(
                "POST",
                format!("/v1/credentials/{id}/verify"),
                seller_id_token.clone(),
                None,
            )
            .await,
        );
        responses.push(
            call(
                "POST",
                format!("/v1/admin/credentials/{id}/approve"),
                admin.clone(),
                None,
            )
            .await,
        );
        responses.push(
            call(
                "GET",
                format!("/v1/credentials/{id}"),
                seller_id_token.clone(),
                None,
            )
            .await,
        );
    }
    responses.push(
        call(
            "GET",
            "/v1/credentials".into(),
            seller_id_token.clone(),
            None,
        )
        .await,
    );
    // The first credential is revoked at its provider after it verified: its pool, listed
    // first, refuses, and requests fail over past it.
    fake.set_behavior(
        &refused_key,
        Behavior {
            status: 401,
            ..Behavior::default()
        },
    );
    for id in &cred_ids[..2] {
        responses.push(call("POST", "/v1/pools".into(), seller_id_token.clone(), Some(json!({
            "credential_id": id, "face_value_micros": 1_000_000, "price_ratio_ppm": 600_000, "models": ["gpt-test"]
        }))).await);
    }
    responses.push(call("GET", "/v1/pools".into(), seller_id_token.clone(), None).await);

    // The buyer key: its creation response is the one place it may appear.
    let created = call(
        "POST",
        "/v1/keys".into(),
        buyer_token.clone(),
        Some(json!({"name": "canary"})),
    )
    .await;
    let buyer_key = serde_json::from_str::<Value>(&created).unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    responses.push(call("GET", "/v1/keys".into(), buyer_token.clone(), None).await);
    c.within_a_second(
        &proxy,
        &buyer_key,
        "gpt-test",
        "canary key accepted",
        |s, _| s == 200,
    )
    .await;
    for _ in 0..3 {
        let (status, body) = c.chat(&proxy, &buyer_key, "gpt-test").await;
        assert_eq!(status, 200, "{body}");
        responses.push(body.to_string());
    }
    assert_eq!(
        last_upstream_key(&fake),
        format!("Bearer {openai_key}"),
        "the credential was used"
    );
    // Hostile and mistaken keys: a corrupted checksum, a seller secret presented as a buyer key.
    let mut corrupted = buyer_key.clone();
    corrupted.pop();
    corrupted.push(if buyer_key.ends_with('A') { 'B' } else { 'A' });
    for bad in [corrupted.as_str(), openai_key.as_str()] {
        let (status, body) = c.chat(&proxy, bad, "gpt-test").await;
        assert_eq!(status, 401);
        responses.push(body.to_string());
    }
    let watched = call(
        "GET",
        "/internal/v1/config?after=0".into(),
        control.proxy_token.clone(),
        None,
    )
    .await;
    assert!(
        watched.contains(&openai_key),
        "the watch carries credentials to proxies"
    );

    let redis_live = match redis_prefix {
        Some(p) => {
            let dump = redis_dump(p, false).await;
            assert!(
                dump.contains("key_sha256"),
                "Redis holds the key record (its hash): {dump}"
            );
            dump
        }
        None => String::new(),
    };

    // Revocation, then the operations endpoints.
    let key_id = serde_json::from_str::<Value>(&created).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    responses.push(
        call(
            "DELETE",
            format!("/v1/keys/{key_id}"),
            buyer_token.clone(),
            None,
        )
        .await,
    );
    c.within_a_second(
        &proxy,
        &buyer_key,
        "gpt-test",
        "canary key revoked",
        |s, _| s == 401,
    )
    .await;
    responses.push(
        reqwest::get(format!("{}/metrics", control.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    responses.push(
        reqwest::get(proxy.metrics_url())
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    responses.push(
        reqwest::get(format!("http://127.0.0.1:{}/status", proxy.metrics_port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );

    let mut canaries: Vec<(String, String)> = [
        "openai",
        "refused",
        "anthropic",
        "awsid",
        "awssecret",
        "awssession",
        "bedrockkey",
        "gemini",
        "azure",
    ]
    .iter()
    .map(|n| (n.to_string(), canary(n)))
    .collect();
    canaries.push((
        "vertex private key".into(),
        vertex_key_canary(&vertex_sa.json),
    ));
    canaries.push(("buyer key".into(), buyer_key.clone()));
    canaries.push((
        "buyer key body".into(),
        buyer_key["tok_live_".len()..].to_owned(),
    ));
    canaries.push(("admin token".into(), control.admin_token.clone()));
    canaries.push(("proxy token".into(), control.proxy_token.clone()));
    canaries.push(("account token".into(), seller_id_token.clone()));

    let mut gathered = vec![
        (
            "Redis while the key was live".to_owned(),
            redis_live.into_bytes(),
        ),
        ("proxy log".to_owned(), proxy.log().into_bytes()),
        ("control log".to_owned(), control.log().into_bytes()),
    ];
    assert!(
        gathered[1..3].iter().all(|(_, log)| log.len() > 1000),
        "debug logs were written"
    );
    for (i, r) in responses.into_iter().enumerate() {
        gathered.push((format!("API response #{i}"), r.into_bytes()));
    }
    read_tree(&proxy.dir, &mut gathered);
    read_tree(&dir, &mut gathered);
    let mut control_files = Vec::new();
    read_tree(&control.dir, &mut control_files);
    // The control plane's files: its SQLite store and WAL, its log. Its configuration file
    // names the environment variables only.
    gathered.extend(control_files);
    drop(proxy);
    drop(control);
    let _ = std::fs::remove_dir_all(&dir);
    Places { canaries, gathered }
}

/// Forty-eight characters from the middle of a key file's private key (its random part).
fn vertex_key_canary(key_file: &str) -> String {
    let file: Value = serde_json::from_str(key_file).unwrap();
    // Within one line: a leak may keep the PEM's line breaks or escape them.
    let line = file["private_key"]
        .as_str()
        .unwrap()
        .lines()
        .nth(8)
        .unwrap();
    line[8..56].to_owned()
}
