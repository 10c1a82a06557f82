use std::path::Path;
use std::process::Command;
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

/// The proxy's Prometheus exposition.
pub async fn metrics_text(proxy: &ProxyProcess) -> String {
    let resp = client().get(proxy.metrics_url()).send().await.unwrap();
    resp.text().await.unwrap()
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

/// The usage records of the requests `model` served (status 200), in order.
pub fn served_records(proxy: &ProxyProcess, model: &str) -> Vec<Value> {
    proxy
        .usage_records()
        .into_iter()
        .filter(|r| r["status"] == 200 && r["model"] == model)
        .collect()
}

/// Models, pools and anything else, plus the buyer key [`KEY`] (`key-main`, account `acct-1`).
pub fn start_with_buyer_key(name: &str, models_and_pools: &str) -> ProxyProcess {
    let toml = format!(
        "{models_and_pools}\n[[keys]]\nid = \"key-main\"\naccount = \"acct-1\"\nkey = \"env:TEST_BUYER_KEY\"\n"
    );
    ProxyProcess::start(binary(), name, &toml, &[("TEST_BUYER_KEY", KEY)])
}

/// Runs `script` with `args` on the venv `venv` (made once per target dir with `packages`) and
/// returns the JSON it prints.
async fn run_python(
    venv: &'static str,
    packages: &'static [&'static str],
    script: &'static str,
    args: Vec<String>,
) -> Value {
    let python = tokio::task::spawn_blocking(move || {
        tokn_testkit::python::venv_python(Path::new(env!("CARGO_TARGET_TMPDIR")), venv, packages)
    })
    .await
    .unwrap();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "sdk script failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Runs `script` with the official `openai` Python SDK.
pub async fn run_openai_sdk(script: &'static str, args: Vec<String>) -> Value {
    run_python("openai-sdk-venv", &["openai>=1.40"], script, args).await
}

/// Runs `script` with the official `anthropic` Python SDK.
pub async fn run_anthropic_sdk(script: &'static str, args: Vec<String>) -> Value {
    run_python("anthropic-sdk-venv", &["anthropic>=0.60"], script, args).await
}

/// The conformance matrix every provider adapter is held to, through the official SDK.
/// Arguments: base URL, buyer key, model, and the error cases as JSON
/// `{name: {"model": …, other create() arguments…}}`.
const SDK_MATRIX_SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
M = sys.argv[3]
hi = [{"role": "user", "content": "Say hi"}]
tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}]
out = {}

def stream(**kw):
    text, usage, calls, finish = "", None, {}, None
    for chunk in client.chat.completions.create(model=M, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(str(tc.index), {"id": "", "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                slot["name"] = tc.function.name or slot["name"]
                slot["arguments"] += tc.function.arguments or ""
    return {"text": text, "usage": usage, "tool_calls": calls, "finish_reason": finish}

def whole(**kw):
    r = client.chat.completions.create(model=M, **kw)
    m = r.choices[0].message
    return {"type": type(r).__name__, "text": m.content, "finish_reason": r.choices[0].finish_reason,
            "usage": r.usage.model_dump(),
            "tool_calls": [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments} for t in (m.tool_calls or [])]}

out["plain_text"] = whole(messages=hi)
out["streamed_text"] = stream(messages=hi)
out["tool_call"] = whole(messages=hi, tools=tools)
out["tool_call_stream"] = stream(messages=hi, tools=tools)
calls = out["tool_call"]["tool_calls"]
follow = hi + [{"role": "assistant", "content": None, "tool_calls": [
    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]}]
follow += [{"role": "tool", "tool_call_id": c["id"], "content": "result-" + c["name"]} for c in calls]
out["tool_result_turn"] = whole(messages=follow, tools=tools)
out["json_mode"] = whole(messages=hi, response_format={"type": "json_object"})
out["image_input"] = whole(messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
out["max_tokens_stop"] = whole(messages=hi, max_tokens=2)
errors = {}
for name, case in json.loads(sys.argv[4]).items():
    kw = dict(case)
    model = kw.pop("model")
    try:
        client.chat.completions.create(model=model, messages=hi, **kw)
        errors[name] = "no error"
    except openai.APIStatusError as e:
        errors[name] = {"class": type(e).__name__, "status": e.status_code, "code": e.code, "message": e.message}
out["errors"] = errors
print(json.dumps(out))
"#;

/// Runs the SDK conformance matrix on `model` through `proxy`; `error_cases` name requests
/// expected to fail (`{name: {"model": …, extra arguments…}}`), reported under `errors`.
pub async fn run_sdk_matrix(proxy: &ProxyProcess, model: &str, error_cases: Value) -> Value {
    run_openai_sdk(
        SDK_MATRIX_SCRIPT,
        vec![
            proxy.base_url(),
            KEY.to_owned(),
            model.to_owned(),
            error_cases.to_string(),
        ],
    )
    .await
}

/// Whether a matrix case reported these prompt, completion and cached tokens.
pub fn sdk_usage_is(case: &Value, u: &FakeUsage) -> bool {
    case["usage"]["prompt_tokens"] == u.prompt_tokens
        && case["usage"]["completion_tokens"] == u.completion_tokens
        && case["usage"]["prompt_tokens_details"]["cached_tokens"] == u.cached_tokens
}

/// A matrix case's tool calls in order (whole answers list them, streams key them by index).
pub fn sdk_tool_calls(calls: &Value) -> Vec<&Value> {
    match calls {
        Value::Array(a) => a.iter().collect(),
        Value::Object(m) => (0..m.len()).filter_map(|i| m.get(&i.to_string())).collect(),
        _ => Vec::new(),
    }
}

/// Whether the calls are `get_weather` (with `{"city": "Paris"}`) then `get_time`.
pub fn are_weather_then_time(calls: &Value) -> bool {
    let list = sdk_tool_calls(calls);
    let names: Vec<&str> = list.iter().filter_map(|c| c["name"].as_str()).collect();
    names == ["get_weather", "get_time"]
        && list
            .first()
            .and_then(|c| c["arguments"].as_str())
            .and_then(|a| serde_json::from_str::<Value>(a).ok())
            == Some(json!({"city": "Paris"}))
}

/// A brief chat request for `model` (system + user turn), with `extra` fields set on top.
pub fn brief_chat(model: &str, extra: Value) -> Value {
    let mut body = json!({"model": model,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// `get_weather` (city) and `get_time` (tz), as OpenAI tools.
pub fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
    ])
}

/// Posts a streamed request; returns the chunks (without `[DONE]`), whether `[DONE]` ended the
/// stream, and the request id.
pub async fn stream_chunks(proxy: &ProxyProcess, body: &Value) -> (Vec<Value>, bool, String) {
    let resp = post(proxy, KEY, body).await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let text = resp.text().await.unwrap();
    let data = sse_data(&text);
    let done = data.last().map(String::as_str) == Some("[DONE]");
    let chunks = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    (chunks, done, id)
}

/// The text a stream's chunks carry, in order.
pub fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}
