//! The APIs coding agents speak, surface × provider × case, through the official SDKs against
//! every provider's strict fake: Anthropic's Messages API (the Anthropic SDK) on its native lanes
//! (Anthropic, Claude on Bedrock and on Vertex) and translated (OpenAI, Gemini); OpenAI's
//! Responses API (the OpenAI SDK) passed through (OpenAI, Azure) and translated (Anthropic,
//! Gemini, Bedrock). One proxy serves them all; the test prints the matrix and holds every cell to its
//! check. (Embeddings print their own matrix: `embeddings.rs`.)

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tokn_testkit::harness::ProxyProcess;
use tokn_testkit::{
    AnthropicBehavior, AzureBehavior, BedrockBehavior, Behavior, FakeAnthropic, FakeAzure,
    FakeBedrock, FakeGoogle, FakeUpstream, GoogleBehavior,
};

use crate::common::*;

const ANT_KEY: &str = "sk-ant-surfaces-0001";
/// The Anthropic seller whose model answers with Codex's `apply_patch`.
const ANT_PATCH_KEY: &str = "sk-ant-surfaces-patch";
const GEMINI_KEY: &str = "AIzaSyFakeGeminiKeySurfaces000000001";
const GEMINI_PATCH_KEY: &str = "AIzaSyFakeGeminiKeySurfacesPatch0002";
const AWS_KEY_ID: &str = "AKIDEXAMPLESURFACE01";
const AWS_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYsecretS01";
const PATCH: &str = "*** Begin Patch\n*** Add File: hello.txt\n+hi\n*** End Patch";

/// Each catalog model: (id, provider, upstream model, the pool's key or `""` for the shared one).
const MODELS: &[(&str, &str, &str, &str)] = &[
    ("claude-ant", "anthropic", "claude-upstream", ANT_KEY),
    (
        "claude-ant-patch",
        "anthropic",
        "claude-upstream",
        ANT_PATCH_KEY,
    ),
    (
        "claude-br",
        "bedrock",
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "",
    ),
    ("claude-vx", "vertex", "claude-sonnet-4-5@20250929", ""),
    ("gpt-oa", "openai", "gpt-upstream", ""),
    ("gpt-az", "azure", "gpt-4o", ""),
    ("gemini-gm", "gemini", "gemini-2.5-flash", GEMINI_KEY),
    (
        "gemini-gm-patch",
        "gemini",
        "gemini-2.5-flash",
        GEMINI_PATCH_KEY,
    ),
];

/// Runs each model's wanted `cases` (a script's dict of name → function of the model): `ok`,
/// what failed, or `-` where the case does not apply; prints them all as one JSON object.
macro_rules! run_cases {
    () => {
        r#"
out = {}
for model, wanted in plan:
    out[model] = {}
    for name, case in cases.items():
        if name not in wanted:
            out[model][name] = "-"
            continue
        try:
            case(model)
            out[model][name] = "ok"
        except Exception as e:
            out[model][name] = "FAIL: " + "".join(traceback.format_exception_only(e)).strip()[:300]
print(json.dumps(out))
"#
    };
}

/// The Messages API's cases.
const MESSAGES_SCRIPT: &str = concat!(
    r#"
import json, sys, traceback
import anthropic

base, key, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
hi = [{"role": "user", "content": "Say hi"}]
tools = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
ask = [{"role": "user", "content": "Weather in Paris?"}]

def text(model):
    m = client.messages.create(model=model, max_tokens=64, messages=hi,
        system=[{"type": "text", "text": "You are brief.", "cache_control": {"type": "ephemeral"}}])
    assert m.content[0].type == "text" and m.content[0].text, m
    assert m.stop_reason == "end_turn" and m.usage.output_tokens > 0, m
    return m

def stream(model):
    plain = text(model)
    with client.messages.stream(model=model, max_tokens=64, messages=hi) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == plain.content[0].text, (streamed, plain)
    assert final.usage.output_tokens == plain.usage.output_tokens, final.usage

def tools_streamed(model):
    with client.messages.stream(model=model, max_tokens=256, messages=ask, tools=tools) as s:
        final = s.get_final_message()
    calls = [b for b in final.content if b.type == "tool_use"]
    assert [(c.name, c.input) for c in calls] == [("get_weather", {"city": "Paris"})], final
    assert final.stop_reason == "tool_use", final
    answer = client.messages.create(model=model, max_tokens=256, tools=tools, messages=ask + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny"}]}])
    assert answer.content[0].type == "text" and answer.content[0].text, answer

def thinking(model):
    think = {"type": "enabled", "budget_tokens": 2048}
    with client.messages.stream(model=model, max_tokens=4096, thinking=think, messages=hi) as s:
        first = s.get_final_message()
    assert first.content[0].type == "thinking" and first.content[0].signature, first
    second = client.messages.create(model=model, max_tokens=4096, thinking=think, messages=hi + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": "And again?"}])
    assert [b.type for b in second.content] == ["thinking", "text"], second

def count_tokens(model):
    assert client.messages.count_tokens(model=model, messages=hi).input_tokens > 0

cases = {"text": text, "stream": stream, "tools, streamed input": tools_streamed,
         "thinking, signed, 2 turns": thinking, "count_tokens": count_tokens}
"#,
    run_cases!()
);

/// The Responses API's cases.
const RESPONSES_SCRIPT: &str = concat!(
    r#"
import json, sys, traceback
from openai import OpenAI

base, key, plan, patch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
weather = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
patcher = [{"type": "custom", "name": "apply_patch", "description": "Apply a patch to files"}]

def text(model):
    r = client.responses.create(model=model, instructions="Be brief.", input="Say hi", store=False)
    assert r.status == "completed" and r.output_text and r.usage.output_tokens > 0, r
    return r

def stream(model):
    plain = text(model)
    kinds, streamed = [], ""
    with client.responses.stream(model=model, input=[{"role": "user", "content": "Say hi"}], store=False) as s:
        for event in s:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                streamed += event.delta
        final = s.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert streamed == final.output_text == plain.output_text, (streamed, final.output_text)
    assert final.usage.output_tokens == plain.usage.output_tokens, final.usage

def function_tool(model):
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.responses.create(model=model, input=ask, tools=weather, store=False)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})], r
    again = client.responses.create(model=model, tools=weather, store=False, input=ask + [
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert again.output_text, again

def custom_tool(model):
    ask = [{"role": "user", "content": "Add hello.txt"}]
    with client.responses.stream(model=model, input=ask, tools=patcher, store=False) as s:
        final = s.get_final_response()
    calls = [o for o in final.output if o.type == "custom_tool_call"]
    assert [(c.name, c.input) for c in calls] == [("apply_patch", patch)], final
    again = client.responses.create(model=model, tools=patcher, store=False, input=ask + [
        {"type": "custom_tool_call", "call_id": calls[0].call_id, "name": "apply_patch", "input": calls[0].input},
        {"type": "custom_tool_call_output", "call_id": calls[0].call_id, "output": "Done"}])
    assert again.output_text, again

def reasoning(model):
    r = client.responses.create(model=model, input="Think, then say hi", store=False,
                                reasoning={"effort": "low"}, include=["reasoning.encrypted_content"])
    assert r.status == "completed" and r.output_text, r

cases = {"text": text, "stream": stream, "function tool, round trip": function_tool,
         "custom tool, round trip": custom_tool, "reasoning": reasoning}
"#,
    run_cases!()
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_surface_serves_every_provider_through_the_official_sdks() {
    let weather = || vec![("get_weather".to_owned(), json!({"city": "Paris"}))];
    let patch = || vec![("apply_patch".to_owned(), json!({"input": PATCH}))];
    let anthropic = FakeAnthropic::start(AnthropicBehavior {
        tool_calls: weather(),
        ..Default::default()
    })
    .await
    .unwrap();
    anthropic.set_behavior(
        ANT_PATCH_KEY,
        AnthropicBehavior {
            tool_calls: patch(),
            ..Default::default()
        },
    );
    let bedrock = FakeBedrock::start(
        "us-east-1",
        BedrockBehavior {
            tool_calls: weather(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    bedrock.add_aws_key(AWS_KEY_ID, AWS_SECRET, None);
    let google = FakeGoogle::start(GoogleBehavior {
        tool_calls: weather(),
        ..Default::default()
    })
    .await
    .unwrap();
    google.allow_key(GEMINI_KEY);
    google.set_behavior(
        GEMINI_PATCH_KEY,
        GoogleBehavior {
            tool_calls: patch(),
            ..Default::default()
        },
    );
    let sa = google.service_account("tokn-surfaces");
    let openai = FakeUpstream::start(Behavior {
        tool_calls: weather(),
        ..Behavior::default()
    })
    .await
    .unwrap();
    let azure = FakeAzure::start(
        AzureBehavior {
            tool_call: true,
            ..Default::default()
        },
        &["gpt-4o"],
    )
    .await
    .unwrap();
    let fakes = Fakes {
        anthropic: &anthropic,
        bedrock: &bedrock,
        google: &google,
        openai: &openai,
        azure: &azure,
    };
    let proxy = start(&fakes, &sa.json);
    let base = format!("http://127.0.0.1:{}", proxy.port);

    // Which cases apply where: thinking signatures only round-trip on Claude's native lanes;
    // `count_tokens` is answered everywhere (Anthropic counts, the others are estimated).
    let all_messages = json!([
        "text",
        "stream",
        "tools, streamed input",
        "thinking, signed, 2 turns",
        "count_tokens"
    ]);
    let translated_messages = json!(["text", "stream", "tools, streamed input", "count_tokens"]);
    let messages_plan = json!([
        ["claude-ant", all_messages],
        ["claude-br", all_messages],
        ["claude-vx", all_messages],
        ["gpt-oa", translated_messages],
        ["gemini-gm", translated_messages]
    ]);
    let messages = run_anthropic_sdk(
        MESSAGES_SCRIPT,
        vec![base.clone(), KEY.to_owned(), messages_plan.to_string()],
    )
    .await;

    let common = json!(["text", "stream", "function tool, round trip", "reasoning"]);
    let responses_plan = json!([
        ["gpt-oa", common],
        ["gpt-az", common],
        ["claude-ant", common],
        ["claude-ant-patch", ["custom tool, round trip"]],
        ["gemini-gm", common],
        ["gemini-gm-patch", ["custom tool, round trip"]],
        ["claude-br", common]
    ]);
    let responses = run_openai_sdk(
        RESPONSES_SCRIPT,
        vec![
            proxy.base_url(),
            KEY.to_owned(),
            responses_plan.to_string(),
            PATCH.to_owned(),
        ],
    )
    .await;

    let lane = |surface: &str, model: &str| -> &'static str {
        match (surface, model) {
            ("messages", "claude-ant" | "claude-br" | "claude-vx") => "native",
            ("responses", "gpt-oa" | "gpt-az") => "native",
            _ => "translated",
        }
    };
    let provider = |model: &str| MODELS.iter().find(|m| m.0 == model).unwrap().1;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (surface, out) in [("messages", &messages), ("responses", &responses)] {
        let cells: BTreeMap<String, Value> = serde_json::from_value(out.clone()).unwrap();
        for (model, cases) in &cells {
            let cases = cases.as_object().unwrap();
            let line: Vec<String> = cases
                .iter()
                .map(|(case, result)| {
                    let r = result.as_str().unwrap();
                    if r.starts_with("FAIL") {
                        failures.push(format!("{surface} {model} {case}: {r}"));
                    }
                    format!("{case}: {}", if r == "ok" || r == "-" { r } else { "FAIL" })
                })
                .filter(|cell| !cell.ends_with(": -"))
                .collect();
            rows.push(format!(
                "{surface:<10} {:<10} {model:<17} {:<11} {}",
                provider(model),
                lane(surface, model),
                line.join(" | ")
            ));
        }
    }
    eprintln!(
        "\nsurface × provider × case (official SDKs):\n{:<10} {:<10} {:<17} {:<11} cases\n{}\n",
        "surface",
        "provider",
        "model",
        "lane",
        rows.join("\n")
    );
    assert!(failures.is_empty(), "{failures:#?}");

    // What the native lanes carried: `cache_control` reached each Claude upstream as sent.
    let cached = |body: &Value| body["system"][0]["cache_control"] == json!({"type": "ephemeral"});
    assert!(anthropic.received().iter().any(|r| cached(&r.body)));
    assert!(bedrock
        .received()
        .iter()
        .any(|r| r.path.ends_with("/invoke") && cached(&r.body)));
    assert!(google
        .received()
        .iter()
        .any(|r| r.path.ends_with(":rawPredict") && cached(&r.body)));

    // Claude's own counting on Bedrock (CountTokens on the foundation model, the InvokeModel
    // body inside) and on Vertex (one endpoint, the model in the body).
    assert!(bedrock.received().iter().any(|r| r.path
        == "/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/count-tokens"
        && r.body["input"]["invokeModel"]["body"].is_string()));
    assert!(google.received().iter().any(|r| r
        .path
        .ends_with("/publishers/anthropic/models/count-tokens:rawPredict")
        && r.body["model"] == "claude-sonnet-4-5@20250929"));

    // Azure's Responses API took the call on its preview surface, the deployment as `model`.
    let az = &azure.received()[0];
    assert_eq!(az.path, "/openai/responses?api-version=2025-04-01-preview");
    assert_eq!(az.body["model"], "gpt-4o");

    // Every served call is one billed record: the mixed run is metered like chat.
    let records = proxy.usage_records();
    let served: Vec<&Value> = records.iter().filter(|r| r["status"] == 200).collect();
    assert!(served.len() >= 50, "{}", served.len());
    for r in &served {
        let counting = r["usage"]["completion_tokens"] == 0;
        assert!(
            counting || r["buyer_cost_micros"].as_u64().unwrap() > 0,
            "a served call billed nothing: {r}"
        );
    }
}

/// Every provider's fake.
struct Fakes<'a> {
    anthropic: &'a FakeAnthropic,
    bedrock: &'a FakeBedrock,
    google: &'a FakeGoogle,
    openai: &'a FakeUpstream,
    azure: &'a FakeAzure,
}

fn start(fakes: &Fakes<'_>, sa: &str) -> ProxyProcess {
    let Fakes {
        anthropic,
        bedrock,
        google,
        openai,
        azure,
    } = fakes;
    let mut toml = String::new();
    for (id, provider, upstream, key) in MODELS {
        toml.push_str(&format!(
            "[[models]]\nid = \"{id}\"\nprovider = \"{provider}\"\nupstream_model = \"{upstream}\"\n\
             input_price_micros_per_mtok = 1_000_000\noutput_price_micros_per_mtok = 2_000_000\n\n"
        ));
        let pool = match *provider {
            "anthropic" => format!(
                "base_url = \"{}\"\napi_key = \"{key}\"",
                anthropic.base_url()
            ),
            "bedrock" => format!(
                "base_url = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"{AWS_KEY_ID}\"\n\
                 secret_access_key = \"{AWS_SECRET}\"",
                bedrock.base_url()
            ),
            "vertex" => format!(
                "base_url = \"{}\"\nservice_account_json = \"env:TEST_VERTEX_SA\"\nlocation = \"us-east5\"",
                google.base_url()
            ),
            "gemini" => format!("base_url = \"{}\"\napi_key = \"{key}\"", google.base_url()),
            "azure" => format!(
                "endpoint = \"{}\"\napi_key = \"azure-surfaces-key\"\napi_version = \"2025-04-01-preview\"",
                azure.base_url()
            ),
            _ => format!(
                "base_url = \"{}\"\napi_key = \"sk-openai-surfaces\"",
                openai.base_url()
            ),
        };
        toml.push_str(&format!(
            "[[pools]]\nid = \"pool-{id}\"\nprovider = \"{provider}\"\n{pool}\nmodels = [\"{id}\"]\nprice_ratio = 0.6\n\n"
        ));
    }
    toml.push_str(
        "[[keys]]\nid = \"key-main\"\naccount = \"acct-1\"\nkey = \"env:TEST_BUYER_KEY\"\n",
    );
    ProxyProcess::start(
        binary(),
        "surfaces",
        &toml,
        &[("TEST_BUYER_KEY", KEY), ("TEST_VERTEX_SA", sa)],
    )
}
