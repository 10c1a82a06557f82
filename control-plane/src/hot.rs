//! The control plane's side of Redis hot state: it mirrors every live buyer key (hash and
//! limits, never the key) under `tokn_config::hot::key_record` and announces each change on
//! `key_channel`, so proxies drop their cached copy at once. A periodic reconcile repairs
//! whatever a Redis outage made the mirror miss.

use redis::AsyncCommands;

use crate::store::Store;

pub struct HotMirror {
    conn: redis::aio::ConnectionManager,
    prefix: String,
}

impl HotMirror {
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(2)));
        Ok(Self {
            conn: redis::aio::ConnectionManager::new_with_config(client, config).await?,
            prefix: prefix.to_owned(),
        })
    }

    /// Writes (or removes) the given keys' records and announces them. Failures are counted
    /// and logged; the next reconcile repairs the mirror.
    pub async fn announce(&self, store: &Store, key_hashes: &[String]) {
        for hash in key_hashes {
            if let Err(e) = self.announce_one(store, hash).await {
                crate::metrics::REDIS_ERRORS.inc();
                tracing::warn!(message = "Redis key announcement failed; reconcile will repair it.",
                    error = %e);
            }
        }
    }

    async fn announce_one(&self, store: &Store, hash: &str) -> Result<(), String> {
        let record = tokn_config::hot::key_record(&self.prefix, hash);
        let mut conn = self.conn.clone();
        match store.live_key(hash).await.map_err(|e| e.to_string())? {
            Some(key) => {
                let json = serde_json::to_string(&crate::push::key_config(&key, None))
                    .map_err(|e| e.to_string())?;
                conn.set::<_, _, ()>(&record, json).await
            }
            None => conn.del::<_, ()>(&record).await,
        }
        .map_err(|e| e.to_string())?;
        conn.publish::<_, _, ()>(tokn_config::hot::key_channel(&self.prefix), hash)
            .await
            .map_err(|e| e.to_string())
    }

    /// Makes Redis hold exactly the live keys. Returns how many records it holds.
    pub async fn reconcile(&self, store: &Store) -> Result<usize, String> {
        let live = store.live_keys().await.map_err(|e| e.to_string())?;
        let mut conn = self.conn.clone();
        let wanted: std::collections::HashSet<String> = live
            .iter()
            .map(|k| tokn_config::hot::key_record(&self.prefix, &k.key_sha256))
            .collect();
        let pattern = tokn_config::hot::key_record(&self.prefix, "*");
        let mut stale = Vec::new();
        {
            let mut iter: redis::AsyncIter<String> =
                conn.scan_match(&pattern).await.map_err(|e| e.to_string())?;
            while let Some(item) = futures_util::StreamExt::next(&mut iter).await {
                let name = item.map_err(|e| e.to_string())?;
                if !wanted.contains(&name) {
                    stale.push(name);
                }
            }
        }
        let mut pipe = redis::pipe();
        for k in &live {
            let json = serde_json::to_string(&crate::push::key_config(k, None))
                .map_err(|e| e.to_string())?;
            pipe.set(
                tokn_config::hot::key_record(&self.prefix, &k.key_sha256),
                json,
            )
            .ignore();
        }
        for name in &stale {
            pipe.del(name).ignore();
            if let Some(hash) = name.rsplit(':').next() {
                pipe.publish(tokn_config::hot::key_channel(&self.prefix), hash)
                    .ignore();
            }
        }
        if !live.is_empty() || !stale.is_empty() {
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(live.len())
    }
}
