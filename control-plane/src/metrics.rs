//! Prometheus metrics of the control plane. Labels are route templates, methods and status
//! codes: never ids, accounts or tokens.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    Encoder, HistogramVec, IntCounter, IntCounterVec, IntGauge, TextEncoder,
};

macro_rules! metric {
    ($e:expr) => {
        // Registration fails only on a duplicate name, a programming error caught by tests.
        #[allow(clippy::expect_used)]
        $e.expect("metric registers once")
    };
}

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metric!(register_int_counter_vec!(
        "tokn_control_requests_total",
        "API requests by route template, method and status.",
        &["route", "method", "status"]
    ))
});

pub static LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    metric!(register_histogram_vec!(
        "tokn_control_request_duration_seconds",
        "API request latency by route template (watch requests include their wait).",
        &["route"]
    ))
});

pub static CONFIG_VERSION: LazyLock<IntGauge> = LazyLock::new(|| {
    metric!(register_int_gauge!(
        "tokn_control_config_version",
        "Version of the configuration this replica publishes to proxies."
    ))
});

pub static REDIS_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    metric!(register_int_counter!(
        "tokn_control_redis_errors_total",
        "Failed writes to Redis hot state (repaired by the periodic reconcile)."
    ))
});

pub static USAGE_APPLIED: LazyLock<IntCounter> = LazyLock::new(|| {
    metric!(register_int_counter!(
        "tokn_control_usage_applied_total",
        "Usage records applied to the ledger (once per request id)."
    ))
});

pub static USAGE_DUPLICATES: LazyLock<IntCounter> = LazyLock::new(|| {
    metric!(register_int_counter!(
        "tokn_control_usage_duplicates_total",
        "Usage records delivered again and skipped."
    ))
});

pub static DRAIN_LAG: LazyLock<prometheus::Gauge> = LazyLock::new(|| {
    metric!(prometheus::register_gauge!(
        "tokn_control_drain_lag_seconds",
        "In the last ingested batch, the longest time from a request's end to its ledger \
         transaction."
    ))
});

pub static STRIPE_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metric!(register_int_counter_vec!(
        "tokn_control_stripe_events_total",
        "Stripe webhook deliveries by result: applied, ignored (nothing to do), duplicate \
         (applied before), refused (bad signature or stale), malformed, failed (the store; \
         Stripe redelivers).",
        &["result"]
    ))
});

pub static PAYOUTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metric!(register_int_counter_vec!(
        "tokn_control_payouts_total",
        "Payout steps by result: created, sent, paid, waiting (the platform's Stripe balance \
         is short, or Stripe is unreachable), failed (refused: back to payable).",
        &["result"]
    ))
});

pub fn observe(method: &str, route: &str, status: u16, elapsed: Duration) {
    REQUESTS
        .with_label_values(&[route, method, &status.to_string()])
        .inc();
    LATENCY
        .with_label_values(&[route])
        .observe(elapsed.as_secs_f64());
}

pub async fn render() -> impl axum::response::IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::with_capacity(16 * 1024);
    let _ = encoder.encode(&prometheus::gather(), &mut body);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            encoder.format_type().to_owned(),
        )],
        body,
    )
}
