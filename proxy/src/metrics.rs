//! Prometheus metrics. Labels are low-cardinality by construction: catalog model ids (bounded by
//! the catalog), provider, status class, outcome and failure kinds — never keys or accounts.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    HistogramVec, IntCounter, IntCounterVec, IntGauge,
};

use crate::usage::UsageRecord;

const LATENCY_BUCKETS_S: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The gateway's own time: the range the benchmark's added latency falls in (tens of
/// microseconds to tens of milliseconds).
const OVERHEAD_BUCKETS_S: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

// Registration only fails on a duplicate name, which is a programming error caught by any test.
#[expect(
    clippy::expect_used,
    reason = "metric registration fails only on duplicate names"
)]
mod defs {
    use super::*;

    pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_requests_total",
            "Requests served, by model, provider, status class and outcome.",
            &["model", "provider", "status_class", "outcome"]
        )
        .expect("register tokn_requests_total")
    });
    pub static LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
        register_histogram_vec!(
            "tokn_request_duration_seconds",
            "Time from request arrival to the last byte of the response.",
            &["model", "stream"],
            LATENCY_BUCKETS_S.to_vec()
        )
        .expect("register tokn_request_duration_seconds")
    });
    pub static TTFT: LazyLock<HistogramVec> = LazyLock::new(|| {
        register_histogram_vec!(
            "tokn_time_to_first_token_seconds",
            "Time from request arrival to the first streamed event sent to the client.",
            &["model"],
            LATENCY_BUCKETS_S.to_vec()
        )
        .expect("register tokn_time_to_first_token_seconds")
    });
    pub static OVERHEAD: LazyLock<HistogramVec> = LazyLock::new(|| {
        register_histogram_vec!(
            "tokn_gateway_overhead_seconds",
            "Time spent in the gateway itself: from request arrival to the last byte of the \
             response, less the time spent waiting for upstreams.",
            &["model", "stream"],
            OVERHEAD_BUCKETS_S.to_vec()
        )
        .expect("register tokn_gateway_overhead_seconds")
    });
    pub static TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_tokens_total",
            "Tokens metered, by model and kind (prompt, completion, cached, reasoning).",
            &["model", "kind"]
        )
        .expect("register tokn_tokens_total")
    });
    pub static COST: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_cost_micros_total",
            "Metered cost in micro-USD, by model and side (list, buyer).",
            &["model", "side"]
        )
        .expect("register tokn_cost_micros_total")
    });
    pub static UPSTREAM_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_upstream_failures_total",
            "Upstream attempts that failed before a usable response, by provider and kind.",
            &["provider", "kind"]
        )
        .expect("register tokn_upstream_failures_total")
    });
    pub static STICKY: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_sticky_routes_total",
            "Requests naming a conversation, by how its pool was chosen: `kept` (the pool that \
             served it before), `placed` (a new conversation, FIFO), `moved` (its pool could \
             not serve; FIFO placed it again).",
            &["outcome"]
        )
        .expect("register tokn_sticky_routes_total")
    });
    pub static FAILOVERS: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "tokn_pool_failovers_total",
            "Requests moved on to a next pool."
        )
        .expect("register tokn_pool_failovers_total")
    });
    pub static USAGE_WRITE_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "tokn_usage_write_errors_total",
            "Usage records the sink failed to write (each is logged in full instead)."
        )
        .expect("register tokn_usage_write_errors_total")
    });
    pub static CONTROL_SYNC_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_control_sync_errors_total",
            "Failed exchanges with the control plane and failed snapshot loads or writes, by kind.",
            &["kind"]
        )
        .expect("register tokn_control_sync_errors_total")
    });
    pub static CONFIG_POOLS_SKIPPED: LazyLock<IntGauge> = LazyLock::new(|| {
        register_int_gauge!(
            "tokn_config_pools_skipped",
            "Pools of the configuration in use left out: pushed without their credential, or with fields this build refuses."
        )
        .expect("register tokn_config_pools_skipped")
    });
    pub static CONFIG_APPLIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_config_applied_total",
            "Configurations from the control plane put in use, by form: full (the whole document) or delta (what changed).",
            &["form"]
        )
        .expect("register tokn_config_applied_total")
    });
    pub static HOT_STATE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_hot_state_errors_total",
            "Redis hot-state operations that failed, by operation (lookup, limits, spend, subscribe).",
            &["op"]
        )
        .expect("register tokn_hot_state_errors_total")
    });
    pub static HOT_STATE_STALE_KEYS: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "tokn_hot_state_stale_keys_total",
            "Key lookups answered from an expired cache entry because Redis could not be reached."
        )
        .expect("register tokn_hot_state_stale_keys_total")
    });
    pub static USAGE_UNBILLED: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "tokn_usage_unbilled_total",
            "Records of billed requests that could not be spooled (spool full): served, not billed."
        )
        .expect("register tokn_usage_unbilled_total")
    });
    pub static USAGE_SPOOL_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
        register_int_gauge!(
            "tokn_usage_spool_bytes",
            "Usage records spooled and not yet applied by the control plane, in bytes."
        )
        .expect("register tokn_usage_spool_bytes")
    });
    pub static USAGE_SHIPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_usage_shipped_total",
            "Usage records the control plane acknowledged, by result (applied, duplicate, refused).",
            &["result"]
        )
        .expect("register tokn_usage_shipped_total")
    });
    pub static USAGE_SHIP_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "tokn_usage_ship_errors_total",
            "Failed attempts to ship a usage batch (retried with back-off)."
        )
        .expect("register tokn_usage_ship_errors_total")
    });
    pub static USAGE_DRAIN_LAG: LazyLock<IntGauge> = LazyLock::new(|| {
        register_int_gauge!(
            "tokn_usage_drain_lag_ms",
            "Age of the oldest record in the last batch the control plane applied (0 when the spool is empty)."
        )
        .expect("register tokn_usage_drain_lag_ms")
    });
    pub static RESERVATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_reservations_total",
            "Reservation outcomes (reserved, reserved_ahead: served from stock taken ahead, insufficient_funds, pool_short, unavailable).",
            &["outcome"]
        )
        .expect("register tokn_reservations_total")
    });
    pub static SLOW_HEADERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "tokn_slow_headers_total",
            "Connections closed while sending a request header: past the header deadline (deadline), over the per-address cap on connections mid-header (per_ip_cap), or a header over the size limits, answered 431 (too_large).",
            &["reason"]
        )
        .expect("register tokn_slow_headers_total")
    });
    pub static CONFIG_VERSION: LazyLock<IntGauge> = LazyLock::new(|| {
        register_int_gauge!(
            "tokn_config_version",
            "Version of the configuration snapshot in use."
        )
        .expect("register tokn_config_version")
    });
}

pub use defs::{
    CONFIG_APPLIED, CONFIG_POOLS_SKIPPED, CONFIG_VERSION, CONTROL_SYNC_ERRORS, FAILOVERS,
    HOT_STATE_ERRORS, HOT_STATE_STALE_KEYS, RESERVATIONS, SLOW_HEADERS, STICKY, UPSTREAM_FAILURES,
    USAGE_DRAIN_LAG, USAGE_SHIPPED, USAGE_SHIP_ERRORS, USAGE_SPOOL_BYTES, USAGE_UNBILLED,
    USAGE_WRITE_ERRORS,
};

/// How a finished request spent its time (observed with microsecond precision; the usage
/// record keeps whole milliseconds).
pub struct Timing {
    /// Arrival to the last byte of the response.
    pub total: Duration,
    /// Arrival to the first streamed event.
    pub ttft: Option<Duration>,
    /// Waiting for upstreams' answers and chunks.
    pub upstream_wait: Duration,
}

/// Counts a finished request. `model_label` must be a catalog id or `"none"`.
pub fn observe(record: &UsageRecord<'_>, model_label: &str, timing: &Timing) {
    let provider = record.provider.unwrap_or("none");
    let class = match record.status {
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    defs::REQUESTS
        .with_label_values(&[model_label, provider, class, record.outcome])
        .inc();
    let stream = if record.stream { "true" } else { "false" };
    defs::LATENCY
        .with_label_values(&[model_label, stream])
        .observe(timing.total.as_secs_f64());
    defs::OVERHEAD
        .with_label_values(&[model_label, stream])
        .observe(
            timing
                .total
                .saturating_sub(timing.upstream_wait)
                .as_secs_f64(),
        );
    if let Some(ttft) = timing.ttft {
        defs::TTFT
            .with_label_values(&[model_label])
            .observe(ttft.as_secs_f64());
    }
    let u = &record.usage;
    for (kind, n) in [
        ("prompt", u.prompt_tokens),
        ("completion", u.completion_tokens),
        ("cached", u.cached_tokens),
        ("reasoning", u.reasoning_tokens),
    ] {
        if n > 0 {
            defs::TOKENS
                .with_label_values(&[model_label, kind])
                .inc_by(n);
        }
    }
    for (side, n) in [
        ("list", record.list_cost_micros),
        ("buyer", record.buyer_cost_micros),
    ] {
        if n > 0 {
            defs::COST.with_label_values(&[model_label, side]).inc_by(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{Usage, UsageSource};

    /// The shipped Grafana dashboard only queries metrics this proxy exports.
    #[test]
    fn the_dashboard_queries_exported_metrics_only() {
        let record = UsageRecord {
            request_id: "r",
            started_at_ms: 0,
            key_id: None,
            account: None,
            pool_id: None,
            seller: None,
            model: None,
            provider: Some("mock"),
            price_version: None,
            stream: true,
            status: 200,
            outcome: "ok",
            usage: Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
                cached_tokens: 1,
                cache_write_tokens: 0,
                cache_write_1h_tokens: 0,
                reasoning_tokens: 1,
            },
            usage_source: UsageSource::Reported,
            list_cost_micros: 1,
            buyer_cost_micros: 1,
            latency_ms: 1,
            ttft_ms: Some(1),
            upstream_attempts: 1,
            upstream_request_id: None,
            reservation: None,
        };
        let timing = Timing {
            total: Duration::from_micros(300),
            ttft: Some(Duration::from_micros(200)),
            upstream_wait: Duration::from_micros(100),
        };
        observe(&record, "mock", &timing);
        FAILOVERS.inc_by(0);
        STICKY.with_label_values(&["kept"]).inc_by(0);
        USAGE_WRITE_ERRORS.inc_by(0);
        UPSTREAM_FAILURES
            .with_label_values(&["mock", "test"])
            .inc_by(0);
        CONFIG_VERSION.set(1);
        let exported: Vec<String> = prometheus::gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();

        let dashboard = include_str!("../../deploy/grafana-dashboard.json");
        let mut queried = Vec::new();
        for (i, _) in dashboard.match_indices("tokn_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            queried.push(name.trim_end_matches("_bucket").to_owned());
        }
        queried.retain(|n| n != "tokn_");
        assert!(queried.len() >= 8, "{queried:?}");
        for name in queried {
            assert!(
                exported.contains(&name),
                "dashboard queries unknown metric {name}; exported: {exported:?}"
            );
        }
    }
}
