//! The proxy's state beyond the configuration file, tested against the real things: Redis hot
//! state on the shared Redis at 127.0.0.1:6379 (each test under its own random key prefix), on
//! a private `redis-server` the test starts and kills, or on a private three-node Redis Cluster,
//! and sealed snapshots in real files.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod cluster;
mod control;
mod hot_state;

use std::time::Duration;

use tokn_config::{PushedConfig, ValidConfig};

/// A prefix no other test run uses.
pub fn unique_prefix() -> String {
    format!("tokn-test-{:016x}:", rand::random::<u64>())
}

/// Retries `check` every 10 ms until it holds or `within` passes; returns the time it took.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, mut check: F) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if check() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check().then(|| started.elapsed())
}

/// A pushed catalog: `mock` and `mock-2` (mock provider), one mock pool with a seller, one
/// Gemini pool (with a seller key), and one Vertex pool pushed without its service account,
/// which the proxy leaves out.
pub fn pushed(version: u64, keys: Option<serde_json::Value>) -> PushedConfig {
    serde_json::from_value(serde_json::json!({
        "version": version,
        "models": [
            {"id": "mock", "provider": "mock", "input_price_micros_per_mtok": 1_000_000,
             "output_price_micros_per_mtok": 2_000_000, "price_version": 7},
            {"id": "mock-2", "provider": "mock", "input_price_micros_per_mtok": 1,
             "output_price_micros_per_mtok": 1},
            {"id": "gemini-x", "provider": "gemini", "input_price_micros_per_mtok": 1,
             "output_price_micros_per_mtok": 1},
            {"id": "vertex-x", "provider": "vertex", "input_price_micros_per_mtok": 1,
             "output_price_micros_per_mtok": 1},
        ],
        "pools": [
            {"id": "mock-pool", "provider": "mock", "models": ["mock", "mock-2"],
             "price_ratio": 0.5, "seller": "seller-1"},
            {"id": "gemini-pool", "provider": "gemini", "base_url": "https://example.invalid/v1",
             "api_key": "sk-gemini-never-logged", "models": ["gemini-x"], "price_ratio": 0.5},
            {"id": "vertex-pool", "provider": "vertex", "location": "us-central1",
             "models": ["vertex-x"], "price_ratio": 0.5},
        ],
        "keys": keys,
    }))
    .unwrap()
}

pub fn load(toml: &str) -> ValidConfig {
    tokn_config::load(toml, Vec::new(), &|_| None).unwrap()
}
