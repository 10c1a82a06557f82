//! Money moves: usage drained from the proxies into the ledger exactly once, balanced, with the
//! real binaries, the fake upstream and a real store.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokn_testkit::control::random_hex32;
use tokn_testkit::harness::temp_dir;
use tokn_testkit::{Behavior, ControlOptions, ControlProcess, FakeUpstream, ProxyProcess};

mod common;

use common::*;

/// Both services and a market with one pool of `gpt-test` on the fake upstream.
struct Money {
    fake: FakeUpstream,
    control: ControlProcess,
    proxy: ProxyProcess,
    dir: std::path::PathBuf,
    c: Client,
    m: Market,
    pool: String,
    key: String,
}

async fn money(tag: &str, options: ControlOptions) -> Money {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(&control_binary(), options);
    let dir = temp_dir(tag);
    let proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        None,
        "info",
    );
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-seller-a"]).await;
    let pool = list_pool(&c, &control, &m, &m.creds[0]).await;
    let k = c
        .api(&control, "POST", "/v1/keys", &m.buyer, Some(json!({})))
        .await;
    let key = k["secret"].as_str().unwrap().to_owned();
    c.within_a_second(&proxy, &key, "gpt-test", "the pool is served", |s, _| {
        s == 200
    })
    .await;
    Money {
        fake,
        control,
        proxy,
        dir,
        c,
        m,
        pool,
        key,
    }
}

impl Money {
    async fn wallet(&self) -> Value {
        self.c
            .api(&self.control, "GET", "/v1/wallet", &self.m.buyer, None)
            .await
    }

    async fn ledger_check(&self) -> Value {
        self.c
            .api(
                &self.control,
                "GET",
                "/v1/admin/ledger/check",
                &self.m.admin,
                None,
            )
            .await
    }

    /// Waits (at most `within`) until the ledger holds `records` usage records.
    async fn drained(&self, records: usize, within: Duration) -> Value {
        let started = Instant::now();
        loop {
            let check = self.ledger_check().await;
            if check["usage_records"] == records {
                return check;
            }
            assert!(
                started.elapsed() < within,
                "{} of {records} records drained: {check}",
                check["usage_records"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `n` chat completions, every other one streamed; all must succeed.
    async fn traffic(&self, n: usize) {
        for i in 0..n {
            let stream = i % 2 == 1;
            let mut body = json!({"model": "gpt-test",
                "messages": [{"role": "user", "content": format!("hello {i}")}]});
            if stream {
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            let resp = self
                .c
                .http
                .post(format!("{}/chat/completions", self.proxy.base_url()))
                .bearer_auth(&self.key)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let _ = resp.bytes().await.unwrap();
        }
    }
}

/// Usage records of billed requests in the proxy's audit log.
fn billed(records: &[Value]) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["buyer_cost_micros"].as_u64().unwrap_or(0) > 0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_moves_money_once_and_balanced() {
    let w = money("money-drain", ControlOptions::default()).await;
    let before = w.wallet().await["balance_micros"].as_i64().unwrap();
    w.traffic(40).await;
    let records = w.proxy.wait_for_records(41, Duration::from_secs(5));
    let billed = billed(&records);
    assert!(billed.len() >= 41, "every request was billed");
    // Every authenticated request is shipped (the first ones, before the pool reached the
    // proxy, bill nothing).
    let shipped = records.iter().filter(|r| r["key_id"].is_string()).count();
    let spent: i64 = billed
        .iter()
        .map(|r| r["buyer_cost_micros"].as_i64().unwrap())
        .sum();
    let check = w.drained(shipped, Duration::from_secs(10)).await;
    assert_eq!(check["unbalanced_transactions"], 0, "{check}");
    assert_eq!(check["unbalanced_usage"], 0, "{check}");
    assert_eq!(check["imbalance_micros"], 0, "{check}");
    assert_eq!(check["balance_mismatches"], json!([]), "{check}");
    assert_eq!(check["pool_mismatches"], json!([]), "{check}");
    let wallet = w.wallet().await;
    assert_eq!(wallet["balance_micros"], before - spent, "{wallet}");
    // The statement lists each request as a usage entry.
    let usage_entries = wallet["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "usage")
        .count();
    assert_eq!(usage_entries, billed.len());

    // Delivering the same records again moves nothing.
    let lines: String = records.iter().map(|r| format!("{r}\n")).collect();
    let again: Value =
        w.c.http
            .post(format!("{}/internal/v1/usage", w.control.url()))
            .bearer_auth(&w.control.proxy_token)
            .header("content-type", "application/x-ndjson")
            .body(lines)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(again["applied"], 0, "{again}");
    assert_eq!(again["duplicates"], shipped, "{again}");
    assert_eq!(
        again["refused"].as_array().unwrap().len(),
        records.len() - shipped
    );
    assert_eq!(w.wallet().await["balance_micros"], before - spent);
    assert_eq!(w.ledger_check().await["usage_records"], shipped);
    let _ = (&w.fake, &w.pool);
    let _ = std::fs::remove_dir_all(&w.dir);
}
