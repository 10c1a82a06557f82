//! The API as its users meet it: the real `tokn-control` binary over HTTP, on Postgres + Redis
//! (fleet) and on SQLite (embedded). One tour calls every endpoint of the OpenAPI document,
//! then every write endpoint is fed bad input (malformed JSON, wrong types, unknown fields,
//! oversized bodies, missing content type, missing or wrong tokens, other accounts' ids) and
//! must answer a JSON 4xx and change nothing. Coverage is read back from the service's own
//! request metrics, so an endpoint added without a test fails here.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use serde_json::{json, Value};
use tokn_testkit::control::StripeOptions;
use tokn_testkit::{
    Behavior, ControlOptions, ControlProcess, FakeStripe, FakeUpstream, TestDatabase,
};

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(control: &ControlProcess) -> Self {
        Self {
            base: control.url(),
            http: reqwest::Client::new(),
        }
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        RESPONSES.lock().unwrap().push(text.clone());
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{path} answered {status} with non-JSON: {text}"))
        };
        (status, value)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let (ct, bytes) = match body {
            Some(b) => (
                Some("application/json"),
                Some(serde_json::to_vec(b).unwrap()),
            ),
            None => (None, None),
        };
        self.raw(method, path, token, ct, bytes).await
    }

    /// Calls and asserts the status.
    async fn ok(
        &self,
        want: u16,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Value {
        let (status, v) = self.call(method, path, Some(token), body.as_ref()).await;
        assert_eq!(status, want, "{method} {path}: {v}");
        v
    }
}

/// Every response body seen, for the secret search.
static RESPONSES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn control_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tokn-control"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_on_postgres_and_redis() {
    let db = TestDatabase::create("api").await;
    let redis_prefix = common::RedisPrefix::new("api");
    let prefix = redis_prefix.0.clone();
    tour(ControlOptions {
        database_url: Some(db.url.clone()),
        redis: Some(("redis://127.0.0.1:6379".to_owned(), prefix)),
        ..ControlOptions::default()
    })
    .await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_on_sqlite() {
    tour(ControlOptions::default()).await;
}

const STRIPE_KEY: &str = "sk_test_tour_0123456789";

/// Money in and out through the fake Stripe: packs, a purchase paid by the webhook, a seller
/// onboarded by the Connect webhook, a payout run, the reconciliation and a backfill.
async fn walk_stripe(api: &Api, w: &World, stripe: &FakeStripe) {
    let admin = &w.admin;
    let pack = api
        .ok(
            201,
            "POST",
            "/v1/admin/packs",
            admin,
            Some(
                json!({"name": "$10 of credit", "price_cents": 1_000, "credit_micros": 10_000_000}),
            ),
        )
        .await;
    let pack_id = pack["id"].as_str().unwrap().to_owned();
    assert_eq!(
        api.ok(200, "GET", "/v1/admin/packs", admin, None).await[0]["id"],
        pack_id.as_str()
    );
    api.ok(
        200,
        "PATCH",
        &format!("/v1/admin/packs/{pack_id}"),
        admin,
        Some(json!({"active": true})),
    )
    .await;
    assert_eq!(
        api.ok(200, "GET", "/v1/packs", &w.buyer, None).await[0]["id"],
        pack_id.as_str()
    );
    let before = api.ok(200, "GET", "/v1/wallet", &w.buyer, None).await["balance_micros"]
        .as_i64()
        .unwrap();
    let purchase = api
        .ok(
            201,
            "POST",
            "/v1/purchases",
            &w.buyer,
            Some(json!({"pack_id": pack_id})),
        )
        .await;
    let id = purchase["id"].as_str().unwrap();
    let (_, status) = stripe
        .pay(purchase["stripe_session_id"].as_str().unwrap())
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        api.ok(200, "GET", &format!("/v1/purchases/{id}"), &w.buyer, None)
            .await["status"],
        "paid"
    );
    assert_eq!(
        api.ok(200, "GET", "/v1/purchases", &w.buyer, None).await[0]["id"],
        id
    );
    let after = api.ok(200, "GET", "/v1/wallet", &w.buyer, None).await["balance_micros"]
        .as_i64()
        .unwrap();
    assert_eq!(after, before + 10_000_000);
    let o = api
        .ok(
            200,
            "POST",
            "/v1/payouts/account",
            &w.seller,
            Some(json!({})),
        )
        .await;
    let (_, status) = stripe
        .onboard(o["account"]["stripe_account"].as_str().unwrap())
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        api.ok(200, "GET", "/v1/payouts/account", &w.seller, None)
            .await["payable"],
        true
    );
    api.ok(
        200,
        "POST",
        "/v1/admin/payouts/run",
        admin,
        Some(json!({"run": "tour"})),
    )
    .await;
    api.ok(200, "GET", "/v1/payouts", &w.seller, None).await;
    api.ok(200, "GET", "/v1/admin/payouts", admin, None).await;
    let r = api
        .ok(200, "GET", "/v1/admin/payouts/reconcile", admin, None)
        .await;
    assert_eq!(r["agrees"], true, "{r}");
    let b = api
        .ok(
            200,
            "POST",
            "/v1/admin/stripe/backfill",
            admin,
            Some(json!({"days": 1})),
        )
        .await;
    assert_eq!(b["applied"], 0, "{b}");
}

struct World {
    admin: String,
    proxy: String,
    buyer: String,
    buyer_id: String,
    seller: String,
    seller_id: String,
    other: String,
    key_id: String,
    cred_id: String,
    pool_id: String,
}

async fn tour(mut opts: ControlOptions) {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    fake.set_behavior(
        "sk-refused",
        Behavior {
            status: 401,
            ..Behavior::default()
        },
    );
    opts.verify_openai_base = Some(fake.base_url());
    let stripe = FakeStripe::start(
        STRIPE_KEY,
        "whsec_tour_account_0123",
        "whsec_tour_connect_0123",
    )
    .await
    .unwrap();
    opts.stripe = Some(StripeOptions {
        base_url: stripe.base_url(),
        secret_key: STRIPE_KEY.to_owned(),
        webhook_secret: "whsec_tour_account_0123".to_owned(),
        connect_webhook_secret: "whsec_tour_connect_0123".to_owned(),
        extra: "[stripe.payouts]\nautomatic = false\nhold_days = 0\nminimum_cents = 1\n".to_owned(),
    });
    let embedded = opts.database_url.is_none();
    let control = ControlProcess::start(&control_binary(), opts);
    stripe.deliver_to(
        &format!("{}/v1/stripe/webhook", control.url()),
        &format!("{}/v1/stripe/connect-webhook", control.url()),
    );
    let api = Api::new(&control);
    let w = walk_every_endpoint(&api, &control, &fake, embedded).await;
    walk_stripe(&api, &w, &stripe).await;
    bad_input_changes_nothing(&api, &w).await;
    other_accounts_see_404(&api, &w).await;
    let doc = api.ok(200, "GET", "/openapi.json", &w.admin, None).await;
    every_operation_was_exercised(&api, &doc).await;
    every_field_is_described(&doc);
    openapi_document_validates(&doc);
}

/// Every property of every schema in the document says what it is (and its unit).
fn every_field_is_described(doc: &Value) {
    let mut undescribed = Vec::new();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    // What a seller submits and what the store keeps are two schemas, not one shadowing the
    // other.
    assert!(schemas.contains_key("ProviderCredential") && schemas.contains_key("Credential"));
    for (name, schema) in schemas {
        // A schema built from others (`allOf`: a flattened struct) describes its own part.
        let parts = schema["allOf"].as_array().cloned().unwrap_or_default();
        for part in parts.iter().chain(std::iter::once(schema)) {
            let Some(properties) = part["properties"].as_object() else {
                continue;
            };
            for (field, property) in properties {
                let described = property["description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty())
                    || property["allOf"]
                        .as_array()
                        .is_some_and(|all| all.iter().any(|p| p["description"].as_str().is_some()));
                if !described {
                    undescribed.push(format!("{name}.{field}"));
                }
            }
        }
    }
    assert!(
        undescribed.is_empty(),
        "{} fields without a description: {undescribed:?}",
        undescribed.len()
    );
}

async fn walk_every_endpoint(
    api: &Api,
    control: &ControlProcess,
    fake: &FakeUpstream,
    embedded: bool,
) -> World {
    let admin = control.admin_token.clone();
    let health = reqwest::get(format!("{}/healthz", api.base)).await.unwrap();
    assert_eq!(health.status(), 200);

    // Accounts (admin).
    let b = api
        .ok(
            201,
            "POST",
            "/v1/admin/accounts",
            &admin,
            Some(json!({"email": "Buyer@Example.com", "role": "buyer"})),
        )
        .await;
    let buyer = b["token"].as_str().unwrap().to_owned();
    let buyer_id = b["account"]["id"].as_str().unwrap().to_owned();
    assert_eq!(b["account"]["email"], "buyer@example.com");
    let s = api
        .ok(
            201,
            "POST",
            "/v1/admin/accounts",
            &admin,
            Some(json!({"email": "seller@example.com", "role": "seller"})),
        )
        .await;
    let seller = s["token"].as_str().unwrap().to_owned();
    let seller_id = s["account"]["id"].as_str().unwrap().to_owned();
    let o = api
        .ok(
            201,
            "POST",
            "/v1/admin/accounts",
            &admin,
            Some(json!({"email": "other@example.com", "role": "both"})),
        )
        .await;
    let other = o["token"].as_str().unwrap().to_owned();
    let (st, dup) = api
        .call(
            "POST",
            "/v1/admin/accounts",
            Some(&admin),
            Some(&json!({"email": "buyer@example.com", "role": "buyer"})),
        )
        .await;
    assert_eq!((st, dup["error"]["code"].as_str()), (409, Some("conflict")));
    // The waitlist: anyone signs up, an address already on it gets the same answer (its first
    // sign-up stands), the operator lists it in sign-up order, a page at a time.
    for (email, role) in [
        (" Ana@Example.com ", "buyer"),
        ("bo@example.org", "seller"),
        ("ana@example.com", "seller"),
    ] {
        let (st, joined) = api
            .call(
                "POST",
                "/v1/waitlist",
                None,
                Some(&json!({"email": email, "role": role})),
            )
            .await;
        assert_eq!((st, joined["status"].as_str()), (202, Some("on_the_list")));
    }
    for bad in [
        json!({"email": "not-an-address", "role": "buyer"}),
        json!({"email": "c@example.com", "role": "admin"}),
        json!({"email": "c@example.com", "role": "buyer", "note": "hi"}),
    ] {
        let (st, e) = api.call("POST", "/v1/waitlist", None, Some(&bad)).await;
        assert_eq!(
            (st, e["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{bad} {e}"
        );
    }
    let waiting = api.ok(200, "GET", "/v1/admin/waitlist", &admin, None).await;
    let entries: Vec<(&str, &str)> = waiting
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["email"].as_str().unwrap(), e["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        entries,
        [("ana@example.com", "buyer"), ("bo@example.org", "seller")]
    );
    let first = api
        .ok(200, "GET", "/v1/admin/waitlist?limit=1", &admin, None)
        .await;
    assert_eq!(first[0]["email"], "ana@example.com");
    let next = api
        .ok(
            200,
            "GET",
            "/v1/admin/waitlist?after=ana@example.com",
            &admin,
            None,
        )
        .await;
    assert_eq!(next.as_array().unwrap().len(), 1);
    assert_eq!(next[0]["email"], "bo@example.org");
    let (st, _) = api
        .call("GET", "/v1/admin/waitlist", Some(&buyer), None)
        .await;
    assert_eq!(st, 401, "the operator's alone");
    let csv = reqwest::Client::new()
        .get(format!("{}/v1/admin/waitlist/export", api.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert_eq!(lines[0], "email,role,signed_up_at");
    assert!(lines[1].starts_with("ana@example.com,buyer,20"), "{csv}");
    assert!(lines[2].starts_with("bo@example.org,seller,20"), "{csv}");

    // The operator's one-time link into the web app (the buyer may not mint one).
    let link = api
        .ok(201, "POST", "/v1/admin/signin-links", &admin, None)
        .await;
    let url = link["url"].as_str().unwrap();
    assert!(url.contains("/signin/link?token=sl_"), "{link}");
    assert!(link["expires_at_ms"].as_i64().unwrap() > 0);
    let (st, _) = api
        .call("POST", "/v1/admin/signin-links", Some(&buyer), None)
        .await;
    assert_eq!(st, 401, "the operator's alone");

    let list = api
        .ok(200, "GET", "/v1/admin/accounts?limit=2", &admin, None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    let one = api
        .ok(
            200,
            "GET",
            &format!("/v1/admin/accounts/{buyer_id}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(one["balance_micros"], 10_000_000, "the welcome credit");
    let grant = json!({"amount_micros": 5_000_000, "memo": "pack", "reference": "inv-1"});
    let g1 = api
        .ok(
            201,
            "POST",
            &format!("/v1/admin/accounts/{buyer_id}/credits"),
            &admin,
            Some(grant.clone()),
        )
        .await;
    let g2 = api
        .ok(
            200,
            "POST",
            &format!("/v1/admin/accounts/{buyer_id}/credits"),
            &admin,
            Some(grant),
        )
        .await;
    assert_eq!(g1["transaction_id"], g2["transaction_id"]);
    assert_eq!(
        g2["balance_micros"], 15_000_000,
        "a replayed grant moves nothing"
    );
    let susp = api
        .ok(
            200,
            "PATCH",
            &format!(
                "/v1/admin/accounts/{}",
                o["account"]["id"].as_str().unwrap()
            ),
            &admin,
            Some(json!({"status": "suspended"})),
        )
        .await;
    assert_eq!(susp["status"], "suspended");
    let (st, _) = api.call("GET", "/v1/account", Some(&other), None).await;
    assert_eq!(st, 403, "a suspended account's token is refused");
    api.ok(
        200,
        "PATCH",
        &format!(
            "/v1/admin/accounts/{}",
            o["account"]["id"].as_str().unwrap()
        ),
        &admin,
        Some(json!({"status": "active"})),
    )
    .await;

    // Settings and catalog (admin).
    let mut settings = api.ok(200, "GET", "/v1/admin/settings", &admin, None).await;
    assert_eq!(settings["welcome_credit_micros"], 10_000_000);
    settings["fee_ratio_ppm"] = json!(120_000);
    let put = api
        .ok(
            200,
            "PUT",
            "/v1/admin/settings",
            &admin,
            Some(settings.clone()),
        )
        .await;
    assert_eq!(put, settings);
    let catalog = api.ok(200, "GET", "/v1/catalog", &admin, None).await;
    let providers: BTreeSet<&str> = catalog
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["provider"].as_str().unwrap())
        .collect();
    for p in [
        "openai",
        "anthropic",
        "bedrock",
        "vertex",
        "gemini",
        "azure",
        "mock",
    ] {
        assert!(providers.contains(p), "default catalog has {p} models");
    }
    let price = api
        .ok(
            201,
            "POST",
            "/v1/admin/catalog",
            &admin,
            Some(json!({
                "model_id": "gpt-test", "provider": "openai",
                "input_price_micros_per_mtok": 150_000, "output_price_micros_per_mtok": 600_000
            })),
        )
        .await;
    assert_eq!(price["cached_input_price_micros_per_mtok"], 150_000);
    assert_eq!(price["cache_write_price_micros_per_mtok"], 150_000);
    // Another name for it, listed, then removed.
    let alias = api
        .ok(
            200,
            "PUT",
            "/v1/admin/catalog/aliases/claude-gpt-test",
            &admin,
            Some(json!({"model_id": "gpt-test"})),
        )
        .await;
    assert_eq!(alias["model_id"], "gpt-test");
    let aliases = api
        .ok(200, "GET", "/v1/admin/catalog/aliases", &admin, None)
        .await;
    assert!(aliases
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["alias"] == "claude-gpt-test"));
    api.ok(
        204,
        "DELETE",
        "/v1/admin/catalog/aliases/claude-gpt-test",
        &admin,
        None,
    )
    .await;

    // Buyer self-service.
    let me = api.ok(200, "GET", "/v1/account", &buyer, None).await;
    assert_eq!(me["id"], buyer_id.as_str());
    let k = api
        .ok(
            201,
            "POST",
            "/v1/keys",
            &buyer,
            Some(json!({"name": "ci", "allowed_models": ["gpt-test"], "requests_per_minute": 600})),
        )
        .await;
    let secret = k["secret"].as_str().unwrap();
    assert!(
        tokn_config::keys::is_well_formed(secret),
        "checksummed tok_live_ key"
    );
    assert_eq!(k["lookup_prefix"].as_str().unwrap(), &secret[..15]);
    let key_id = k["id"].as_str().unwrap().to_owned();
    let keys = api.ok(200, "GET", "/v1/keys", &buyer, None).await;
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert!(!keys.to_string().contains(secret), "a key is shown once");
    let got = api
        .ok(200, "GET", &format!("/v1/keys/{key_id}"), &buyer, None)
        .await;
    assert!(got.get("secret").is_none());
    let patched = api
        .ok(
            200,
            "PATCH",
            &format!("/v1/keys/{key_id}"),
            &buyer,
            Some(json!({"spend_cap_micros": 1_000_000, "requests_per_minute": null})),
        )
        .await;
    assert_eq!(
        (
            patched["spend_cap_micros"].as_i64(),
            patched["requests_per_minute"].as_i64()
        ),
        (Some(1_000_000), None)
    );
    assert_eq!(
        patched["allowed_models"],
        json!(["gpt-test"]),
        "absent fields stay"
    );
    let k2 = api
        .ok(201, "POST", "/v1/keys", &buyer, Some(json!({})))
        .await;
    let revoked = api
        .ok(
            200,
            "DELETE",
            &format!("/v1/keys/{}", k2["id"].as_str().unwrap()),
            &buyer,
            None,
        )
        .await;
    assert!(revoked["revoked_at_ms"].is_i64());
    // The operator sees an account's keys and revokes a leaked one (never a secret shown).
    let k3 = api
        .ok(
            201,
            "POST",
            "/v1/keys",
            &buyer,
            Some(json!({"name": "leaked"})),
        )
        .await;
    let k3_id = k3["id"].as_str().unwrap();
    let listed = api
        .ok(
            200,
            "GET",
            &format!("/v1/admin/accounts/{buyer_id}/keys"),
            &admin,
            None,
        )
        .await;
    assert!(listed.as_array().unwrap().iter().any(|k| k["id"] == k3_id));
    assert!(!listed.to_string().contains(k3["secret"].as_str().unwrap()));
    let (st, _) = api
        .call(
            "GET",
            "/v1/admin/accounts/acct_nope/keys",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(st, 404);
    let (st, _) = api
        .call(
            "DELETE",
            &format!("/v1/admin/accounts/acct_nope/keys/{k3_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(st, 404, "a key under another account is not found");
    let gone = api
        .ok(
            200,
            "DELETE",
            &format!("/v1/admin/accounts/{buyer_id}/keys/{k3_id}"),
            &admin,
            None,
        )
        .await;
    assert!(gone["revoked_at_ms"].is_i64());
    let wallet = api.ok(200, "GET", "/v1/wallet", &buyer, None).await;
    assert_eq!(wallet["balance_micros"], 15_000_000);
    assert_eq!(wallet["entries"].as_array().unwrap().len(), 2);
    let (st, _) = api
        .call(
            "POST",
            "/v1/credentials",
            Some(&buyer),
            Some(&json!({"credential": {"provider": "mock"}})),
        )
        .await;
    assert_eq!(st, 403, "buyers list no credentials");

    // Seller self-service.
    let c = api
        .ok(
            201,
            "POST",
            "/v1/credentials",
            &seller,
            Some(json!({"label": "main", "credential": {
                "provider": "openai", "api_key": "sk-fine", "base_url": fake.base_url()
            }})),
        )
        .await;
    let cred_id = c["id"].as_str().unwrap().to_owned();
    assert!(!c.to_string().contains("sk-fine"));
    let verified = api
        .ok(
            200,
            "POST",
            &format!("/v1/credentials/{cred_id}/verify"),
            &seller,
            None,
        )
        .await;
    assert_eq!(verified["verify_status"], "valid");
    assert_eq!(
        (&verified["custom_endpoint"], &verified["approved_at_ms"]),
        (&json!(true), &Value::Null),
        "a base URL of the seller's own waits for the operator: {verified}"
    );
    let approve = format!("/v1/admin/credentials/{cred_id}/approve");
    let (st, _) = api.call("POST", &approve, Some(&seller), None).await;
    assert_eq!(st, 401, "sellers do not approve their own endpoints");
    let approved = api.ok(200, "POST", &approve, &admin, None).await;
    assert!(approved["approved_at_ms"].is_i64(), "{approved}");
    let bad = api
        .ok(
            201,
            "POST",
            "/v1/credentials",
            &seller,
            Some(json!({"credential": {
                "provider": "openai", "api_key": "sk-refused", "base_url": fake.base_url()
            }})),
        )
        .await;
    let bad_id = bad["id"].as_str().unwrap().to_owned();
    let refused = api
        .ok(
            200,
            "POST",
            &format!("/v1/credentials/{bad_id}/verify"),
            &seller,
            None,
        )
        .await;
    assert_eq!(refused["verify_status"], "invalid");
    // The seller rotates the refused key: verified afresh, its secret never shown.
    let rotated = api
        .ok(
            200,
            "PUT",
            &format!("/v1/credentials/{bad_id}"),
            &seller,
            Some(json!({"credential": {
                "provider": "openai", "api_key": "sk-rotated", "base_url": fake.base_url()
            }})),
        )
        .await;
    assert_eq!(rotated["verify_status"], Value::Null, "{rotated}");
    assert!(!rotated.to_string().contains("sk-rotated"));
    let reverified = api
        .ok(
            200,
            "POST",
            &format!("/v1/credentials/{bad_id}/verify"),
            &seller,
            None,
        )
        .await;
    assert_eq!(reverified["verify_status"], "valid");
    for (body, status) in [
        (
            json!({"credential": {"provider": "anthropic", "api_key": "sk-ant-x"}}),
            409,
        ),
        (json!({"credential": {"provider": "openai"}}), 400),
        (
            json!({"credential": {"provider": "openai", "api_key": "k"}, "label": "x"}),
            400,
        ),
    ] {
        let (st, v) = api
            .call(
                "PUT",
                &format!("/v1/credentials/{bad_id}"),
                Some(&seller),
                Some(&body),
            )
            .await;
        assert_eq!(st, status, "{body}: {v}");
    }
    let replace_missing = json!({"credential": {"provider": "openai", "api_key": "k"}});
    let (st, _) = api
        .call(
            "PUT",
            "/v1/credentials/cred_missing",
            Some(&seller),
            Some(&replace_missing),
        )
        .await;
    assert_eq!(st, 404);
    let creds = api.ok(200, "GET", "/v1/credentials", &seller, None).await;
    assert_eq!(creds.as_array().unwrap().len(), 2);
    api.ok(
        200,
        "GET",
        &format!("/v1/credentials/{cred_id}"),
        &seller,
        None,
    )
    .await;
    api.ok(
        204,
        "DELETE",
        &format!("/v1/credentials/{bad_id}"),
        &seller,
        None,
    )
    .await;
    let (st, _) = api
        .call(
            "GET",
            &format!("/v1/credentials/{bad_id}"),
            Some(&seller),
            None,
        )
        .await;
    assert_eq!(st, 404);
    for cred in [
        json!({"provider": "anthropic", "api_key": "sk-ant-x"}),
        json!({"provider": "bedrock", "region": "us-east-1", "access_key_id": "AKIAX", "secret_access_key": "s3cr3t", "session_token": "tok"}),
        json!({"provider": "bedrock", "region": "eu-west-1", "api_key": "bedrock-key"}),
        json!({"provider": "vertex", "location": "us-central1", "service_account_json":
            tokn_testkit::TestServiceAccount::generate("sa", "p1", "https://oauth2.googleapis.com/token").json}),
        json!({"provider": "gemini", "api_key": "AIzaX"}),
        json!({"provider": "azure", "endpoint": "https://r1.openai.azure.com", "api_key": "az", "deployment": "gpt4o", "api_version": "2024-10-21"}),
    ] {
        let made = api
            .ok(
                201,
                "POST",
                "/v1/credentials",
                &seller,
                Some(json!({"credential": cred})),
            )
            .await;
        assert_eq!(made["provider"], cred["provider"]);
    }
    let (st, e) = api
        .call("POST", "/v1/credentials", Some(&seller), Some(&json!({"credential": {"provider": "bedrock", "region": "us-east-1", "access_key_id": "AKIAX"}})))
        .await;
    assert_eq!(st, 400, "{e}");
    let (st, e) = api
        .call(
            "POST",
            "/v1/credentials",
            Some(&seller),
            Some(&json!({"credential": {"provider": "mock"}})),
        )
        .await;
    if embedded {
        assert_eq!(st, 201, "the embedded demo lists the mock: {e}");
    } else {
        assert_eq!(st, 400, "a marketplace never lists the mock: {e}");
    }
    let pool = api
        .ok(201, "POST", "/v1/pools", &seller, Some(json!({
            "credential_id": cred_id, "face_value_micros": 50_000_000, "price_ratio_ppm": 600_000,
            "models": ["gpt-test"]
        })))
        .await;
    let pool_id = pool["id"].as_str().unwrap().to_owned();
    let (st, e) = api
        .call(
            "POST",
            "/v1/pools",
            Some(&seller),
            Some(&json!({
                "credential_id": cred_id, "face_value_micros": 1, "price_ratio_ppm": 600_000,
                "models": ["claude-sonnet-4-5"]
            })),
        )
        .await;
    assert_eq!(st, 400, "a pool serves its credential's provider only: {e}");
    let pools = api.ok(200, "GET", "/v1/pools", &seller, None).await;
    assert_eq!(pools.as_array().unwrap().len(), 1);
    api.ok(200, "GET", &format!("/v1/pools/{pool_id}"), &seller, None)
        .await;
    let paused = api
        .ok(
            200,
            "PATCH",
            &format!("/v1/pools/{pool_id}"),
            &seller,
            Some(json!({"status": "paused"})),
        )
        .await;
    assert_eq!(paused["status"], "paused");
    // The operator's pause holds against the seller until the operator resumes the pool.
    let operator_pool = format!("/v1/admin/pools/{pool_id}");
    let held = api
        .ok(
            200,
            "PATCH",
            &operator_pool,
            &admin,
            Some(json!({"status": "paused"})),
        )
        .await;
    assert_eq!(held["held_by_operator"], true, "{held}");
    let (st, e) = api
        .call(
            "PATCH",
            &format!("/v1/pools/{pool_id}"),
            Some(&seller),
            Some(&json!({"status": "live"})),
        )
        .await;
    assert_eq!(st, 409, "{e}");
    api.ok(
        200,
        "PATCH",
        &operator_pool,
        &admin,
        Some(json!({"status": "live"})),
    )
    .await;
    api.ok(
        200,
        "PATCH",
        &format!("/v1/pools/{pool_id}"),
        &seller,
        Some(json!({"status": "live", "price_ratio_ppm": 550_000})),
    )
    .await;
    let (st, _) = api
        .call(
            "DELETE",
            &format!("/v1/credentials/{cred_id}"),
            Some(&seller),
            None,
        )
        .await;
    assert_eq!(st, 409, "a credential with a live pool stays");

    // The proxies' watch.
    let proxy = control.proxy_token.clone();
    let cfg = api
        .ok(200, "GET", "/internal/v1/config?after=0", &proxy, None)
        .await;
    let pools = cfg["pools"].as_array().unwrap();
    assert_eq!(
        pools.len(),
        1,
        "only the openai pool's provider has a proxy adapter with a credential"
    );
    assert_eq!(pools[0]["id"], pool_id.as_str());
    // The ratio crosses the push as an integer (parts per million), never a float.
    assert_eq!(pools[0]["price_ratio_ppm"], 550_000);
    // The catalog shows what can be served and what a buyer pays: list × the pool's ratio.
    let catalog = api.ok(200, "GET", "/v1/catalog", &buyer, None).await;
    let entries = catalog.as_array().unwrap();
    let sold = entries
        .iter()
        .rfind(|m| m["model_id"] == "gpt-test")
        .unwrap();
    assert_eq!(sold["supply"]["live_pools"], 1, "{sold}");
    assert_eq!(sold["supply"]["price_ratio_ppm"], 550_000, "{sold}");
    let list = sold["input_price_micros_per_mtok"].as_i64().unwrap();
    assert_eq!(
        sold["buyer_input_price_micros_per_mtok"].as_i64(),
        Some(list * 55 / 100)
    );
    assert!(sold["supply"]["face_value_left_micros"].as_i64().unwrap() > 0);
    let unsold = entries.iter().find(|m| m["model_id"] == "gpt-4o").unwrap();
    assert!(unsold["supply"].is_null(), "no pool sells it: {unsold}");
    assert!(unsold["buyer_input_price_micros_per_mtok"].is_null());
    assert!(pools[0].get("price_ratio").is_none());
    let version = cfg["version"].as_u64().unwrap();
    let (st, _) = api
        .call(
            "GET",
            &format!("/internal/v1/config?after={version}&wait_s=0"),
            Some(&proxy),
            None,
        )
        .await;
    assert_eq!(st, 204, "nothing newer");
    let (st, _) = api
        .call("GET", "/internal/v1/config?after=0", Some(&admin), None)
        .await;
    assert_eq!(st, 401, "the admin token is not the proxy token");
    let (st, _) = api
        .call("GET", "/internal/v1/config?after=0", Some(&buyer), None)
        .await;
    assert_eq!(st, 401);

    // The usage drain: a record is applied once, with its postings; a second delivery is
    // skipped; a line that is no record is refused without stopping the batch.
    let record = json!({"request_id": "req_tour_1", "started_at_ms": 1, "key_id": key_id,
        "account": buyer_id, "pool_id": pool_id, "seller": seller_id, "model": "gpt-4o-mini",
        "provider": "openai", "price_version": 1, "stream": false, "status": 200, "outcome": "ok",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "cached_tokens": 0,
            "reasoning_tokens": 0},
        "usage_source": "reported", "list_cost_micros": 210, "buyer_cost_micros": 116,
        "latency_ms": 3, "ttft_ms": null, "upstream_attempts": 1, "upstream_request_id": null});
    let batch = format!("{record}\nnot json\n").into_bytes();
    let ndjson = Some("application/x-ndjson");
    let (st, v) = api
        .raw(
            "POST",
            "/internal/v1/usage",
            Some(&proxy),
            ndjson,
            Some(batch.clone()),
        )
        .await;
    assert_eq!(
        (st, &v["applied"], &v["duplicates"]),
        (200, &json!(1), &json!(0)),
        "{v}"
    );
    assert_eq!(v["refused"][0]["line"], 2, "{v}");
    let (st, v) = api
        .raw(
            "POST",
            "/internal/v1/usage",
            Some(&proxy),
            ndjson,
            Some(batch.clone()),
        )
        .await;
    assert_eq!(
        (st, &v["applied"], &v["duplicates"]),
        (200, &json!(0), &json!(1)),
        "{v}"
    );
    let (st, _) = api
        .raw(
            "POST",
            "/internal/v1/usage",
            Some(&admin),
            ndjson,
            Some(batch),
        )
        .await;
    assert_eq!(st, 401, "only proxies ship usage");
    let check = api
        .ok(200, "GET", "/v1/admin/ledger/check", &admin, None)
        .await;
    assert_eq!(check["usage_records"], 1, "{check}");
    assert_eq!(check["imbalance_micros"], 0, "{check}");
    assert_eq!(check["balance_mismatches"], json!([]), "{check}");
    assert_eq!(check["pool_mismatches"], json!([]), "{check}");
    assert_eq!(check["rollup_mismatches"], json!([]), "{check}");
    // The balance feed: everything first, then only what changes.
    let feed = api
        .ok(
            200,
            "GET",
            "/internal/v1/balances?after=0&wait_s=0",
            &proxy,
            None,
        )
        .await;
    assert_eq!(feed["complete"], true, "{feed}");
    let mine = feed["balances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["account"] == buyer_id.as_str())
        .cloned()
        .unwrap();
    let version = feed["version"].as_u64().unwrap();
    let (st, _) = api
        .call(
            "GET",
            &format!("/internal/v1/balances?after={version}&wait_s=0"),
            Some(&proxy),
            None,
        )
        .await;
    assert_eq!(st, 204, "nothing changed");
    let wallet = api.ok(200, "GET", "/v1/wallet", &buyer, None).await;
    assert_eq!(mine["balance_micros"], wallet["balance_micros"], "{feed}");
    let usage = wallet["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "usage")
        .cloned();
    assert_eq!(usage.unwrap()["amount_micros"], -116, "{wallet}");

    // What each side reads of it: the operator's listing, the buyer's statement, the seller's
    // earnings, the drain's state.
    let listed = api
        .ok(
            200,
            "GET",
            &format!("/v1/admin/usage?account_id={buyer_id}&model=gpt-4o-mini&limit=10"),
            &admin,
            None,
        )
        .await;
    assert_eq!(listed[0]["request_id"], "req_tour_1", "{listed}");
    assert_eq!(
        listed[0]["fee_micros"], 13,
        "12% of 116, rounded down: {listed}"
    );
    // By key alone (found through the key's account), and none for a key that has none.
    let by_key = format!("/v1/admin/usage?key_id={key_id}");
    let listed = api.ok(200, "GET", &by_key, &admin, None).await;
    assert_eq!(listed[0]["request_id"], "req_tour_1", "{listed}");
    let listed = api
        .ok(
            200,
            "GET",
            "/v1/admin/usage?key_id=key_unknown",
            &admin,
            None,
        )
        .await;
    assert_eq!(listed, json!([]));
    for group in ["key", "model", "day"] {
        let statement = api
            .ok(
                200,
                "GET",
                &format!("/v1/usage?group={group}"),
                &buyer,
                None,
            )
            .await;
        assert_eq!(statement["cost_micros"], 116, "{statement}");
        assert_eq!(statement["list_cost_micros"], 210, "{statement}");
        assert_eq!(statement["lines"].as_array().unwrap().len(), 1);
    }
    let statement = api.ok(200, "GET", "/v1/usage", &buyer, None).await;
    assert_eq!(statement["lines"][0]["group"], "1970-01-01", "{statement}");
    let (st, e) = api
        .call("GET", "/v1/usage?group=week", Some(&buyer), None)
        .await;
    assert_eq!(st, 400, "{e}");
    let earnings = api.ok(200, "GET", "/v1/earnings", &seller, None).await;
    assert_eq!(earnings["earned_micros"], 103, "{earnings}");
    assert_eq!(earnings["payable_micros"], 103, "{earnings}");
    assert_eq!(earnings["pools"][0]["consumed_micros"], 210, "{earnings}");
    let (st, _) = api.call("GET", "/v1/earnings", Some(&buyer), None).await;
    assert_eq!(st, 403, "buyers earn nothing");
    let drain = api.ok(200, "GET", "/v1/admin/drain", &admin, None).await;
    assert_eq!(
        (&drain["applied"], &drain["duplicates"]),
        (&json!(1), &json!(1)),
        "{drain}"
    );
    // A refund gives the buyer the cost back once, and the ledger still holds.
    let refund = "/v1/admin/usage/req_tour_1/refund";
    let memo = Some(json!({"memo": "duplicate charge"}));
    let first = api.ok(201, "POST", refund, &admin, memo.clone()).await;
    assert_eq!(
        first["balance_micros"],
        wallet["balance_micros"].as_i64().unwrap() + 116
    );
    let again = api.ok(200, "POST", refund, &admin, memo.clone()).await;
    assert_eq!(
        (&again["created"], &again["transaction_id"]),
        (&json!(false), &first["transaction_id"])
    );
    let (st, _) = api
        .call(
            "POST",
            "/v1/admin/usage/req_unknown/refund",
            Some(&admin),
            memo.as_ref(),
        )
        .await;
    assert_eq!(st, 404);
    let earnings = api.ok(200, "GET", "/v1/earnings", &seller, None).await;
    assert_eq!(
        earnings["payable_micros"], 0,
        "the seller's share went back: {earnings}"
    );
    let check = api
        .ok(200, "GET", "/v1/admin/ledger/check", &admin, None)
        .await;
    assert_eq!(check["imbalance_micros"], 0, "{check}");
    assert_eq!(check["balance_mismatches"], json!([]), "{check}");

    World {
        admin,
        proxy,
        buyer,
        buyer_id,
        seller,
        seller_id,
        other,
        key_id,
        cred_id,
        pool_id,
    }
}

/// Everything a bad request could have changed.
async fn fingerprint(api: &Api, w: &World) -> String {
    let mut out = String::new();
    for (path, token) in [
        ("/v1/admin/accounts", &w.admin),
        (&*format!("/v1/admin/accounts/{}", w.buyer_id), &w.admin),
        (&*format!("/v1/admin/accounts/{}", w.seller_id), &w.admin),
        ("/v1/admin/settings", &w.admin),
        ("/v1/catalog", &w.admin),
        ("/v1/keys", &w.buyer),
        ("/v1/wallet", &w.buyer),
        ("/v1/credentials", &w.seller),
        ("/v1/pools", &w.seller),
        ("/internal/v1/config?after=0", &w.proxy),
    ] {
        let (_, v) = api.call("GET", path, Some(token), None).await;
        out.push_str(&v.to_string());
    }
    out
}

/// What is wrong, the token, the content type, the body, the status expected.
type BadCase<'a> = (String, Option<&'a str>, Option<&'a str>, Vec<u8>, u16);

async fn bad_input_changes_nothing(api: &Api, w: &World) {
    let writes: Vec<(&str, String, &str, Value)> = vec![
        (
            "POST",
            "/v1/admin/accounts".into(),
            &w.admin,
            json!({"email": "new@example.com", "role": "buyer"}),
        ),
        (
            "PATCH",
            format!("/v1/admin/accounts/{}", w.buyer_id),
            &w.admin,
            json!({"status": "suspended"}),
        ),
        (
            "POST",
            format!("/v1/admin/accounts/{}/credits", w.buyer_id),
            &w.admin,
            json!({"amount_micros": 1, "memo": "m", "reference": "r-bad"}),
        ),
        (
            "PUT",
            "/v1/admin/settings".into(),
            &w.admin,
            json!({"fee_ratio_ppm": 1, "welcome_credit_micros": 1, "keys_per_account_max": 5, "default_requests_per_minute": null}),
        ),
        (
            "POST",
            "/v1/admin/catalog".into(),
            &w.admin,
            json!({"model_id": "m-new", "provider": "openai", "input_price_micros_per_mtok": 1, "output_price_micros_per_mtok": 1}),
        ),
        ("POST", "/v1/keys".into(), &w.buyer, json!({"name": "x"})),
        (
            "PATCH",
            format!("/v1/keys/{}", w.key_id),
            &w.buyer,
            json!({"spend_cap_micros": 5}),
        ),
        (
            "POST",
            "/v1/credentials".into(),
            &w.seller,
            json!({"label": "x", "credential": {"provider": "gemini", "api_key": "AIzaY"}}),
        ),
        (
            "POST",
            "/v1/pools".into(),
            &w.seller,
            json!({"credential_id": w.cred_id, "face_value_micros": 1_000_000, "price_ratio_ppm": 1, "models": ["gpt-test"]}),
        ),
        (
            "PATCH",
            format!("/v1/pools/{}", w.pool_id),
            &w.seller,
            json!({"status": "paused"}),
        ),
        (
            "PATCH",
            format!("/v1/admin/pools/{}", w.pool_id),
            &w.admin,
            json!({"status": "paused"}),
        ),
        (
            "POST",
            "/v1/admin/usage/req_tour_1/refund".into(),
            &w.admin,
            json!({"memo": "again"}),
        ),
    ];
    let before = fingerprint(api, w).await;
    let huge = format!("{{\"name\": \"{}\"}}", "a".repeat(300 * 1024));
    for (method, path, token, good) in &writes {
        let mut cases: Vec<BadCase> = vec![
            (
                "malformed JSON".into(),
                Some(token),
                Some("application/json"),
                b"{\"x\": ".to_vec(),
                400,
            ),
            (
                "not an object".into(),
                Some(token),
                Some("application/json"),
                b"[1, 2]".to_vec(),
                400,
            ),
            (
                "oversized".into(),
                Some(token),
                Some("application/json"),
                huge.clone().into_bytes(),
                413,
            ),
            (
                "no content type".into(),
                Some(token),
                None,
                good.to_string().into_bytes(),
                415,
            ),
            (
                "no token".into(),
                None,
                Some("application/json"),
                good.to_string().into_bytes(),
                401,
            ),
            (
                "wrong token".into(),
                Some("tok_acct_nope"),
                Some("application/json"),
                good.to_string().into_bytes(),
                401,
            ),
        ];
        let mut unknown = good.clone();
        unknown["surprise"] = json!(1);
        cases.push((
            "unknown field".into(),
            Some(token),
            Some("application/json"),
            unknown.to_string().into_bytes(),
            400,
        ));
        for field in good.as_object().unwrap().keys() {
            let mut wrong = good.clone();
            wrong[field] = json!({"nested": [true]});
            cases.push((
                format!("wrong type for {field}"),
                Some(token),
                Some("application/json"),
                wrong.to_string().into_bytes(),
                400,
            ));
        }
        for (what, tok, ct, body, want) in cases {
            let (status, v) = api.raw(method, path, tok, ct, Some(body)).await;
            assert_eq!(status, want, "{method} {path} with {what}: {v}");
            let code = v["error"]["code"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} {what}: no JSON error: {v}"));
            assert!(
                !v["error"]["message"].as_str().unwrap().is_empty(),
                "{code}"
            );
            if what == "unknown field" {
                assert!(
                    v.to_string().contains("surprise"),
                    "the message names the field: {v}"
                );
            }
        }
    }
    // Values out of range are refused by the same rules.
    for (method, path, token, body) in [
        (
            "POST",
            "/v1/admin/accounts".to_owned(),
            &w.admin,
            json!({"email": "not-an-email", "role": "buyer"}),
        ),
        (
            "POST",
            "/v1/admin/accounts".to_owned(),
            &w.admin,
            json!({"email": "x@y.z", "role": "king"}),
        ),
        (
            "POST",
            format!("/v1/admin/accounts/{}/credits", w.buyer_id),
            &w.admin,
            json!({"amount_micros": -5, "memo": "m", "reference": "r"}),
        ),
        (
            "PUT",
            "/v1/admin/settings".to_owned(),
            &w.admin,
            json!({"fee_ratio_ppm": 2_000_000, "welcome_credit_micros": 1, "keys_per_account_max": 5, "default_requests_per_minute": null}),
        ),
        (
            "POST",
            "/v1/admin/catalog".to_owned(),
            &w.admin,
            json!({"model_id": "m", "provider": "nope", "input_price_micros_per_mtok": 1, "output_price_micros_per_mtok": 1}),
        ),
        (
            "POST",
            "/v1/admin/catalog".to_owned(),
            &w.admin,
            json!({"model_id": "m", "provider": "openai", "input_price_micros_per_mtok": -1, "output_price_micros_per_mtok": 1}),
        ),
        (
            "POST",
            "/v1/keys".to_owned(),
            &w.buyer,
            json!({"allowed_models": ["no-such-model"]}),
        ),
        (
            "POST",
            "/v1/keys".to_owned(),
            &w.buyer,
            json!({"requests_per_minute": 0}),
        ),
        (
            "POST",
            "/v1/credentials".to_owned(),
            &w.seller,
            json!({"credential": {"provider": "openai", "api_key": "sk", "base_url": "http://evil.example.com/v1"}}),
        ),
        (
            "POST",
            "/v1/credentials".to_owned(),
            &w.seller,
            json!({"credential": {"provider": "vertex", "location": "x", "service_account_json": "{}"}}),
        ),
        // A working key file, but a location the proxies would refuse in a request path.
        (
            "POST",
            "/v1/credentials".to_owned(),
            &w.seller,
            json!({"credential": {"provider": "vertex", "location": "US-Central1",
                "service_account_json": tokn_testkit::TestServiceAccount::generate(
                    "sa", "p1", "https://oauth2.googleapis.com/token").json}}),
        ),
        (
            "POST",
            "/v1/credentials".to_owned(),
            &w.seller,
            json!({"credential": {"provider": "openai", "api_key": "sk", "base_url": "http://localhost.evil.example/v1"}}),
        ),
        (
            "POST",
            "/v1/credentials".to_owned(),
            &w.seller,
            json!({"credential": {"provider": "openai", "api_key": "has space"}}),
        ),
        (
            "POST",
            "/v1/pools".to_owned(),
            &w.seller,
            json!({"credential_id": w.cred_id, "face_value_micros": 1, "price_ratio_ppm": 1_500_000, "models": ["gpt-test"]}),
        ),
        (
            "POST",
            "/v1/pools".to_owned(),
            &w.seller,
            json!({"credential_id": w.cred_id, "face_value_micros": 0, "price_ratio_ppm": 1, "models": ["gpt-test"]}),
        ),
        (
            "POST",
            "/v1/pools".to_owned(),
            &w.seller,
            json!({"credential_id": w.cred_id, "face_value_micros": 1, "price_ratio_ppm": 1, "models": []}),
        ),
        (
            "POST",
            "/v1/pools".to_owned(),
            &w.seller,
            json!({"credential_id": w.cred_id, "face_value_micros": 1, "price_ratio_ppm": 1, "models": ["gpt-test"], "expires_at_ms": 1}),
        ),
        (
            "PATCH",
            format!("/v1/pools/{}", w.pool_id),
            &w.seller,
            json!({"status": "gone"}),
        ),
        (
            "GET",
            "/v1/keys?limit=abc".to_owned(),
            &w.buyer,
            Value::Null,
        ),
        ("GET", "/v1/keys?bogus=1".to_owned(), &w.buyer, Value::Null),
        (
            "GET",
            "/internal/v1/config?after=-1".to_owned(),
            &w.proxy,
            Value::Null,
        ),
    ] {
        let body = (!body.is_null()).then_some(&body);
        let (status, v) = api.call(method, &path, Some(token), body).await;
        assert_eq!(status, 400, "{method} {path} {body:?}: {v}");
        assert!(v["error"]["code"].is_string(), "{v}");
    }
    let (status, v) = api.call("GET", "/v1/nope", Some(&w.buyer), None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, v) = api.call("PUT", "/v1/keys", Some(&w.buyer), None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    assert_eq!(
        fingerprint(api, w).await,
        before,
        "bad input changed something"
    );
}

async fn other_accounts_see_404(api: &Api, w: &World) {
    let before = fingerprint(api, w).await;
    let other = &w.other;
    for (method, path, body) in [
        ("GET", format!("/v1/keys/{}", w.key_id), None),
        (
            "PATCH",
            format!("/v1/keys/{}", w.key_id),
            Some(json!({"spend_cap_micros": 1})),
        ),
        ("DELETE", format!("/v1/keys/{}", w.key_id), None),
        ("GET", format!("/v1/credentials/{}", w.cred_id), None),
        ("DELETE", format!("/v1/credentials/{}", w.cred_id), None),
        (
            "POST",
            format!("/v1/credentials/{}/verify", w.cred_id),
            None,
        ),
        ("GET", format!("/v1/pools/{}", w.pool_id), None),
        (
            "PATCH",
            format!("/v1/pools/{}", w.pool_id),
            Some(json!({"status": "exhausted"})),
        ),
        (
            "POST",
            "/v1/pools".to_owned(),
            Some(
                json!({"credential_id": w.cred_id, "face_value_micros": 1_000_000, "price_ratio_ppm": 1, "models": ["gpt-test"]}),
            ),
        ),
    ] {
        let (status, v) = api.call(method, &path, Some(other), body.as_ref()).await;
        assert_eq!(status, 404, "{method} {path} by another account: {v}");
        assert_eq!(v["error"]["code"], "not_found");
    }
    // The owner of one kind of thing cannot reach another owner's through a different door.
    let (status, _) = api
        .call(
            "GET",
            &format!("/v1/keys/{}", w.key_id),
            Some(&w.seller),
            None,
        )
        .await;
    assert_eq!(status, 404);
    for (method, path, body) in [
        ("GET", "/v1/admin/accounts/acct_missing".to_owned(), None),
        (
            "PATCH",
            "/v1/admin/accounts/acct_missing".to_owned(),
            Some(json!({"status": "active"})),
        ),
        (
            "POST",
            "/v1/admin/accounts/acct_missing/credits".to_owned(),
            Some(json!({"amount_micros": 1, "memo": "", "reference": "x"})),
        ),
    ] {
        let (status, v) = api.call(method, &path, Some(&w.admin), body.as_ref()).await;
        assert_eq!(status, 404, "{method} {path}: {v}");
    }
    // Account tokens open no admin endpoint.
    let (status, _) = api
        .call("GET", "/v1/admin/accounts", Some(&w.buyer), None)
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        fingerprint(api, w).await,
        before,
        "a refused request changed something"
    );
}

async fn every_operation_was_exercised(api: &Api, doc: &Value) {
    let text = reqwest::get(format!("{}/metrics", api.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut hit = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("tokn_control_requests_total{"))
    {
        let label = |name: &str| {
            let start = line.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
            line[start..start + line[start..].find('"').unwrap()].to_owned()
        };
        if label("status").starts_with('2') {
            hit.insert((label("method"), label("route")));
        }
    }
    let mut missing = Vec::new();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            operations += 1;
            if !hit.contains(&(method.to_ascii_uppercase(), path.clone())) {
                missing.push(format!("{} {path}", method.to_ascii_uppercase()));
            }
        }
    }
    assert!(
        operations >= 26,
        "the document lists every operation ({operations})"
    );
    assert!(
        missing.is_empty(),
        "operations no test exercised successfully: {missing:?}"
    );
}

/// Validates the document with `openapi-spec-validator` (PyPI), in a venv made once per target
/// directory.
fn openapi_document_validates(doc: &Value) {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let python = tokn_testkit::python::venv_python(
        &tmp,
        "openapi-validator-venv",
        &["openapi-spec-validator==0.7.1"],
    );
    let file = tmp.join(format!("openapi-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    let out = Command::new(&python)
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "OpenAPI document is invalid:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGTERM ends a proxy's pending watch at once (204) instead of holding the exit for its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_waiting_watches() {
    let mut control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let url = format!(
        "{}/internal/v1/config?after=1000000&wait_s=60",
        control.url()
    );
    let token = control.proxy_token.clone();
    let watch = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    control.terminate();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), watch)
        .await
        .expect("the watch returned")
        .unwrap();
    assert_eq!(status.unwrap(), 204);
    assert!(
        control.wait_exit(std::time::Duration::from_secs(10)),
        "the service exited"
    );
    eprintln!(
        "exit after SIGTERM with a pending watch: {:?}",
        started.elapsed()
    );
}

/// Eight clients creating keys at once on SQLite: every call succeeds — writes wait their turn
/// on the store's one writer connection instead of failing with "database is locked" — and
/// every key reaches the published configuration.
/// The per-account key cap holds under concurrency: with one slot left, eight creations at
/// once make one key and seven 409s; a revoked key frees its slot once, however often it is
/// revoked.
async fn key_cap(options: ControlOptions) {
    let control = ControlProcess::start(&control_binary(), options);
    let c = common::Client::new();
    let admin = control.admin_token.clone();
    c.set_setting(&control, "keys_per_account_max", json!(3))
        .await;
    let buyer = c
        .api(
            &control,
            "POST",
            "/v1/admin/accounts",
            &admin,
            Some(json!({"email": "cap@example.com", "role": "buyer"})),
        )
        .await;
    let token = buyer["token"].as_str().unwrap().to_owned();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let k = c
            .api(&control, "POST", "/v1/keys", &token, Some(json!({})))
            .await;
        ids.push(k["id"].as_str().unwrap().to_owned());
    }
    let create = || async {
        c.call(&control, "POST", "/v1/keys", &token, Some(json!({})))
            .await
    };
    let statuses = |answers: Vec<(u16, Value)>| {
        let mut s: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
        s.sort_unstable();
        s
    };
    let at_once = futures_util::future::join_all((0..8).map(|_| create())).await;
    assert_eq!(
        statuses(at_once),
        [201, 409, 409, 409, 409, 409, 409, 409],
        "one slot, one key"
    );
    let (status, body) = create().await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("3 live keys"));
    // Revoked twice: one slot freed.
    let path = format!("/v1/keys/{}", ids[0]);
    for _ in 0..2 {
        let (status, _) = c.call(&control, "DELETE", &path, &token, None).await;
        assert!(status == 200 || status == 204, "{status}");
    }
    let at_once = futures_util::future::join_all((0..4).map(|_| create())).await;
    assert_eq!(statuses(at_once), [201, 409, 409, 409]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_cap_holds_under_concurrency_on_sqlite() {
    key_cap(ControlOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_cap_holds_under_concurrency_on_postgres() {
    let db = TestDatabase::create("keycap").await;
    key_cap(ControlOptions {
        database_url: Some(db.url.clone()),
        ..ControlOptions::default()
    })
    .await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_creating_keys_at_once_on_sqlite_all_succeed() {
    const CLIENTS: usize = 8;
    const KEYS_EACH: usize = 25;
    let control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let c = common::Client::new();
    let admin = control.admin_token.clone();
    let mut buyers = Vec::new();
    for i in 0..CLIENTS {
        let email = format!("buyer-{i}@example.com");
        let a = c
            .api(
                &control,
                "POST",
                "/v1/admin/accounts",
                &admin,
                Some(json!({"email": email, "role": "buyer"})),
            )
            .await;
        buyers.push(a["token"].as_str().unwrap().to_owned());
    }
    let started = std::time::Instant::now();
    let clients = buyers.iter().map(|token| {
        let (c, control) = (&c, &control);
        async move {
            let mut statuses = Vec::new();
            for _ in 0..KEYS_EACH {
                let (status, body) = c
                    .call(control, "POST", "/v1/keys", token, Some(json!({})))
                    .await;
                statuses.push((status, body["error"].clone()));
            }
            statuses
        }
    });
    let answers: Vec<(u16, Value)> = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .flatten()
        .collect();
    let took = started.elapsed();
    let failed: Vec<&(u16, Value)> = answers.iter().filter(|(s, _)| *s != 201).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        answers.len()
    );
    eprintln!(
        "{} keys by {CLIENTS} clients in {took:?}: {:.0} keys/s",
        answers.len(),
        answers.len() as f64 / took.as_secs_f64()
    );
    // Published off the request path, and complete.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let config: Value = serde_json::from_str(&c.watch(&control, 0, false).await.1).unwrap();
        let keys = config["keys"].as_array().map_or(0, Vec::len);
        if keys == CLIENTS * KEYS_EACH {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{keys} keys published"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// What a proxy at `after` is answered (with `delta=true`): the `x-tokn-config` kind, the body
/// and its size.
async fn watch_answer(
    c: &common::Client,
    control: &ControlProcess,
    after: u64,
) -> (String, Value, usize) {
    let (kind, text) = c.watch(control, after, true).await;
    (kind, serde_json::from_str(&text).unwrap(), text.len())
}

/// A proxy behind by key changes alone is sent those keys (created, changed, revoked: a few
/// hundred bytes whatever the store holds), one behind by anything else — or asking without
/// `delta=true`, or cold — the whole configuration; deltas merge across versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_travel_as_deltas_and_anything_else_as_the_whole_configuration() {
    let control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let c = common::Client::new();
    let admin = control.admin_token.clone();
    let buyer = c
        .api(
            &control,
            "POST",
            "/v1/admin/accounts",
            &admin,
            Some(json!({"email": "delta@example.com", "role": "buyer"})),
        )
        .await;
    let token = buyer["token"].as_str().unwrap().to_owned();
    let (kind, full, _) = watch_answer(&c, &control, 0).await;
    assert_eq!(kind, "full");
    let v0 = full["version"].as_u64().unwrap();

    let first = c
        .api(
            &control,
            "POST",
            "/v1/keys",
            &token,
            Some(json!({"name": "a"})),
        )
        .await;
    let (kind, delta, bytes) = watch_answer(&c, &control, v0).await;
    assert_eq!(kind, "delta", "{delta}");
    assert_eq!(delta["from"], v0, "{delta}");
    let v1 = delta["version"].as_u64().unwrap();
    assert!(v1 > v0);
    let keys = delta["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{delta}");
    assert_eq!(keys[0]["id"], first["id"]);
    assert!(keys[0]["key_sha256"].is_string() && keys[0].get("key").is_none_or(Value::is_null));
    assert!(bytes < 1_000, "{bytes} bytes for one key");

    // Limits changed, then revoked, plus a new key: one answer from v1 carries where each
    // ended.
    let id = first["id"].as_str().unwrap();
    c.api(
        &control,
        "PATCH",
        &format!("/v1/keys/{id}"),
        &token,
        Some(json!({"requests_per_minute": 7})),
    )
    .await;
    let second = c
        .api(
            &control,
            "POST",
            "/v1/keys",
            &token,
            Some(json!({"name": "b"})),
        )
        .await;
    let (kind, delta, _) = watch_answer(&c, &control, v1).await;
    assert_eq!(kind, "delta", "{delta}");
    let keys = delta["keys"].as_array().unwrap();
    let limited = keys
        .iter()
        .find(|k| k["id"] == first["id"])
        .expect("first key");
    assert_eq!(limited["requests_per_minute"], 7);
    assert!(keys.iter().any(|k| k["id"] == second["id"]), "{delta}");
    let v2 = delta["version"].as_u64().unwrap();
    c.call(&control, "DELETE", &format!("/v1/keys/{id}"), &token, None)
        .await;
    let (kind, delta, _) = watch_answer(&c, &control, v1).await;
    assert_eq!(kind, "delta", "{delta}");
    assert_eq!(delta["revoked"], json!([limited["key_sha256"]]), "{delta}");
    assert!(delta["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["id"] != first["id"]));
    let v3 = delta["version"].as_u64().unwrap();
    assert!(v3 > v2);

    // Anything but keys (a catalog change): the whole configuration, to a proxy at v3 and to
    // one still at v1; without `delta=true`, always the whole configuration.
    c.api(
        &control,
        "POST",
        "/v1/admin/catalog",
        &admin,
        Some(json!({
        "model_id": "delta-model", "provider": "openai",
        "input_price_micros_per_mtok": 1, "output_price_micros_per_mtok": 1})),
    )
    .await;
    for after in [v3, v1] {
        let (kind, full, _) = watch_answer(&c, &control, after).await;
        assert_eq!(kind, "full", "after {after}");
        let ids: Vec<&Value> = full["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| &k["id"])
            .collect();
        assert_eq!(ids, [&second["id"]], "{full}");
    }
    assert_eq!(c.watch(&control, v3, false).await.0, "full");
}

/// Waitlist sign-ups are throttled per source address: after 10 within a minute the address
/// gets 429 `rate_limited` with `retry-after`, and nothing more is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waitlist_sign_ups_are_throttled_per_source() {
    let control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for i in 0..15 {
        let resp = http
            .post(format!("{}/v1/waitlist", control.url()))
            .json(&json!({"email": format!("w{i}@example.com"), "role": "buyer"}))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            assert_throttled(resp, "rate_limited").await;
        }
    }
    assert!(statuses[..10].iter().all(|s| *s == 202), "{statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 429), "{statuses:?}");
    let list: Value = http
        .get(format!("{}/v1/admin/waitlist?limit=100", control.url()))
        .bearer_auth(&control.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 10, "{list}");
}

/// A 429 with the error `code` and a `retry-after` within the minute's window.
async fn assert_throttled(resp: reqwest::Response, code: &str) {
    let wait: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
}

/// Bad tokens are throttled per source address: after 50 within a minute the address gets 429
/// with `retry-after` — even with a good token, the admin's and the proxies' alike — and a
/// request without a token guesses nothing (401, not counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_throttled_per_source() {
    let control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let http = reqwest::Client::new();
    let get = |token: Option<String>| {
        let mut req = http.get(format!("{}/v1/account", control.url()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    for _ in 0..20 {
        assert_eq!(get(None).await.unwrap().status(), 401);
    }
    let mut statuses = Vec::new();
    for i in 0..60 {
        let resp = get(Some(format!("tok_wrong_{i}"))).await.unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            assert_throttled(resp, "too_many_failed_sign_ins").await;
        }
    }
    assert!(statuses[..50].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[50..].iter().all(|s| *s == 429), "{statuses:?}");
    // The address is refused whatever it presents until its window ends.
    let admin = http
        .get(format!("{}/v1/admin/settings", control.url()))
        .bearer_auth(&control.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 429);
}
