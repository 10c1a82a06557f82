//! Redis and in-process hot state: key lookup, cache invalidation, limits, outage behaviour.

use std::sync::Arc;
use std::time::Duration;
use tokn_testkit::PrivateRedis;

use redis::AsyncCommands;
use serde_json::json;
use tokio::sync::watch;
use tokn_config::{hash_key, hot};
use tokn_proxy::hot_state::HotState;
use tokn_proxy::keys::Key;
use tokn_proxy::snapshot::{PoolHealthRegistry, Snapshot};

use crate::{eventually, load, pushed, unique_prefix};

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// One test's view of a Redis: hot state under a private prefix, plus a plain connection to
/// play the control plane's part.
struct Fixture {
    url: String,
    prefix: String,
    hot: Arc<HotState>,
    snap: Snapshot,
    redis: redis::aio::MultiplexedConnection,
    stop_subscriber: Option<watch::Sender<bool>>,
}

impl Fixture {
    async fn new(url: &str, ttl_ms: u64) -> Self {
        Self::with_prefix(url, ttl_ms, unique_prefix()).await
    }

    async fn with_prefix(url: &str, ttl_ms: u64, prefix: String) -> Self {
        let base = load(&format!(
            "[hot_state]\nredis_url = \"{url}\"\nprefix = \"{prefix}\"\nkey_cache_ttl_ms = {ttl_ms}\n"
        ));
        let hot = Arc::new(HotState::from_config(&base).unwrap());
        assert_eq!(hot.kind(), "redis");
        let (valid, skipped) = base.with_pushed(pushed(1, None)).unwrap();
        let skipped: Vec<&str> = skipped.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(skipped, ["vertex-pool"]);
        assert!(valid.keys_in_hot_state);
        let snap =
            Snapshot::build(&valid, 1, hot.counters(), &PoolHealthRegistry::default()).unwrap();
        let redis = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let f = Self {
            url: url.to_owned(),
            prefix,
            hot,
            snap,
            redis,
            stop_subscriber: None,
        };
        f.warm().await;
        f
    }

    /// Marks Redis as holding the control plane's state (its restore after Redis lost it).
    async fn warm(&self) {
        let mut conn = redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = conn.set(hot::money_epoch(&self.prefix), 1).await.unwrap();
    }

    /// Runs the key-announcement subscriber and waits until it has subscribed.
    async fn subscribe(&mut self) {
        self.subscribe_pinging(Duration::from_secs(10)).await
    }

    async fn subscribe_pinging(&mut self, every: Duration) {
        let subscriber = self.hot.subscriber().unwrap().with_ping_every(every);
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move { subscriber.run(rx).await });
        self.stop_subscriber = Some(tx);
        let hot = self.hot.clone();
        eventually(Duration::from_secs(5), || hot.subscriptions() >= 1)
            .await
            .expect("subscribed");
    }

    /// Writes a key record the way the control plane does (without announcing it).
    async fn set_key(&mut self, key: &str, record: serde_json::Value) {
        let hash = hex::encode(hash_key(key));
        let mut record = record;
        record["key_sha256"] = json!(hash);
        let _: () = self
            .redis
            .set(hot::key_record(&self.prefix, &hash), record.to_string())
            .await
            .unwrap();
    }

    async fn del_key(&mut self, key: &str) {
        let hash = hex::encode(hash_key(key));
        let _: () = self
            .redis
            .del(hot::key_record(&self.prefix, &hash))
            .await
            .unwrap();
    }

    async fn announce(&mut self, key: &str) {
        let _: () = self
            .redis
            .publish(hot::key_channel(&self.prefix), hex::encode(hash_key(key)))
            .await
            .unwrap();
    }

    async fn lookup(&self, key: &str) -> Result<Option<Arc<Key>>, u16> {
        self.hot
            .lookup(&self.snap, &hash_key(key))
            .await
            .map_err(|e| e.status())
    }

    /// Retries the lookup until it agrees with `found` (at most `within`).
    async fn lookup_until(&self, key: &str, found: bool, within: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            if matches!(self.lookup(key).await, Ok(k) if k.is_some() == found) {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Deletes every key under this test's prefix.
    async fn cleanup(&mut self) {
        if let Some(tx) = self.stop_subscriber.take() {
            let _ = tx.send(true);
        }
        let keys: Vec<String> = self
            .redis
            .keys(format!("{}*", self.prefix))
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = self.redis.del(keys).await;
        }
    }
}

fn key_name(tag: &str) -> String {
    format!("tok_test_{tag}_{:016x}", rand::random::<u64>())
}

/// The seconds left in this minute window are enough for a rate-limit test, or waits for the
/// next window.
async fn away_from_a_minute_boundary() {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if s >= 55 {
        tokio::time::sleep(Duration::from_secs(61 - s)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_found_after_set_and_gone_within_a_second_of_del_and_publish() {
    let mut f = Fixture::new(SHARED_REDIS, 30_000).await;
    f.subscribe().await;
    let key = key_name("found");
    f.set_key(
        &key,
        json!({"id": "k-found", "account": "acct-9", "allowed_models": ["mock-2", "gone"]}),
    )
    .await;
    let found = f.lookup(&key).await.unwrap().expect("key found");
    assert_eq!(&*found.id, "k-found");
    assert_eq!(&*found.account, "acct-9");
    assert!(found.may_use("mock-2") && !found.may_use("mock"));
    // Its model list comes from the snapshot's catalog, filtered by allowed_models.
    let body: serde_json::Value = serde_json::from_slice(&f.snap.models_body(&found)).unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["id"], "mock-2");

    // Revoked: gone from Redis and announced. The 30 s cache does not keep it alive.
    f.del_key(&key).await;
    f.announce(&key).await;
    let took = f
        .lookup_until(&key, false, Duration::from_secs(1))
        .await
        .expect("revoked key evicted within 1 s");
    assert!(took < Duration::from_secs(1));
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_is_cached_as_absent_until_announced() {
    let mut f = Fixture::new(SHARED_REDIS, 30_000).await;
    f.subscribe().await;
    let key = key_name("late");
    assert!(f.lookup(&key).await.unwrap().is_none());
    // Created but not yet announced: the negative entry still answers.
    f.set_key(&key, json!({"id": "k-late", "account": "a"}))
        .await;
    assert!(f.lookup(&key).await.unwrap().is_none());
    // Announced: found at once.
    f.announce(&key).await;
    f.lookup_until(&key, true, Duration::from_secs(1))
        .await
        .expect("announced key found within 1 s");
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_key_map_is_used_when_keys_are_pushed_even_with_redis() {
    let prefix = unique_prefix();
    let base = load(&format!(
        "[hot_state]\nredis_url = \"{SHARED_REDIS}\"\nprefix = \"{prefix}\"\n"
    ));
    let hot = HotState::from_config(&base).unwrap();
    let key = key_name("listed");
    let keys =
        json!([{"id": "k-listed", "account": "a", "key_sha256": hex::encode(hash_key(&key))}]);
    let (valid, _) = base.with_pushed(pushed(3, Some(keys))).unwrap();
    assert!(!valid.keys_in_hot_state);
    let snap = Snapshot::build(&valid, 3, hot.counters(), &PoolHealthRegistry::default()).unwrap();
    // Not in Redis at all, found in the snapshot.
    let found = hot.lookup(&snap, &hash_key(&key)).await.unwrap().unwrap();
    assert_eq!(&*found.id, "k-listed");
    assert!(hot
        .lookup(&snap, &hash_key("tok_test_other_key_00"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_across_proxies_sharing_redis() {
    away_from_a_minute_boundary().await;
    let mut a = Fixture::new(SHARED_REDIS, 30_000).await;
    // A second proxy on the same Redis and prefix.
    let b = Fixture::with_prefix(SHARED_REDIS, 30_000, a.prefix.clone()).await;
    let key = key_name("rpm");
    a.set_key(
        &key,
        json!({"id": format!("k-rpm-{}", rand::random::<u32>()), "account": "a", "requests_per_minute": 3}),
    )
    .await;
    let ka = a.lookup(&key).await.unwrap().unwrap();
    let kb = b.lookup(&key).await.unwrap().unwrap();
    a.hot.check_limits(&ka).await.unwrap();
    b.hot.check_limits(&kb).await.unwrap();
    a.hot.check_limits(&ka).await.unwrap();
    let refused = b.hot.check_limits(&kb).await.unwrap_err();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.code(), Some("rate_limit_exceeded"));
    let retry = refused.retry_after_s().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Each proxy alone has seen only two requests: the count is Redis's.
    a.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spend_cap_holds_across_proxies_sharing_redis() {
    let mut a = Fixture::new(SHARED_REDIS, 30_000).await;
    let b = Fixture::with_prefix(SHARED_REDIS, 30_000, a.prefix.clone()).await;
    let key = key_name("cap");
    let key_id = format!("k-cap-{}", rand::random::<u32>());
    a.set_key(
        &key,
        // With a rate limit too: both counters in one round trip.
        json!({"id": key_id, "account": "a", "spend_cap_micros": 100, "requests_per_minute": 1000}),
    )
    .await;
    let ka = a.lookup(&key).await.unwrap().unwrap();
    let kb = b.lookup(&key).await.unwrap().unwrap();
    b.hot.check_limits(&kb).await.unwrap();
    // 20 counted where a release before the money slot counted it: it still counts.
    let mut conn = a.redis.clone();
    let () = conn
        .set(hot::legacy_spend_counter(&a.prefix, &key_id), 20)
        .await
        .unwrap();
    a.hot.record_spend(&ka, 40, false);
    let spend_key = hot::spend_counter(&a.prefix, &key_id);
    let mut spent = 0u64;
    for _ in 0..100 {
        spent = conn
            .get::<_, Option<u64>>(&spend_key)
            .await
            .unwrap()
            .unwrap_or(0);
        if spent == 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(spent, 40);
    // Under the cap on the other proxy too.
    b.hot.check_limits(&kb).await.unwrap();
    a.hot.record_spend(&ka, 40, false);
    for _ in 0..100 {
        spent = conn
            .get::<_, Option<u64>>(&spend_key)
            .await
            .unwrap()
            .unwrap_or(0);
        if spent == 80 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(spent, 80);
    // At the cap (80 + 20): refused on the proxy that never served the key a request.
    let refused = b.hot.check_limits(&kb).await.unwrap_err();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.code(), Some("insufficient_quota"));
    a.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_limits_count_per_key() {
    away_from_a_minute_boundary().await;
    let key = key_name("local");
    let base = load(&format!(
        "[[models]]\nid = \"m\"\nprovider = \"mock\"\ninput_price_micros_per_mtok = 1\noutput_price_micros_per_mtok = 1\n\
         [[keys]]\nid = \"k-rpm\"\naccount = \"a\"\nkey = \"{key}\"\nrequests_per_minute = 2\n\
         [[keys]]\nid = \"k-cap\"\naccount = \"a\"\nkey = \"{key}-cap\"\nspend_cap_micros = 10\n"
    ));
    let hot = HotState::in_process(100);
    assert_eq!(hot.kind(), "in_process");
    let snap = Snapshot::build(&base, 1, hot.counters(), &PoolHealthRegistry::default()).unwrap();
    let rpm = hot.lookup(&snap, &hash_key(&key)).await.unwrap().unwrap();
    hot.check_limits(&rpm).await.unwrap();
    hot.check_limits(&rpm).await.unwrap();
    let e = hot.check_limits(&rpm).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (429, Some("rate_limit_exceeded")));

    let capped = hot
        .lookup(&snap, &hash_key(&format!("{key}-cap")))
        .await
        .unwrap()
        .unwrap();
    hot.record_spend(&capped, 9, false);
    hot.check_limits(&capped).await.unwrap();
    // A new snapshot (a configuration push) keeps what was counted.
    let snap = Snapshot::build(&base, 2, hot.counters(), &PoolHealthRegistry::default()).unwrap();
    let capped = hot
        .lookup(&snap, &hash_key(&format!("{key}-cap")))
        .await
        .unwrap()
        .unwrap();
    hot.record_spend(&capped, 1, false);
    let e = hot.check_limits(&capped).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (429, Some("insufficient_quota")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_key_is_served_stale_while_redis_is_down_and_unknown_keys_get_503() {
    let mut server = PrivateRedis::start();
    // A short cache lifetime: every lookup below after the first would ask Redis again.
    let mut f = Fixture::new(&server.url(), 100).await;
    f.subscribe().await;
    let key = key_name("stale");
    f.set_key(
        &key,
        json!({"id": "k-stale", "account": "a", "requests_per_minute": 2}),
    )
    .await;
    assert!(f.lookup(&key).await.unwrap().is_some());

    server.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stale = f
        .lookup(&key)
        .await
        .expect("stale entry served, not an error")
        .expect("still the key");
    assert_eq!(&*stale.id, "k-stale");
    assert!(tokn_proxy::metrics::HOT_STATE_STALE_KEYS.get() >= 1);
    assert_eq!(
        f.lookup(&key_name("never-seen")).await.unwrap_err(),
        503,
        "an unknown key cannot be checked"
    );
    // Limits fall back to this proxy's own counters.
    away_from_a_minute_boundary().await;
    f.hot.check_limits(&stale).await.unwrap();
    f.hot.check_limits(&stale).await.unwrap();
    let e = f.hot.check_limits(&stale).await.unwrap_err();
    assert_eq!(e.code(), Some("rate_limit_exceeded"));
    if let Some(tx) = f.stop_subscriber.take() {
        let _ = tx.send(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_stays_up_across_keep_alive_pings() {
    let mut f = Fixture::new(SHARED_REDIS, 30_000).await;
    f.subscribe_pinging(Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // A failed ping would have dropped and renewed the subscription (and the cache).
    assert_eq!(f.hot.subscriptions(), 1);
    let key = key_name("pinged");
    f.set_key(&key, json!({"id": "k-pinged", "account": "a"}))
        .await;
    assert!(f.lookup(&key).await.unwrap().is_some());
    f.del_key(&key).await;
    f.announce(&key).await;
    f.lookup_until(&key, false, Duration::from_secs(1))
        .await
        .expect("still evicting after pings");
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_cleared_when_the_subscription_comes_back() {
    let mut server = PrivateRedis::start();
    let mut f = Fixture::new(&server.url(), 30_000).await;
    f.subscribe_pinging(Duration::from_millis(50)).await;
    let key = key_name("resub");
    f.set_key(&key, json!({"id": "k-resub", "account": "a"}))
        .await;
    assert!(f.lookup(&key).await.unwrap().is_some());

    // Redis restarts empty: announcements made meanwhile are lost, so the cache must go.
    server.restart();
    let hot = f.hot.clone();
    eventually(Duration::from_secs(10), || hot.subscriptions() >= 2)
        .await
        .expect("resubscribed");
    // Until the control plane restores Redis, a missing record says nothing about the key: a
    // valid key is never refused as unknown (401) because Redis lost it.
    assert_eq!(
        f.lookup(&key).await.err(),
        Some(503),
        "the 30 s cache entry should have been dropped on resubscription"
    );
    f.warm().await;
    assert!(f.lookup(&key).await.unwrap().is_none());
    if let Some(tx) = f.stop_subscriber.take() {
        let _ = tx.send(true);
    }
}
