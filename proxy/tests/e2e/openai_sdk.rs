//! The contract our users hold us to: the official OpenAI Python SDK, pointed at the proxy.
//! The test creates a venv (once per target dir) and installs `openai` from PyPI.

use crate::common::*;

const SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
out = {}

for model in ["gpt-test", "mock"]:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "hi"}])
    out[model] = {
        "type": type(r).__name__,
        "content": r.choices[0].message.content,
        "finish_reason": r.choices[0].finish_reason,
        "usage": r.usage.model_dump(),
        "request_id": raw.headers.get("x-request-id"),
    }

    text, usage, chunks = "", None, 0
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                stream=True, stream_options={"include_usage": True}):
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
            assert chunk.choices == [], "usage chunk must have no choices"
        for c in chunk.choices:
            text += c.delta.content or ""
    out[model + "_stream"] = {"text": text, "usage": usage, "chunks": chunks}

    plain_usage_seen = False
    plain_text = ""
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=True):
        plain_usage_seen |= chunk.usage is not None
        for c in chunk.choices:
            plain_text += c.delta.content or ""
    out[model + "_stream_plain"] = {"text": plain_text, "usage_seen": plain_usage_seen}

tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
calls = {}
for chunk in client.chat.completions.create(model="gpt-tools", messages=[{"role": "user", "content": "weather?"}],
                                            tools=tools, stream=True):
    for c in chunk.choices:
        for tc in c.delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            if tc.function.name:
                slot["name"] = tc.function.name
            slot["arguments"] += tc.function.arguments or ""
out["tools"] = calls

errors = {}
for name, fn in {
    "bad_key": lambda: OpenAI(base_url=base, api_key="tok_not_a_real_key_0", max_retries=0).chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}]),
    "unknown_model": lambda: client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}]),
    "bad_request": lambda: client.chat.completions.create(model="mock", messages=[]),
}.items():
    try:
        fn()
        errors[name] = "no error"
    except openai.APIStatusError as e:
        errors[name] = {"class": type(e).__name__, "status": e.status_code, "code": e.code}
out["errors"] = errors
out["models"] = sorted(m.id for m in client.models.list())
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_sdk_works_through_the_proxy() {
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    fake.set_behavior(
        "sk-tools",
        Behavior {
            tool_call: true,
            ..Behavior::default()
        },
    );
    let mut config = config(&[("pool-a", &fake.base_url(), "sk-a")], "");
    config.push_str(&format!(
        "\n[[models]]\nid = \"gpt-tools\"\nprovider = \"openai\"\ninput_price_micros_per_mtok = 1\noutput_price_micros_per_mtok = 1\n\n[[pools]]\nid = \"tools\"\nprovider = \"openai\"\nbase_url = \"{}\"\napi_key = \"sk-tools\"\nmodels = [\"gpt-tools\"]\nprice_ratio = 0.5\n",
        fake.base_url()
    ));
    let proxy = ProxyProcess::start(binary(), "sdk", &config, &[("TEST_BUYER_KEY", KEY)]);

    let out = run_openai_sdk(SCRIPT, vec![proxy.base_url(), KEY.to_owned()]).await;

    let fake_text = tokn_testkit::fake::fake_text(5);
    let g = &out["gpt-test"];
    assert_eq!(g["type"], "ChatCompletion");
    assert_eq!(g["content"], fake_text.as_str());
    assert_eq!(g["usage"]["prompt_tokens"], 17);
    assert_eq!(g["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
    assert_eq!(
        g["usage"]["completion_tokens_details"]["reasoning_tokens"],
        1
    );
    let rec = proxy.record_for(g["request_id"].as_str().unwrap()).unwrap();
    assert_eq!(usage_of(&rec), Behavior::default().usage);

    assert_eq!(out["gpt-test_stream"]["text"], fake_text.as_str());
    assert_eq!(out["gpt-test_stream"]["usage"]["completion_tokens"], 5);
    assert_eq!(out["gpt-test_stream_plain"]["text"], fake_text.as_str());
    assert_eq!(out["gpt-test_stream_plain"]["usage_seen"], false);

    let m = &out["mock"];
    assert!(m["content"]
        .as_str()
        .unwrap()
        .starts_with("Hello from the tokn$ mock model."));
    assert_eq!(m["finish_reason"], "stop");
    assert_eq!(out["mock_stream"]["text"], m["content"]);
    assert_eq!(
        out["mock_stream"]["usage"]["completion_tokens"],
        m["usage"]["completion_tokens"]
    );
    assert_eq!(out["mock_stream_plain"]["usage_seen"], false);

    assert_eq!(out["tools"]["0"]["name"], "get_weather");
    assert_eq!(out["tools"]["0"]["arguments"], r#"{"city":"Paris"}"#);

    let e = &out["errors"];
    assert_eq!(e["bad_key"]["class"], "AuthenticationError");
    assert_eq!(e["unknown_model"]["class"], "NotFoundError");
    assert_eq!(e["unknown_model"]["code"], "model_not_found");
    assert_eq!(e["bad_request"]["class"], "BadRequestError");
    assert_eq!(
        out["models"],
        serde_json::json!(["gpt-test", "gpt-tools", "mock"]),
        "a model whose pools are all paused is not listed"
    );

    // One record per request the SDK made (2 × (2 + 2 streams) + tools + 3 errors + models).
    assert_eq!(proxy.usage_records().len(), 13);
}
