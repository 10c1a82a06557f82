//! The configuration the hot path reads: catalog, prices, pools and keys, indexed and with
//! everything per-request work would otherwise recompute (auth headers, peers, `/v1/models`
//! bodies) prepared once. Swapped whole (`arc-swap`) when new configuration arrives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::HeaderValue;
use serde::Serialize;
use tokn_config::{PoolStatus, ProviderKind, UpstreamUrl, ValidConfig};

use crate::usage::Usage;

/// List prices of one model in micro-USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
}

/// What a request costs, in micro-USD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    pub list_micros: u64,
    pub buyer_micros: u64,
}

impl Prices {
    /// Rounding rule: the exact cost is `Σ tokens × price / 10⁶` micro-USD; it is rounded up once,
    /// after summing, so a request is never billed below its exact cost. The buyer pays
    /// `exact × ratio_ppm / 10⁶`, likewise rounded up once.
    pub fn cost(&self, usage: &Usage, ratio_ppm: u64) -> Cost {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let exact_pico: u128 = (usage.prompt_tokens - cached) as u128 * self.input as u128
            + cached as u128 * self.cached_input as u128
            + usage.completion_tokens as u128 * self.output as u128;
        let list = exact_pico.div_ceil(1_000_000);
        let buyer = (exact_pico * ratio_ppm as u128).div_ceil(1_000_000_000_000);
        Cost {
            list_micros: u64::try_from(list).unwrap_or(u64::MAX),
            buyer_micros: u64::try_from(buyer).unwrap_or(u64::MAX),
        }
    }
}

pub struct Model {
    pub id: Arc<str>,
    pub provider: ProviderKind,
    pub upstream_model: String,
    pub prices: Prices,
    /// Pools serving this model, FIFO (configuration order).
    pub pools: Vec<Arc<Pool>>,
    /// `GET /v1/models/{id}` body.
    pub object_body: Bytes,
}

/// Where a pool's requests go.
pub enum Transport {
    /// The built-in mock provider: answered in process.
    Mock,
    Http(Box<HttpTarget>),
}

pub struct HttpTarget {
    pub url: UpstreamUrl,
    /// `Authorization: Bearer …`, built once and marked sensitive so it is never logged.
    pub authorization: HeaderValue,
    pub host_header: HeaderValue,
    pub chat_path: String,
    pub resolver: crate::upstream::Resolver,
}

pub struct Pool {
    pub id: Arc<str>,
    pub provider: ProviderKind,
    pub transport: Transport,
    pub price_ratio_ppm: u64,
    pub live: bool,
    health: PoolHealth,
}

/// Back-off state shared by every request that uses a pool.
struct PoolHealth {
    epoch: Instant,
    skip_until_ms: AtomicU64,
}

impl Pool {
    fn now_ms(&self) -> u64 {
        self.health.epoch.elapsed().as_millis() as u64
    }

    /// Live and not backed off.
    pub fn is_available(&self) -> bool {
        self.live && self.health.skip_until_ms.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// Skips the pool for `ms` (never shortens a longer back-off already in place).
    pub fn back_off(&self, ms: u64) {
        let until = self.now_ms() + ms;
        self.health
            .skip_until_ms
            .fetch_max(until, Ordering::Relaxed);
    }
}

pub struct Key {
    pub id: Arc<str>,
    pub account: Arc<str>,
    /// `None`: every model.
    pub allowed_models: Option<Vec<Arc<str>>>,
    /// This key's `GET /v1/models` body.
    pub models_body: Bytes,
}

impl Key {
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|list| list.iter().any(|m| &**m == model))
    }
}

pub struct Snapshot {
    pub version: u64,
    pub models: HashMap<Arc<str>, Arc<Model>>,
    pub keys: HashMap<[u8; 32], Arc<Key>>,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelObject<'a>>,
}

#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

impl<'a> ModelObject<'a> {
    fn of(m: &'a tokn_config::ModelConfig) -> Self {
        Self {
            id: &m.id,
            object: "model",
            created: m.created,
            owned_by: m.provider.as_str(),
        }
    }
}

/// `GET /v1/models` for the given models, rendered once.
fn models_body<'a>(models: impl Iterator<Item = &'a tokn_config::ModelConfig>) -> Bytes {
    let list = ModelList {
        object: "list",
        data: models.map(ModelObject::of).collect(),
    };
    serde_json::to_vec(&list)
        .map(Bytes::from)
        .unwrap_or_default()
}

impl Snapshot {
    /// Builds the hot-path view of a validated configuration.
    pub fn build(valid: &ValidConfig, version: u64) -> Result<Self, String> {
        let cfg = &valid.config;
        let epoch = Instant::now();
        let mut pools = Vec::with_capacity(cfg.pools.len());
        for (i, p) in cfg.pools.iter().enumerate() {
            let transport = match &valid.pool_upstreams[i] {
                None => Transport::Mock,
                Some((url, key)) => {
                    let mut authorization = HeaderValue::try_from(format!("Bearer {key}"))
                        .map_err(|_| format!("pools[{i}].api_key is not a valid header value"))?;
                    authorization.set_sensitive(true);
                    let host = if (url.tls && url.port == 443) || (!url.tls && url.port == 80) {
                        url.host.clone()
                    } else if url.host.contains(':') {
                        format!("[{}]:{}", url.host, url.port)
                    } else {
                        format!("{}:{}", url.host, url.port)
                    };
                    Transport::Http(Box::new(HttpTarget {
                        host_header: HeaderValue::try_from(host)
                            .map_err(|_| format!("pools[{i}].base_url has a bad host"))?,
                        chat_path: format!("{}/chat/completions", url.base_path),
                        url: url.clone(),
                        authorization,
                        resolver: Default::default(),
                    }))
                }
            };
            pools.push(Arc::new(Pool {
                id: p.id.as_str().into(),
                provider: p.provider,
                transport,
                price_ratio_ppm: valid.pool_price_ratio_ppm[i],
                live: p.status == PoolStatus::Live,
                health: PoolHealth {
                    epoch,
                    skip_until_ms: AtomicU64::new(0),
                },
            }));
        }

        let mut models = HashMap::with_capacity(cfg.models.len());
        for m in &cfg.models {
            let serving = cfg
                .pools
                .iter()
                .zip(&pools)
                .filter(|(pc, _)| pc.models.iter().any(|id| id == &m.id))
                .map(|(_, p)| p.clone())
                .collect();
            let id: Arc<str> = m.id.as_str().into();
            models.insert(
                id.clone(),
                Arc::new(Model {
                    id,
                    provider: m.provider,
                    upstream_model: m.upstream_model.clone().unwrap_or_else(|| m.id.clone()),
                    prices: Prices {
                        input: m.input_price_micros_per_mtok,
                        output: m.output_price_micros_per_mtok,
                        cached_input: m
                            .cached_input_price_micros_per_mtok
                            .unwrap_or(m.input_price_micros_per_mtok),
                    },
                    pools: serving,
                    object_body: serde_json::to_vec(&ModelObject::of(m))
                        .map(Bytes::from)
                        .unwrap_or_default(),
                }),
            );
        }

        let all_models_body = models_body(cfg.models.iter());
        let mut keys = HashMap::with_capacity(cfg.keys.len());
        for (k, hash) in cfg.keys.iter().zip(&valid.key_hashes) {
            let allowed: Option<Vec<Arc<str>>> = k
                .allowed_models
                .as_ref()
                .map(|list| list.iter().map(|m| Arc::from(m.as_str())).collect());
            let body = match &k.allowed_models {
                None => all_models_body.clone(),
                Some(list) => models_body(cfg.models.iter().filter(|m| list.contains(&m.id))),
            };
            keys.insert(
                *hash,
                Arc::new(Key {
                    id: k.id.as_str().into(),
                    account: k.account.as_str().into(),
                    allowed_models: allowed,
                    models_body: body,
                }),
            );
        }
        Ok(Self {
            version,
            models,
            keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_up_once_after_summing() {
        let p = Prices {
            input: 150_000,
            output: 600_000,
            cached_input: 75_000,
        };
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
            cached_tokens: 200,
            reasoning_tokens: 0,
        };
        // 800×0.15 + 200×0.075 + 500×0.6 = 120 + 15 + 300 = 435 micro-USD exactly.
        assert_eq!(
            p.cost(&u, 600_000),
            Cost {
                list_micros: 435,
                buyer_micros: 261
            }
        );
        // One input token at $0.15/M is 0.15 micro-USD: billed as 1.
        let one = Usage {
            prompt_tokens: 1,
            ..Usage::default()
        };
        assert_eq!(
            p.cost(&one, 600_000),
            Cost {
                list_micros: 1,
                buyer_micros: 1
            }
        );
        assert_eq!(p.cost(&Usage::default(), 600_000), Cost::default());
        // Cached tokens beyond the prompt (a confused upstream) are capped, never underflow.
        let odd = Usage {
            prompt_tokens: 1,
            cached_tokens: 5,
            ..Usage::default()
        };
        assert_eq!(p.cost(&odd, 1_000_000).list_micros, 1);
    }

    #[test]
    fn pools_keep_fifo_order_and_back_off() {
        let valid = tokn_config::load(
            &format!(
                "{}\n[[pools]]\nid = \"second\"\nprovider = \"mock\"\nmodels = [\"mock\"]\nprice_ratio = 0.5\n",
                tokn_config::DEFAULT_CONFIG_TOML
            ),
            Vec::new(),
            &|_| None,
        )
        .unwrap();
        let snap = Snapshot::build(&valid, 1).unwrap();
        let model = &snap.models["mock"];
        let ids: Vec<&str> = model.pools.iter().map(|p| &*p.id).collect();
        assert_eq!(ids, ["mock-pool", "second"]);
        assert!(model.pools[0].is_available());
        model.pools[0].back_off(60_000);
        assert!(!model.pools[0].is_available());
        assert!(model.pools[1].is_available());
    }
}
