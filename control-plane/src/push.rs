//! Configuration push: the control plane publishes one `PushedConfig` per store version and
//! proxies long-poll for the first version newer than theirs (`GET /internal/v1/config`).
//!
//! A change made through this replica is published before its API call returns; changes made
//! by other replicas (or a price version coming into force) are picked up by a poll of the
//! store's version every `limits.version_poll_ms`. Each published document is labelled with the
//! store version read *before* its data, so a label never claims more than the data holds.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex, Notify};
use tokn_config::{
    KeyConfig, ModelConfig, PoolConfig, PoolStatus, ProviderKind, PushedConfig, ScheduledPrice,
};

use crate::store::{now_ms, ApiKey, ModelPrice, StoreResult};
use crate::App;

pub struct Published {
    pub version: u64,
    /// The JSON `PushedConfig`. Holds seller credentials: kept in memory only.
    pub body: String,
}

pub struct Push {
    tx: watch::Sender<Arc<Published>>,
    build: Mutex<()>,
    /// When the earliest not-yet-effective model comes into force (i64::MAX: none).
    next_activation_ms: AtomicI64,
    /// Set at shutdown: waiting watches answer at once instead of holding the exit.
    closing: watch::Sender<bool>,
    /// A change was committed: the publisher builds the configuration (once for a burst).
    wanted: Arc<Notify>,
}

impl Drop for Push {
    fn drop(&mut self) {
        // The publisher wakes, finds its app gone and ends.
        self.wanted.notify_one();
    }
}

impl Default for Push {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(Arc::new(Published {
                version: 0,
                body: String::new(),
            })),
            build: Mutex::new(()),
            next_activation_ms: AtomicI64::new(i64::MAX),
            closing: watch::Sender::new(false),
            wanted: Arc::new(Notify::new()),
        }
    }
}

impl Push {
    pub fn version(&self) -> u64 {
        self.tx.borrow().version
    }

    /// The first published configuration newer than `after`, waiting up to `wait` for it.
    pub async fn newer_than(&self, after: u64, wait: Duration) -> Option<Arc<Published>> {
        let mut rx = self.tx.subscribe();
        let wanted = async {
            loop {
                let current = rx.borrow_and_update().clone();
                if current.version > after {
                    return Some(current);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        let mut closing = self.closing.subscribe();
        tokio::select! {
            found = tokio::time::timeout(wait, wanted) => found.ok().flatten(),
            _ = closing.wait_for(|c| *c) => None,
        }
    }

    /// Ends every waiting watch (with "nothing newer") and every later one.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Asks the publisher for a new configuration; returns at once.
    pub fn wake(&self) {
        self.wanted.notify_one();
    }

    /// Publishes on every [`Push::wake`], off the API's request path: the changes committed
    /// while a configuration is being built are published together by the next build. Ends
    /// when `app` is gone.
    pub async fn publisher(app: std::sync::Weak<App>) {
        let Some(wanted) = app.upgrade().map(|a| a.push.wanted.clone()) else {
            return;
        };
        loop {
            wanted.notified().await;
            let Some(app) = app.upgrade() else {
                return;
            };
            if let Err(e) = app.push.refresh(&app).await {
                // The change is committed; the version poll publishes it on its next tick.
                tracing::error!(message = "Publishing the configuration failed.", error = %e);
            }
        }
    }

    /// Publishes the store's configuration if its version moved past the published one.
    pub async fn refresh(&self, app: &App) -> StoreResult<()> {
        let _one_at_a_time = self.build.lock().await;
        let version = app.store.config_version().await?;
        let version = u64::try_from(version).unwrap_or(0);
        if version <= self.version() {
            return Ok(());
        }
        let (config, next_activation) = build(app, version).await?;
        self.next_activation_ms
            .store(next_activation.unwrap_or(i64::MAX), Ordering::Relaxed);
        let body = serde_json::to_string(&config).unwrap_or_default();
        crate::metrics::CONFIG_VERSION.set(version as i64);
        self.tx.send_replace(Arc::new(Published { version, body }));
        Ok(())
    }

    /// Whether a scheduled model has come into force and needs a new version.
    pub fn activation_due(&self) -> bool {
        self.next_activation_ms.load(Ordering::Relaxed) <= now_ms()
    }
}

/// Builds the document proxies run. Returns it with the moment the next not-yet-effective
/// model comes into force, if any.
async fn build(app: &App, version: u64) -> StoreResult<(PushedConfig, Option<i64>)> {
    let now = now_ms();
    let (models, next_activation) = catalog(&app.store.prices().await?, now);
    let served: HashSet<(&str, ProviderKind)> =
        models.iter().map(|m| (m.id.as_str(), m.provider)).collect();

    let mut pools = Vec::new();
    for (pool, cred) in app.store.servable_pools(now).await? {
        let credential = match app.open_credential(&cred) {
            Ok(c) => c,
            Err(e) => {
                // A credential sealed under a key this replica lacks: the pool is left out,
                // loudly, rather than the whole fleet's configuration.
                tracing::error!(message = "Credential cannot be opened; pool not pushed.",
                    pool = %pool.id, error = %e);
                continue;
            }
        };
        let provider = credential.kind();
        let pool_models: Vec<String> = pool
            .models
            .iter()
            .filter(|m| served.contains(&(m.as_str(), provider)))
            .cloned()
            .collect();
        if pool_models.is_empty() {
            continue;
        }
        pools.push(tokn_config::PushedPool::from(PoolConfig {
            id: pool.id,
            credential,
            models: pool_models,
            price_ratio: None,
            price_ratio_ppm: u64::try_from(pool.price_ratio_ppm).ok(),
            status: PoolStatus::Live,
            seller: Some(pool.account_id),
            face_value_micros: u64::try_from(pool.face_value_micros).ok(),
            expires_at_ms: pool.expires_at_ms.and_then(|t| u64::try_from(t).ok()),
        }));
    }

    let keys = if app.hot.is_some() {
        None
    } else {
        let ids: HashSet<&str> = models.iter().map(|m| m.id.as_str()).collect();
        Some(
            app.store
                .live_keys()
                .await?
                .iter()
                .map(|k| key_config(k, Some(&ids)))
                .collect(),
        )
    };
    Ok((
        PushedConfig {
            version,
            models,
            pools,
            keys,
        },
        next_activation,
    ))
}

/// The key as proxies see it: its hash and limits, never the key. With `catalog`, allowed
/// models outside it are dropped (a proxy refuses a configuration naming unknown models).
pub fn key_config(k: &ApiKey, catalog: Option<&HashSet<&str>>) -> KeyConfig {
    KeyConfig {
        id: k.id.clone(),
        account: k.account_id.clone(),
        key: None,
        key_sha256: Some(k.key_sha256.clone()),
        allowed_models: k.allowed_models.as_ref().map(|list| {
            list.iter()
                .filter(|m| catalog.is_none_or(|c| c.contains(m.as_str())))
                .cloned()
                .collect()
        }),
        spend_cap_micros: k.spend_cap_micros.and_then(|c| u64::try_from(c).ok()),
        requests_per_minute: k.requests_per_minute.and_then(|r| u32::try_from(r).ok()),
    }
}

/// Per model: the price version in force now, and the later ones as its schedule.
fn catalog(prices: &[ModelPrice], now: i64) -> (Vec<ModelConfig>, Option<i64>) {
    let mut by_model: BTreeMap<&str, Vec<&ModelPrice>> = BTreeMap::new();
    for p in prices {
        by_model.entry(&p.model_id).or_default().push(p);
    }
    let mut next_activation: Option<i64> = None;
    let mut models = Vec::with_capacity(by_model.len());
    for (id, mut versions) in by_model {
        versions.sort_by_key(|p| (p.effective_at_ms, p.version));
        let (past, future): (Vec<&ModelPrice>, Vec<&ModelPrice>) =
            versions.iter().partition(|p| p.effective_at_ms <= now);
        let Some(current) = past.last() else {
            if let Some(first) = future.first().map(|p| p.effective_at_ms) {
                next_activation = Some(next_activation.map_or(first, |n| n.min(first)));
            }
            continue;
        };
        let Some(provider) = ProviderKind::parse(&current.provider) else {
            continue;
        };
        let micros = |v: i64| u64::try_from(v).unwrap_or(0);
        models.push(ModelConfig {
            id: id.to_owned(),
            provider,
            upstream_model: Some(current.upstream_model.clone()),
            input_price_micros_per_mtok: micros(current.input_price_micros_per_mtok),
            output_price_micros_per_mtok: micros(current.output_price_micros_per_mtok),
            cached_input_price_micros_per_mtok: Some(micros(
                current.cached_input_price_micros_per_mtok,
            )),
            max_output_tokens: current
                .max_output_tokens
                .and_then(|t| u64::try_from(t).ok()),
            created: past.first().map_or(0, |p| micros(p.effective_at_ms) / 1000),
            price_version: micros(current.version),
            scheduled_prices: future
                .iter()
                .map(|p| ScheduledPrice {
                    version: micros(p.version),
                    effective_at_ms: micros(p.effective_at_ms),
                    input_price_micros_per_mtok: micros(p.input_price_micros_per_mtok),
                    output_price_micros_per_mtok: micros(p.output_price_micros_per_mtok),
                    cached_input_price_micros_per_mtok: micros(
                        p.cached_input_price_micros_per_mtok,
                    ),
                })
                .collect(),
        });
    }
    (models, next_activation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(model: &str, version: i64, at: i64, input: i64) -> ModelPrice {
        ModelPrice {
            model_id: model.to_owned(),
            version,
            provider: "openai".to_owned(),
            upstream_model: model.to_owned(),
            input_price_micros_per_mtok: input,
            output_price_micros_per_mtok: 2 * input,
            cached_input_price_micros_per_mtok: input / 2,
            effective_at_ms: at,
            max_output_tokens: None,
        }
    }

    #[test]
    fn the_version_in_force_is_current_and_later_ones_are_scheduled() {
        let prices = [
            price("a", 2, 100, 10),
            price("a", 5, 500, 20),
            price("a", 7, 900, 30),
            price("b", 8, 2_000, 40),
        ];
        let (models, next) = catalog(&prices, 600);
        assert_eq!(models.len(), 1, "b is not in force yet");
        let a = &models[0];
        assert_eq!((a.price_version, a.input_price_micros_per_mtok), (5, 20));
        assert_eq!(a.scheduled_prices.len(), 1);
        assert_eq!(a.scheduled_prices[0].version, 7);
        assert_eq!(a.scheduled_prices[0].effective_at_ms, 900);
        assert_eq!(next, Some(2_000));
    }
}
