use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
pub use tokn_testkit::{Behavior, FakeUpstream, FakeUsage, ProxyProcess};

pub const KEY: &str = "tok_test_buyer_key_0001";
pub const LIMITED_KEY: &str = "tok_test_buyer_key_0002";

pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tokn-proxy"))
}

/// A catalog with `gpt-test` (upstream name `gpt-upstream`; $1/M in, $2/M out, $0.50/M cached)
/// served by `pools` in order, `mock`, and `paused-model` whose only pool is paused.
/// Each pool is `(id, base_url, seller_key)`.
pub fn config(pools: &[(&str, &str, &str)], limits: &str) -> String {
    let mut s = format!(
        r#"
[limits]
{limits}

[[models]]
id = "gpt-test"
provider = "openai"
upstream_model = "gpt-upstream"
input_price_micros_per_mtok = 1_000_000
output_price_micros_per_mtok = 2_000_000
cached_input_price_micros_per_mtok = 500_000

[[models]]
id = "paused-model"
provider = "openai"
input_price_micros_per_mtok = 1
output_price_micros_per_mtok = 1

[[models]]
id = "mock"
provider = "mock"
input_price_micros_per_mtok = 1_000_000
output_price_micros_per_mtok = 2_000_000

[[pools]]
id = "mock-pool"
provider = "mock"
models = ["mock"]
price_ratio = 0.6

[[pools]]
id = "paused"
provider = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "sk-paused"
models = ["paused-model"]
price_ratio = 0.6
status = "paused"

[[keys]]
id = "key-main"
account = "acct-1"
key = "env:TEST_BUYER_KEY"

[[keys]]
id = "key-limited"
account = "acct-2"
key = "{LIMITED_KEY}"
allowed_models = ["mock"]
"#
    );
    for (id, url, key) in pools {
        s.push_str(&format!(
            "\n[[pools]]\nid = \"{id}\"\nprovider = \"openai\"\nbase_url = \"{url}\"\napi_key = \"{key}\"\nmodels = [\"gpt-test\"]\nprice_ratio = 0.6\n"
        ));
    }
    s
}

pub fn start(name: &str, pools: &[(&str, &str, &str)], limits: &str) -> ProxyProcess {
    ProxyProcess::start(
        binary(),
        name,
        &config(pools, limits),
        &[("TEST_BUYER_KEY", KEY)],
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn chat_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hi"}], "stream": stream})
}

pub async fn post(proxy: &ProxyProcess, key: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}/chat/completions", proxy.base_url()))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// GETs `url` with one header and returns the JSON body.
pub async fn get_json(url: &str, header: (&str, &str)) -> Value {
    client()
        .get(url)
        .header(header.0, header.1)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Splits an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

pub fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-request-id"].to_str().unwrap().to_owned()
}

/// Asserts the OpenAI error shape and returns `error.code`.
pub fn assert_openai_error(body: &Value) -> String {
    let e = &body["error"];
    assert!(e["message"].is_string(), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    e["code"].as_str().unwrap_or_default().to_owned()
}

pub fn usage_of(record: &Value) -> FakeUsage {
    let u = &record["usage"];
    FakeUsage {
        prompt_tokens: u["prompt_tokens"].as_u64().unwrap(),
        completion_tokens: u["completion_tokens"].as_u64().unwrap(),
        cached_tokens: u["cached_tokens"].as_u64().unwrap(),
        reasoning_tokens: u["reasoning_tokens"].as_u64().unwrap(),
    }
}
