//! Money under faults: while two proxies serve a steady load, the upstream of the pool first
//! in the queue answers 500s, then resets its streams, then hangs, then refuses its key (401);
//! one proxy is SIGKILLed and started again, Redis restarts empty, then freezes (SIGSTOP) for a few seconds, Postgres
//! restarts (immediate shutdown, as a crash), and the control plane is down for a minute. Then the load stops and the system idles: every
//! request that completed to its client is billed exactly once — none lost, none twice — and
//! the ledger's invariants hold. Redis and Postgres here are the test's own servers, on ports
//! of their own. A second buyer with a few cents keeps asking throughout: its wallet never goes
//! below zero (the overspend bound with `fail_closed`, the default, is 0).
//!
//! `TOKN_FAULTS=long` runs the long profile: the proxy kill, Redis restart and freeze and the
//! Postgres restart five times over, 10 s apart (the short one, run by CI: once, 2 s apart).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokn_testkit::control::random_hex32;
use tokn_testkit::harness::temp_dir;
use tokn_testkit::{
    Behavior, ControlOptions, ControlProcess, FakeUpstream, PrivatePostgres, PrivateRedis,
    ProxyProcess,
};

mod common;

use common::*;

/// Requests in flight at once, and the most the load sends in the short and the long profile
/// (it stops earlier when told).
const CONCURRENCY: usize = 16;
const REQUESTS_MAX: [usize; 2] = [200_000, 2_000_000];
/// How long the control plane stays down.
const CONTROL_DOWN: Duration = Duration::from_secs(60);
/// The key of the pool whose upstream misbehaves.
const FLAKY: &str = "sk-fault-flaky";
/// How long Redis answers nothing.
const REDIS_FROZEN: Duration = Duration::from_secs(3);
/// What the second buyer has: a few hundred requests' worth, spent early in the run.
const LOW_BALANCE_MICROS: i64 = 5_000;

/// What one client saw of one request.
#[derive(Debug)]
enum Outcome {
    /// Completed: status 200 and the whole body read.
    Completed {
        request_id: String,
        cost_micros: i64,
        took: Duration,
    },
    /// An HTTP error status (refused before anything was served).
    Refused(u16),
    /// The connection broke (a proxy was killed under it) or timed out; the request id when
    /// the response had begun.
    Broken(Option<String>),
}

async fn one_request(http: &reqwest::Client, proxy: &str, key: &str, i: usize) -> Outcome {
    let started = Instant::now();
    let stream = i % 2 == 1;
    let mut body = json!({"model": "gpt-test", "max_tokens": 100,
        "messages": [{"role": "user", "content": format!("fault load {i}")}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let Ok(resp) = http
        .post(format!("{proxy}/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
    else {
        return Outcome::Broken(None);
    };
    let status = resp.status().as_u16();
    let request_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let header_cost = resp
        .headers()
        .get("x-tokn-cost-micros")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let Ok(text) = resp.text().await else {
        return Outcome::Broken(Some(request_id));
    };
    if status != 200 {
        return Outcome::Refused(status);
    }
    let cost = if stream {
        // A stream completed only if it reached its usage chunk and `[DONE]`.
        if !text.contains("data: [DONE]") {
            return Outcome::Broken(Some(request_id));
        }
        text.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|c| c["usage"].is_object())
            .and_then(|c| c["usage"]["cost_micros"].as_i64())
    } else {
        header_cost
    };
    Outcome::Completed {
        request_id,
        cost_micros: cost.unwrap_or_else(|| panic!("a completed request states its cost")),
        took: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usage_is_lost_or_billed_twice_through_kills_and_restarts() {
    let mut pg = PrivatePostgres::start();
    let mut redis = PrivateRedis::start();
    let prefix = format!("faults-{}:", &random_hex32()[..12]);
    let mut control = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            database_url: Some(pg.url()),
            redis: Some((redis.url(), prefix.clone())),
            ..ControlOptions::default()
        },
    );
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let c = Client::new();
    // Two pools on one fake, told apart by their keys: the flaky one first in the queue.
    let m = market(&c, &control, &fake, &[FLAKY, "sk-fault-seller"]).await;
    for cred in &m.creds {
        list_pool(&c, &control, &m, cred).await;
    }
    let buyer = c.api(&control, "GET", "/v1/account", &m.buyer, None).await;
    let buyer_id = buyer["id"].as_str().unwrap().to_owned();
    c.api(
        &control,
        "POST",
        &format!("/v1/admin/accounts/{buyer_id}/credits"),
        &m.admin,
        Some(json!({"amount_micros": 100_000_000, "memo": "load", "reference": "fault-load"})),
    )
    .await;
    let key = c
        .api(&control, "POST", "/v1/keys", &m.buyer, Some(json!({})))
        .await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    // A buyer with a few cents, asking throughout: it runs out early and keeps asking.
    c.set_setting(&control, "welcome_credit_micros", json!(LOW_BALANCE_MICROS))
        .await;
    let low = c
        .api(
            &control,
            "POST",
            "/v1/admin/accounts",
            &m.admin,
            Some(json!({"email": "low@example.com", "role": "buyer"})),
        )
        .await;
    let low_token = low["token"].as_str().unwrap().to_owned();
    let low_key = new_key(&c, &control, &low_token).await;
    let dir = temp_dir("faults");
    let redis_url = redis.url();
    // Ejections of at most 8 s: each misbehaviour below lasts until the flaky pool has been
    // asked under it, at most 30 s, and ejections in a row double (up to 60 s by default: a
    // third one in a row outlasted the wait on a CI run).
    let mut proxies: Vec<ProxyProcess> = (0..2)
        .map(|i| {
            let body = proxy_body_on(
                &control,
                &dir.join(format!("snapshot-{i}.sealed")),
                Some((&redis_url, &prefix)),
            )
            .replace(
                "[limits]\n",
                "[limits]\nthrottle_backoff_ms = 2000\nthrottle_backoff_max_ms = 8000\n",
            );
            start_proxy_with(&control, &body, &random_hex32(), &[("TOKN_LOG", "info")])
        })
        .collect();
    for proxy in &proxies {
        c.within_a_second(proxy, &key, "gpt-test", "served", |s, _| s == 200)
            .await;
    }
    // The warm-ups in the ledger before the wallet is read.
    let warm_up: BTreeSet<String> = proxies
        .iter()
        .flat_map(ProxyProcess::usage_records)
        .filter(|r| r["key_id"].is_string())
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect();
    ledger_holds(
        &c,
        &control,
        &m.admin,
        warm_up.len(),
        Duration::from_secs(10),
    )
    .await;
    let wallet_before = c.api(&control, "GET", "/v1/wallet", &m.buyer, None).await;

    let long = std::env::var("TOKN_FAULTS").is_ok_and(|p| p == "long");
    // The load: both proxies, streamed and whole, until told to stop.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let urls: Vec<String> = proxies.iter().map(ProxyProcess::base_url).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (stop, outcomes) = (stop.clone(), outcomes.clone());
        let keys = [key.clone(), low_key.clone()];
        tokio::spawn(async move {
            futures_util::stream::iter(0..REQUESTS_MAX[usize::from(long)])
                .take_while(|_| std::future::ready(!stop.load(Ordering::Relaxed)))
                .map(|i| {
                    let key = &keys[usize::from(i % 5 == 4)];
                    let (http, url) = (&http, &urls[i % 2]);
                    async move { one_request(http, url, key, i).await }
                })
                .buffer_unordered(CONCURRENCY)
                .for_each(|o| {
                    outcomes.lock().unwrap().push(o);
                    std::future::ready(())
                })
                .await;
        })
    };
    let (rounds, pause_for) = if long {
        (5, Duration::from_secs(10))
    } else {
        (1, Duration::from_secs(2))
    };
    let pause = || tokio::time::sleep(pause_for);
    let mut timeline = Vec::new();
    let started = Instant::now();
    let mut mark = |what: &str| {
        timeline.push(format!(
            "{:>6.1}s {what} (the first pool asked {} times so far)",
            started.elapsed().as_secs_f64(),
            flaky_requests(&fake)
        ))
    };

    // The flaky pool's upstream misbehaves in turn; buyers are served by the next pool. Each
    // misbehaviour lasts until the pool has been asked under it (an ejected pool is asked again
    // once its ejection ends) and a second more, at most 30 s.
    for (what, behavior) in [
        (
            "streams reset after 2 chunks",
            Behavior {
                disconnect_after_chunks: Some(2),
                ..Behavior::default()
            },
        ),
        (
            "no answer (hangs)",
            Behavior {
                hang: true,
                ..Behavior::default()
            },
        ),
        (
            "500s",
            Behavior {
                status: 500,
                ..Behavior::default()
            },
        ),
        (
            "401 (its key refused)",
            Behavior {
                status: 401,
                ..Behavior::default()
            },
        ),
    ] {
        fake.set_behavior(FLAKY, behavior);
        let before = flaky_requests(&fake);
        let deadline = Instant::now() + Duration::from_secs(30);
        while flaky_requests(&fake) == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tried = flaky_requests(&fake) - before;
        mark(&format!(
            "the first pool's upstream: {what}; it was asked {tried} times"
        ));
        assert!(
            tried > 0,
            "the first pool was tried while its upstream gave {what}"
        );
    }
    let quarantined = flaky_requests(&fake);
    for _ in 0..rounds {
        pause().await;
        mark("proxy 1 SIGKILLed");
        proxies[1].sigkill();
        pause().await;
        proxies[1].restart();
        mark("proxy 1 started again (same spool)");
        pause().await;
        redis.restart();
        mark("Redis restarted empty");
        pause().await;
        redis.freeze();
        mark("Redis frozen (SIGSTOP)");
        tokio::time::sleep(REDIS_FROZEN).await;
        redis.thaw();
        mark("Redis thawed");
        pause().await;
        pg.restart();
        mark("Postgres restarted (immediate shutdown)");
    }
    pause().await;
    control.kill();
    mark("control plane down");
    tokio::time::sleep(CONTROL_DOWN).await;
    let mut backlog = Vec::new();
    for p in &proxies {
        backlog.push(spool_bytes(p).await);
    }
    control.restart();
    mark(&format!(
        "control plane up again (spool bytes then: {backlog:?})"
    ));
    pause().await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    mark("load stopped");

    // Idle: the backlog drains.
    let records: Vec<Value> = proxies
        .iter()
        .flat_map(ProxyProcess::usage_records)
        .filter(|r| r["key_id"].is_string())
        .collect();
    let check = ledger_holds(
        &c,
        &control,
        &m.admin,
        records.len(),
        Duration::from_secs(60),
    )
    .await;
    mark("every record in the ledger");

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let mut refused: BTreeMap<u16, usize> = BTreeMap::new();
    let mut broken = 0;
    let mut begun = Vec::new();
    let mut completed = Vec::new();
    let mut took = Vec::new();
    for o in &outcomes {
        match o {
            Outcome::Completed {
                request_id,
                cost_micros,
                took: t,
            } => {
                completed.push((request_id.as_str(), *cost_micros));
                took.push(*t);
            }
            Outcome::Refused(s) => *refused.entry(*s).or_default() += 1,
            Outcome::Broken(id) => {
                broken += 1;
                begun.extend(id.as_deref());
            }
        }
    }
    took.sort_unstable();
    let ids: BTreeSet<&str> = records
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    let by_id: BTreeMap<&str, &Value> = records
        .iter()
        .map(|r| (r["request_id"].as_str().unwrap(), r))
        .collect();
    // Answered (in full, or begun before a fault broke it) and never billed.
    let lost: Vec<&str> = completed
        .iter()
        .map(|(id, _)| *id)
        .chain(begun.iter().copied())
        .filter(|id| !ids.contains(id))
        .collect();
    let drain = c
        .api(&control, "GET", "/v1/admin/drain", &m.admin, None)
        .await;
    eprintln!("{}", timeline.join("\n"));
    // Refused its key, the flaky pool is quarantined: a proxy that has seen the refusal never
    // asks again. Quarantine is a proxy's own state, so the restarted proxy asks again — with
    // the requests it has in flight before the first refusal comes back, no more.
    let retried = flaky_requests(&fake) - quarantined;
    assert!(
        retried <= CONCURRENCY,
        "the refused key was tried {retried} times after its quarantine, by proxy instance \
         (x-tokn-via): {:?}",
        flaky_senders(&fake, quarantined)
    );
    eprintln!(
        "requests: {} sent, {} completed, refused {refused:?}, {broken} broken by the faults; \
         {} records ({} billed), {} in the ledger; redelivered and skipped since the last \
         control-plane start: {}; lost: {}; false 401s: {}",
        outcomes.len(),
        completed.len(),
        records.len(),
        records
            .iter()
            .filter(|r| r["buyer_cost_micros"].as_i64() > Some(0))
            .count(),
        check["usage_records"],
        drain["duplicates"],
        lost.len(),
        refused.get(&401).copied().unwrap_or(0)
    );
    let low_wallet = c.api(&control, "GET", "/v1/wallet", &low_token, None).await;
    let low_balance = low_wallet["balance_micros"].as_i64().unwrap();
    let proxy_lost = records
        .iter()
        .filter(|r| r["outcome"] == "proxy_lost")
        .count();
    let p50 = took[took.len() / 2];
    let max = *took.last().unwrap();
    eprintln!(
        "\n| profile | requests | completed | billed | lost | duplicated | false 401s | \
         max added latency | max overspend |\n|---|---|---|---|---|---|---|---|---|\n\
         | {} | {} | {} | {} | {} | {} | {} | {} ms (max {} ms − p50 {} ms) | {} µ$ (bound 0) |\n\
         (broken by the faults: {broken}, of them answered in part: {}; billed from a killed \
         proxy's intents: {proxy_lost}; the low buyer: {} µ$ left, refused {:?})\n",
        if long { "long" } else { "short" },
        outcomes.len(),
        completed.len(),
        records
            .iter()
            .filter(|r| r["buyer_cost_micros"].as_i64() > Some(0))
            .count(),
        lost.len(),
        records.len() - ids.len(),
        refused.get(&401).copied().unwrap_or(0),
        (max - p50).as_millis(),
        max.as_millis(),
        p50.as_millis(),
        (-low_balance).max(0),
        begun.len(),
        low_balance,
        refused.get(&402),
    );
    assert!(completed.len() > 100, "the load ran");
    assert!(low_balance >= 0, "the low buyer overspent: {low_wallet}");
    // The buyer's key is valid throughout: a 401 while Redis was cold would be a false "no".
    assert_eq!(refused.get(&401), None, "false 401s");
    assert_eq!(ids.len(), records.len(), "one record per request id");
    assert!(lost.is_empty(), "completed but never recorded: {lost:?}");
    // Billed once: what each client was told is its record's charge, the ledger has each
    // record once (its key), holds, and the wallet moved by exactly the records' sum.
    for (id, cost) in &completed {
        assert_eq!(by_id[id]["buyer_cost_micros"].as_i64(), Some(*cost), "{id}");
    }
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
    let billed_after_warm_up: i64 = records
        .iter()
        .filter(|r| r["account"] == buyer_id.as_str())
        .filter(|r| !warm_up.contains(r["request_id"].as_str().unwrap()))
        .map(|r| r["buyer_cost_micros"].as_i64().unwrap())
        .sum();
    let low_billed: i64 = records
        .iter()
        .filter(|r| r["account"] != buyer_id.as_str())
        .map(|r| r["buyer_cost_micros"].as_i64().unwrap())
        .sum();
    assert_eq!(low_balance, LOW_BALANCE_MICROS - low_billed);
    let wallet = c.api(&control, "GET", "/v1/wallet", &m.buyer, None).await;
    assert_eq!(
        wallet["balance_micros"].as_i64().unwrap(),
        wallet_before["balance_micros"].as_i64().unwrap() - billed_after_warm_up,
        "the wallet moved by exactly what was billed"
    );
    drop(proxies);
    drop(control);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A proxy SIGKILLed 3 s into a 10 s stream: the upstream was asked (its seller pays), the
/// client got part of an answer, and no record was written. The request's intent, journaled
/// before the upstream call, bills it — once — when the proxy starts again: its prompt,
/// estimated, with outcome `proxy_lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_proxy_was_killed_under_is_billed_when_the_proxy_starts_again() {
    let control = ControlProcess::start(&control_binary(), ControlOptions::default());
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-slow-seller"]).await;
    list_pool(&c, &control, &m, &m.creds[0]).await;
    let key = new_key(&c, &control, &m.buyer).await;
    let dir = temp_dir("killed-mid-stream");
    let mut proxy = start_proxy(
        &control,
        &dir.join("snapshot.sealed"),
        &random_hex32(),
        None,
        "info",
    );
    c.within_a_second(&proxy, &key, "gpt-test", "served", |s, _| s == 200)
        .await;
    // The warm-ups (a request that came before the market reached the proxy is recorded too).
    let billed_records = |proxy: &ProxyProcess| {
        proxy
            .usage_records()
            .iter()
            .filter(|r| r["key_id"].is_string())
            .count()
    };
    let warm_up = billed_records(&proxy);
    ledger_holds(&c, &control, &m.admin, warm_up, Duration::from_secs(10)).await;
    let wallet_before = c.api(&control, "GET", "/v1/wallet", &m.buyer, None).await;

    fake.set_behavior(
        "sk-slow-seller",
        Behavior {
            chunks: 100,
            chunk_interval: Duration::from_millis(100),
            ..Behavior::default()
        },
    );
    let body = json!({"model": "gpt-test", "stream": true, "max_tokens": 500,
        "messages": [{"role": "user", "content": "a long answer, please"}]});
    let prompt_bytes = serde_json::to_vec(&body).unwrap().len() as i64;
    let asked = fake.received().len();
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", proxy.base_url()))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut stream = resp.bytes_stream();
    let mut got = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        match tokio::time::timeout_at(until.into(), stream.next()).await {
            Ok(Some(Ok(chunk))) => got += chunk.len(),
            _ => break,
        }
    }
    assert!(got > 0, "part of the answer arrived");
    proxy.sigkill();
    assert_eq!(fake.received().len(), asked + 1, "the upstream was asked");
    assert!(
        !proxy
            .usage_records()
            .iter()
            .any(|r| r["request_id"] == request_id.as_str()),
        "no record before the restart"
    );

    proxy.restart();
    let check = ledger_holds(&c, &control, &m.admin, warm_up + 1, Duration::from_secs(10)).await;
    for zero in [
        "unbalanced_transactions",
        "unbalanced_usage",
        "imbalance_micros",
    ] {
        assert_eq!(check[zero], 0, "{zero}: {check}");
    }
    let rows = c
        .api(&control, "GET", "/v1/admin/usage?limit=10", &m.admin, None)
        .await;
    let lost: Vec<&Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["request_id"] == request_id.as_str())
        .collect();
    assert_eq!(lost.len(), 1, "{rows}");
    let lost = lost[0];
    assert_eq!(lost["outcome"], "proxy_lost", "{lost}");
    assert_eq!(lost["status"], 0, "{lost}");
    assert_eq!(
        lost["prompt_tokens"].as_i64().unwrap(),
        (prompt_bytes + 3) / 4
    );
    assert_eq!(lost["completion_tokens"], 0);
    let charged = lost["buyer_cost_micros"].as_i64().unwrap();
    assert!(charged > 0, "{lost}");
    let wallet = c.api(&control, "GET", "/v1/wallet", &m.buyer, None).await;
    assert_eq!(
        wallet["balance_micros"].as_i64().unwrap(),
        wallet_before["balance_micros"].as_i64().unwrap() - charged
    );
    // The audit log has it once too; a second start bills nothing more.
    let in_log = |proxy: &ProxyProcess| {
        proxy
            .usage_records()
            .iter()
            .filter(|r| r["request_id"] == request_id.as_str())
            .count()
    };
    assert_eq!(in_log(&proxy), 1);
    fake.set_behavior("sk-slow-seller", Behavior::default());
    proxy.restart();
    c.within_a_second(&proxy, &key, "gpt-test", "served again", |s, _| s == 200)
        .await;
    ledger_holds(
        &c,
        &control,
        &m.admin,
        billed_records(&proxy),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(in_log(&proxy), 1);
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Requests the flaky pool's upstream has received.
fn flaky_requests(fake: &FakeUpstream) -> usize {
    let bearer = format!("Bearer {FLAKY}");
    fake.received()
        .iter()
        .filter(|r| r.headers.get("authorization") == Some(&bearer))
        .count()
}

/// The flaky pool's requests after the first `skip`, counted by the proxy instance that sent
/// them (`x-tokn-via` names it).
fn flaky_senders(fake: &FakeUpstream, skip: usize) -> BTreeMap<String, usize> {
    let bearer = format!("Bearer {FLAKY}");
    let mut by_instance = BTreeMap::new();
    for r in fake
        .received()
        .iter()
        .filter(|r| r.headers.get("authorization") == Some(&bearer))
        .skip(skip)
    {
        let via = r.headers.get("x-tokn-via").cloned().unwrap_or_default();
        *by_instance.entry(via).or_insert(0) += 1;
    }
    by_instance
}

/// Waits (at most `within`) until the ledger holds `records` usage records; its check.
async fn ledger_holds(
    c: &Client,
    control: &ControlProcess,
    admin: &str,
    records: usize,
    within: Duration,
) -> Value {
    let started = Instant::now();
    loop {
        let check = c
            .api(control, "GET", "/v1/admin/ledger/check", admin, None)
            .await;
        if check["usage_records"].as_u64() == Some(records as u64) {
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

/// The proxy's `tokn_usage_spool_bytes` gauge.
async fn spool_bytes(proxy: &ProxyProcess) -> String {
    proxy_metrics(proxy)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("tokn_usage_spool_bytes "))
        .unwrap_or("?")
        .to_owned()
}
