//! Price versions and per-key limits in a proxy run from its configuration file (in-process hot
//! state).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::common::*;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_billed_at_the_price_in_force_when_it_started() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let effective_at = now_ms() + 4_000;
    let body = format!(
        r#"
[[models]]
id = "priced"
provider = "openai"
upstream_model = "gpt-upstream"
input_price_micros_per_mtok = 1_000_000
output_price_micros_per_mtok = 2_000_000
cached_input_price_micros_per_mtok = 500_000
price_version = 1

[[models.scheduled_prices]]
version = 2
effective_at_ms = {effective_at}
input_price_micros_per_mtok = 10_000_000
output_price_micros_per_mtok = 20_000_000
cached_input_price_micros_per_mtok = 5_000_000

[[pools]]
id = "pool-priced"
provider = "openai"
base_url = "{}"
api_key = "sk-seller-priced"
models = ["priced"]
price_ratio = 1.0
seller = "seller-priced"

[[keys]]
id = "key-priced"
account = "acct-priced"
key = "{KEY}"
"#,
        fake.base_url()
    );
    let proxy = ProxyProcess::start(binary(), "pricing", &body, &[]);

    // Starts under version 1 and is still running when version 2 takes effect.
    let left = effective_at.saturating_sub(now_ms());
    assert!(left > 500, "the proxy took too long to start");
    fake.set_default(Behavior {
        ttft: Duration::from_millis(left + 300),
        ..Behavior::default()
    });
    let before = post(&proxy, KEY, &chat_body("priced", false)).await;
    assert_eq!(before.status(), 200);
    assert!(now_ms() > effective_at);
    let before_id = request_id(&before);
    fake.set_default(Behavior::default());
    let after = post(&proxy, KEY, &chat_body("priced", false)).await;
    assert_eq!(after.status(), 200);
    let after_id = request_id(&after);

    let rec = proxy.record_for(&before_id).unwrap();
    assert_eq!(rec["price_version"], 1);
    assert_eq!(rec["seller"], "seller-priced");
    // (17-3)×$1/M + 3×$0.50/M + 5×$2/M = 25.5 µ$ → 26.
    assert_eq!(rec["list_cost_micros"], 26);
    assert_eq!(rec["buyer_cost_micros"], 26);
    let rec = proxy.record_for(&after_id).unwrap();
    assert_eq!(rec["price_version"], 2);
    assert_eq!(rec["list_cost_micros"], 255);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_key_limits_answer_429_with_openai_codes() {
    let body = format!(
        r#"
[[models]]
id = "mock"
provider = "mock"
input_price_micros_per_mtok = 1_000_000
output_price_micros_per_mtok = 2_000_000

[[pools]]
id = "mock-pool"
provider = "mock"
models = ["mock"]
price_ratio = 1.0

[[keys]]
id = "key-rpm"
account = "acct"
key = "{KEY}"
requests_per_minute = 2

[[keys]]
id = "key-cap"
account = "acct"
key = "{LIMITED_KEY}"
spend_cap_micros = 1
"#
    );
    let proxy = ProxyProcess::start(binary(), "limits", &body, &[]);
    let second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second >= 55 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    for _ in 0..2 {
        assert_eq!(
            post(&proxy, KEY, &chat_body("mock", true)).await.status(),
            200
        );
    }
    let resp = post(&proxy, KEY, &chat_body("mock", true)).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let id = request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(assert_openai_error(&body), "rate_limit_exceeded");
    // Refused requests are recorded, never billed.
    let rec = proxy.record_for(&id).unwrap();
    assert_eq!(rec["status"], 429);
    assert_eq!(rec["outcome"], "rate_limit_exceeded");
    assert_eq!(rec["buyer_cost_micros"], 0);
    // The models list is not rate limited.
    let resp = client()
        .get(format!("{}/models", proxy.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    assert_eq!(
        post(&proxy, LIMITED_KEY, &chat_body("mock", false))
            .await
            .status(),
        200
    );
    let resp = post(&proxy, LIMITED_KEY, &chat_body("mock", false)).await;
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(assert_openai_error(&body), "insufficient_quota");
}
