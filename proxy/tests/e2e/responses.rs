//! OpenAI's Responses API inbound (`/v1/responses`, what Codex CLI and the Agents SDK speak): on
//! the pass-through lane to OpenAI pools, and translated to chat for other pools. The official
//! OpenAI Python SDK drives the real proxy binary in front of the fake OpenAI API, which
//! validates Responses bodies as the API does, and the fake Anthropic API.

use serde_json::json;
use tokn_testkit::{AnthropicBehavior, FakeAnthropic};

use crate::common::*;

const SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
out = {}
r = client.responses.create(model="gpt-test", input="Say hi", store=False,
                            reasoning={"effort": "low"}, include=["reasoning.encrypted_content"])
out["plain"] = {"text": r.output_text, "usage": r.usage.model_dump(), "status": r.status}
text = ""
with client.responses.stream(model="gpt-test", instructions="Be brief.",
                             input=[{"role": "user", "content": "Say hi"}]) as s:
    for event in s:
        if event.type == "response.output_text.delta":
            text += event.delta
    final = s.get_final_response()
out["stream"] = {"text": text, "final": final.output_text, "usage": final.usage.model_dump()}
tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
         {"type": "custom", "name": "apply_patch", "description": "Apply a patch to files"}]
ask = [{"role": "user", "content": "Weather in Paris?"}]
r = client.responses.create(model="gpt-test", input=ask, tools=tools, store=False)
calls = [o for o in r.output if o.type == "function_call"]
out["tools"] = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]
r = client.responses.create(model="gpt-test", tools=tools, store=False, input=ask + [
    {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
     "arguments": calls[0].arguments},
    {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
out["tool_result"] = r.output_text

def error(call):
    try:
        call()
        return None
    except openai.APIStatusError as e:
        return {"status": e.status_code, "body": e.body}

out["errors"] = {
    "previous_response_id": error(lambda: client.responses.create(
        model="gpt-test", input="hi", previous_response_id="resp_abc")),
}
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdks_responses_api_passes_through_to_openai_pools() {
    let openai = FakeUpstream::start(Behavior {
        tool_calls: vec![("get_weather".into(), json!({"city": "Paris"}))],
        ..Behavior::default()
    })
    .await
    .unwrap();
    let anthropic = FakeAnthropic::start(AnthropicBehavior::default())
        .await
        .unwrap();
    let toml = format!(
        r#"
[[models]]
id = "gpt-test"
provider = "openai"
upstream_model = "gpt-upstream"
input_price_micros_per_mtok = 1_000_000
output_price_micros_per_mtok = 2_000_000
cached_input_price_micros_per_mtok = 500_000

[[models]]
id = "claude-test"
provider = "anthropic"
upstream_model = "claude-upstream"
input_price_micros_per_mtok = 3_000_000
output_price_micros_per_mtok = 15_000_000

[[pools]]
id = "oai-a"
provider = "openai"
base_url = "{}"
api_key = "sk-openai-seller"
models = ["gpt-test"]
price_ratio = 0.6

[[pools]]
id = "ant-a"
provider = "anthropic"
base_url = "{}"
api_key = "sk-ant-seller"
models = ["claude-test"]
price_ratio = 0.6
"#,
        openai.base_url(),
        anthropic.base_url()
    );
    let proxy = start_with_buyer_key("responses-sdk", &toml);
    let out = run_openai_sdk(SCRIPT, vec![proxy.base_url(), KEY.to_owned()]).await;

    let usage = Behavior::default().usage;
    let plain = &out["plain"];
    assert_eq!(plain["status"], "completed", "{out}");
    assert!(!plain["text"].as_str().unwrap().is_empty());
    assert_eq!(plain["usage"]["input_tokens"], usage.prompt_tokens);
    assert_eq!(plain["usage"]["output_tokens"], usage.completion_tokens);
    assert_eq!(
        plain["usage"]["input_tokens_details"]["cached_tokens"],
        usage.cached_tokens
    );
    assert_eq!(out["stream"]["text"], plain["text"], "{out}");
    assert_eq!(out["stream"]["final"], plain["text"]);
    assert_eq!(out["stream"]["usage"], plain["usage"]);
    assert_eq!(
        out["tools"],
        json!([{"name": "get_weather", "arguments": {"city": "Paris"}}]),
        "{out}"
    );
    assert_eq!(out["tool_result"], "Tool results: sunny.");
    let errors = &out["errors"];
    assert_eq!(errors["previous_response_id"]["status"], 400, "{out}");
    assert_eq!(
        errors["previous_response_id"]["body"]["param"],
        "previous_response_id"
    );

    // The upstream got the client's body with the model renamed: the custom tool, reasoning,
    // `include` and `store: false` as sent.
    let received = openai.received();
    let first = &received[0];
    assert_eq!(first.path, "/v1/responses");
    assert_eq!(first.body["model"], "gpt-upstream");
    assert_eq!(first.body["store"], false);
    assert_eq!(
        first.body["include"],
        json!(["reasoning.encrypted_content"])
    );
    assert_eq!(first.body["reasoning"], json!({"effort": "low"}));
    let with_tools = &received[2].body;
    assert_eq!(with_tools["tools"][1]["type"], "custom");
    assert_eq!(with_tools["tools"][1]["name"], "apply_patch");
    assert!(anthropic.received().is_empty());

    // Metered and billed like chat.
    let served = served_records(&proxy, "gpt-test");
    assert_eq!(served.len(), 4, "{served:?}");
    assert_eq!(served[1]["stream"], true);
    assert_eq!(served[1]["usage_source"], "reported");
    assert_eq!(
        served[1]["usage"]["completion_tokens"],
        usage.completion_tokens
    );
    assert!(served[0]["buyer_cost_micros"].as_u64().unwrap() > 0);
}

const TRANSLATED_SCRIPT: &str = r#"
import json, sys
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
out = {}
r = client.responses.create(model="claude-test", instructions="Be brief.", input="Say hi", store=False,
                            reasoning={"effort": "low"}, include=["reasoning.encrypted_content"])
out["plain"] = {"text": r.output_text, "usage": r.usage.model_dump(), "status": r.status, "model": r.model}
text, kinds = "", []
with client.responses.stream(model="claude-test", input=[{"role": "user", "content": "Say hi"}]) as s:
    for event in s:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    final = s.get_final_response()
out["stream"] = {"text": text, "final": final.output_text, "usage": final.usage.model_dump(),
                 "first": kinds[0], "last": kinds[-1]}
tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
         {"type": "custom", "name": "apply_patch", "description": "Apply a patch to files"}]
ask = [{"role": "user", "content": "Fix the bug"}]
with client.responses.stream(model="claude-test", input=ask, tools=tools, store=False) as s:
    final = s.get_final_response()
calls = [o for o in final.output if o.type == "custom_tool_call"]
out["custom"] = [{"name": c.name, "input": c.input} for c in calls]
r = client.responses.create(model="claude-test", tools=tools, store=False, input=ask + [
    {"type": "custom_tool_call", "call_id": calls[0].call_id, "name": "apply_patch", "input": calls[0].input},
    {"type": "custom_tool_call_output", "call_id": calls[0].call_id, "output": "Done"}])
out["tool_result"] = r.output_text
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_reaches_other_pools_through_translation() {
    let patch = "*** Begin Patch\n*** End Patch";
    let anthropic = FakeAnthropic::start(AnthropicBehavior {
        tool_calls: vec![("apply_patch".into(), json!({"input": patch}))],
        ..AnthropicBehavior::default()
    })
    .await
    .unwrap();
    let toml = format!(
        r#"
[[models]]
id = "claude-test"
provider = "anthropic"
upstream_model = "claude-upstream"
input_price_micros_per_mtok = 3_000_000
output_price_micros_per_mtok = 15_000_000
cached_input_price_micros_per_mtok = 300_000

[[pools]]
id = "ant-a"
provider = "anthropic"
base_url = "{}"
api_key = "sk-ant-seller"
models = ["claude-test"]
price_ratio = 0.6
"#,
        anthropic.base_url()
    );
    let proxy = start_with_buyer_key("responses-translated", &toml);
    let out = run_openai_sdk(TRANSLATED_SCRIPT, vec![proxy.base_url(), KEY.to_owned()]).await;

    let usage = AnthropicBehavior::default().usage;
    let plain = &out["plain"];
    assert_eq!(plain["status"], "completed", "{out}");
    assert_eq!(plain["model"], "claude-test");
    assert_eq!(plain["text"], tokn_testkit::fake_anthropic::ANTHROPIC_REPLY);
    let prompt =
        usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens;
    assert_eq!(plain["usage"]["input_tokens"], prompt);
    assert_eq!(
        plain["usage"]["input_tokens_details"]["cached_tokens"],
        usage.cache_read_input_tokens
    );
    assert_eq!(plain["usage"]["output_tokens"], usage.output_tokens);
    assert_eq!(out["stream"]["text"], plain["text"], "{out}");
    assert_eq!(out["stream"]["final"], plain["text"]);
    assert_eq!(out["stream"]["usage"], plain["usage"]);
    assert_eq!(out["stream"]["first"], "response.created");
    assert_eq!(out["stream"]["last"], "response.completed");
    assert_eq!(
        out["custom"],
        json!([{"name": "apply_patch", "input": patch}]),
        "a custom tool's call comes back as one: {out}"
    );
    assert_eq!(out["tool_result"], "Tool results: Done.");

    // Anthropic got Messages: instructions as system, the custom tool as a tool taking `input`,
    // the call and its output as tool_use and tool_result.
    let received = anthropic.received();
    assert_eq!(received[0].body["system"][0]["text"], "Be brief.");
    let last = &received.last().unwrap().body;
    assert_eq!(last["tools"][1]["name"], "apply_patch");
    assert_eq!(
        last["tools"][1]["input_schema"]["required"],
        json!(["input"])
    );
    assert_eq!(last["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(
        last["messages"][1]["content"][0]["input"],
        json!({"input": patch})
    );
    assert_eq!(last["messages"][2]["content"][0]["type"], "tool_result");

    let served = served_records(&proxy, "claude-test").len();
    assert_eq!(served, 4, "{served:?}");
}

/// A request in the shape Codex CLI sends (its headers, `instructions`, input with a message, an
/// encrypted reasoning item, a `custom_tool_call` of `apply_patch` and its output, the
/// freeform tool with its grammar, `include`, `prompt_cache_key`, `store: false`, `text`
/// verbosity) reaches an OpenAI pool with nothing dropped or rewritten but the model's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_codex_request_replays_through_the_pass_through_lane_intact() {
    let openai = FakeUpstream::start(Behavior::default()).await.unwrap();
    let proxy = start(
        "responses-replay",
        &[("pool-a", &openai.base_url(), "sk-a")],
        "",
    );
    let body = json!({
        "model": "gpt-test",
        "instructions": "You are Codex, a coding agent based on GPT-5.",
        "input": [
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Fix the failing test"}]},
            {"type": "reasoning", "id": "rs_68a1", "summary": [],
             "encrypted_content": "gAAAAABoEncryptedReasoningBlob=="},
            {"type": "custom_tool_call", "id": "ctc_1", "call_id": "call_Kx1",
             "name": "apply_patch", "input": "*** Begin Patch\n*** Update File: a.rs\n*** End Patch"},
            {"type": "custom_tool_call_output", "call_id": "call_Kx1", "output": "Success."}
        ],
        "tools": [
            {"type": "custom", "name": "apply_patch", "description": "Edit files.",
             "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch"}},
            {"type": "function", "name": "shell", "strict": false,
             "parameters": {"type": "object", "properties": {"command": {"type": "array",
                 "items": {"type": "string"}}}, "required": ["command"]}}
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": false,
        "stream": true,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a1b2-thread",
        "text": {"verbosity": "low"}
    });
    let resp = client()
        .post(format!("{}/responses", proxy.base_url()))
        .bearer_auth(KEY)
        .header("session_id", "0199a1b2-thread")
        .header("conversation_id", "0199a1b2-thread")
        .header("originator", "codex_cli_rs")
        .header("openai-beta", "responses=experimental")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = resp.text().await.unwrap();
    let received = openai.received();
    assert_eq!(received.len(), 1);
    let mut expected = body.clone();
    expected["model"] = json!("gpt-upstream");
    assert_eq!(
        received[0].body, expected,
        "only the model's name may change"
    );
    assert_eq!(received[0].path, "/v1/responses");
    assert_eq!(received[0].headers["authorization"], "Bearer sk-a");
    let kinds: Vec<&str> = events
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"response.created"), "{events}");
    assert_eq!(kinds.last(), Some(&"response.completed"));
}

const EMBEDDINGS_SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
out = {}
e = client.embeddings.create(model="gpt-test", input=["first text", "second text"], dimensions=4)
out["floats"] = {"n": len(e.data), "dims": [len(d.embedding) for d in e.data], "usage": e.usage.model_dump()}
e = client.embeddings.create(model="gpt-test", input="one text")  # the SDK asks for base64
out["base64"] = {"n": len(e.data), "dims": len(e.data[0].embedding)}
try:
    client.embeddings.create(model="claude-test", input="x")
    out["no_lane"] = None
except openai.APIStatusError as err:
    out["no_lane"] = {"status": err.status_code, "code": err.body["code"]}
print(json.dumps(out))
"#;

/// Embeddings through the official SDK: passed through to an OpenAI pool, billed for their
/// input tokens at the model's input price; a model without such a pool says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_pass_through_to_openai_pools_and_bill_their_input() {
    let openai = FakeUpstream::start(Behavior::default()).await.unwrap();
    let anthropic = FakeAnthropic::start(AnthropicBehavior::default())
        .await
        .unwrap();
    let toml = format!(
        r#"
[[models]]
id = "gpt-test"
provider = "openai"
upstream_model = "text-embedding-3-small"
input_price_micros_per_mtok = 20_000
output_price_micros_per_mtok = 0

[[models]]
id = "claude-test"
provider = "anthropic"
input_price_micros_per_mtok = 3_000_000
output_price_micros_per_mtok = 15_000_000

[[pools]]
id = "oai-a"
provider = "openai"
base_url = "{}"
api_key = "sk-openai-seller"
models = ["gpt-test"]
price_ratio = 0.5

[[pools]]
id = "ant-a"
provider = "anthropic"
base_url = "{}"
api_key = "sk-ant-seller"
models = ["claude-test"]
price_ratio = 0.6
"#,
        openai.base_url(),
        anthropic.base_url()
    );
    let proxy = start_with_buyer_key("embeddings-sdk", &toml);
    let out = run_openai_sdk(EMBEDDINGS_SCRIPT, vec![proxy.base_url(), KEY.to_owned()]).await;
    assert_eq!(out["floats"]["n"], 2, "{out}");
    assert_eq!(out["floats"]["dims"], json!([4, 4]));
    let usage = Behavior::default().usage;
    assert_eq!(out["floats"]["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(out["base64"], json!({"n": 1, "dims": 8}), "{out}");
    assert_eq!(
        out["no_lane"],
        json!({"status": 400, "code": "model_not_served_on_this_api"})
    );
    let received = openai.received();
    assert_eq!(received[0].path, "/v1/embeddings");
    assert_eq!(received[0].body["model"], "text-embedding-3-small");
    assert_eq!(received[0].body["dimensions"], 4);

    // Billed for the input alone: prompt tokens × $0.02/M × 0.5.
    let served = served_records(&proxy, "gpt-test");
    assert_eq!(served.len(), 2, "{served:?}");
    assert_eq!(served[0]["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(served[0]["usage"]["completion_tokens"], 0);
    let list = (usage.prompt_tokens * 20_000).div_ceil(1_000_000);
    assert_eq!(served[0]["list_cost_micros"], list, "{}", served[0]);
}

/// A response stored upstream (`store` not `false`) lives in the account of the pool that
/// answered it: a request continuing it (`previous_response_id`) goes to that pool alone — not
/// to the pool FIFO would pick, and not to another when that one fails — and an id no pool
/// of this gateway stored is refused with a 400 before any pool is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_is_continued_on_the_pool_that_stored_it() {
    const KEY_A: &str = "sk-openai-seller-a";
    const KEY_B: &str = "sk-openai-seller-b";
    let openai = FakeUpstream::start(Behavior::default()).await.unwrap();
    let toml = format!(
        r#"
[[models]]
id = "gpt-test"
provider = "openai"
upstream_model = "gpt-upstream"
input_price_micros_per_mtok = 1_000_000
output_price_micros_per_mtok = 2_000_000

[[pools]]
id = "oai-a"
provider = "openai"
base_url = "{url}"
api_key = "{KEY_A}"
models = ["gpt-test"]
price_ratio = 0.6

[[pools]]
id = "oai-b"
provider = "openai"
base_url = "{url}"
api_key = "{KEY_B}"
models = ["gpt-test"]
price_ratio = 0.6
"#,
        url = openai.base_url()
    );
    let proxy = start_with_buyer_key("responses-stored", &toml);
    let http = client();
    let create = |body: serde_json::Value| {
        http.post(format!("{}/responses", proxy.base_url()))
            .bearer_auth(KEY)
            .json(&body)
            .send()
    };
    let sent_with = |i: usize| openai.received()[i].headers["authorization"].clone();

    // Stored by oai-a (first in FIFO, which it is while it answers).
    let stored: serde_json::Value = create(json!({"model": "gpt-test", "input": "Say hi"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = stored["id"].as_str().unwrap().to_owned();
    assert_eq!(sent_with(0), format!("Bearer {KEY_A}"));

    // oai-a fails from now on: a fresh request goes to oai-b (not stored: the fake answers
    // every response with the same id), but the continuation waits for the pool that holds the
    // response and is not sent to oai-b.
    openai.set_behavior(
        KEY_A,
        Behavior {
            status: 500,
            ..Behavior::default()
        },
    );
    let fresh = create(json!({"model": "gpt-test", "input": "Say hi", "store": false}))
        .await
        .unwrap();
    assert_eq!(fresh.status(), 200);
    let n = openai.received().len();
    assert_eq!(sent_with(n - 1), format!("Bearer {KEY_B}"));
    let refused = create(json!({"model": "gpt-test", "input": "And again?",
        "previous_response_id": id}))
    .await
    .unwrap();
    assert!(refused.status().is_server_error(), "{}", refused.status());
    let to_b = || {
        openai
            .received()
            .iter()
            .filter(|r| r.headers["authorization"] == format!("Bearer {KEY_B}"))
            .count()
    };
    assert_eq!(to_b(), 1, "only the fresh request went to oai-b");

    // Back to health: once oai-a's back-off ends, the continuation reaches it with the id as
    // sent (bounded: 50 tries over at most ~15 s).
    openai.set_behavior(KEY_A, Behavior::default());
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let continued = create(json!({"model": "gpt-test", "input": "And again?",
            "previous_response_id": id}))
        .await
        .unwrap();
        if continued.status() == 200 || started.elapsed() > std::time::Duration::from_secs(15) {
            assert_eq!(continued.status(), 200);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(to_b(), 1, "never oai-b");
    let last = openai.received().last().unwrap().clone();
    assert_eq!(last.headers["authorization"], format!("Bearer {KEY_A}"));
    assert_eq!(last.body["previous_response_id"], id.as_str());

    // An id no pool here stored: a 400 naming the parameter, no pool asked.
    let before = openai.received().len();
    let unknown = create(json!({"model": "gpt-test", "input": "hi",
        "previous_response_id": "resp_not_ours"}))
    .await
    .unwrap();
    assert_eq!(unknown.status(), 400);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["param"], "previous_response_id", "{body}");
    assert_eq!(openai.received().len(), before);
}
