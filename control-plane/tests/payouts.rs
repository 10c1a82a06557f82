//! Money out through Stripe Connect: sellers onboard, earn from buyers' traffic and are paid by
//! transfer — once, through a crash between Stripe's answer and our commit, a short platform
//! balance, a refused transfer, and several replicas running the schedule at once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokn_testkit::control::{random_hex32, StripeOptions};
use tokn_testkit::fake_stripe::{FakeStripe, StripeFailure};
use tokn_testkit::harness::temp_dir;
use tokn_testkit::{Behavior, ControlOptions, ControlProcess, FakeUpstream};

mod common;

use common::*;

const STRIPE_KEY: &str = "sk_test_tokn_payouts_0123456789";
const WHSEC: &str = "whsec_tokn_payouts_account_secret";
const CONNECT_WHSEC: &str = "whsec_tokn_payouts_connect_secret";

/// Payouts by hand (the operator's run), no hold, any amount.
const MANUAL: &str = "timeout_ms = 60000\n[stripe.payouts]\nautomatic = false\nhold_days = 0\nminimum_cents = 1\ntick_s = 1\n";

fn stripe_options(stripe: &FakeStripe, extra: &str) -> StripeOptions {
    StripeOptions {
        base_url: stripe.base_url(),
        secret_key: STRIPE_KEY.to_owned(),
        webhook_secret: WHSEC.to_owned(),
        connect_webhook_secret: CONNECT_WHSEC.to_owned(),
        extra: extra.to_owned(),
    }
}

fn deliver_to(stripe: &FakeStripe, control: &ControlProcess) {
    stripe.deliver_to(
        &format!("{}/v1/stripe/webhook", control.url()),
        &format!("{}/v1/stripe/connect-webhook", control.url()),
    );
}

/// A `[stripe.payouts]` whose weekly run is due now (today, 00:00 UTC), looked for every second.
fn due_now() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    // 1970-01-01 was a Thursday.
    let today =
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][usize::try_from((days + 3) % 7).unwrap()];
    format!("[stripe.payouts]\nautomatic = true\nweekday = \"{today}\"\nhour_utc = 0\nhold_days = 0\nminimum_cents = 1\ntick_s = 1\n")
}

/// A seller onboarded on the fake Stripe (payable); its Connect account id.
async fn onboarded(
    c: &Client,
    control: &ControlProcess,
    stripe: &FakeStripe,
    seller: &str,
) -> String {
    let o = c
        .api(
            control,
            "POST",
            "/v1/payouts/account",
            seller,
            Some(json!({})),
        )
        .await;
    assert_eq!(o["account"]["payable"], false);
    assert!(o["onboarding_url"].as_str().unwrap().contains("/setup/"));
    let acct = o["account"]["stripe_account"].as_str().unwrap().to_owned();
    let (_, status) = stripe.onboard(&acct).await;
    assert_eq!(status, 200);
    let a = c
        .api(control, "GET", "/v1/payouts/account", seller, None)
        .await;
    assert_eq!(a["payable"], true, "{a}");
    acct
}

/// Ships `n` usage records of `buyer_micros` each for the buyer's key on the seller's pool, as
/// a proxy ships them.
async fn earn(
    c: &Client,
    control: &ControlProcess,
    m: &Market,
    pool: &str,
    n: usize,
    buyer_micros: i64,
) {
    let buyer = c.api(control, "GET", "/v1/account", &m.buyer, None).await;
    let seller = c.api(control, "GET", "/v1/account", &m.seller, None).await;
    let key = c
        .api(control, "POST", "/v1/keys", &m.buyer, Some(json!({})))
        .await;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let lines: Vec<String> = (0..n)
        .map(|i| {
            json!({
                "request_id": format!("req-{}-{i}", random_hex32()), "started_at_ms": now - 1_000,
                "key_id": key["id"], "account": buyer["id"], "pool_id": pool, "seller": seller["id"],
                "model": "gpt-test", "provider": "openai", "price_version": 1, "stream": false,
                "status": 200, "outcome": "ok",
                "usage": {"prompt_tokens": 10, "completion_tokens": 20},
                "usage_source": "upstream", "list_cost_micros": buyer_micros * 10 / 6,
                "buyer_cost_micros": buyer_micros, "latency_ms": 5, "upstream_attempts": 1,
            })
            .to_string()
        })
        .collect();
    let resp = c
        .http
        .post(format!("{}/internal/v1/usage", control.url()))
        .bearer_auth(&control.proxy_token)
        .header("content-type", "application/x-ndjson")
        .body(lines.join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["applied"], n, "{body}");
}

async fn payouts_of(c: &Client, control: &ControlProcess) -> Vec<Value> {
    c.api(
        control,
        "GET",
        "/v1/admin/payouts",
        &control.admin_token,
        None,
    )
    .await
    .as_array()
    .unwrap()
    .clone()
}

/// Polls (at most `within`) until the admin's payout list satisfies `pred`.
async fn until_payouts(
    c: &Client,
    control: &ControlProcess,
    within: Duration,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let p = payouts_of(c, control).await;
        if pred(&p) {
            return p;
        }
        assert!(started.elapsed() < within, "{what}: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_buys_a_pack_a_seller_onboards_earns_from_it_and_is_paid_once() {
    let (db, prefix, mut options) = fleet_stores("payouts-e2e").await;
    let stripe = FakeStripe::start(STRIPE_KEY, WHSEC, CONNECT_WHSEC)
        .await
        .unwrap();
    options.stripe = Some(stripe_options(&stripe, MANUAL));
    let control = ControlProcess::start(&control_binary(), options);
    deliver_to(&stripe, &control);
    let c = Client::new();
    let admin = control.admin_token.clone();
    // No welcome credit: the buyer spends only what it bought.
    c.set_setting(&control, "welcome_credit_micros", json!(0))
        .await;
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let m = market(&c, &control, &fake, &["sk-seller-paid"]).await;
    // A pricey model, so a few requests earn whole cents.
    c.api(&control, "POST", "/v1/admin/catalog", &admin, Some(json!({
        "model_id": "gpt-pricey", "provider": "openai",
        "input_price_micros_per_mtok": 2_000_000_000_i64, "output_price_micros_per_mtok": 2_000_000_000_i64
    }))).await;
    let pool = c.api(&control, "POST", "/v1/pools", &m.seller, Some(json!({
        "credential_id": m.creds[0], "face_value_micros": 100_000_000, "price_ratio_ppm": 600_000,
        "models": ["gpt-pricey"]
    }))).await;
    assert!(pool["id"].is_string());

    // The buyer buys $20 of credit.
    let pack = c
        .api(
            &control,
            "POST",
            "/v1/admin/packs",
            &admin,
            Some(json!({"name": "$20", "price_cents": 2_000, "credit_micros": 20_000_000})),
        )
        .await;
    let purchase = c
        .api(
            &control,
            "POST",
            "/v1/purchases",
            &m.buyer,
            Some(json!({"pack_id": pack["id"]})),
        )
        .await;
    let (_, status) = stripe
        .pay(purchase["stripe_session_id"].as_str().unwrap())
        .await;
    assert_eq!(status, 200);
    assert_ledger_holds(&c, &control).await;

    // The seller onboards; until Stripe says it can be paid, a run pays it nothing.
    let o = c
        .api(
            &control,
            "POST",
            "/v1/payouts/account",
            &m.seller,
            Some(json!({"country": "US"})),
        )
        .await;
    let acct = o["account"]["stripe_account"].as_str().unwrap().to_owned();

    // The buyer spends through a proxy; the seller earns.
    let dir = temp_dir("payouts-e2e");
    let proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        Some(&prefix.0),
        "info",
    );
    let key = new_key(&c, &control, &m.buyer).await;
    c.within_a_second(&proxy, &key, "gpt-pricey", "the pool is served", |s, _| {
        s == 200
    })
    .await;
    for _ in 0..20 {
        let (status, _) = c.chat(&proxy, &key, "gpt-pricey").await;
        assert_eq!(status, 200);
    }
    // Drained: the ledger holds every request and stops growing.
    let started = Instant::now();
    let mut last = -1;
    let earned = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let check = c
            .api(&control, "GET", "/v1/admin/ledger/check", &admin, None)
            .await;
        let records = check["usage_records"].as_i64().unwrap();
        if records >= 21 && records == last {
            break c
                .api(&control, "GET", "/v1/earnings", &m.seller, None)
                .await;
        }
        last = records;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not drained: {check}"
        );
    };
    assert_ledger_holds(&c, &control).await;
    let payable = earned["payable_micros"].as_i64().unwrap();
    assert!(payable >= 10_000, "the seller earned whole cents: {earned}");
    let wallet = c.api(&control, "GET", "/v1/wallet", &m.buyer, None).await;
    assert!(
        wallet["balance_micros"].as_i64().unwrap() < 20_000_000,
        "the pack paid for it: {wallet}"
    );
    assert_eq!(earned["weeks"][0]["earned_micros"], earned["earned_micros"]);
    drop(proxy);
    stripe.set_available_cents(1_000_000);
    let report = run_payouts(&c, &control, "before-onboarding").await;
    assert_eq!(report["created"], 0, "{report}");

    let (_, status) = stripe.onboard(&acct).await;
    assert_eq!(status, 200);
    assert_ledger_holds(&c, &control).await;
    // The weekly run: a replica whose schedule is due now pays the seller.
    let weekly = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            stripe: Some(stripe_options(&stripe, &due_now())),
            database_url: Some(db.url.clone()),
            redis: Some(("redis://127.0.0.1:6379".to_owned(), prefix.0.clone())),
            ..ControlOptions::default()
        },
    );
    let payouts = until_payouts(
        &c,
        &control,
        Duration::from_secs(20),
        "the weekly run pays",
        |p| p.len() == 1 && p[0]["status"] == "paid",
    )
    .await;
    assert!(
        payouts[0]["run"].as_str().unwrap().starts_with("20"),
        "the weekly run is named by its date"
    );
    drop(weekly);
    assert_eq!(stripe.transfers_made(), 1);
    let cents = payable / 10_000;
    let payouts = c.api(&control, "GET", "/v1/payouts", &m.seller, None).await;
    assert_eq!(payouts[0]["amount_cents"], cents);
    assert_eq!(payouts[0]["status"], "paid");
    assert!(payouts[0]["transfer_id"]
        .as_str()
        .unwrap()
        .starts_with("tr_"));
    let t = stripe.state().transfers[payouts[0]["transfer_id"].as_str().unwrap()].clone();
    assert_eq!(
        (t["amount"].as_i64(), t["destination"].as_str()),
        (Some(cents), Some(acct.as_str()))
    );
    let earned = c
        .api(&control, "GET", "/v1/earnings", &m.seller, None)
        .await;
    assert_eq!(
        earned["payable_micros"],
        payable - cents * 10_000,
        "the sub-cent rest stays payable"
    );
    assert_eq!(earned["paid_micros"], cents * 10_000);
    assert_eq!(earned["in_transit_micros"], 0);
    assert_ledger_holds(&c, &control).await;

    // The operator's runs after it, with nothing new earned (one of them repeated): nothing
    // more is paid.
    let report = run_payouts(&c, &control, "week-2").await;
    assert_eq!(report["created"], 0);
    let report = run_payouts(&c, &control, "week-2").await;
    assert_eq!(report["created"], 0);
    assert_eq!(stripe.transfers_made(), 1);
    let r = c
        .api(&control, "GET", "/v1/admin/payouts/reconcile", &admin, None)
        .await;
    assert_eq!(r["agrees"], true, "{r}");
    assert_eq!(r["transfers_checked"], 1);
    assert_eq!(r["stripe_available_cents"], 1_000_000 - cents);
    assert_ledger_holds(&c, &control).await;
    drop(control);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payout_is_sent_once_through_a_crash_waits_for_the_balance_and_returns_when_refused() {
    let stripe = FakeStripe::start(STRIPE_KEY, WHSEC, CONNECT_WHSEC)
        .await
        .unwrap();
    let options = ControlOptions {
        stripe: Some(stripe_options(&stripe, MANUAL)),
        ..ControlOptions::default()
    };
    let mut control = ControlProcess::start(&control_binary(), options);
    deliver_to(&stripe, &control);
    let c = Client::new();
    let admin = control.admin_token.clone();
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let m = market(&c, &control, &fake, &["sk-seller-crash"]).await;
    let pool = list_pool(&c, &control, &m, &m.creds[0]).await;
    onboarded(&c, &control, &stripe, &m.seller).await;
    stripe.set_available_cents(1_000_000);

    // 1. Stripe makes the transfer but its answer never arrives: the control plane is killed
    //    between the call and the commit. After the restart the transfer is found, not made
    //    again.
    earn(&c, &control, &m, &pool, 10, 12_345).await;
    stripe.fail_next(
        "POST /v1/transfers",
        StripeFailure::AnswerLate(Duration::from_secs(60)),
    );
    let url = format!("{}/v1/admin/payouts/run", control.url());
    let runner = {
        let (http, admin) = (c.http.clone(), admin.clone());
        tokio::spawn(async move {
            let _ = http
                .post(url)
                .bearer_auth(admin)
                .json(&json!({"run": "crash"}))
                .send()
                .await;
        })
    };
    let started = Instant::now();
    while stripe.transfers_made() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no transfer was made"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    control.kill();
    runner.abort();
    let pending = {
        // Read the store the same way after the restart: the payout is pending, attempted.
        control.restart();
        deliver_to(&stripe, &control);
        until_payouts(
            &c,
            &control,
            Duration::from_secs(40),
            "the crashed payout is confirmed",
            |p| p.len() == 1 && p[0]["status"] == "paid",
        )
        .await
    };
    assert_eq!(stripe.transfers_made(), 1, "one transfer, whatever crashed");
    assert_eq!(pending[0]["amount_cents"], 12_345 * 10 * 85 / 100 / 10_000);
    assert_ledger_holds(&c, &control).await;

    // 2. The platform's balance is short: the payout waits, says why, and goes when it can.
    earn(&c, &control, &m, &pool, 10, 20_000).await;
    stripe.set_available_cents(1);
    let report = run_payouts(&c, &control, "short").await;
    assert_eq!(
        (
            report["created"].as_i64(),
            report["waiting"].as_i64(),
            report["sent"].as_i64()
        ),
        (Some(1), Some(1), Some(0)),
        "{report}"
    );
    let waiting = &payouts_of(&c, &control).await[0];
    assert_eq!(waiting["status"], "pending");
    assert!(
        waiting["last_error"]
            .as_str()
            .unwrap()
            .contains("balance_insufficient"),
        "{waiting}"
    );
    stripe.set_available_cents(1_000_000);
    until_payouts(
        &c,
        &control,
        Duration::from_secs(10),
        "the waiting payout is paid",
        |p| p[0]["status"] == "paid",
    )
    .await;
    assert_eq!(stripe.transfers_made(), 2);

    // 3. Stripe refuses a transfer: the payout fails and its amount is payable again.
    earn(&c, &control, &m, &pool, 10, 30_000).await;
    let payable = c
        .api(&control, "GET", "/v1/earnings", &m.seller, None)
        .await["payable_micros"]
        .as_i64()
        .unwrap();
    stripe.fail_next(
        "POST /v1/transfers",
        StripeFailure::Refused("account_invalid"),
    );
    let report = run_payouts(&c, &control, "refused").await;
    assert_eq!(
        (report["created"].as_i64(), report["failed"].as_i64()),
        (Some(1), Some(1)),
        "{report}"
    );
    let failed = &payouts_of(&c, &control).await[0];
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("account_invalid"),
        "{failed}"
    );
    let earned = c
        .api(&control, "GET", "/v1/earnings", &m.seller, None)
        .await;
    assert_eq!(
        earned["payable_micros"], payable,
        "the refused amount is payable again"
    );
    assert_eq!(earned["in_transit_micros"], 0);
    assert_eq!(stripe.transfers_made(), 2);
    assert_ledger_holds(&c, &control).await;
    let r = c
        .api(&control, "GET", "/v1/admin/payouts/reconcile", &admin, None)
        .await;
    assert_eq!(r["agrees"], true, "{r}");

    // 4. Two runs started at once (a double click): the earnings are paid once.
    earn(&c, &control, &m, &pool, 5, 40_000).await;
    let made_before = stripe.transfers_made();
    let run = |name: &'static str| {
        let (http, url, admin) = (
            c.http.clone(),
            format!("{}/v1/admin/payouts/run", control.url()),
            admin.clone(),
        );
        async move {
            let resp = http
                .post(url)
                .bearer_auth(admin)
                .json(&json!({"run": name}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let (a, b) = tokio::join!(run("double-a"), run("double-b"));
    let created: i64 = [&a, &b]
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, r)| r["created"].as_i64().unwrap())
        .sum();
    // (The payout refused above became payable again: it is paid with these earnings.)
    assert_eq!(created, 1, "{a:?} {b:?}");
    assert_eq!(stripe.transfers_made(), made_before + 1);
    let earned = c
        .api(&control, "GET", "/v1/earnings", &m.seller, None)
        .await;
    assert!(
        earned["payable_micros"].as_i64().unwrap() < 10_000,
        "{earned}"
    );
    assert_ledger_holds(&c, &control).await;

    // 5. A transfer partly reversed on Stripe before it was confirmed: the payout is paid, and
    //    the reversed part is payable again.
    earn(&c, &control, &m, &pool, 10, 30_000).await;
    // Stripe cannot be asked about the transfer until it is reversed: it stays sent (the
    // schedule's own ticks meet the failures too, so none confirms it before the reversal).
    for _ in 0..1_000 {
        stripe.fail_next("GET /v1/transfers/", StripeFailure::Status(500));
    }
    let report = run_payouts(&c, &control, "reversed").await;
    assert_eq!(
        (report["sent"].as_i64(), report["paid"].as_i64()),
        (Some(1), Some(0)),
        "{report}"
    );
    let sent = payouts_of(&c, &control).await[0].clone();
    assert_eq!(sent["status"], "sent");
    let before = c
        .api(&control, "GET", "/v1/earnings", &m.seller, None)
        .await["payable_micros"]
        .as_i64()
        .unwrap();
    stripe.reverse(sent["transfer_id"].as_str().unwrap(), 10);
    stripe.stop_failing("GET /v1/transfers/");
    let done = until_payouts(
        &c,
        &control,
        Duration::from_secs(10),
        "the reversed payout is confirmed",
        |p| p[0]["status"] != "sent",
    )
    .await;
    assert_eq!(done[0]["status"], "paid");
    assert!(
        done[0]["last_error"].as_str().unwrap().contains("10 cents"),
        "{}",
        done[0]
    );
    let after = c
        .api(&control, "GET", "/v1/earnings", &m.seller, None)
        .await["payable_micros"]
        .as_i64()
        .unwrap();
    assert_eq!(
        after,
        before + 100_000,
        "the reversed 10 cents are payable again"
    );
    assert_ledger_holds(&c, &control).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_running_the_schedule_at_the_same_moment_pay_once() {
    let (db, _prefix, options) = fleet_stores("payouts-replicas").await;
    let stripe = FakeStripe::start(STRIPE_KEY, WHSEC, CONNECT_WHSEC)
        .await
        .unwrap();
    let base = ControlOptions {
        stripe: Some(stripe_options(&stripe, MANUAL)),
        ..options
    };
    let first = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            stripe: base.stripe.clone(),
            database_url: base.database_url.clone(),
            redis: base.redis.clone(),
            ..ControlOptions::default()
        },
    );
    deliver_to(&stripe, &first);
    let c = Client::new();
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let m = market(&c, &first, &fake, &["sk-seller-replicas"]).await;
    let pool = list_pool(&c, &first, &m, &m.creds[0]).await;
    onboarded(&c, &first, &stripe, &m.seller).await;
    earn(&c, &first, &m, &pool, 10, 50_000).await;
    stripe.set_available_cents(1_000_000);
    // Three more replicas whose weekly run is due now (today, 00:00 UTC), started together;
    // each looks every second.
    let due = due_now();
    let replicas: Vec<ControlProcess> = (0..3)
        .map(|_| {
            ControlProcess::start(
                &control_binary(),
                ControlOptions {
                    stripe: Some(stripe_options(&stripe, &due)),
                    database_url: base.database_url.clone(),
                    redis: base.redis.clone(),
                    ..ControlOptions::default()
                },
            )
        })
        .collect();
    let payouts = until_payouts(
        &c,
        &first,
        Duration::from_secs(20),
        "the scheduled payout is paid",
        |p| !p.is_empty() && p.iter().all(|x| x["status"] == "paid"),
    )
    .await;
    // Every replica has had several passes at it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let payouts_after = payouts_of(&c, &first).await;
    assert_eq!(payouts_after.len(), 1, "{payouts_after:?}");
    assert_eq!(payouts[0]["id"], payouts_after[0]["id"]);
    assert_eq!(stripe.transfers_made(), 1);
    assert!(
        payouts[0]["run"].as_str().unwrap().starts_with("20"),
        "the run is named by its date"
    );
    assert_ledger_holds(&c, &first).await;
    drop(replicas);
    db.drop_db().await;
}

/// A manual payout run named `name`: its report.
async fn run_payouts(c: &Client, control: &ControlProcess, name: &str) -> Value {
    c.api(
        control,
        "POST",
        "/v1/admin/payouts/run",
        &control.admin_token,
        Some(json!({ "run": name })),
    )
    .await
}
