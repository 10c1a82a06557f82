//! The store suite, run against both backends: a fresh Postgres database and a fresh SQLite
//! file per test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use tokn_config::PoolStatus;
use tokn_control::hot::HotMirror;
use tokn_control::ledger::UsageIn;
use tokn_control::sealing::Keyring;
use tokn_control::store::{
    AccountStatus, Backend, KeyLimits, ModelPrice, NewPool, PoolChange, Role, Store, StoreError,
};
use tokn_testkit::TestDatabase;

/// Runs one async test body against each backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn postgres() {
                let db = tokn_testkit::TestDatabase::create(stringify!($name)).await;
                let store = super::open_postgres(&db).await;
                super::$name(&store).await;
                store.close().await;
                db.drop_db().await;
            }
            #[tokio::test]
            async fn sqlite() {
                let dir = tokn_testkit::harness::temp_dir(stringify!($name));
                let store = super::open_sqlite(&dir).await;
                super::$name(&store).await;
                store.close().await;
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    )*};
}

async fn open_postgres(db: &TestDatabase) -> Store {
    Store::open(Backend::Postgres(&db.url))
        .await
        .expect("open postgres")
}

async fn open_sqlite(dir: &std::path::Path) -> Store {
    Store::open(Backend::Sqlite(&dir.join("store.db")))
        .await
        .expect("open sqlite")
}

fn price(model: &str, provider: &str, input: i64) -> ModelPrice {
    ModelPrice {
        model_id: model.to_owned(),
        version: 0,
        provider: provider.to_owned(),
        upstream_model: model.to_owned(),
        input_price_micros_per_mtok: input,
        output_price_micros_per_mtok: input * 4,
        cached_input_price_micros_per_mtok: input / 2,
        cache_write_price_micros_per_mtok: input * 5 / 4,
        cache_write_1h_price_micros_per_mtok: input * 2,
        effective_at_ms: 0,
        max_output_tokens: None,
    }
}

fn keyring() -> Keyring {
    Keyring::new(&[(1, &[7u8; 32][..])]).expect("keyring")
}

on_both_backends!(
    accounts_and_welcome_credit,
    keys_are_scoped_and_revocable,
    concurrent_key_creations_never_exceed_the_accounts_limit,
    grants_are_idempotent_and_balanced,
    pools_are_fifo_and_filtered,
    catalog_versions_and_push_version,
    migrations_apply_once,
    usage_text_round_trips_and_applies_once,
    racing_deliveries_apply_each_record_once,
);

/// A free, unpooled usage record as a proxy writes it, with `fields` written over it.
fn usage_record(fields: serde_json::Value) -> UsageIn {
    let mut record = serde_json::json!({
        "request_id": "req_0", "started_at_ms": 0, "key_id": "key_0", "account": "acct_0",
        "pool_id": null, "seller": null, "model": "m", "provider": "openai",
        "price_version": null, "stream": false, "status": 200, "outcome": "ok",
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}, "usage_source": "reported",
        "list_cost_micros": 0, "buyer_cost_micros": 0, "latency_ms": 1, "ttft_ms": null,
        "upstream_attempts": 1, "upstream_request_id": null
    });
    for (name, value) in fields.as_object().expect("fields are an object") {
        record[name] = value.clone();
    }
    serde_json::from_value(record).expect("a usage record")
}

/// A batch delivered four times at once (a proxy's retry racing its first delivery, across
/// control planes): every delivery succeeds, each record is applied once, the wallet moves once.
async fn racing_deliveries_apply_each_record_once(store: &Store) {
    let records: Vec<UsageIn> = (0..40)
        .map(|i| {
            usage_record(serde_json::json!({
                "request_id": format!("req_race_{i:03}"), "started_at_ms": 1_000 + i,
                "key_id": "key_race", "account": "acct_race", "pool_id": "pool_race",
                "seller": "seller_race", "price_version": 1,
                "usage": {"prompt_tokens": 10, "completion_tokens": 5},
                "list_cost_micros": 2_000, "buyer_cost_micros": 1_000
            }))
        })
        .collect();
    let deliveries = (0..4).map(|_| store.apply_usage(&records, 150_000));
    let results = futures_util::future::join_all(deliveries).await;
    let mut applied = 0;
    for r in results {
        let r = r.expect("a racing delivery succeeds");
        assert_eq!(r.applied.len() + r.duplicates, 40);
        applied += r.applied.len();
    }
    assert_eq!(applied, 40, "each record once");
    let wallet = store
        .wallet_balances(Some(&["acct_race".to_owned()]))
        .await
        .unwrap();
    assert_eq!(wallet[0].balance_micros, -40_000);
    let check = store.ledger_check().await.unwrap();
    assert!(check.holds(), "{check:?}");
    assert_eq!(check.usage_records, 40);
}

/// Usage text reaches the journal as written, whatever it holds (Postgres receives it inside
/// array literals, where quotes, backslashes, braces, commas and the word NULL mean something),
/// and a redelivered record is skipped.
async fn usage_text_round_trips_and_applies_once(store: &Store) {
    use tokn_control::ledger::UsageFilter;
    let awkward = [
        r#"say "hi""#,
        r"back\slash\",
        "{a,b}",
        "NULL",
        "",
        "ünï, cödé ✓",
    ];
    let records: Vec<UsageIn> = awkward
        .iter()
        .enumerate()
        .map(|(i, text)| {
            usage_record(serde_json::json!({
                "request_id": format!("req_awkward_{i}"), "started_at_ms": i,
                "key_id": format!("key {text}"), "account": "acct_awkward", "model": text,
                "outcome": text, "upstream_request_id": text
            }))
        })
        .collect();
    let applied = store.apply_usage(&records, 150_000).await.unwrap();
    assert_eq!((applied.applied.len(), applied.duplicates), (6, 0));
    let again = store.apply_usage(&records, 150_000).await.unwrap();
    assert_eq!((again.applied.len(), again.duplicates), (0, 6));
    let filter = UsageFilter {
        account_id: Some("acct_awkward".to_owned()),
        ..Default::default()
    };
    let rows = store.usage(&filter, 100).await.unwrap();
    assert_eq!(rows.len(), 6);
    for row in rows {
        let i: usize = row.request_id["req_awkward_".len()..].parse().unwrap();
        assert_eq!(row.model.as_deref(), Some(awkward[i]), "{row:?}");
        assert_eq!(row.outcome, awkward[i]);
        assert_eq!(row.key_id, format!("key {}", awkward[i]));
    }
}

async fn accounts_and_welcome_credit(store: &Store) {
    let settings = store.settings().await.unwrap();
    assert_eq!(settings.welcome_credit_micros, 10_000_000, "$10 by default");
    let buyer = store
        .create_account("b@x.io", Role::Buyer, "h1")
        .await
        .unwrap();
    let seller = store
        .create_account("s@x.io", Role::Seller, "h2")
        .await
        .unwrap();
    assert_eq!(store.balance(&buyer.id).await.unwrap(), 10_000_000);
    assert_eq!(
        store.balance(&seller.id).await.unwrap(),
        0,
        "sellers get no welcome credit"
    );
    let entries = store.wallet_entries(&buyer.id, 10).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].kind, "welcome_credit");
    match store.create_account("b@x.io", Role::Both, "h3").await {
        Err(StoreError::Conflict(m)) => assert!(m.contains("email"), "{m}"),
        other => panic!("duplicate email: {other:?}"),
    }
    assert_eq!(store.account_by_token("h2").await.unwrap().id, seller.id);
    assert!(matches!(
        store.account_by_token("nope").await,
        Err(StoreError::NotFound)
    ));
    let all = store.accounts(None, 10).await.unwrap();
    assert_eq!(all.len(), 2);
    let page = store.accounts(Some(&all[0].id), 10).await.unwrap();
    assert_eq!(page.len(), 1);
    let suspended = store
        .set_account_status(&buyer.id, AccountStatus::Suspended)
        .await
        .unwrap();
    assert_eq!(suspended.status, AccountStatus::Suspended);
    assert_eq!(store.ledger_imbalance().await.unwrap(), 0);
}

/// Eight creations at once for an account that may hold three keys: three succeed, five are
/// refused, and three are live — the count and the insert are not raced.
async fn concurrent_key_creations_never_exceed_the_accounts_limit(store: &Store) {
    let a = store
        .create_account("many@x.io", Role::Buyer, "hm")
        .await
        .unwrap();
    keys_at_most(store, 3, None).await;
    let limits = KeyLimits::default();
    let attempts = (0..8).map(|i| {
        let (account, limits) = (&a.id, &limits);
        async move {
            store
                .create_key(
                    account,
                    "k",
                    &format!("tok_p{i}"),
                    &format!("sha-m{i}"),
                    limits,
                )
                .await
        }
    });
    let results = futures_util::future::join_all(attempts).await;
    let created = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(created, 3, "{results:?}");
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| matches!(e, StoreError::Conflict(_))));
    let live = store.keys(&a.id, 100).await.unwrap();
    assert_eq!(live.iter().filter(|k| k.revoked_at_ms.is_none()).count(), 3);
}

async fn keys_are_scoped_and_revocable(store: &Store) {
    let a = store
        .create_account("a@x.io", Role::Buyer, "ha")
        .await
        .unwrap();
    let b = store
        .create_account("b@x.io", Role::Buyer, "hb")
        .await
        .unwrap();
    let limits = KeyLimits {
        allowed_models: Some(vec!["mock".to_owned()]),
        spend_cap_micros: Some(5),
        requests_per_minute: Some(60),
    };
    keys_at_most(store, 2, Some(120)).await;
    let k = store
        .create_key(&a.id, "main", "tok_live_abcdef", "sha-a1", &limits)
        .await
        .unwrap();
    assert_eq!(k.allowed_models.as_deref(), Some(&["mock".to_owned()][..]));
    assert_eq!(
        (k.spend_cap_micros, k.requests_per_minute),
        (Some(5), Some(60))
    );
    // Another account's key does not exist for b.
    assert!(matches!(
        store.key(&b.id, &k.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.revoke_key(&b.id, &k.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .set_key_limits(&b.id, &k.id, &KeyLimits::default())
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(store.keys(&b.id, 10).await.unwrap().is_empty());
    let second = store
        .create_key(
            &a.id,
            "second",
            "tok_live_zzzzzz",
            "sha-a2",
            &KeyLimits::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        second.requests_per_minute,
        Some(120),
        "a key without a rate limit takes the settings' default"
    );
    // What creation answered is what was written.
    assert_eq!(
        serde_json::to_value(store.key(&a.id, &second.id).await.unwrap()).unwrap(),
        serde_json::to_value(&second).unwrap()
    );
    assert!(
        matches!(
            store
                .create_key(
                    &a.id,
                    "third",
                    "tok_live_yyyyyy",
                    "sha-a3",
                    &KeyLimits::default()
                )
                .await,
            Err(StoreError::Conflict(_))
        ),
        "keys_per_account_max holds"
    );
    assert!(matches!(
        store
            .create_key(
                &b.id,
                "dup",
                "tok_live_abcdef",
                "sha-a1",
                &KeyLimits::default()
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    let changed = store
        .set_key_limits(&a.id, &k.id, &KeyLimits::default())
        .await
        .unwrap();
    assert_eq!(changed.allowed_models, None);
    assert_eq!(store.live_keys().await.unwrap().len(), 2);
    assert!(store.live_key("sha-a1").await.unwrap().is_some());
    let revoked = store.revoke_key(&a.id, &k.id).await.unwrap();
    assert!(revoked.revoked_at_ms.is_some());
    let again = store.revoke_key(&a.id, &k.id).await.unwrap();
    assert_eq!(
        again.revoked_at_ms, revoked.revoked_at_ms,
        "revoking twice changes nothing"
    );
    assert!(store.live_key("sha-a1").await.unwrap().is_none());
    assert!(
        matches!(
            store
                .set_key_limits(&a.id, &k.id, &KeyLimits::default())
                .await,
            Err(StoreError::NotFound)
        ),
        "a revoked key's limits are final"
    );
    store
        .set_account_status(&a.id, AccountStatus::Suspended)
        .await
        .unwrap();
    assert!(
        store.live_keys().await.unwrap().is_empty(),
        "a suspended account's keys are not live"
    );
    assert_eq!(store.account_key_hashes(&a.id).await.unwrap().len(), 2);
}

async fn grants_are_idempotent_and_balanced(store: &Store) {
    let a = store
        .create_account("a@x.io", Role::Buyer, "ha")
        .await
        .unwrap();
    let (t1, created) = store
        .grant_credit(&a.id, 2_500_000, "pack", "ref-1")
        .await
        .unwrap();
    assert!(created);
    let (t2, created2) = store
        .grant_credit(&a.id, 2_500_000, "pack", "ref-1")
        .await
        .unwrap();
    assert_eq!(
        (t1.as_str(), created2),
        (t2.as_str(), false),
        "same reference, same transaction"
    );
    assert_eq!(store.balance(&a.id).await.unwrap(), 12_500_000);
    assert!(matches!(
        store.grant_credit("acct_missing", 1, "x", "r").await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store.ledger_imbalance().await.unwrap(),
        0,
        "every transaction sums to zero"
    );
}

async fn pools_are_fifo_and_filtered(store: &Store) {
    store
        .seed_catalog(&[price("m1", "openai", 100)], &[])
        .await
        .unwrap();
    let s = store
        .create_account("s@x.io", Role::Seller, "hs")
        .await
        .unwrap();
    let other = store
        .create_account("o@x.io", Role::Seller, "ho")
        .await
        .unwrap();
    let ring = keyring();
    let cred = store
        .create_credential(
            &s.id,
            "openai",
            "main",
            &serde_json::json!({}),
            false,
            |id| ring.seal(id, b"{\"provider\":\"openai\",\"api_key\":\"sk\"}"),
        )
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&cred.sealed.ciphertext).contains("sk"));
    assert_eq!(
        &*ring.open(&cred.id, &cred.sealed).unwrap(),
        b"{\"provider\":\"openai\",\"api_key\":\"sk\"}"
    );
    assert!(matches!(
        store.credential(&other.id, &cred.id).await,
        Err(StoreError::NotFound)
    ));
    let new = |ratio: i64, expires: Option<i64>| NewPool {
        credential_id: cred.id.clone(),
        face_value_micros: 1_000_000,
        price_ratio_ppm: ratio,
        models: vec!["m1".to_owned()],
        expires_at_ms: expires,
    };
    let now = tokn_control::store::now_ms();
    let first = store.create_pool(&s.id, &new(600_000, None)).await.unwrap();
    let second = store
        .create_pool(&s.id, &new(500_000, Some(now + 60_000)))
        .await
        .unwrap();
    let third = store.create_pool(&s.id, &new(700_000, None)).await.unwrap();
    assert!(first.listed_seq < second.listed_seq && second.listed_seq < third.listed_seq);
    assert!(
        matches!(
            store.create_pool(&other.id, &new(1, None)).await,
            Err(StoreError::NotFound)
        ),
        "a pool on another seller's credential"
    );
    let ids = |v: Vec<(tokn_control::store::Pool, _)>| {
        v.into_iter().map(|(p, _)| p.id).collect::<Vec<_>>()
    };
    assert!(
        store.servable_pools(now).await.unwrap().is_empty(),
        "no pool serves before its credential verified"
    );
    store
        .record_verification(&s.id, &cred.id, "invalid")
        .await
        .unwrap();
    assert!(store.servable_pools(now).await.unwrap().is_empty());
    store
        .record_verification(&s.id, &cred.id, "valid")
        .await
        .unwrap();
    assert_eq!(
        ids(store.servable_pools(now).await.unwrap()),
        [first.id.clone(), second.id.clone(), third.id.clone()]
    );
    // A custom endpoint serves only once the operator approved it, verified or not.
    let custom = store
        .create_credential(&s.id, "openai", "own", &serde_json::json!({}), true, |id| {
            ring.seal(id, b"{}")
        })
        .await
        .unwrap();
    store
        .record_verification(&s.id, &custom.id, "valid")
        .await
        .unwrap();
    let on_custom = store
        .create_pool(
            &s.id,
            &NewPool {
                credential_id: custom.id.clone(),
                ..new(600_000, None)
            },
        )
        .await
        .unwrap();
    assert_eq!(ids(store.servable_pools(now).await.unwrap()).len(), 3);
    let approved = store.approve_credential(&custom.id).await.unwrap();
    assert!(approved.custom_endpoint && approved.approved_at_ms.is_some());
    assert_eq!(
        ids(store.servable_pools(now).await.unwrap()),
        [
            first.id.clone(),
            second.id.clone(),
            third.id.clone(),
            on_custom.id.clone()
        ]
    );
    // The operator's pause holds against the seller.
    let operator = |status| PoolChange {
        status: Some(status),
        by_operator: true,
        ..Default::default()
    };
    let held = store
        .change_pool(&s.id, &on_custom.id, &operator(PoolStatus::Paused))
        .await
        .unwrap();
    assert!(held.held_by_operator);
    assert!(matches!(
        store
            .change_pool(
                &s.id,
                &on_custom.id,
                &PoolChange {
                    status: Some(PoolStatus::Live),
                    ..Default::default()
                }
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    let resumed = store
        .change_pool(&s.id, &on_custom.id, &operator(PoolStatus::Live))
        .await
        .unwrap();
    assert!(!resumed.held_by_operator && resumed.status == PoolStatus::Live);
    // Raising the price sends a pool to the back of the queue; lowering it keeps its place.
    let cheaper = store
        .change_pool(
            &s.id,
            &second.id,
            &PoolChange {
                price_ratio_ppm: Some(400_000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(cheaper.listed_seq, second.listed_seq);
    let dearer = store
        .change_pool(
            &s.id,
            &first.id,
            &PoolChange {
                price_ratio_ppm: Some(900_000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(dearer.listed_seq > on_custom.listed_seq);
    assert_eq!(
        ids(store.servable_pools(now).await.unwrap()),
        [
            second.id.clone(),
            third.id.clone(),
            on_custom.id.clone(),
            first.id.clone()
        ]
    );
    store
        .change_pool(&s.id, &on_custom.id, &operator(PoolStatus::Exhausted))
        .await
        .unwrap();
    assert_eq!(
        ids(store.servable_pools(now + 120_000).await.unwrap()),
        [third.id.clone(), first.id.clone()],
        "expired pools are not served"
    );
    let paused = store
        .change_pool(
            &s.id,
            &first.id,
            &PoolChange {
                status: Some(PoolStatus::Paused),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(paused.status, PoolStatus::Paused);
    assert_eq!(
        ids(store.servable_pools(now).await.unwrap()),
        [second.id.clone(), third.id.clone()]
    );
    assert!(matches!(
        store
            .change_pool(&other.id, &first.id, &PoolChange::default())
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(
        matches!(
            store.delete_credential(&s.id, &cred.id).await,
            Err(StoreError::Conflict(_))
        ),
        "a credential in use stays"
    );
    for p in [&first, &second, &third] {
        store
            .change_pool(
                &s.id,
                &p.id,
                &PoolChange {
                    status: Some(PoolStatus::Exhausted),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    assert!(
        matches!(
            store
                .change_pool(
                    &s.id,
                    &first.id,
                    &PoolChange {
                        status: Some(PoolStatus::Live),
                        ..Default::default()
                    }
                )
                .await,
            Err(StoreError::Conflict(_))
        ),
        "exhausted is final"
    );
    store.delete_credential(&s.id, &cred.id).await.unwrap();
    assert!(matches!(
        store.credential(&s.id, &cred.id).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.pools(&s.id, 10).await.unwrap().len(), 4);
}

async fn catalog_versions_and_push_version(store: &Store) {
    let mut last = store.config_version().await.unwrap();
    let mut bumped = |v: i64| {
        assert!(v > last, "the push version only grows ({v} after {last})");
        last = v;
    };
    assert!(store
        .seed_catalog(
            &[price("m1", "openai", 100), price("m2", "anthropic", 300)],
            &[]
        )
        .await
        .unwrap());
    assert!(
        !store
            .seed_catalog(&[price("m3", "openai", 1)], &[])
            .await
            .unwrap(),
        "seeded once"
    );
    bumped(store.config_version().await.unwrap());
    let v2 = store
        .add_price(&ModelPrice {
            effective_at_ms: 5_000,
            ..price("m1", "openai", 200)
        })
        .await
        .unwrap();
    bumped(v2.version);
    assert!(
        matches!(
            store.add_price(&price("m1", "anthropic", 1)).await,
            Err(StoreError::Conflict(_))
        ),
        "a model keeps its provider"
    );
    let prices = store.prices().await.unwrap();
    let m1: Vec<_> = prices.iter().filter(|p| p.model_id == "m1").collect();
    assert_eq!(m1.len(), 2);
    assert_eq!(m1[1].input_price_micros_per_mtok, 200);
    assert_eq!(
        m1[1].cache_write_price_micros_per_mtok, 250,
        "stored and read back"
    );
    // A version written before cache writes had their own price (no value in the column)
    // bills them as input, as it did.
    sqlx::query(
        "INSERT INTO model_prices (model_id, version, provider, upstream_model, input_micros, \
         output_micros, cached_input_micros, effective_at, created_at) \
         VALUES ('old', 1, 'anthropic', 'old', 70, 80, 7, 0, 0)",
    )
    .execute(store.raw())
    .await
    .unwrap();
    let prices = store.prices().await.unwrap();
    let old = prices.iter().find(|p| p.model_id == "old").unwrap();
    assert_eq!(old.cache_write_price_micros_per_mtok, 70);
    assert_eq!(old.cache_write_1h_price_micros_per_mtok, 70);
    assert_eq!(m1[1].cache_write_1h_price_micros_per_mtok, 400);
    bumped(store.bump_version().await.unwrap());
    let a = store
        .create_account("a@x.io", Role::Buyer, "ha")
        .await
        .unwrap();
    let k = store
        .create_key(&a.id, "", "p", "h", &KeyLimits::default())
        .await
        .unwrap();
    bumped(store.config_version().await.unwrap());
    store.revoke_key(&a.id, &k.id).await.unwrap();
    bumped(store.config_version().await.unwrap());
    let mut s = store.settings().await.unwrap();
    s.welcome_credit_micros = 0;
    store.put_settings(&s).await.unwrap();
    let b = store
        .create_account("b@x.io", Role::Buyer, "hb")
        .await
        .unwrap();
    assert_eq!(
        store.balance(&b.id).await.unwrap(),
        0,
        "welcome credit follows the setting"
    );
}

async fn migrations_apply_once(store: &Store) {
    // Opening again on the same database applies nothing twice and keeps the data.
    let a = store
        .create_account("a@x.io", Role::Buyer, "ha")
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(store.raw())
        .await
        .unwrap();
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert_eq!(n, shipped as i64, "each migration once");
    assert_eq!(store.account(&a.id).await.unwrap().email, "a@x.io");
}

/// Calls of `command` the private Redis has served so far.
async fn redis_calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// The key mirror in Redis is kept by change: the periodic reconcile costs one query while
/// nothing changed, and otherwise writes only the records that differ (counted on a Redis of
/// the test's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_key_mirror_is_reconciled_by_comparison_not_rewritten() {
    let redis = tokn_testkit::PrivateRedis::start();
    let dir = tokn_testkit::harness::temp_dir("store-mirror");
    let store = open_sqlite(&dir).await;
    let buyer = store
        .create_account("b@x.io", Role::Buyer, "h-mirror")
        .await
        .unwrap();
    let limits = KeyLimits {
        allowed_models: None,
        spend_cap_micros: None,
        requests_per_minute: None,
    };
    for i in 0..50 {
        store
            .create_key(&buyer.id, "k", "tok_live_x", &format!("sha-{i}"), &limits)
            .await
            .unwrap();
    }
    let mirror = HotMirror::connect(&redis.url(), "mirror:").await.unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let first = mirror.reconcile(&store).await.unwrap();
    assert_eq!((first.live, first.written, first.removed), (50, 50, 0));
    let sets = redis_calls(&mut conn, "set").await;
    // Nothing changed: skipped, and a full comparison writes nothing either.
    assert_eq!(mirror.reconcile_if_changed(&store).await.unwrap(), None);
    let again = mirror.reconcile(&store).await.unwrap();
    assert_eq!((again.written, again.removed), (0, 0));
    assert_eq!(redis_calls(&mut conn, "set").await, sets);
    // Redis lost one record, holds a wrong one and a stale one: exactly those are repaired.
    let _: () = redis::cmd("DEL")
        .arg("mirror:key:sha-1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("mirror:key:sha-2")
        .arg("{}")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("mirror:key:sha-gone")
        .arg("{}")
        .query_async(&mut conn)
        .await
        .unwrap();
    let sets = redis_calls(&mut conn, "set").await;
    let repaired = mirror.reconcile(&store).await.unwrap();
    assert_eq!((repaired.written, repaired.removed), (2, 1));
    assert_eq!(redis_calls(&mut conn, "set").await, sets + 2);
    // A change moves the configuration version: the periodic check compares again.
    store
        .create_key(&buyer.id, "k", "tok_live_x", "sha-new", &limits)
        .await
        .unwrap();
    let changed = mirror.reconcile_if_changed(&store).await.unwrap().unwrap();
    assert_eq!((changed.live, changed.written), (51, 1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sets the settings' cap on live keys per account and default rate limit for new keys.
async fn keys_at_most(store: &Store, most: i64, default_requests_per_minute: Option<i64>) {
    let mut s = store.settings().await.unwrap();
    s.keys_per_account_max = most;
    s.default_requests_per_minute = default_requests_per_minute;
    store.put_settings(&s).await.unwrap();
}
