//! Money in through Stripe: credit packs bought on a (fake) Stripe Checkout page, credited once
//! by the signed webhook, taken back by refunds and disputes; the webhook refuses what is not
//! Stripe's. The real binaries, a real store, the fake Stripe of the test kit.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokn_testkit::control::{random_hex32, StripeOptions};
use tokn_testkit::fake_stripe::{post_raw, stripe_signature, FakeStripe, StripeFailure};
use tokn_testkit::harness::temp_dir;
use tokn_testkit::{Behavior, ControlOptions, ControlProcess, FakeUpstream};

mod common;

use common::*;

const STRIPE_KEY: &str = "sk_test_tokn_payments_0123456789";
const WHSEC: &str = "whsec_tokn_account_endpoint_secret";
const CONNECT_WHSEC: &str = "whsec_tokn_connect_endpoint_secret";

/// A control plane on Stripe (the fake), delivering events back to it.
struct Paid {
    stripe: FakeStripe,
    control: ControlProcess,
    c: Client,
    admin: String,
}

async fn paid(mut options: ControlOptions, extra: &str) -> Paid {
    let stripe = FakeStripe::start(STRIPE_KEY, WHSEC, CONNECT_WHSEC)
        .await
        .unwrap();
    options.stripe = Some(StripeOptions {
        base_url: stripe.base_url(),
        secret_key: STRIPE_KEY.to_owned(),
        webhook_secret: WHSEC.to_owned(),
        connect_webhook_secret: CONNECT_WHSEC.to_owned(),
        extra: extra.to_owned(),
    });
    let control = ControlProcess::start(&control_binary(), options);
    stripe.deliver_to(
        &format!("{}/v1/stripe/webhook", control.url()),
        &format!("{}/v1/stripe/connect-webhook", control.url()),
    );
    let admin = control.admin_token.clone();
    Paid {
        stripe,
        control,
        c: Client::new(),
        admin,
    }
}

impl Paid {
    async fn api(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
        self.c.api(&self.control, method, path, token, body).await
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.c.call(&self.control, method, path, token, body).await
    }

    async fn ledger_holds(&self) -> Value {
        assert_ledger_holds(&self.c, &self.control).await
    }

    async fn balance(&self, token: &str) -> i64 {
        self.api("GET", "/v1/wallet", token, None).await["balance_micros"]
            .as_i64()
            .unwrap()
    }

    /// A pack of `price_cents` giving `credit_micros`; its id.
    async fn pack(&self, name: &str, price_cents: i64, credit_micros: i64) -> String {
        let p = self
            .api(
                "POST",
                "/v1/admin/packs",
                &self.admin,
                Some(json!({"name": name, "price_cents": price_cents, "credit_micros": credit_micros})),
            )
            .await;
        p["id"].as_str().unwrap().to_owned()
    }

    /// Starts a purchase; (purchase, Checkout Session id).
    async fn buy(&self, token: &str, pack: &str) -> (Value, String) {
        let p = self
            .api(
                "POST",
                "/v1/purchases",
                token,
                Some(json!({"pack_id": pack})),
            )
            .await;
        let session = p["stripe_session_id"].as_str().unwrap().to_owned();
        (p, session)
    }

    async fn account(&self, email: &str, role: &str) -> String {
        let a = self
            .api(
                "POST",
                "/v1/admin/accounts",
                &self.admin,
                Some(json!({"email": email, "role": role})),
            )
            .await;
        a["token"].as_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_pack_is_credited_once_and_a_refund_takes_back_only_what_is_left() {
    let (db, _prefix, options) = fleet_stores("payments-pack").await;
    let p = paid(options, "").await;
    // No welcome credit: the wallet holds only what was bought.
    let mut settings = p.api("GET", "/v1/admin/settings", &p.admin, None).await;
    settings["welcome_credit_micros"] = json!(0);
    p.api("PUT", "/v1/admin/settings", &p.admin, Some(settings))
        .await;
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let m = market(&p.c, &p.control, &fake, &["sk-seller-pay"]).await;
    let pool = list_pool(&p.c, &p.control, &m, &m.creds[0]).await;
    let before = p.balance(&m.buyer).await;
    assert_eq!(before, 0);
    // $20 buys $22 of credit.
    let pack = p.pack("$20 pack", 2_000, 22_000_000).await;
    let packs = p.api("GET", "/v1/packs", &m.buyer, None).await;
    assert_eq!(packs[0]["id"], pack.as_str());

    let (purchase, session) = p.buy(&m.buyer, &pack).await;
    assert_eq!(purchase["status"], "open");
    assert!(purchase["checkout_url"]
        .as_str()
        .unwrap()
        .contains(&session));
    let s = p.stripe.session(&session).unwrap();
    assert_eq!(s["amount_total"], 2_000);
    assert_eq!(s["currency"], "usd");
    assert_eq!(s["client_reference_id"], purchase["id"]);
    assert_eq!(
        p.balance(&m.buyer).await,
        before,
        "nothing is credited before Stripe says paid"
    );

    let (event, status) = p.stripe.pay(&session).await;
    assert_eq!(status, 200);
    assert_eq!(p.balance(&m.buyer).await, before + 22_000_000);
    let id = purchase["id"].as_str().unwrap();
    let now = p
        .api("GET", &format!("/v1/purchases/{id}"), &m.buyer, None)
        .await;
    assert_eq!(now["status"], "paid");
    p.ledger_holds().await;

    // Redelivered, and a second event about the same payment: one credit.
    assert_eq!(p.stripe.deliver(&event).await, 200);
    let (_, status) = p.stripe.settle(&session).await;
    assert_eq!(status, 200);
    assert_eq!(p.balance(&m.buyer).await, before + 22_000_000);

    // The buyer spends through a proxy; the usage is drained into the ledger.
    let dir = temp_dir("payments-pack");
    let proxy = start_proxy(
        &p.control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        Some(&_prefix.0),
        "info",
    );
    let key = new_key(&p.c, &p.control, &m.buyer).await;
    p.c.within_a_second(&proxy, &key, "gpt-test", "the pool is served", |s, _| {
        s == 200
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let spent = loop {
        let check = p.ledger_holds().await;
        let spent = before + 22_000_000 - p.balance(&m.buyer).await;
        if check["usage_records"].as_i64().unwrap() >= 1 && spent > 0 {
            break spent;
        }
        assert!(Instant::now() < deadline, "usage not drained: {check}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(proxy);
    let _ = pool;

    // Half refunded: half the credit comes back out of the wallet (which holds it).
    let (_, status) = p.stripe.refund(&session, 1_000).await;
    assert_eq!(status, 200);
    let after_refund = p.balance(&m.buyer).await;
    assert_eq!(after_refund, before + 22_000_000 - spent - 11_000_000);
    p.ledger_holds().await;

    // Disputing the other half asks for 11M; the wallet holds 11M − spent: it gives that, and
    // what was spent is owed.
    let (_, status) = p.stripe.dispute(&session, 1_000).await;
    assert_eq!(status, 200);
    let wallet = p.api("GET", "/v1/wallet", &m.buyer, None).await;
    assert_eq!(wallet["balance_micros"], 0);
    assert_eq!(wallet["owed_micros"], spent);
    let check = p.ledger_holds().await;
    let purchases = p.api("GET", "/v1/purchases", &m.buyer, None).await;
    assert_eq!(purchases[0]["taken_back_micros"], 22_000_000);
    assert_eq!(purchases[0]["refunded_cents"], 1_000);
    assert_eq!(purchases[0]["disputed_cents"], 1_000);
    // A refund event redelivered, or one naming the same cumulative figure, takes nothing more.
    let (_, status) = p.stripe.refund(&session, 0).await;
    assert_eq!(status, 200);
    assert_eq!(
        p.ledger_holds().await["usage_records"],
        check["usage_records"]
    );
    let wallet = p.api("GET", "/v1/wallet", &m.buyer, None).await;
    assert_eq!(
        (
            wallet["balance_micros"].as_i64(),
            wallet["owed_micros"].as_i64()
        ),
        (Some(0), Some(spent))
    );
    drop(p);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_refuses_what_is_not_stripes_and_changes_nothing() {
    let p = paid(ControlOptions::default(), "").await;
    let buyer = p.account("wh@example.com", "buyer").await;
    let pack = p.pack("$5 pack", 500, 5_000_000).await;
    let (_, session) = p.buy(&buyer, &pack).await;
    let before = p.balance(&buyer).await;
    let url = format!("{}/v1/stripe/webhook", p.control.url());
    // A genuine event, not delivered yet.
    let event = {
        let s = p.stripe.session(&session).unwrap();
        let mut object = s.clone();
        object["status"] = json!("complete");
        object["payment_status"] = json!("paid");
        object["payment_intent"] = json!("pi_test_forged");
        json!({"id": "evt_test_refusals", "object": "event", "type": "checkout.session.completed",
               "api_version": "2026-06-24.dahlia", "created": 1, "livemode": false,
               "data": {"object": object}})
    };
    let body = event.to_string();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let cases: Vec<(&str, String, Option<String>)> = vec![
        ("no signature", body.clone(), None),
        (
            "signed with another secret",
            body.clone(),
            Some(stripe_signature(
                "whsec_not_this_endpoint",
                now,
                body.as_bytes(),
            )),
        ),
        (
            "a body changed after signing",
            body.replace("\"paid\"", "\"paid\" "),
            Some(stripe_signature(WHSEC, now, body.as_bytes())),
        ),
        (
            "a stale timestamp",
            body.clone(),
            Some(stripe_signature(WHSEC, now - 301, body.as_bytes())),
        ),
        (
            "only a v0 signature",
            body.clone(),
            Some(stripe_signature(WHSEC, now, body.as_bytes()).replace("v1=", "v0=")),
        ),
        (
            "a malformed body, signed",
            "{\"id\": \"evt_x\", \"type\": ".to_owned(),
            Some(stripe_signature(
                WHSEC,
                now,
                b"{\"id\": \"evt_x\", \"type\": ",
            )),
        ),
        (
            "not an event, signed",
            "[1,2,3]".to_owned(),
            Some(stripe_signature(WHSEC, now, b"[1,2,3]")),
        ),
        (
            "the connect endpoint's secret",
            body.clone(),
            Some(stripe_signature(CONNECT_WHSEC, now, body.as_bytes())),
        ),
    ];
    for (what, body, signature) in &cases {
        let status = post_raw(&url, body, signature.as_deref()).await;
        assert_eq!(status, 400, "{what}");
        assert_eq!(p.balance(&buyer).await, before, "{what}: the wallet moved");
    }
    let check = p.ledger_holds().await;
    // The genuine delivery credits once; replaying it (a captured delivery, resent within the
    // window, or Stripe's own redelivery) changes nothing more.
    let header = stripe_signature(WHSEC, now, body.as_bytes());
    assert_eq!(post_raw(&url, &body, Some(&header)).await, 200);
    assert_eq!(p.balance(&buyer).await, before + 5_000_000);
    assert_eq!(post_raw(&url, &body, Some(&header)).await, 200);
    assert_eq!(
        post_raw(
            &url,
            &body,
            Some(&stripe_signature(WHSEC, now + 1, body.as_bytes()))
        )
        .await,
        200
    );
    assert_eq!(p.balance(&buyer).await, before + 5_000_000);
    // The same event id with another body (a forgery that kept the id, or a replay) is not
    // applied a second time either.
    let mut other = event.clone();
    other["data"]["object"]["amount_total"] = json!(999_999);
    let other = other.to_string();
    assert_eq!(
        post_raw(
            &url,
            &other,
            Some(&stripe_signature(WHSEC, now, other.as_bytes()))
        )
        .await,
        200
    );
    assert_eq!(p.balance(&buyer).await, before + 5_000_000);
    let after = p.ledger_holds().await;
    assert_eq!(
        after["unbalanced_transactions"],
        check["unbalanced_transactions"]
    );
    let metrics =
        p.c.http
            .get(format!("{}/metrics", p.control.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    assert!(
        metrics.contains("tokn_control_stripe_events_total{result=\"refused\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tokn_control_stripe_events_total{result=\"duplicate\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_survives_stripe_hiccups_and_says_when_payments_are_off() {
    let p = paid(ControlOptions::default(), "timeout_ms = 1000\n").await;
    let buyer = p.account("hiccup@example.com", "buyer").await;
    let pack = p.pack("$10 pack", 1_000, 10_000_000).await;
    // Two 500s, then an answer: one session, made with one idempotency key.
    p.stripe
        .fail_next("POST /v1/checkout/sessions", StripeFailure::Status(500));
    p.stripe
        .fail_next("POST /v1/checkout/sessions", StripeFailure::Status(500));
    let (purchase, _) = p.buy(&buyer, &pack).await;
    assert_eq!(purchase["status"], "open");
    let posts: Vec<_> = p
        .stripe
        .received()
        .into_iter()
        .filter(|r| r.path == "/v1/checkout/sessions")
        .collect();
    assert_eq!(posts.len(), 1);
    assert_eq!(
        posts[0].headers["idempotency-key"],
        format!("checkout:{}", purchase["id"].as_str().unwrap())
    );
    assert_eq!(posts[0].headers["stripe-version"], "2026-06-24.dahlia");
    assert!(p.stripe.rejected().is_empty(), "{:?}", p.stripe.rejected());
    // An answer that comes too late (the client gives up after 1 s) is asked for again with the
    // same key: Stripe replays the session it made, and there is still one.
    p.stripe.fail_next(
        "POST /v1/checkout/sessions",
        StripeFailure::AnswerLate(Duration::from_secs(3)),
    );
    let sessions_before = p.stripe.state().sessions.len();
    let (late, session) = p.buy(&buyer, &pack).await;
    assert_eq!(late["status"], "open");
    assert_eq!(p.stripe.state().sessions.len(), sessions_before + 1);
    assert!(p.stripe.state().sessions.contains_key(&session));
    // Four 429s exhaust the retries: 503, nothing to pay.
    for _ in 0..4 {
        p.stripe
            .fail_next("POST /v1/checkout/sessions", StripeFailure::Status(429));
    }
    let (status, body) = p
        .call(
            "POST",
            "/v1/purchases",
            &buyer,
            Some(json!({"pack_id": pack})),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "stripe_unavailable");
    let purchases = p.api("GET", "/v1/purchases", &buyer, None).await;
    assert_eq!(purchases[0]["status"], "unavailable");
    // Bad input: an unknown pack, a withdrawn pack, unknown fields, a seller buying.
    let (status, _) = p
        .call(
            "POST",
            "/v1/purchases",
            &buyer,
            Some(json!({"pack_id": "pack_nope"})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = p
        .call(
            "POST",
            "/v1/purchases",
            &buyer,
            Some(json!({"pack_id": pack, "x": 1})),
        )
        .await;
    assert_eq!(status, 400);
    p.api(
        "PATCH",
        &format!("/v1/admin/packs/{pack}"),
        &p.admin,
        Some(json!({"active": false})),
    )
    .await;
    let (status, _) = p
        .call(
            "POST",
            "/v1/purchases",
            &buyer,
            Some(json!({"pack_id": pack})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = p
        .call(
            "POST",
            "/v1/admin/packs",
            &p.admin,
            Some(json!({"name": "too cheap", "price_cents": 49, "credit_micros": 490_000})),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = p
        .call(
            "POST",
            "/v1/admin/packs",
            &p.admin,
            Some(json!({"name": "a loss", "price_cents": 1_000, "credit_micros": 9_999_999})),
        )
        .await;
    assert_eq!(status, 400);

    // A delivery that never arrived (the endpoint was down past Stripe's retries): the
    // operator's backfill reads it from Stripe's events and applies it, once.
    let before = p.balance(&buyer).await;
    let mut object = p.stripe.session(&session).unwrap();
    object["status"] = json!("complete");
    object["payment_status"] = json!("paid");
    object["payment_intent"] = json!("pi_test_missed");
    p.stripe
        .emit_undelivered("checkout.session.completed", object);
    assert_eq!(p.balance(&buyer).await, before);
    let report = p
        .api(
            "POST",
            "/v1/admin/stripe/backfill",
            &p.admin,
            Some(json!({"days": 1})),
        )
        .await;
    assert_eq!(
        (report["read"].as_i64(), report["applied"].as_i64()),
        (Some(1), Some(1)),
        "{report}"
    );
    assert_eq!(p.balance(&buyer).await, before + 10_000_000);
    let report = p
        .api(
            "POST",
            "/v1/admin/stripe/backfill",
            &p.admin,
            Some(json!({"days": 1})),
        )
        .await;
    assert_eq!(
        (report["applied"].as_i64(), report["duplicates"].as_i64()),
        (Some(0), Some(1)),
        "{report}"
    );
    assert_eq!(p.balance(&buyer).await, before + 10_000_000);
    let (status, _) = p
        .call(
            "POST",
            "/v1/admin/stripe/backfill",
            &p.admin,
            Some(json!({"days": 31})),
        )
        .await;
    assert_eq!(status, 400);

    // A delayed payment (a bank debit): completed but unpaid credits nothing; its settlement
    // credits.
    p.api(
        "PATCH",
        &format!("/v1/admin/packs/{pack}"),
        &p.admin,
        Some(json!({"active": true})),
    )
    .await;
    let (_, slow) = p.buy(&buyer, &pack).await;
    let before = p.balance(&buyer).await;
    assert_eq!(p.stripe.pay_later(&slow).await.1, 200);
    assert_eq!(p.balance(&buyer).await, before);
    assert_eq!(p.stripe.settle(&slow).await.1, 200);
    assert_eq!(p.balance(&buyer).await, before + 10_000_000);

    // A refund that overtakes the payment's own event is kept, and taken back when the
    // credit arrives: the wallet ends where it began.
    let (early_purchase, early) = p.buy(&buyer, &pack).await;
    let before = p.balance(&buyer).await;
    let completed = {
        let mut st = p.stripe.state();
        let s = st.sessions.get_mut(&early).unwrap();
        s["status"] = json!("complete");
        s["payment_status"] = json!("paid");
        s["payment_intent"] = json!("pi_test_early");
        s.clone()
    };
    let event = p
        .stripe
        .emit_undelivered("checkout.session.completed", completed);
    assert_eq!(p.stripe.refund(&early, 1_000).await.1, 200);
    assert_eq!(p.balance(&buyer).await, before);
    assert_eq!(p.stripe.deliver(&event).await, 200);
    assert_eq!(p.balance(&buyer).await, before);
    let id = early_purchase["id"].as_str().unwrap();
    let early_purchase = p
        .api("GET", &format!("/v1/purchases/{id}"), &buyer, None)
        .await;
    assert_eq!(
        (
            early_purchase["status"].as_str(),
            early_purchase["taken_back_micros"].as_i64()
        ),
        (Some("paid"), Some(10_000_000))
    );
    p.ledger_holds().await;
    // An account event sent to the Connect endpoint is refused.
    let body = event.to_string();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let connect_url = format!("{}/v1/stripe/connect-webhook", p.control.url());
    assert_eq!(
        post_raw(
            &connect_url,
            &body,
            Some(&stripe_signature(CONNECT_WHSEC, now, body.as_bytes()))
        )
        .await,
        400
    );

    // Without [stripe], the API says payments are off.
    let plain = ControlProcess::start(&control_binary(), ControlOptions::default());
    let c = Client::new();
    let admin = plain.admin_token.clone();
    let (status, body) = c.call(&plain, "GET", "/v1/admin/packs", &admin, None).await;
    assert_eq!(status, 501);
    assert_eq!(body["error"]["code"], "payments_disabled");
    let (status, _) = c
        .call(&plain, "POST", "/v1/stripe/webhook", "", Some(json!({})))
        .await;
    assert_eq!(status, 501);
}
