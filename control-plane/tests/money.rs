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
    money_with(tag, options, None).await
}

/// [`money`], the proxy on Redis under `redis_prefix` when given.
async fn money_with(tag: &str, options: ControlOptions, redis_prefix: Option<&str>) -> Money {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(&control_binary(), options);
    let dir = temp_dir(tag);
    let proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        redis_prefix,
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
/// How many of `records` were shipped (every authenticated request's is), and what they cost.
fn shipped_spent(records: &[Value]) -> (usize, i64) {
    let shipped: Vec<&Value> = records.iter().filter(|r| r["key_id"].is_string()).collect();
    let spent = shipped
        .iter()
        .map(|r| r["buyer_cost_micros"].as_i64().unwrap())
        .sum();
    (shipped.len(), spent)
}

fn billed(records: &[Value]) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["buyer_cost_micros"].as_u64().unwrap_or(0) > 0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_moves_money_once_and_balanced() {
    let w = money("money-drain", ControlOptions::default()).await;
    moves_money_once(&w).await;
    let _ = std::fs::remove_dir_all(&w.dir);
}

/// The same through Redis, where a lone client's requests are served from reservations taken
/// ahead: each is billed once all the same, and what was taken ahead and never used is
/// released — Redis ends up holding nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_moves_money_once_through_redis_and_unused_stock_is_released() {
    let (db, prefix, options) = fleet_stores("money-drain").await;
    let w = money_with("money-drain-redis", options, Some(&prefix.0)).await;
    moves_money_once(&w).await;
    let metrics = proxy_metrics(&w.proxy).await;
    let ahead: f64 = metrics
        .lines()
        .find(|l| l.starts_with(r#"tokn_reservations_total{outcome="reserved_ahead"}"#))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0.0);
    assert!(
        ahead >= 20.0,
        "most of 40 requests served from stock: {ahead}"
    );
    let records = w.proxy.usage_records();
    assert!(
        records
            .iter()
            .filter(|r| r["reservation"].is_string())
            .count() as f64
            >= ahead,
        "each request served from stock names its reservation"
    );
    // Every record is in the ledger; the stock nobody took is released within its life (two
    // seconds) and the sweep's tick.
    let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let buyer = records.iter().find_map(|r| r["account"].as_str()).unwrap();
    let account = tokn_config::hot::money_account(&prefix.0, buyer);
    let pool = tokn_config::hot::money_pool(&prefix.0, &w.pool);
    let started = Instant::now();
    loop {
        let held: (Option<i64>, Option<i64>) = redis::pipe()
            .hget(&account, "held")
            .hget(&pool, "held")
            .query_async(&mut conn)
            .await
            .unwrap();
        if held == (Some(0), Some(0)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Redis still holds {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(&w.dir);
    db.drop_db().await;
}

/// 40 requests, each billed once: the ledger balanced, the wallet less exactly what they
/// cost, a redelivery moving nothing.
async fn moves_money_once(w: &Money) {
    // What the set-up spent is in the ledger before this test's own requests start (else it
    // may be in `before` or not, depending on how fast the drain was).
    let (setup_shipped, setup_spent) = shipped_spent(&w.proxy.usage_records());
    w.drained(setup_shipped, Duration::from_secs(10)).await;
    let before = w.wallet().await["balance_micros"].as_i64().unwrap();
    w.traffic(40).await;
    let records = w
        .proxy
        .wait_for_records(setup_shipped + 40, Duration::from_secs(5));
    let billed = billed(&records);
    assert!(billed.len() >= 41, "every request was billed");
    // Every authenticated request is shipped (the first ones, before the pool reached the
    // proxy, bill nothing).
    let (shipped, total_spent) = shipped_spent(&records);
    let spent = total_spent - setup_spent;
    let check = w.drained(shipped, Duration::from_secs(10)).await;
    assert_eq!(check["unbalanced_transactions"], 0, "{check}");
    assert_eq!(check["unbalanced_usage"], 0, "{check}");
    assert_eq!(check["imbalance_micros"], 0, "{check}");
    assert_eq!(check["balance_mismatches"], json!([]), "{check}");
    assert_eq!(check["pool_mismatches"], json!([]), "{check}");
    assert_eq!(check["rollup_mismatches"], json!([]), "{check}");
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
}

/// The small balance the overspend tests start a buyer with: a few requests' worth.
const SMALL_BALANCE_MICROS: i64 = 2_000;

/// A market whose buyer holds only [`SMALL_BALANCE_MICROS`], served by a slow fake (so 64
/// concurrent streams overlap) reporting 1,000 completion tokens a request.
async fn small_balance(tag: &str, options: ControlOptions, redis_prefix: Option<&str>) -> Money {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(&control_binary(), options);
    let c = Client::new();
    c.api(
        &control,
        "PUT",
        "/v1/admin/settings",
        &control.admin_token,
        Some(
            json!({"fee_ratio_ppm": 150_000, "welcome_credit_micros": SMALL_BALANCE_MICROS,
            "keys_per_account_max": 100, "default_requests_per_minute": null}),
        ),
    )
    .await;
    let dir = temp_dir(tag);
    let proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        redis_prefix,
        "info",
    );
    let m = market(&c, &control, &fake, &["sk-seller-a"]).await;
    let pool = list_pool(&c, &control, &m, &m.creds[0]).await;
    let k = c
        .api(&control, "POST", "/v1/keys", &m.buyer, Some(json!({})))
        .await;
    let key = k["secret"].as_str().unwrap().to_owned();
    fake.set_behavior(
        "sk-seller-a",
        Behavior {
            chunk_interval: Duration::from_millis(20),
            usage: tokn_testkit::FakeUsage {
                prompt_tokens: 17,
                completion_tokens: 1_000,
                cached_tokens: 0,
                reasoning_tokens: 0,
            },
            ..Behavior::default()
        },
    );
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

/// 64 concurrent streams against a balance that covers a few: the balance never goes below
/// zero, and every refusal is a 402 sent before anything reached the upstream.
async fn concurrent_streams_never_overspend(w: Money) {
    // The pool reaches the proxy (a request whose hold exceeds the balance is refused with
    // 402 once it does).
    let started = Instant::now();
    loop {
        let (status, _) = w.c.chat(&w.proxy, &w.key, "gpt-test").await;
        if status == 402 || status == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let upstream_before = w.fake.received().len();
    // The ledger has the warm-up before the balance is read.
    let warm_up = w.proxy.usage_records();
    let shipped = warm_up.iter().filter(|r| r["key_id"].is_string()).count();
    w.drained(shipped, Duration::from_secs(10)).await;
    let before = w.wallet().await["balance_micros"].as_i64().unwrap();
    let body = json!({"model": "gpt-test", "stream": true, "max_tokens": 1_000,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]});
    let calls = (0..64).map(|_| {
        let req =
            w.c.http
                .post(format!("{}/chat/completions", w.proxy.base_url()))
                .bearer_auth(&w.key)
                .json(&body);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap())
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let served: Vec<&String> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
        .collect();
    let refused: Vec<&String> = answers
        .iter()
        .filter(|(s, _)| *s == 402)
        .map(|(_, b)| b)
        .collect();
    eprintln!(
        "64 streams: {} served, {} refused (402)",
        served.len(),
        refused.len()
    );
    assert_eq!(served.len() + refused.len(), 64, "{answers:?}");
    assert!(!served.is_empty() && !refused.is_empty());
    for body in &refused {
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "insufficient_quota");
        assert_eq!(v["error"]["code"], "insufficient_quota");
    }
    // The upstream saw exactly the served requests: no refused one reached it.
    assert_eq!(w.fake.received().len() - upstream_before, served.len());
    // Each served stream ends with what it cost.
    let mut charged = 0;
    for body in &served {
        let usage = body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|c| c["usage"].is_object())
            .unwrap_or_else(|| panic!("no usage chunk in {body}"));
        charged += usage["usage"]["cost_micros"].as_i64().unwrap();
        let balance = usage["usage"]["balance_micros"].as_i64();
        assert!(balance.is_some_and(|b| b >= 0), "{usage}");
    }
    // Once the ledger has every record: never below zero, and exactly what was charged.
    let records = w.proxy.usage_records();
    let shipped = records.iter().filter(|r| r["key_id"].is_string()).count();
    let check = w.drained(shipped, Duration::from_secs(10)).await;
    assert_eq!(check["balance_mismatches"], json!([]), "{check}");
    let after = w.wallet().await["balance_micros"].as_i64().unwrap();
    assert_eq!(after, before - charged);
    assert!(after >= 0, "the balance went below zero: {after}");
    let _ = &w.pool;
    let _ = std::fs::remove_dir_all(&w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_never_overspend_in_process() {
    let w = small_balance("money-streams", ControlOptions::default(), None).await;
    concurrent_streams_never_overspend(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_never_overspend_with_redis() {
    let (db, prefix, options) = fleet_stores("money-streams").await;
    let w = small_balance("money-streams-redis", options, Some(&prefix.0)).await;
    concurrent_streams_never_overspend(w).await;
    db.drop_db().await;
}

/// What the buyer sees of the money, read through the official OpenAI Python SDK: the cost and
/// balance headers of a whole response, and the extension fields of a stream's usage chunk,
/// which the SDK passes through untouched.
const SDK_MONEY_SCRIPT: &str = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
messages = [{"role": "user", "content": "what does it cost?"}]
raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=messages)
whole = raw.parse()
usage = None
for chunk in client.chat.completions.create(model="gpt-test", messages=messages, stream=True,
                                            stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage
print(json.dumps({
    "cost": raw.headers.get("x-tokn-cost-micros"),
    "balance": raw.headers.get("x-tokn-balance-micros"),
    "whole_tokens": whole.usage.total_tokens,
    "stream_usage": usage.model_dump(),
    "stream_cost_attr": getattr(usage, "cost_micros", None),
}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_reads_cost_and_balance() {
    let w = money("money-sdk", ControlOptions::default()).await;
    let python = tokio::task::spawn_blocking(|| {
        tokn_testkit::python::venv_python(
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
            "openai-sdk-venv",
            &["openai>=1.40"],
        )
    })
    .await
    .unwrap();
    let (base, key) = (w.proxy.base_url(), w.key.clone());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg("-c")
            .arg(SDK_MONEY_SCRIPT)
            .args([base, key])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    let cost: i64 = seen["cost"].as_str().unwrap().parse().unwrap();
    let balance: i64 = seen["balance"].as_str().unwrap().parse().unwrap();
    assert!(cost > 0 && balance > 0, "{seen}");
    let usage = &seen["stream_usage"];
    let stream_cost = usage["cost_micros"].as_i64().unwrap();
    assert!(stream_cost > 0, "{seen}");
    assert_eq!(seen["stream_cost_attr"], usage["cost_micros"]);
    assert!(
        usage["list_cost_micros"].as_i64().unwrap() > stream_cost,
        "{seen}"
    );
    assert_eq!(
        usage["balance_micros"].as_i64().unwrap(),
        balance - stream_cost,
        "the stream's balance follows the whole response's: {seen}"
    );
    let _ = (&w.fake, &w.pool, &w.m);
    let _ = std::fs::remove_dir_all(&w.dir);
}

/// Anthropic's Messages API (Claude Code's), OpenAI's Responses API (Codex's) and embeddings are
/// money like chat: each call reserves on the pool it tries, settles from the usage the upstream reported,
/// ships and drains into the ledger once; the cost is reported as chat reports it (a header, and
/// the stream's last usage event); counting tokens costs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_responses_calls_are_reserved_settled_and_drained_like_chat() {
    let w = money("money-messages", ControlOptions::default()).await;
    let (setup_shipped, setup_spent) = shipped_spent(&w.proxy.usage_records());
    w.drained(setup_shipped, Duration::from_secs(10)).await;
    let before = w.wallet().await["balance_micros"].as_i64().unwrap();
    let anthropic = tokn_testkit::FakeAnthropic::start(Default::default())
        .await
        .unwrap();
    w.c.api(
        &w.control,
        "POST",
        "/v1/admin/catalog",
        &w.m.admin,
        Some(json!({
            "model_id": "claude-test", "provider": "anthropic", "upstream_model": "claude-upstream",
            "input_price_micros_per_mtok": 3_000_000, "output_price_micros_per_mtok": 15_000_000,
            "cached_input_price_micros_per_mtok": 300_000
        })),
    )
    .await;
    let cred = offer_credential(
        &w.c,
        &w.control,
        &w.m.seller,
        &w.m.admin,
        json!({"provider": "anthropic", "api_key": "sk-ant-money", "base_url": anthropic.base_url()}),
    )
    .await;
    w.c.api(&w.control, "POST", "/v1/pools", &w.m.seller, Some(json!({
        "credential_id": cred["id"], "face_value_micros": 10_000_000, "price_ratio_ppm": 600_000,
        "models": ["claude-test"]
    })))
    .await;
    let root = w.proxy.base_url().trim_end_matches("/v1").to_owned();
    let ask = |stream: bool| {
        json!({"model": "claude-test", "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": "Say hi"}]})
    };
    let post = |path: &'static str, body: Value| {
        w.c.http
            .post(format!("{root}{path}"))
            .header("x-api-key", &w.key)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    // The pool reaches the proxy within a second.
    let started = Instant::now();
    let whole = loop {
        let resp = post("/v1/messages", ask(false)).await.unwrap();
        if resp.status() == 200 {
            break resp;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{}",
            resp.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let header_i64 = |r: &reqwest::Response, name: &str| -> i64 {
        r.headers()[name].to_str().unwrap().parse().unwrap()
    };
    let whole_cost = header_i64(&whole, "x-tokn-cost-micros");
    assert!(whole_cost > 0);
    let body: Value = whole.json().await.unwrap();
    assert_eq!(body["type"], "message", "{body}");

    let streamed = post("/v1/messages", ask(true)).await.unwrap();
    assert_eq!(streamed.status(), 200);
    let events = streamed.text().await.unwrap();
    let last_delta: Value = events
        .split("\n\n")
        .filter(|e| e.starts_with("event: message_delta"))
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap())
        .last()
        .unwrap();
    let stream_cost = last_delta["usage"]["cost_micros"].as_i64().unwrap();
    assert_eq!(
        stream_cost, whole_cost,
        "the same answer costs the same: {events}"
    );
    assert!(last_delta["usage"]["list_cost_micros"].as_i64().unwrap() > stream_cost);
    assert!(
        last_delta["usage"]["balance_micros"].is_i64(),
        "{last_delta}"
    );

    let counted = post(
        "/v1/messages/count_tokens",
        json!({"model": "claude-test", "messages": [{"role": "user", "content": "Say hi"}]}),
    )
    .await
    .unwrap();
    assert_eq!(counted.status(), 200);
    assert_eq!(counted.json::<Value>().await.unwrap()["input_tokens"], 21);

    // Embeddings too: billed for their input, the cost in the header.
    let embedded =
        w.c.http
            .post(format!("{}/embeddings", w.proxy.base_url()))
            .bearer_auth(&w.key)
            .json(&json!({"model": "gpt-test", "input": ["first text", "second text"]}))
            .send()
            .await
            .unwrap();
    assert_eq!(embedded.status(), 200);
    let embeddings_cost = header_i64(&embedded, "x-tokn-cost-micros");
    assert!(embeddings_cost > 0);
    let embeddings: Value = embedded.json().await.unwrap();
    assert_eq!(embeddings["data"].as_array().unwrap().len(), 2);

    // The Responses API (Codex) too: its stream's `response.completed` tells the cost.
    let responses =
        w.c.http
            .post(format!("{}/responses", w.proxy.base_url()))
            .bearer_auth(&w.key)
            .json(&json!({"model": "gpt-test", "input": "Say hi", "stream": true, "store": false}))
            .send()
            .await
            .unwrap();
    assert_eq!(responses.status(), 200);
    let events = responses.text().await.unwrap();
    let completed: Value = events
        .split("\n\n")
        .find(|e| e.starts_with("event: response.completed"))
        .and_then(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap())
        .expect("response.completed");
    let responses_cost = completed["response"]["usage"]["cost_micros"]
        .as_i64()
        .unwrap();
    assert!(responses_cost > 0, "{completed}");

    // In the ledger once each, balanced, the wallet down by exactly what was reported.
    let records = w.proxy.usage_records();
    let [.., embedding_record, last] = &records[..] else {
        panic!("{records:?}")
    };
    assert_eq!(last["model"], "gpt-test");
    assert_eq!(last["buyer_cost_micros"], responses_cost);
    assert_eq!(embedding_record["buyer_cost_micros"], embeddings_cost);
    assert_eq!(embedding_record["usage"]["completion_tokens"], 0);
    let messages: Vec<&Value> = records
        .iter()
        .filter(|r| r["model"] == "claude-test" && r["status"] == 200)
        .collect();
    assert_eq!(messages.len(), 3, "{records:?}");
    let costs: Vec<i64> = messages
        .iter()
        .map(|r| r["buyer_cost_micros"].as_i64().unwrap())
        .collect();
    assert_eq!(costs, [whole_cost, stream_cost, 0]);
    let (shipped, spent) = shipped_spent(&records);
    let check = w.drained(shipped, Duration::from_secs(10)).await;
    assert_eq!(check["imbalance_micros"], 0, "{check}");
    assert_eq!(check["balance_mismatches"], json!([]), "{check}");
    assert_eq!(check["pool_mismatches"], json!([]), "{check}");
    assert_eq!(check["rollup_mismatches"], json!([]), "{check}");
    let wallet = w.wallet().await;
    assert_eq!(
        wallet["balance_micros"],
        before - (spent - setup_spent),
        "{wallet}"
    );
    let _ = std::fs::remove_dir_all(&w.dir);
}
