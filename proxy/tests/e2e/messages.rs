//! Anthropic's Messages API inbound (`/v1/messages`, what Claude Code speaks): on the
//! pass-through lane to `anthropic` pools, and translated to chat for other pools. The official
//! Anthropic Python SDK drives the real proxy binary in front of the fake Messages API, which
//! refuses what Anthropic refuses (a thinking block whose signature was altered, a beta field
//! without its beta header, …), and the fake OpenAI API, which refuses a malformed chat body.

use serde_json::{json, Value};
use tokn_testkit::fake_anthropic::{
    thinking_signature, ANTHROPIC_REPLY, ANTHROPIC_THINKING, ANTHROPIC_VERSION_2026,
};
use tokn_testkit::{AnthropicBehavior, FakeAnthropic};

use crate::common::*;

const SELLER_KEY: &str = "sk-ant-seller-secret-0002";

/// `claude-test` (upstream `claude-upstream`) on one `anthropic` pool, and `gpt-test` (alias
/// `claude-gpt-test`, a name Claude Code lists) on an OpenAI pool (no Messages lane:
/// translated).
fn start_messages(name: &str, anthropic_url: &str, openai_url: &str) -> ProxyProcess {
    let toml = format!(
        r#"
[[models]]
id = "claude-test"
provider = "anthropic"
upstream_model = "claude-upstream"
input_price_micros_per_mtok = 3_000_000
output_price_micros_per_mtok = 15_000_000
cached_input_price_micros_per_mtok = 300_000
cache_write_price_micros_per_mtok = 3_750_000
cache_write_1h_price_micros_per_mtok = 6_000_000

[[models]]
id = "gpt-test"
aliases = ["claude-gpt-test"]
provider = "openai"
upstream_model = "gpt-upstream"
input_price_micros_per_mtok = 1_000_000
output_price_micros_per_mtok = 2_000_000

[[pools]]
id = "ant-a"
provider = "anthropic"
base_url = "{anthropic_url}"
api_key = "{SELLER_KEY}"
models = ["claude-test"]
price_ratio = 0.6

[[pools]]
id = "oai-a"
provider = "openai"
base_url = "{openai_url}"
api_key = "sk-openai-seller"
models = ["gpt-test"]
price_ratio = 0.6
"#
    );
    start_with_buyer_key(name, &toml)
}

/// Every case the Anthropic SDK runs, printed as one JSON object.
const SDK_SCRIPT: &str = r#"
import json, sys
import anthropic

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
hi = [{"role": "user", "content": "Say hi"}]
out = {}

m = client.messages.create(model=model, max_tokens=64, messages=hi,
    system=[{"type": "text", "text": "You are brief.", "cache_control": {"type": "ephemeral"}}])
out["plain"] = {"text": m.content[0].text, "usage": m.usage.model_dump(), "stop": m.stop_reason,
                "model": m.model}

with client.messages.stream(model=model, max_tokens=64, messages=hi) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
out["stream"] = {"text": text, "usage": final.usage.model_dump(), "stop": final.stop_reason}

tools = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
          "strict": True}]
ask = [{"role": "user", "content": "Weather in Paris?"}]
with client.messages.stream(model=model, max_tokens=256, messages=ask, tools=tools) as s:
    final = s.get_final_message()
calls = [b for b in final.content if b.type == "tool_use"]
out["tools"] = {"calls": [{"id": c.id, "name": c.name, "input": c.input} for c in calls],
                "stop": final.stop_reason}
answer = client.messages.create(model=model, max_tokens=256, tools=tools, messages=ask + [
    {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny"}]}])
out["tool_result"] = answer.content[0].text

think = {"type": "enabled", "budget_tokens": 2048}
with client.messages.stream(model=model, max_tokens=4096, thinking=think, messages=hi) as s:
    first = s.get_final_message()
second = client.messages.create(model=model, max_tokens=4096, thinking=think, messages=hi + [
    {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
    {"role": "user", "content": "And again?"}])
out["thinking"] = {"first": [b.type for b in first.content], "thinking": first.content[0].thinking,
                   "signature": first.content[0].signature,
                   "second": [b.type for b in second.content]}

beta = client.beta.messages.create(model=model, max_tokens=64, messages=hi,
    betas=["context-management-2025-06-27"],
    extra_body={"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}})
out["beta"] = beta.content[0].text

out["count_tokens"] = client.messages.count_tokens(model=model, messages=hi).input_tokens
out["models"] = [m.id for m in client.models.list()]

def error(call):
    try:
        call()
        return None
    except anthropic.APIStatusError as e:
        return {"status": e.status_code, "class": type(e).__name__, "body": e.body}

out["errors"] = {
    "wrong_key": error(lambda: anthropic.Anthropic(base_url=base, api_key="tok_wrong", max_retries=0)
                       .messages.create(model=model, max_tokens=8, messages=hi)),
    "unknown_model": error(lambda: client.messages.create(model="claude-nope", max_tokens=8, messages=hi)),
    "upstream_refusal": error(lambda: client.messages.create(model=model, max_tokens=8, messages=hi,
                                                             extra_body={"temperature": 0.5})),
}
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_passes_through_to_anthropic_pools() {
    let fake = FakeAnthropic::start(AnthropicBehavior {
        tool_calls: vec![("get_weather".into(), json!({"city": "Paris"}))],
        ..AnthropicBehavior::default()
    })
    .await
    .unwrap();
    let openai = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start_messages("messages-sdk", &fake.base_url(), &openai.base_url());
    let base = format!("http://127.0.0.1:{}", proxy.port);
    let out = run_anthropic_sdk(
        SDK_SCRIPT,
        vec![base, KEY.to_owned(), "claude-test".to_owned()],
    )
    .await;

    // The answers are Anthropic's own, usage included (cache writes and reads as they came).
    let usage = AnthropicBehavior::default().usage;
    let plain = &out["plain"];
    assert_eq!(plain["text"], ANTHROPIC_REPLY, "{out}");
    assert_eq!(plain["stop"], "end_turn");
    assert_eq!(plain["model"], "claude-upstream");
    assert_eq!(plain["usage"]["input_tokens"], usage.input_tokens);
    assert_eq!(plain["usage"]["output_tokens"], usage.output_tokens);
    assert_eq!(
        plain["usage"]["cache_creation_input_tokens"],
        usage.cache_creation_input_tokens
    );
    assert_eq!(
        plain["usage"]["cache_read_input_tokens"],
        usage.cache_read_input_tokens
    );
    assert_eq!(out["stream"]["text"], ANTHROPIC_REPLY, "{out}");
    assert_eq!(out["stream"]["usage"]["output_tokens"], usage.output_tokens);
    assert_eq!(out["stream"]["usage"]["input_tokens"], usage.input_tokens);
    assert_eq!(
        out["tools"]["calls"][0]["input"],
        json!({"city": "Paris"}),
        "streamed tool input: {out}"
    );
    assert_eq!(out["tools"]["stop"], "tool_use");
    assert_eq!(out["tool_result"], "Tool results: sunny.");
    // A streamed thinking block with its signature, sent back in the next turn and accepted.
    let thinking = &out["thinking"];
    assert_eq!(thinking["first"], json!(["thinking", "text"]), "{out}");
    assert_eq!(thinking["thinking"], ANTHROPIC_THINKING);
    assert_eq!(
        thinking["signature"],
        thinking_signature(ANTHROPIC_THINKING)
    );
    assert_eq!(thinking["second"], json!(["thinking", "text"]));
    assert_eq!(out["beta"], ANTHROPIC_REPLY, "{out}");
    assert_eq!(out["count_tokens"], usage.input_tokens);
    // Listed under the names Claude Code accepts: `gpt-test` by its alias.
    assert_eq!(
        out["models"],
        json!(["claude-test", "claude-gpt-test"]),
        "{out}"
    );

    // Errors: the gateway's own in Anthropic's shape, the upstream's as it sent it.
    let errors = &out["errors"];
    let kind = |case: &str| errors[case]["body"]["error"]["type"].clone();
    assert_eq!(errors["wrong_key"]["status"], 401, "{out}");
    assert_eq!(errors["wrong_key"]["class"], "AuthenticationError");
    assert_eq!(kind("wrong_key"), "authentication_error");
    assert_eq!(errors["unknown_model"]["status"], 404);
    assert_eq!(kind("unknown_model"), "not_found_error");
    let refused = &errors["upstream_refusal"];
    assert_eq!(refused["status"], 400, "{out}");
    // (The SDK sends `anthropic-version: 2026-10-21`, under which `temperature` is refused.)
    assert_eq!(
        refused["body"],
        json!({"type": "error", "error": {"type": "invalid_request_error",
            "message": "temperature: not supported with anthropic-version 2026-10-21"},
            "request_id": "req_fake_anthropic"}),
        "the upstream's error, unmodified"
    );

    // What reached the upstream: the client's body with the upstream's model name, its
    // `cache_control`, its beta header verbatim, the pool's key, nothing of the buyer's.
    let received = fake.received();
    let first = &received[0];
    assert_eq!(first.path, "/v1/messages");
    assert_eq!(first.body["model"], "claude-upstream");
    assert_eq!(
        first.body["system"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
    assert_eq!(first.headers["x-api-key"], SELLER_KEY);
    assert_eq!(first.headers["anthropic-version"], ANTHROPIC_VERSION_2026);
    assert!(!first.headers.contains_key("authorization"));
    let beta = received
        .iter()
        .find(|r| r.body.get("context_management").is_some())
        .expect("the beta call reached the upstream");
    assert_eq!(
        beta.headers["anthropic-beta"],
        "context-management-2025-06-27"
    );
    assert!(received
        .iter()
        .any(|r| r.path == "/v1/messages/count_tokens" && r.body["model"] == "claude-upstream"));
    assert!(
        openai.received().is_empty(),
        "no Messages call went to chat"
    );

    // Every served call is one usage record, billed from Anthropic's usage (input + cache
    // writes + cache reads as the prompt, reads as cached); counting tokens costs nothing.
    let served = served_records(&proxy, "claude-test");
    assert_eq!(served.len(), 8, "{served:?}");
    let plain_record = &served[0];
    assert_eq!(plain_record["model"], "claude-test");
    assert_eq!(plain_record["pool_id"], "ant-a");
    assert_eq!(
        plain_record["usage"]["prompt_tokens"],
        usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
    );
    assert_eq!(
        plain_record["usage"]["completion_tokens"],
        usage.output_tokens
    );
    assert_eq!(
        plain_record["usage"]["cached_tokens"],
        usage.cache_read_input_tokens
    );
    assert_eq!(
        plain_record["usage"]["cache_write_tokens"],
        usage.cache_creation_input_tokens
    );
    // Each part of the prompt at its own price: writes at 1.25× input, reads at 0.1×.
    let exact_pico = usage.input_tokens * 3_000_000
        + usage.cache_creation_input_tokens * 3_750_000
        + usage.cache_read_input_tokens * 300_000
        + usage.output_tokens * 15_000_000;
    assert_eq!(
        plain_record["list_cost_micros"],
        exact_pico.div_ceil(1_000_000),
        "{plain_record}"
    );
    assert_eq!(plain_record["usage_source"], "reported");
    assert_eq!(plain_record["upstream_request_id"], "req_fake_anthropic");
    assert!(plain_record["buyer_cost_micros"].as_u64().unwrap() > 0);
    let counted = served.last().unwrap();
    assert_eq!(counted["buyer_cost_micros"], 0, "{counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_messages_surface_speaks_anthropic_on_the_wire() {
    let fake = FakeAnthropic::start(AnthropicBehavior::default())
        .await
        .unwrap();
    let openai = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start_messages("messages-wire", &fake.base_url(), &openai.base_url());
    let root = format!("http://127.0.0.1:{}", proxy.port);
    let http = client();

    // Claude Code checks the base URL with `HEAD /`.
    let head = http.head(&root).send().await.unwrap();
    assert_eq!(head.status(), 200);

    // OpenAI's clients see catalog ids only; an alias resolves to its model.
    let get = |path: &str| {
        let req = http.get(format!("{root}{path}")).bearer_auth(KEY);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let listed = get("/v1/models").await;
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["claude-test", "gpt-test"]);
    let aliased = get("/v1/models/claude-gpt-test").await;
    assert_eq!(aliased["id"], "gpt-test");

    // A stream relays Anthropic's events as they are, `event:` names included, with the
    // query Claude Code adds (`?beta=true`) and the key as `x-api-key`.
    let resp = http
        .post(format!("{root}/v1/messages?beta=true"))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(
            &json!({"model": "claude-test", "max_tokens": 64, "stream": true,
            "messages": [{"role": "user", "content": "Say hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"message_start"), "{text}");
    assert_eq!(names.last(), Some(&"message_stop"), "{text}");
    assert!(names.contains(&"ping") && names.contains(&"content_block_delta"));
    assert_eq!(names.iter().filter(|n| **n == "message_delta").count(), 2);

    // Bad input is refused at the edge in Anthropic's error shape, and reaches no pool.
    let before = fake.received().len();
    for (body, why) in [
        ("{not json", "malformed JSON"),
        (r#"{"model":"claude-test","max_tokens":8}"#, "no messages"),
        (
            r#"{"model":7,"max_tokens":8,"messages":[]}"#,
            "a model that is not a string",
        ),
        (
            r#"{"model":"claude-test","max_tokens":"8","messages":[]}"#,
            "max_tokens of the wrong type",
        ),
        (
            r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"\ud800"}]}"#,
            "a lone surrogate",
        ),
    ] {
        let resp = http
            .post(format!("{root}/v1/messages"))
            .header("x-api-key", KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{why}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["type"], "error", "{why}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{why}");
        assert!(error["error"]["message"].is_string(), "{why}");
    }
    let resp = http
        .post(format!("{root}/v1/messages"))
        .json(&json!({"model": "claude-test", "max_tokens": 8, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["type"], "authentication_error", "{error}");
    assert_eq!(
        fake.received().len(),
        before,
        "nothing refused reached the upstream"
    );
}

/// The SDK against a model whose pools speak chat only: the translation lane.
const TRANSLATED_SCRIPT: &str = r#"
import json, sys
import anthropic

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
hi = [{"role": "user", "content": "Say hi"}]
out = {}
m = client.messages.create(model=model, max_tokens=64, messages=hi,
    system=[{"type": "text", "text": "You are brief.", "cache_control": {"type": "ephemeral"}}])
out["plain"] = {"text": m.content[0].text, "types": [b.type for b in m.content],
                "usage": m.usage.model_dump(), "stop": m.stop_reason, "model": m.model}
with client.messages.stream(model=model, max_tokens=64, messages=hi) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
out["stream"] = {"text": text, "usage": final.usage.model_dump(), "stop": final.stop_reason}
tools = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
ask = [{"role": "user", "content": "Weather in Paris?"}]
with client.messages.stream(model=model, max_tokens=256, messages=ask, tools=tools) as s:
    final = s.get_final_message()
calls = [b for b in final.content if b.type == "tool_use"]
out["tools"] = {"calls": [{"id": c.id, "name": c.name, "input": c.input} for c in calls],
                "stop": final.stop_reason}
answer = client.messages.create(model=model, max_tokens=256, tools=tools, messages=ask + [
    {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny"}]}])
out["tool_result"] = answer.content[0].text
out["count_tokens"] = client.messages.count_tokens(model=model, messages=hi).input_tokens
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_reaches_chat_pools_through_translation() {
    let fake = FakeAnthropic::start(AnthropicBehavior::default())
        .await
        .unwrap();
    let openai = FakeUpstream::start(Behavior {
        tool_calls: vec![("get_weather".into(), json!({"city": "Paris"}))],
        ..Behavior::default()
    })
    .await
    .unwrap();
    let proxy = start_messages("messages-translated", &fake.base_url(), &openai.base_url());
    let base = format!("http://127.0.0.1:{}", proxy.port);
    let out = run_anthropic_sdk(
        TRANSLATED_SCRIPT,
        vec![base, KEY.to_owned(), "claude-gpt-test".to_owned()],
    )
    .await;
    let usage = Behavior::default().usage;
    let plain = &out["plain"];
    assert_eq!(plain["types"], json!(["text"]), "{out}");
    assert!(!plain["text"].as_str().unwrap().is_empty());
    assert_eq!(plain["stop"], "end_turn");
    assert_eq!(plain["model"], "gpt-test");
    assert_eq!(
        plain["usage"]["input_tokens"],
        usage.prompt_tokens - usage.cached_tokens
    );
    assert_eq!(
        plain["usage"]["cache_read_input_tokens"],
        usage.cached_tokens
    );
    assert_eq!(plain["usage"]["output_tokens"], usage.completion_tokens);
    assert_eq!(out["stream"]["text"], plain["text"], "{out}");
    assert_eq!(out["stream"]["usage"], plain["usage"]);
    assert_eq!(out["stream"]["stop"], "end_turn");
    assert_eq!(
        out["tools"]["calls"],
        json!([{"id": "call_fake1", "name": "get_weather", "input": {"city": "Paris"}}]),
        "streamed tool input: {out}"
    );
    assert_eq!(out["tools"]["stop"], "tool_use");
    assert_eq!(out["tool_result"], "Tool results: sunny.");
    assert!(out["count_tokens"].as_u64().unwrap() > 0);

    // The chat pool got chat: the system prompt as a system message, the tool round trip as
    // `tool_calls` and a `tool` message; nothing reached the Anthropic pool.
    let received = openai.received();
    assert_eq!(received[0].body["model"], "gpt-upstream");
    assert_eq!(
        received[0].body["messages"][0],
        json!({"role": "system", "content": "You are brief."})
    );
    let round_trip = &received.last().unwrap().body["messages"];
    assert_eq!(round_trip[1]["tool_calls"][0]["id"], "call_fake1");
    assert_eq!(
        round_trip[2],
        json!({"role": "tool", "tool_call_id": "call_fake1", "content": "sunny"})
    );
    assert!(fake.received().is_empty());

    // Billed from the chat usage, like chat, under the model the alias names; counting tokens
    // is answered here and free.
    let served = served_records(&proxy, "gpt-test");
    assert_eq!(served.len(), 5, "{served:?}");
    assert_eq!(served[0]["pool_id"], "oai-a");
    assert_eq!(
        served[0]["usage"]["completion_tokens"],
        usage.completion_tokens
    );
    assert!(served[0]["buyer_cost_micros"].as_u64().unwrap() > 0);
    assert_eq!(served[4]["buyer_cost_micros"], 0);
}

/// Claude on a Bedrock pool: the same SDK calls reach InvokeModel with Bedrock's envelope.
const BEDROCK_SCRIPT: &str = r#"
import json, sys
import anthropic

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
hi = [{"role": "user", "content": "Say hi"}]
out = {}
m = client.messages.create(model=model, max_tokens=64, messages=hi,
    system=[{"type": "text", "text": "You are brief.", "cache_control": {"type": "ephemeral"}}])
out["plain"] = {"text": m.content[0].text, "usage": m.usage.model_dump(), "stop": m.stop_reason}
tools = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
ask = [{"role": "user", "content": "Weather in Paris?"}]
with client.messages.stream(model=model, max_tokens=256, messages=ask, tools=tools) as s:
    final = s.get_final_message()
out["tools"] = {"calls": [{"name": b.name, "input": b.input} for b in final.content if b.type == "tool_use"],
                "usage": final.usage.model_dump(), "stop": final.stop_reason}
think = {"type": "enabled", "budget_tokens": 2048}
with client.messages.stream(model=model, max_tokens=4096, thinking=think, messages=hi) as s:
    first = s.get_final_message()
second = client.beta.messages.create(model=model, max_tokens=4096, thinking=think,
    betas=["context-management-2025-06-27"],
    extra_body={"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}},
    messages=hi + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                   {"role": "user", "content": "And again?"}])
out["thinking"] = {"first": [b.type for b in first.content], "signature": first.content[0].signature,
                   "second": [b.type for b in second.content]}
out["count_tokens"] = client.messages.count_tokens(model=model, messages=hi).input_tokens
try:
    client.messages.create(model=model, max_tokens=8, messages=hi, extra_body={"temperature": 1.5})
    out["refused"] = None
except anthropic.APIStatusError as e:
    out["refused"] = {"status": e.status_code, "body": e.body}
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_on_bedrock_takes_the_messages_lane_through_invoke_model() {
    const KEY_ID: &str = "AKIDEXAMPLEMSG000001";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYsecretM01";
    const MODEL_ID: &str = "us.anthropic.claude-sonnet-4-5-20250929-v1:0";
    let fake = tokn_testkit::FakeBedrock::start(
        "us-east-1",
        tokn_testkit::BedrockBehavior {
            tool_calls: vec![("get_weather".into(), json!({"city": "Paris"}))],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    fake.add_aws_key(KEY_ID, SECRET, None);
    let toml = format!(
        r#"
[[models]]
id = "claude-bedrock"
provider = "bedrock"
upstream_model = "{MODEL_ID}"
input_price_micros_per_mtok = 3_000_000
output_price_micros_per_mtok = 15_000_000
cached_input_price_micros_per_mtok = 300_000

[[pools]]
id = "br-claude"
provider = "bedrock"
base_url = "{}"
region = "us-east-1"
access_key_id = "{KEY_ID}"
secret_access_key = "{SECRET}"
models = ["claude-bedrock"]
price_ratio = 0.6
"#,
        fake.base_url()
    );
    let proxy = start_with_buyer_key("messages-bedrock", &toml);
    let base = format!("http://127.0.0.1:{}", proxy.port);
    let out = run_anthropic_sdk(
        BEDROCK_SCRIPT,
        vec![base, KEY.to_owned(), "claude-bedrock".to_owned()],
    )
    .await;

    let usage = AnthropicBehavior::default().usage;
    assert_eq!(out["plain"]["text"], ANTHROPIC_REPLY, "{out}");
    assert_eq!(out["plain"]["usage"]["input_tokens"], usage.input_tokens);
    assert_eq!(
        out["plain"]["usage"]["cache_read_input_tokens"],
        usage.cache_read_input_tokens
    );
    assert_eq!(
        out["tools"]["calls"],
        json!([{"name": "get_weather", "input": {"city": "Paris"}}]),
        "{out}"
    );
    assert_eq!(out["tools"]["usage"]["output_tokens"], usage.output_tokens);
    assert_eq!(
        out["thinking"]["first"],
        json!(["thinking", "text"]),
        "{out}"
    );
    assert_eq!(
        out["thinking"]["signature"],
        thinking_signature(ANTHROPIC_THINKING)
    );
    assert_eq!(out["thinking"]["second"], json!(["thinking", "text"]));
    assert!(out["count_tokens"].as_u64().unwrap() > 0);
    // Bedrock's refusal in Anthropic's shape, its words unchanged.
    assert_eq!(
        out["refused"],
        json!({"status": 400, "body": {"type": "error", "error": {
            "type": "invalid_request_error", "message": "temperature: range: 0..1"}}}),
        "{out}"
    );

    // What Bedrock got: InvokeModel on the model's path, the Messages body in Bedrock's
    // envelope, the beta header as `anthropic_beta`, `cache_control` kept.
    let received = fake.received();
    let first = &received[0];
    assert_eq!(
        first.path,
        "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    );
    assert_eq!(first.body["anthropic_version"], "bedrock-2023-05-31");
    assert!(first.body.get("model").is_none() && first.body.get("stream").is_none());
    assert_eq!(
        first.body["system"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
    assert!(received[1].path.ends_with("/invoke-with-response-stream"));
    let beta = received
        .iter()
        .find(|r| r.body.get("context_management").is_some())
        .expect("the beta call reached Bedrock");
    assert_eq!(
        beta.body["anthropic_beta"],
        json!(["context-management-2025-06-27"])
    );
    assert!(!beta.headers.contains_key("anthropic-beta"));

    // Billed from Claude's usage on each lane call; counting was estimated here, free.
    let served = served_records(&proxy, "claude-bedrock");
    assert_eq!(served.len(), 5, "{served:?}");
    assert_eq!(served[0]["pool_id"], "br-claude");
    assert_eq!(
        served[0]["usage"]["prompt_tokens"],
        usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
    );
    assert!(served[1]["buyer_cost_micros"].as_u64().unwrap() > 0);
    assert_eq!(served[4]["buyer_cost_micros"], 0);
}

/// Claude on a Vertex pool: the same SDK calls reach `rawPredict` / `streamRawPredict` with
/// Vertex's envelope, the token minted from the pool's service account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_on_vertex_takes_the_messages_lane_through_raw_predict() {
    const MODEL_ID: &str = "claude-sonnet-4-5@20250929";
    let fake = tokn_testkit::FakeGoogle::start(Default::default())
        .await
        .unwrap();
    let sa = fake.service_account("tokn-claude");
    let toml = format!(
        r#"
[[models]]
id = "claude-vertex"
provider = "vertex"
upstream_model = "{MODEL_ID}"
input_price_micros_per_mtok = 3_000_000
output_price_micros_per_mtok = 15_000_000
cached_input_price_micros_per_mtok = 300_000

[[pools]]
id = "vx-claude"
provider = "vertex"
service_account_json = "env:TEST_VERTEX_SA"
location = "us-east5"
base_url = "{}"
models = ["claude-vertex"]
price_ratio = 0.6

[[keys]]
id = "key-main"
account = "acct-1"
key = "env:TEST_BUYER_KEY"
"#,
        fake.base_url()
    );
    let proxy = ProxyProcess::start(
        binary(),
        "messages-vertex",
        &toml,
        &[("TEST_BUYER_KEY", KEY), ("TEST_VERTEX_SA", &sa.json)],
    );
    let base = format!("http://127.0.0.1:{}", proxy.port);
    let out = run_anthropic_sdk(
        BEDROCK_SCRIPT,
        vec![base, KEY.to_owned(), "claude-vertex".to_owned()],
    )
    .await;

    let usage = AnthropicBehavior::default().usage;
    assert_eq!(out["plain"]["text"], ANTHROPIC_REPLY, "{out}");
    assert_eq!(
        out["plain"]["usage"]["cache_read_input_tokens"],
        usage.cache_read_input_tokens
    );
    assert_eq!(
        out["thinking"]["first"],
        json!(["thinking", "text"]),
        "{out}"
    );
    assert_eq!(out["thinking"]["second"], json!(["thinking", "text"]));
    assert_eq!(
        out["tools"]["stop"], "end_turn",
        "no tool calls configured: {out}"
    );
    // Claude's own refusal, relayed as Vertex relays it (Anthropic's shape).
    assert_eq!(
        out["refused"],
        json!({"status": 400, "body": {"type": "error", "error": {
            "type": "invalid_request_error", "message": "temperature: range: 0..1"},
            "request_id": "req_fake_anthropic"}}),
        "{out}"
    );

    let received = fake.received();
    let first = &received[0];
    assert_eq!(
        first.path,
        "/v1/projects/tokn-claude/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
    );
    assert!(first.headers["authorization"].starts_with("Bearer ya29."));
    assert_eq!(first.body["anthropic_version"], "vertex-2023-10-16");
    assert!(first.body.get("model").is_none());
    assert!(received[1].path.ends_with(":streamRawPredict"));
    assert_eq!(received[1].body["stream"], true);
    let beta = received
        .iter()
        .find(|r| r.body.get("context_management").is_some())
        .expect("the beta call reached Vertex");
    assert_eq!(
        beta.headers["anthropic-beta"],
        "context-management-2025-06-27"
    );

    let served = served_records(&proxy, "claude-vertex");
    assert_eq!(served.len(), 5, "{served:?}");
    assert_eq!(served[0]["pool_id"], "vx-claude");
    assert!(served[0]["buyer_cost_micros"].as_u64().unwrap() > 0);
}

/// A request in the shape Claude Code sends (captured field by field: its betas, `?beta=true`,
/// the session header, cache breakpoints with a TTL on system, tool and tool-result blocks,
/// adaptive thinking, a signed thinking block before a tool call, `metadata.user_id`,
/// `context_management`) reaches an Anthropic pool with nothing dropped or rewritten but the
/// model's name, and its stream comes back event for event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_code_request_replays_through_the_pass_through_lane_intact() {
    let fake = FakeAnthropic::start(AnthropicBehavior::default())
        .await
        .unwrap();
    let openai = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start_messages("messages-replay", &fake.base_url(), &openai.base_url());
    let thought = "The bug is in main; read it first.";
    let body = json!({
        "model": "claude-test",
        "max_tokens": 32000,
        "stream": true,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.200; cc_entrypoint=cli"},
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral", "ttl": "1h"}}
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>cwd: /work</system-reminder>"},
                {"type": "text", "text": "Fix the bug in main.rs", "cache_control": {"type": "ephemeral"}}
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": thought, "signature": thinking_signature(thought)},
                {"type": "tool_use", "id": "toolu_01A", "name": "Read",
                 "input": {"file_path": "/work/src/main.rs"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "fn main() { panic!() }",
                 "cache_control": {"type": "ephemeral"}}
            ]}
        ],
        "tools": [
            {"name": "Read", "description": "Reads a file from the local filesystem.",
             "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}},
                              "required": ["file_path"], "additionalProperties": false,
                              "$schema": "http://json-schema.org/draft-07/schema#"},
             "cache_control": {"type": "ephemeral"}}
        ],
        "metadata": {"user_id": "user_5f3a_account_9b1c_session_4e7d"},
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
    });
    let betas = "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,prompt-caching-scope-2026-01-05";
    let resp = client()
        .post(format!(
            "http://127.0.0.1:{}/v1/messages?beta=true",
            proxy.port
        ))
        .bearer_auth(KEY)
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", betas)
        .header(
            "x-claude-code-session-id",
            "4e7d0a52-1c1f-4c39-9f55-0d3c6d1f2b11",
        )
        .header("user-agent", "claude-cli/2.1.200 (external, cli)")
        .header("x-app", "cli")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = resp.text().await.unwrap();

    let received = fake.received();
    assert_eq!(received.len(), 1);
    let upstream = &received[0];
    let mut expected = body.clone();
    expected["model"] = json!("claude-upstream");
    assert_eq!(upstream.body, expected, "only the model's name may change");
    assert_eq!(upstream.headers["anthropic-beta"], betas);
    assert_eq!(upstream.headers["anthropic-version"], "2023-06-01");
    assert_eq!(upstream.headers["x-api-key"], SELLER_KEY);
    assert_eq!(upstream.path, "/v1/messages");
    assert!(!upstream.headers.contains_key("authorization"));

    // The stream, event for event: a thinking block (streamed with its signature), the text,
    // the usage, the end.
    let names: Vec<&str> = events
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"message_start"), "{events}");
    assert_eq!(names.last(), Some(&"message_stop"));
    assert!(events.contains(r#""type":"signature_delta""#), "{events}");
    assert!(events.contains(&thinking_signature(ANTHROPIC_THINKING)));

    // Its breakpoints ask for the 1-hour cache: the writes are billed at that price (2× input),
    // not the 5-minute one.
    let usage = AnthropicBehavior::default().usage;
    let record = served_records(&proxy, "claude-test").pop().unwrap();
    assert_eq!(
        record["usage"]["cache_write_1h_tokens"], usage.cache_creation_input_tokens,
        "{record}"
    );
    let output = record["usage"]["completion_tokens"].as_u64().unwrap();
    let exact_pico = usage.input_tokens * 3_000_000
        + usage.cache_creation_input_tokens * 6_000_000
        + usage.cache_read_input_tokens * 300_000
        + output * 15_000_000;
    assert_eq!(
        record["list_cost_micros"],
        exact_pico.div_ceil(1_000_000),
        "{record}"
    );
}
