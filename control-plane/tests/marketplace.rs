//! The marketplace under load: thousands of concurrent requests (streamed and whole) from
//! several buyers, across pools of several sellers, through two proxies and one control plane
//! — with Redis and Postgres (a fleet), and with neither (embedded: SQLite, each proxy's own
//! book). Afterwards every ledger invariant holds to the micro-dollar, every request is one
//! ledger transaction, what each client was told it paid is what it was charged, and pools were
//! consumed first-in first-out.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokn_testkit::control::random_hex32;
use tokn_testkit::harness::temp_dir;
use tokn_testkit::{Behavior, ControlOptions, ControlProcess, FakeUpstream, ProxyProcess};

mod common;

use common::*;

/// Requests sent (bounded), and how many are in flight at once.
const REQUESTS: usize = 3_000;
const CONCURRENCY: usize = 64;
const BUYERS: usize = 4;
const SELLERS: usize = 3;
const WELCOME_MICROS: i64 = 5_000_000;
const FEE_PPM: i64 = 150_000;
/// Every request asks for at most this many tokens: what its reservation holds.
const MAX_TOKENS: i64 = 200;
/// What the fake reports for every request.
const PROMPT_TOKENS: u64 = 17;
const COMPLETION_TOKENS: u64 = 150;
/// Both models' prices, micro-USD per million tokens.
const INPUT_PRICE: i64 = 150_000;
const OUTPUT_PRICE: i64 = 600_000;
/// Less than this left and a pool is used up (the control plane's `POOL_DUST_MICROS`).
const DUST_MICROS: i64 = 10_000;

/// Pools in listing order: (model, seller, face value). Each model's first pools run out
/// during the run, so FIFO and exhaustion are exercised; the last ones never do.
const POOLS: [(&str, usize, i64); 6] = [
    ("load-a", 0, 60_000),
    ("load-b", 1, 60_000),
    ("load-a", 1, 80_000),
    ("load-b", 2, 80_000),
    ("load-a", 2, 50_000_000),
    ("load-b", 0, 50_000_000),
];

struct Buyer {
    token: String,
    id: String,
    keys: Vec<String>,
}

struct Seller {
    token: String,
    id: String,
}

/// What one client saw.
struct Answer {
    status: u16,
    request_id: String,
    /// `x-tokn-cost-micros`, or the stream's usage chunk's `cost_micros`.
    cost_micros: Option<i64>,
}

struct Market {
    c: Client,
    control: ControlProcess,
    proxies: Vec<ProxyProcess>,
    buyers: Vec<Buyer>,
    sellers: Vec<Seller>,
    /// Pool ids, in [`POOLS`] order.
    pools: Vec<String>,
    dir: std::path::PathBuf,
    _fake: FakeUpstream,
}

async fn open_market(tag: &str, options: ControlOptions, redis_prefix: Option<&str>) -> Market {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let control = ControlProcess::start(&control_binary(), options);
    let c = Client::new();
    let admin = control.admin_token.clone();
    c.api(
        &control,
        "PUT",
        "/v1/admin/settings",
        &admin,
        Some(json!({
            "fee_ratio_ppm": FEE_PPM, "welcome_credit_micros": WELCOME_MICROS,
            "keys_per_account_max": 10, "default_requests_per_minute": null
        })),
    )
    .await;
    for model in ["load-a", "load-b"] {
        c.api(&control, "POST", "/v1/admin/catalog", &admin, Some(json!({
            "model_id": model, "provider": "openai",
            "input_price_micros_per_mtok": INPUT_PRICE, "output_price_micros_per_mtok": OUTPUT_PRICE
        })))
        .await;
    }
    let account = |role: &'static str, i: usize| {
        let c = &c;
        let control = &control;
        let admin = &admin;
        async move {
            let a = c
                .api(
                    control,
                    "POST",
                    "/v1/admin/accounts",
                    admin,
                    Some(json!({
                        "email": format!("{role}{i}@load.example.com"), "role": role
                    })),
                )
                .await;
            (
                a["token"].as_str().unwrap().to_owned(),
                a["account"]["id"].as_str().unwrap().to_owned(),
            )
        }
    };
    let mut sellers = Vec::new();
    let mut creds = Vec::new();
    for i in 0..SELLERS {
        let (token, id) = account("seller", i).await;
        let secret = format!("sk-load-seller-{i}");
        fake.set_behavior(
            &secret,
            Behavior {
                usage: tokn_testkit::FakeUsage {
                    prompt_tokens: PROMPT_TOKENS,
                    completion_tokens: COMPLETION_TOKENS,
                    cached_tokens: 0,
                    reasoning_tokens: 0,
                },
                ..Behavior::default()
            },
        );
        let credential =
            json!({"provider": "openai", "api_key": secret, "base_url": fake.base_url()});
        let cred = offer_credential(&c, &control, &token, &admin, credential).await;
        creds.push(cred["id"].as_str().unwrap().to_owned());
        sellers.push(Seller { token, id });
    }
    let mut pools = Vec::new();
    for (model, seller, face) in POOLS {
        let pool = c
            .api(
                &control,
                "POST",
                "/v1/pools",
                &sellers[seller].token,
                Some(json!({
                    "credential_id": creds[seller], "face_value_micros": face,
                    "price_ratio_ppm": 600_000, "models": [model]
                })),
            )
            .await;
        pools.push(pool["id"].as_str().unwrap().to_owned());
    }
    let mut buyers = Vec::new();
    for i in 0..BUYERS {
        let (token, id) = account("buyer", i).await;
        let mut keys = Vec::new();
        for _ in 0..2 {
            let k = c
                .api(&control, "POST", "/v1/keys", &token, Some(json!({})))
                .await;
            keys.push(k["secret"].as_str().unwrap().to_owned());
        }
        buyers.push(Buyer { token, id, keys });
    }
    let dir = temp_dir(tag);
    let proxies: Vec<ProxyProcess> = (0..2)
        .map(|i| {
            start_proxy(
                &control,
                &dir.join(format!("snapshot-{i}.sealed")),
                &random_hex32(),
                redis_prefix,
                "info",
            )
        })
        .collect();
    // Every key and pool has reached both proxies (a warm-up request each, billed too).
    for proxy in &proxies {
        for buyer in &buyers {
            for key in &buyer.keys {
                c.within_a_second(
                    proxy,
                    key,
                    "load-a",
                    "the market reached the proxy",
                    |s, _| s == 200,
                )
                .await;
            }
        }
    }
    Market {
        c,
        control,
        proxies,
        buyers,
        sellers,
        pools,
        dir,
        _fake: fake,
    }
}

impl Market {
    /// Request `i`: its buyer, key, model, proxy and whether it streams all vary.
    async fn send(&self, i: usize) -> Answer {
        let buyer = &self.buyers[i % BUYERS];
        let key = &buyer.keys[(i / BUYERS) % buyer.keys.len()];
        let model = if i.is_multiple_of(3) {
            "load-b"
        } else {
            "load-a"
        };
        let proxy = &self.proxies[(i / 2) % self.proxies.len()];
        let stream = i % 2 == 1;
        let mut body = json!({"model": model, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": format!("request {i}")}]});
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let resp = self
            .c
            .http
            .post(format!("{}/chat/completions", proxy.base_url()))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let request_id = header("x-request-id").unwrap_or_default();
        let mut cost_micros = header("x-tokn-cost-micros").and_then(|v| v.parse().ok());
        let text = resp.text().await.unwrap();
        if stream && status == 200 {
            let usage = text
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .find(|c| c["usage"].is_object())
                .unwrap_or_else(|| panic!("no usage chunk in {text}"));
            cost_micros = usage["usage"]["cost_micros"].as_i64();
        }
        Answer {
            status,
            request_id,
            cost_micros,
        }
    }

    /// Every usage record both proxies wrote for an authenticated request.
    fn records(&self) -> Vec<Value> {
        self.proxies
            .iter()
            .flat_map(ProxyProcess::usage_records)
            .filter(|r| r["key_id"].is_string())
            .collect()
    }

    /// Waits until the ledger holds every record (at most `within`), and returns its check.
    async fn drained(&self, records: usize, within: Duration) -> Value {
        let started = Instant::now();
        loop {
            let check = self
                .c
                .api(
                    &self.control,
                    "GET",
                    "/v1/admin/ledger/check",
                    &self.control.admin_token,
                    None,
                )
                .await;
            if check["usage_records"] == records {
                return check;
            }
            assert!(
                started.elapsed() < within,
                "{} of {records} records drained: {check}",
                check["usage_records"]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn int(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

/// The whole scenario; `fleet` says whether reservations are global (Redis) or per proxy.
async fn thousands_of_requests(tag: &str, options: ControlOptions, redis_prefix: Option<&str>) {
    let fleet = redis_prefix.is_some();
    let m = open_market(tag, options, redis_prefix).await;
    let started = Instant::now();
    let answers: Vec<Answer> = futures_util::stream::iter(0..REQUESTS)
        .map(|i| m.send(i))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let took = started.elapsed();
    eprintln!(
        "{REQUESTS} requests, {CONCURRENCY} at a time, two proxies ({}): {took:?}",
        if fleet { "Redis" } else { "in process" }
    );
    assert!(took < Duration::from_secs(300), "bounded in time");
    let refused: Vec<u16> = answers
        .iter()
        .map(|a| a.status)
        .filter(|s| *s != 200)
        .collect();
    assert!(refused.is_empty(), "every request is served: {refused:?}");

    // The ledger has every request once (the warm-ups' refusals before the market reached a
    // proxy are records too, billing nothing).
    let shipped = m.records();
    let ids: BTreeSet<&str> = shipped
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), shipped.len(), "one record per request id");
    let records: Vec<&Value> = shipped.iter().filter(|r| r["status"] == 200).collect();
    assert_eq!(
        records.len(),
        REQUESTS + 2 * BUYERS * 2,
        "warm-ups included"
    );
    let check = m.drained(shipped.len(), Duration::from_secs(60)).await;
    for zero in [
        "unbalanced_transactions",
        "unbalanced_usage",
        "imbalance_micros",
    ] {
        assert_eq!(check[zero], 0, "{zero}: {check}");
    }
    assert_eq!(check["balance_mismatches"], json!([]), "{check}");
    assert_eq!(check["pool_mismatches"], json!([]), "{check}");
    assert_eq!(check["rollup_mismatches"], json!([]), "{check}");
    let by_id: BTreeMap<&str, &Value> = records
        .iter()
        .map(|r| (r["request_id"].as_str().unwrap(), *r))
        .collect();
    let listed =
        m.c.api(
            &m.control,
            "GET",
            "/v1/admin/usage?limit=1",
            &m.control.admin_token,
            None,
        )
        .await;
    assert!(by_id.contains_key(listed[0]["request_id"].as_str().unwrap()));

    // What each client was told it paid is what its record charged.
    for a in &answers {
        let record = by_id
            .get(a.request_id.as_str())
            .unwrap_or_else(|| panic!("no record for {}", a.request_id));
        assert_eq!(
            a.cost_micros,
            record["buyer_cost_micros"].as_i64(),
            "{record}"
        );
    }

    // Buyers: each wallet is its welcome credit less exactly what its records cost.
    let mut spent: BTreeMap<&str, i64> = BTreeMap::new();
    let mut earned: BTreeMap<&str, i64> = BTreeMap::new();
    let mut consumed: BTreeMap<&str, i64> = BTreeMap::new();
    let mut fees = 0;
    for r in records.iter().copied() {
        let buyer_cost = int(r, "buyer_cost_micros");
        assert!(buyer_cost > 0, "every request billed: {r}");
        let fee = buyer_cost * FEE_PPM / 1_000_000;
        fees += fee;
        *spent.entry(r["account"].as_str().unwrap()).or_default() += buyer_cost;
        *earned.entry(r["seller"].as_str().unwrap()).or_default() += buyer_cost - fee;
        *consumed.entry(r["pool_id"].as_str().unwrap()).or_default() += int(r, "list_cost_micros");
    }
    for b in &m.buyers {
        let wallet =
            m.c.api(&m.control, "GET", "/v1/wallet", &b.token, None)
                .await;
        assert_eq!(
            int(&wallet, "balance_micros"),
            WELCOME_MICROS - spent[b.id.as_str()],
            "{}",
            b.id
        );
        let statement =
            m.c.api(&m.control, "GET", "/v1/usage?group=model", &b.token, None)
                .await;
        assert_eq!(int(&statement, "cost_micros"), spent[b.id.as_str()]);
    }
    // Sellers: the payable is the sales less the fee, rounded down per request.
    let mut payable_total = 0;
    for s in &m.sellers {
        let e =
            m.c.api(&m.control, "GET", "/v1/earnings", &s.token, None)
                .await;
        let payable = int(&e, "payable_micros");
        assert_eq!(
            payable,
            earned.get(s.id.as_str()).copied().unwrap_or(0),
            "{e}"
        );
        payable_total += payable;
    }
    let sales: i64 = spent.values().sum();
    assert_eq!(
        sales,
        payable_total + fees,
        "every micro-dollar lands somewhere"
    );

    // Pools: consumption is the list cost served; used-up pools are exhausted; FIFO.
    let mut table = Vec::new();
    let mut pools = Vec::new();
    for (i, (model, seller, face)) in POOLS.iter().enumerate() {
        let id = &m.pools[i];
        let p =
            m.c.api(
                &m.control,
                "GET",
                &format!("/v1/pools/{id}"),
                &m.sellers[*seller].token,
                None,
            )
            .await;
        let used = int(&p, "consumed_micros");
        assert_eq!(used, consumed.get(id.as_str()).copied().unwrap_or(0), "{p}");
        let status = p["status"].as_str().unwrap().to_owned();
        assert_eq!(status == "exhausted", face - used < DUST_MICROS, "{p}");
        table.push(format!(
            "{model} {id} face {face:>10} consumed {used:>7} {status}"
        ));
        pools.push((*model, *face, used, status));
    }
    eprintln!("{}", table.join("\n"));
    // A reservation holds the prompt estimate and MAX_TOKENS of output at list price: a pool
    // with less left than that is skipped.
    let hold_bound = (MAX_TOKENS + 1_000) * OUTPUT_PRICE / 1_000_000;
    for model in ["load-a", "load-b"] {
        let order: Vec<&(&str, i64, i64, String)> = pools.iter().filter(|p| p.0 == model).collect();
        assert!(order[0].3 == "exhausted", "{model}: the first pool ran out");
        for (i, later) in order.iter().enumerate().skip(1) {
            if later.2 == 0 {
                continue;
            }
            for earlier in &order[..i] {
                let left = earlier.1 - earlier.2;
                assert!(
                    earlier.3 == "exhausted" || left < hold_bound,
                    "{model}: a later pool served while an earlier one had {left} left"
                );
            }
        }
        if fleet {
            // Reservations are global: no pool served more than its face value.
            for p in &order {
                assert!(p.2 <= p.1, "{model}: {p:?}");
            }
        } else {
            let over: i64 = order.iter().map(|p| (p.2 - p.1).max(0)).sum();
            eprintln!("{model}: served beyond face value with per-proxy books: {over} micros");
        }
    }
    let drain =
        m.c.api(
            &m.control,
            "GET",
            "/v1/admin/drain",
            &m.control.admin_token,
            None,
        )
        .await;
    eprintln!("drain: {drain}");
    let _ = std::fs::remove_dir_all(&m.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_requests_through_two_proxies_with_redis_and_postgres() {
    let (db, prefix, options) = fleet_stores("market-load").await;
    thousands_of_requests("market-load-fleet", options, Some(&prefix.0)).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_requests_through_two_proxies_embedded() {
    thousands_of_requests("market-load-embedded", ControlOptions::default(), None).await;
}
