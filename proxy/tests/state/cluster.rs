//! The money scripts on a real three-node Redis Cluster the test starts. Every money key carries
//! the hash tag `{money}`, so all keys of one script share a slot and the scripts run there; a
//! script that also touches an untagged key is refused, which shows the slot rule is enforced.

use std::collections::HashMap;
use std::fmt::Display;
use std::time::{SystemTime, UNIX_EPOCH};

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, Script};
use tokn_config::hot;
use tokn_testkit::PrivateRedisCluster;

use crate::unique_prefix;

const ACCOUNT: &str = "acct-1";
const POOL: &str = "pool-1";
/// The pool's face value, micro-USD.
const FACE: i64 = 10_000;

/// One account and one pool under a prefix of the test's own, driven through a cluster client
/// the way the proxy and the control plane drive them.
struct Money {
    conn: ClusterConnection,
    prefix: String,
    deadline_ms: u64,
}

impl Money {
    fn account_key(&self) -> String {
        hot::money_account(&self.prefix, ACCOUNT)
    }

    fn pool_key(&self) -> String {
        hot::money_pool(&self.prefix, POOL)
    }

    fn reservation_key(&self, request: &str) -> String {
        hot::money_reservation(&self.prefix, request)
    }

    /// Runs `script` with KEYS account, pool, reservation of `request`, open set (the layout
    /// the money and expiry scripts share), then `extra_keys`, and ARGV `args`
    /// (Redis receives every argument as a string anyway).
    async fn run<T: redis::FromRedisValue>(
        &mut self,
        script: &str,
        request: &str,
        extra_keys: &[String],
        args: &[&dyn Display],
    ) -> T {
        let script = Script::new(script);
        let mut call = script.prepare_invoke();
        call.key(self.account_key())
            .key(self.pool_key())
            .key(self.reservation_key(request))
            .key(hot::money_open(&self.prefix));
        for key in extra_keys {
            call.key(key);
        }
        for arg in args {
            call.arg(arg.to_string());
        }
        call.invoke_async(&mut self.conn).await.unwrap()
    }

    async fn reserve(&mut self, request: &str, buyer: i64, list: i64) -> Vec<i64> {
        let epoch = [hot::money_epoch(&self.prefix)];
        let deadline = self.deadline_ms;
        let args: [&dyn Display; 10] = [
            &buyer,
            &list,
            &FACE,
            &deadline,
            &request,
            &hot::RESERVATION_RECORD_TTL_MS,
            &ACCOUNT,
            &POOL,
            &1,
            &1,
        ];
        self.money(0, request, &epoch, &args).await
    }

    async fn settle(&mut self, request: &str, buyer: i64, list: i64) -> Vec<i64> {
        let spend = [hot::spend_counter(&self.prefix, "key")];
        self.money(1, request, &spend, &[&buyer, &list, &request])
            .await
    }

    /// The script a proxy calls, with one group: a settlement (`settlements` 1) or a
    /// reservation (0).
    async fn money(
        &mut self,
        settlements: u8,
        request: &str,
        extra_keys: &[String],
        args: &[&dyn Display],
    ) -> Vec<i64> {
        let mut all: Vec<&dyn Display> = vec![&settlements];
        all.extend_from_slice(args);
        self.run(&hot::money_script(), request, extra_keys, &all)
            .await
    }

    /// Drains one request, mirroring its wallet and pool (the drain names its keys its own
    /// way: the open set, the reservations, then each account and pool once).
    async fn drain(&mut self, request: &str, balance: i64, seq: i64, consumed: i64) {
        let script = Script::new(hot::DRAIN_SCRIPT);
        let mut call = script.prepare_invoke();
        call.key(hot::money_open(&self.prefix))
            .key(self.reservation_key(request))
            .key(self.account_key())
            .key(self.pool_key());
        let args: [&dyn Display; 9] = [&1, &1, &1, &request, &1, &1, &balance, &seq, &consumed];
        for arg in args {
            call.arg(arg.to_string());
        }
        let () = call.invoke_async(&mut self.conn).await.unwrap();
    }

    async fn expire(&mut self, request: &str) {
        let () = self
            .run(hot::EXPIRE_SCRIPT, request, &[], &[&request])
            .await;
    }

    async fn hash(&mut self, key: String) -> HashMap<String, String> {
        self.conn.hgetall(key).await.unwrap()
    }

    /// `(field, value)` pairs of a hash, for compact assertions.
    async fn fields(&mut self, key: String, names: &[&str]) -> Vec<(String, String)> {
        let hash = self.hash(key).await;
        names
            .iter()
            .map(|name| {
                let value = hash.get(*name).cloned().unwrap_or_default();
                ((*name).to_owned(), value)
            })
            .collect()
    }

    async fn state(&mut self, request: &str) -> String {
        let key = self.reservation_key(request);
        self.conn.hget(key, "state").await.unwrap()
    }

    async fn held(&mut self) -> (String, String) {
        let account: String = self.conn.hget(self.account_key(), "held").await.unwrap();
        let pool: String = self.conn.hget(self.pool_key(), "held").await.unwrap();
        (account, pool)
    }
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `CLUSTER <sub>` on one node, over a plain (non-cluster) connection.
async fn cluster_command(url: &str, sub: &str) -> String {
    let mut node = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("CLUSTER")
        .arg(sub)
        .query_async(&mut node)
        .await
        .unwrap()
}

/// Without three masters sharing the slots this test would prove nothing a single server
/// doesn't, so it first checks that every node sees exactly that cluster.
async fn assert_three_masters(cluster: &PrivateRedisCluster) {
    for url in cluster.urls() {
        let info = cluster_command(&url, "INFO").await;
        for line in [
            "cluster_state:ok",
            "cluster_slots_assigned:16384",
            "cluster_slots_ok:16384",
            "cluster_known_nodes:3",
            "cluster_size:3",
        ] {
            assert!(
                info.lines().any(|l| l.trim() == line),
                "{url}: no {line} in\n{info}"
            );
        }
        let nodes = cluster_command(&url, "NODES").await;
        let masters: Vec<&str> = nodes
            .lines()
            .filter(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("master")))
            .collect();
        assert_eq!(masters.len(), 3, "{url}: masters in\n{nodes}");
        // Each master serves slots: its line goes on past the 8 fixed fields.
        assert!(
            masters.iter().all(|l| l.split(' ').nth(8).is_some()),
            "{url}: a master without slots in\n{nodes}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_scripts_run_on_a_three_node_redis_cluster() {
    let cluster = PrivateRedisCluster::start();
    assert_three_masters(&cluster).await;

    let conn = ClusterClient::new(cluster.urls())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let mut money = Money {
        conn,
        prefix: unique_prefix(),
        deadline_ms: u64::try_from(now_ms).unwrap() + 60_000,
    };

    // The control plane's load: epoch, balance 1000 at seq 1, nothing consumed from the pool.
    let () = money
        .conn
        .set(hot::money_epoch(&money.prefix), 1)
        .await
        .unwrap();
    let () = Script::new(hot::SET_BALANCE_SCRIPT)
        .key(money.account_key())
        .arg(1000)
        .arg(1)
        .invoke_async(&mut money.conn)
        .await
        .unwrap();
    let () = Script::new(hot::SET_CONSUMED_SCRIPT)
        .key(money.pool_key())
        .arg(0)
        .invoke_async(&mut money.conn)
        .await
        .unwrap();

    // Reserve: granted once, refused as a duplicate, refused when the buyer or pool is short.
    assert_eq!(money.reserve("r1", 300, 500).await, [0, 700]);
    let open: Option<u64> = money
        .conn
        .zscore(hot::money_open(&money.prefix), "r1")
        .await
        .unwrap();
    assert_eq!(open, Some(money.deadline_ms));
    assert_eq!(money.reserve("r1", 300, 500).await, [4, 0]);
    assert_eq!(money.reserve("r2", 800, 500).await, [1, 700]);
    assert_eq!(money.reserve("r3", 100, 20_000).await, [2, 0]);
    assert_eq!(money.held().await, ("300".to_owned(), "500".to_owned()));

    // Settle to the actual cost, then the ledger drains it (once).
    assert_eq!(money.settle("r1", 200, 300).await, [0, 800]);
    assert_eq!(money.state("r1").await, "settled");
    for _ in 0..2 {
        // The second drain is a repeat and must move nothing.
        money.drain("r1", 800, 2, 300).await;
        let account = money.account_key();
        assert_eq!(
            money.fields(account, &["bal", "seq", "held"]).await,
            pairs(&[("bal", "800"), ("seq", "2"), ("held", "0")])
        );
        let pool = money.pool_key();
        assert_eq!(
            money.fields(pool, &["consumed", "held"]).await,
            pairs(&[("consumed", "300"), ("held", "0")])
        );
        assert_eq!(money.state("r1").await, "drained");
    }
    let open: Vec<String> = money
        .conn
        .zrange(hot::money_open(&money.prefix), 0, -1)
        .await
        .unwrap();
    assert!(open.is_empty(), "{open:?}");

    // A reservation whose proxy died expires; a late settle holds the actual cost again.
    assert_eq!(money.reserve("r4", 100, 150).await, [0, 700]);
    money.expire("r4").await;
    assert_eq!(money.held().await, ("0".to_owned(), "0".to_owned()));
    assert_eq!(money.state("r4").await, "expired");
    assert_eq!(money.settle("r4", 90, 120).await, [0, 710]);
    assert_eq!(money.state("r4").await, "settled");
    assert_eq!(money.held().await, ("90".to_owned(), "120".to_owned()));
    // The key's spend took each settled request once (r1's 200, r4's 90); a repeat adds nothing.
    assert_eq!(money.settle("r4", 90, 120).await, [0, 710]);
    let spent: u64 = money
        .conn
        .get(hot::spend_counter(&money.prefix, "key"))
        .await
        .unwrap();
    assert_eq!(spent, 290);

    // Many requests in one call of the script a proxy calls (no settlements here), each as if
    // alone and in order: the second sees what the first holds.
    let reserve = Script::new(&hot::money_script());
    let mut call = reserve.prepare_invoke();
    call.arg(0);
    for request in ["r5", "r6"] {
        call.key(money.account_key())
            .key(money.pool_key())
            .key(money.reservation_key(request))
            .key(hot::money_open(&money.prefix))
            .key(hot::money_epoch(&money.prefix))
            .arg(500)
            .arg(100)
            .arg(FACE)
            .arg(money.deadline_ms)
            .arg(request)
            .arg(hot::RESERVATION_RECORD_TTL_MS)
            .arg(ACCOUNT)
            .arg(POOL)
            .arg(1)
            .arg(1);
    }
    let answer: Vec<i64> = call.invoke_async(&mut money.conn).await.unwrap();
    assert_eq!(answer, [0, 210, 1, 210]);
    let settle = Script::new(&hot::money_script());
    let mut call = settle.prepare_invoke();
    call.arg(2);
    for request in ["r5", "r6"] {
        call.key(money.account_key())
            .key(money.pool_key())
            .key(money.reservation_key(request))
            .key(hot::money_open(&money.prefix))
            .key(hot::spend_counter(&money.prefix, "key"))
            .arg(100)
            .arg(50)
            .arg(request);
    }
    let answer: Vec<i64> = call.invoke_async(&mut money.conn).await.unwrap();
    assert_eq!(answer, [0, 610, 1, 610], "r6 was never reserved");

    // The negative control: a key without the tag, in another slot, is refused by the server.
    let epoch = hot::money_epoch(&money.prefix);
    let money_slot: i64 = keyslot(&mut money.conn, &epoch).await;
    let mut other = None;
    for i in 0..10 {
        let key = format!("{}other-{i}", money.prefix);
        if keyslot(&mut money.conn, &key).await != money_slot {
            other = Some(key);
            break;
        }
    }
    let other = other.expect("a key outside the {money} slot");
    let err = Script::new("return redis.call('EXISTS', KEYS[1], KEYS[2])")
        .key(&epoch)
        .key(&other)
        .invoke_async::<i64>(&mut money.conn)
        .await
        .expect_err("a script across slots must be refused");
    assert_eq!(err.code(), Some("CROSSSLOT"), "{err}");
}

/// The slot the cluster assigns `key`.
async fn keyslot(conn: &mut ClusterConnection, key: &str) -> i64 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}
