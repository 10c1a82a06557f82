//! OpenAI's Responses API inbound (`/v1/responses`, what Codex CLI and the Agents SDK speak), on
//! the pass-through lane to OpenAI pools: the official OpenAI Python SDK against the real proxy
//! binary in front of the fake OpenAI API, which validates Responses bodies as the API does.

use serde_json::{json, Value};
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
    "no_responses_lane": error(lambda: client.responses.create(model="claude-test", input="hi")),
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
    assert_eq!(errors["no_responses_lane"]["status"], 400);
    assert_eq!(
        errors["no_responses_lane"]["body"]["code"],
        "model_not_served_on_this_api"
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
    let records = proxy.usage_records();
    let served: Vec<&Value> = records
        .iter()
        .filter(|r| r["status"] == 200 && r["model"] == "gpt-test")
        .collect();
    assert_eq!(served.len(), 4, "{records:?}");
    assert_eq!(served[1]["stream"], true);
    assert_eq!(served[1]["usage_source"], "reported");
    assert_eq!(
        served[1]["usage"]["completion_tokens"],
        usage.completion_tokens
    );
    assert!(served[0]["buyer_cost_micros"].as_u64().unwrap() > 0);
}
