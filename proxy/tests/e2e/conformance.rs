//! The conformance matrix: every provider, through the real proxy and the official OpenAI Python
//! SDK, held to the same cases — plain and streamed text, parallel tool calls (whole and
//! streamed), a tool-result turn, JSON mode, an image, a max-tokens stop and a provider error —
//! with the usage each fake reported, cached and reasoning tokens included. One proxy serves all
//! providers; the test prints one table (case × provider).
//!
//! Beside it, time to first token through the proxy next to each fake's own, for every provider
//! (a measurement printed as a table, not a timing assertion).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokn_testkit::fake::{FAKE_JSON_REPLY, TOOL_RESULTS_REPLY};
use tokn_testkit::fake_anthropic::{ANTHROPIC_JSON_REPLY, ANTHROPIC_REPLY, ANTHROPIC_VERSION};
use tokn_testkit::fake_azure::{AZURE_JSON_REPLY, AZURE_REPLY};
use tokn_testkit::fake_bedrock::{BEDROCK_JSON_REPLY, BEDROCK_REPLY};
use tokn_testkit::fake_google::{
    FakeGoogle, GoogleBehavior, GoogleUsage, TestServiceAccount, GOOGLE_JSON_REPLY, GOOGLE_REPLY,
};
use tokn_testkit::{
    AnthropicBehavior, AzureBehavior, BedrockBehavior, FakeAnthropic, FakeAzure, FakeBedrock,
};

use crate::common::*;

const OPENAI_KEY: &str = "sk-conformance-openai-0001";
const OPENAI_BROKEN_KEY: &str = "sk-conformance-openai-broken";
const ANTHROPIC_KEY: &str = "sk-ant-conformance-0001";
const ANTHROPIC_BROKEN_KEY: &str = "sk-ant-conformance-broken";
const BEDROCK_REGION: &str = "us-east-1";
const BEDROCK_MODEL: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";
const BEDROCK_KEY_ID: &str = "AKIDCONFORMANCE00001";
const BEDROCK_SECRET: &str = "conformanceSecretAccessKey/0000000000001";
const BEDROCK_BROKEN_KEY_ID: &str = "AKIDCONFORMANCE00002";
const BEDROCK_BROKEN_SECRET: &str = "conformanceSecretAccessKey/0000000000002";
const AZURE_KEY: &str = "azure-conformance-key-0001";
const AZURE_FILTERED_KEY: &str = "azure-conformance-key-filtered";
const GEMINI_KEY: &str = "AIzaConformanceGeminiKey0001";
const GEMINI_BROKEN_KEY: &str = "AIzaConformanceGeminiKeyBroken";

/// The two functions every provider is asked to call, in order.
fn weather_and_time() -> Vec<(String, Value)> {
    vec![
        ("get_weather".into(), json!({"city": "Paris"})),
        ("get_time".into(), json!({"tz": "Europe/Paris"})),
    ]
}

/// What one provider's column expects, and how to reach its fake directly.
struct Column {
    provider: &'static str,
    /// The catalog model the matrix runs on, and one whose pool answers a provider error.
    model: String,
    error_model: String,
    reply: String,
    json_reply: &'static str,
    tool_result_reply: String,
    image_reply: String,
    max_tokens_reply: String,
    usage: FakeUsage,
    /// The provider error as the SDK raises it: class and `code` (`None`: any code).
    error_class: &'static str,
    error_code: Option<&'static str>,
    /// The fake's refusals (a translation bug shows up here).
    rejected: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// A streamed request straight to the fake, and the reply's first word (its first token).
    direct_stream: Box<dyn Fn() -> reqwest::RequestBuilder + Send + Sync>,
    first_word: &'static str,
}

/// One model and its pool in the proxy's configuration.
fn model_and_pool(id: &str, provider: &str, upstream: &str, pool_fields: &str) -> String {
    format!(
        r#"
[[models]]
id = "{id}"
provider = "{provider}"
upstream_model = "{upstream}"
input_price_micros_per_mtok = 1_000_000
output_price_micros_per_mtok = 2_000_000
cached_input_price_micros_per_mtok = 500_000

[[pools]]
id = "{id}-pool"
provider = "{provider}"
models = ["{id}"]
price_ratio = 0.6
{pool_fields}
"#
    )
}

/// Every fake, started (each column's closures keep its fake alive), with the proxy
/// configuration that serves them.
struct Fakes {
    toml: String,
    columns: Vec<Column>,
    /// Runs of each Vertex key file's private key, to search for.
    private_key_fragments: Vec<String>,
}

async fn start_fakes(pace: Option<(Duration, Duration)>) -> Fakes {
    let (ttft, interval) = pace.unwrap_or_default();
    let mut toml = String::new();
    let mut columns = Vec::new();

    // OpenAI: the format the proxy speaks, relayed.
    let openai = FakeUpstream::start(Behavior {
        tool_calls: weather_and_time(),
        ttft,
        chunk_interval: interval,
        ..Behavior::default()
    })
    .await
    .map(Arc::new)
    .unwrap();
    openai.set_behavior(
        OPENAI_BROKEN_KEY,
        Behavior {
            status: 400,
            ..Behavior::default()
        },
    );
    let url = openai.base_url();
    toml += &model_and_pool(
        "c-openai",
        "openai",
        "gpt-upstream",
        &format!("base_url = \"{url}\"\napi_key = \"{OPENAI_KEY}\""),
    );
    toml += &model_and_pool(
        "c-openai-broken",
        "openai",
        "gpt-upstream",
        &format!("base_url = \"{url}\"\napi_key = \"{OPENAI_BROKEN_KEY}\""),
    );
    let default_text = tokn_testkit::fake::fake_text(Behavior::default().chunks);
    columns.push(Column {
        provider: "openai",
        model: "c-openai".into(),
        error_model: "c-openai-broken".into(),
        reply: default_text.clone(),
        json_reply: FAKE_JSON_REPLY,
        tool_result_reply: TOOL_RESULTS_REPLY.into(),
        image_reply: default_text,
        max_tokens_reply: tokn_testkit::fake::fake_text(2),
        usage: Behavior::default().usage,
        error_class: "BadRequestError",
        error_code: None,
        rejected: {
            let f = openai.clone();
            Box::new(move || f.rejected())
        },
        direct_stream: {
            let url = url.clone();
            Box::new(move || {
                client()
                    .post(format!("{url}/chat/completions"))
                    .bearer_auth(OPENAI_KEY)
                    .json(&json!({"model": "gpt-upstream", "stream": true,
                        "messages": [{"role": "user", "content": "Say hi"}]}))
            })
        },
        first_word: "tok0",
    });

    // Anthropic Messages.
    let anthropic = FakeAnthropic::start(AnthropicBehavior {
        tool_calls: weather_and_time(),
        ttft,
        chunk_interval: interval,
        ..AnthropicBehavior::default()
    })
    .await
    .map(Arc::new)
    .unwrap();
    anthropic.set_behavior(
        ANTHROPIC_BROKEN_KEY,
        AnthropicBehavior {
            status: 400,
            error_message: Some("messages: prompt is too long".into()),
            ..AnthropicBehavior::default()
        },
    );
    let url = anthropic.base_url();
    for (id, key) in [
        ("c-anthropic", ANTHROPIC_KEY),
        ("c-anthropic-broken", ANTHROPIC_BROKEN_KEY),
    ] {
        toml += &model_and_pool(
            id,
            "anthropic",
            "claude-upstream",
            &format!("base_url = \"{url}\"\napi_key = \"{key}\""),
        );
    }
    let u = AnthropicBehavior::default().usage;
    columns.push(Column {
        provider: "anthropic",
        model: "c-anthropic".into(),
        error_model: "c-anthropic-broken".into(),
        reply: ANTHROPIC_REPLY.into(),
        json_reply: ANTHROPIC_JSON_REPLY,
        tool_result_reply: TOOL_RESULTS_REPLY.into(),
        image_reply: ANTHROPIC_REPLY.into(),
        max_tokens_reply: "Hello from".into(),
        usage: FakeUsage {
            prompt_tokens: u.input_tokens
                + u.cache_creation_input_tokens
                + u.cache_read_input_tokens,
            completion_tokens: u.output_tokens,
            cached_tokens: u.cache_read_input_tokens,
            reasoning_tokens: 0,
        },
        error_class: "BadRequestError",
        error_code: None,
        rejected: {
            let f = anthropic.clone();
            Box::new(move || f.rejected())
        },
        direct_stream: {
            let url = url.clone();
            Box::new(move || {
                client()
                    .post(format!("{url}/v1/messages"))
                    .header("x-api-key", ANTHROPIC_KEY)
                    .header("anthropic-version", ANTHROPIC_VERSION)
                    .json(
                        &json!({"model": "claude-upstream", "max_tokens": 100, "stream": true,
                        "messages": [{"role": "user", "content": "Say hi"}]}),
                    )
            })
        },
        first_word: "Hello",
    });

    // AWS Bedrock Converse, signed with SigV4.
    let bedrock = FakeBedrock::start(
        BEDROCK_REGION,
        BedrockBehavior {
            tool_calls: weather_and_time(),
            ttft,
            chunk_interval: interval,
            ..BedrockBehavior::default()
        },
    )
    .await
    .map(Arc::new)
    .unwrap();
    bedrock.add_aws_key(BEDROCK_KEY_ID, BEDROCK_SECRET, None);
    bedrock.add_aws_key(BEDROCK_BROKEN_KEY_ID, BEDROCK_BROKEN_SECRET, None);
    bedrock.set_behavior(
        BEDROCK_BROKEN_KEY_ID,
        BedrockBehavior {
            status: 400,
            ..BedrockBehavior::default()
        },
    );
    let url = bedrock.base_url();
    for (id, key_id, secret) in [
        ("c-bedrock", BEDROCK_KEY_ID, BEDROCK_SECRET),
        (
            "c-bedrock-broken",
            BEDROCK_BROKEN_KEY_ID,
            BEDROCK_BROKEN_SECRET,
        ),
    ] {
        toml += &model_and_pool(
            id,
            "bedrock",
            BEDROCK_MODEL,
            &format!(
                "base_url = \"{url}\"\nregion = \"{BEDROCK_REGION}\"\naccess_key_id = \"{key_id}\"\nsecret_access_key = \"{secret}\""
            ),
        );
    }
    let u = BedrockBehavior::default().usage;
    columns.push(Column {
        provider: "bedrock",
        model: "c-bedrock".into(),
        error_model: "c-bedrock-broken".into(),
        reply: BEDROCK_REPLY.into(),
        json_reply: BEDROCK_JSON_REPLY,
        tool_result_reply: TOOL_RESULTS_REPLY.into(),
        image_reply: BEDROCK_REPLY.into(),
        max_tokens_reply: "Hello from".into(),
        usage: FakeUsage {
            prompt_tokens: u.input_tokens + u.cache_read_input_tokens + u.cache_write_input_tokens,
            completion_tokens: u.output_tokens,
            cached_tokens: u.cache_read_input_tokens,
            reasoning_tokens: 0,
        },
        error_class: "BadRequestError",
        error_code: None,
        rejected: {
            let f = bedrock.clone();
            Box::new(move || f.rejected())
        },
        // Straight to the fake, signed with SigV4 like the proxy's requests (the same work for
        // the fake on both paths).
        direct_stream: {
            let url = url.clone();
            Box::new(move || signed_converse_stream(&url))
        },
        first_word: "Hello",
    });

    // Azure OpenAI: a deployment on the classic surface; the broken pool on the v1 surface.
    let azure = FakeAzure::start(
        AzureBehavior {
            // `get_weather` and `get_time` in parallel, like the other fakes.
            tool_call: true,
            ttft,
            chunk_interval: interval,
            ..AzureBehavior::default()
        },
        &["gpt4o-prod"],
    )
    .await
    .map(Arc::new)
    .unwrap();
    azure.set_behavior(
        AZURE_FILTERED_KEY,
        AzureBehavior {
            status: 400,
            ..AzureBehavior::default()
        },
    );
    let url = azure.base_url();
    toml += &model_and_pool(
        "c-azure",
        "azure",
        "gpt-4o",
        &format!("endpoint = \"{url}\"\napi_key = \"{AZURE_KEY}\"\ndeployment = \"gpt4o-prod\""),
    );
    toml += &model_and_pool(
        "c-azure-filtered",
        "azure",
        "gpt4o-prod",
        &format!("endpoint = \"{url}\"\napi_key = \"{AZURE_FILTERED_KEY}\"\napi_version = \"v1\""),
    );
    columns.push(Column {
        provider: "azure",
        model: "c-azure".into(),
        error_model: "c-azure-filtered".into(),
        reply: AZURE_REPLY.into(),
        json_reply: AZURE_JSON_REPLY,
        tool_result_reply: TOOL_RESULTS_REPLY.into(),
        image_reply: AZURE_REPLY.into(),
        max_tokens_reply: "Hello from".into(),
        usage: AzureBehavior::default().usage,
        error_class: "BadRequestError",
        error_code: Some("content_filter"),
        rejected: {
            let f = azure.clone();
            Box::new(move || f.rejected())
        },
        direct_stream: {
            let url = url.clone();
            Box::new(move || {
                client()
                    .post(format!(
                        "{url}/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
                    ))
                    .header("api-key", AZURE_KEY)
                    .json(&json!({"stream": true,
                        "messages": [{"role": "user", "content": "Say hi"}]}))
            })
        },
        first_word: "Hello",
    });

    // Google: the Gemini API (API key) and Vertex AI (service account), one fake for both.
    let google = FakeGoogle::start(GoogleBehavior {
        tool_calls: weather_and_time(),
        ttft,
        chunk_interval: interval,
        ..GoogleBehavior::default()
    })
    .await
    .map(Arc::new)
    .unwrap();
    google.allow_key(GEMINI_KEY);
    google.set_behavior(
        GEMINI_BROKEN_KEY,
        GoogleBehavior {
            status: 400,
            ..GoogleBehavior::default()
        },
    );
    let sa = google.service_account("conformance-project");
    let broken_sa = google.service_account("conformance-broken");
    google.set_behavior(
        &broken_sa.client_email,
        GoogleBehavior {
            status: 400,
            ..GoogleBehavior::default()
        },
    );
    let url = google.base_url();
    for (id, key) in [
        ("c-gemini", GEMINI_KEY),
        ("c-gemini-broken", GEMINI_BROKEN_KEY),
    ] {
        toml += &model_and_pool(
            id,
            "gemini",
            "gemini-2.5-flash",
            &format!("base_url = \"{url}\"\napi_key = \"{key}\""),
        );
    }
    for (id, account) in [("c-vertex", &sa), ("c-vertex-broken", &broken_sa)] {
        toml += &model_and_pool(
            id,
            "vertex",
            "gemini-2.5-flash",
            &format!(
                "base_url = \"{url}\"\nlocation = \"us-central1\"\nservice_account_json = '''{}'''",
                account.json
            ),
        );
    }
    let u = GoogleBehavior::default().usage;
    let google_usage = google_usage_in_openai_terms(u);
    for (provider, model) in [("gemini", "c-gemini"), ("vertex", "c-vertex")] {
        let direct_stream: Box<dyn Fn() -> reqwest::RequestBuilder + Send + Sync> = if provider
            == "gemini"
        {
            let url = url.clone();
            Box::new(move || {
                client()
                    .post(format!(
                        "{url}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
                    ))
                    .header("x-goog-api-key", GEMINI_KEY)
                    .json(&json!({"contents": [{"role": "user", "parts": [{"text": "Say hi"}]}]}))
            })
        } else {
            let token = mint_token(&sa).await;
            let url = url.clone();
            Box::new(move || {
                client()
                        .post(format!("{url}/v1/projects/conformance-project/locations/us-central1/publishers/google/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
                        .bearer_auth(&token)
                        .json(&json!({"contents": [{"role": "user", "parts": [{"text": "Say hi"}]}]}))
            })
        };
        columns.push(Column {
            provider,
            model: model.into(),
            error_model: format!("{model}-broken"),
            reply: GOOGLE_REPLY.into(),
            json_reply: GOOGLE_JSON_REPLY,
            // Tool results that are not JSON objects arrive wrapped as `{"result": …}`.
            tool_result_reply: r#"Function results: get_weather={"result":"result-get_weather"}; get_time={"result":"result-get_time"}."#.into(),
            // The SDK matrix's image is 8 bytes of PNG signature.
            image_reply: format!("Received image/png (8 bytes). {GOOGLE_REPLY}"),
            max_tokens_reply: "Hello from".into(),
            usage: google_usage,
            error_class: "BadRequestError",
            error_code: None,
            rejected: {
                let f = google.clone();
                Box::new(move || f.rejected())
            },
            direct_stream,
            first_word: "Hello",
        });
    }

    let private_key_fragments = [&sa, &broken_sa].map(|a| key_fragment(&a.json)).to_vec();
    Fakes {
        toml,
        columns,
        private_key_fragments,
    }
}

/// A ConverseStream request to the fake Bedrock at `url`, signed with SigV4 now.
fn signed_converse_stream(url: &str) -> reqwest::RequestBuilder {
    use tokn_proxy::providers::aws::sigv4;
    let path = format!(
        "/model/{}/converse-stream",
        BEDROCK_MODEL.replace(':', "%3A")
    );
    let body = json!({"messages": [{"role": "user", "content": [{"text": "Say hi"}]}]}).to_string();
    let host = url.trim_start_matches("http://").to_owned();
    let signed = sigv4::sign(
        &sigv4::Request {
            method: "POST",
            host: &host,
            path: &path,
            query: "",
            headers: &[("content-type", "application/json")],
            payload: sigv4::Payload::Bytes(body.as_bytes()),
        },
        &sigv4::Credentials {
            access_key_id: BEDROCK_KEY_ID.into(),
            secret_access_key: BEDROCK_SECRET.into(),
            session_token: None,
        },
        &sigv4::Params {
            region: BEDROCK_REGION,
            service: "bedrock",
            time: sigv4::AmzDate::from_system_time(std::time::SystemTime::now()).unwrap(),
            path_encoding: sigv4::PathEncoding::Double,
            content_sha256_header: false,
        },
    )
    .unwrap();
    let mut req = client()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in signed.headers() {
        req = req.header(name, value);
    }
    req
}

/// Google's usage as OpenAI counts it: thinking tokens are completion (and reasoning) tokens.
fn google_usage_in_openai_terms(u: GoogleUsage) -> FakeUsage {
    FakeUsage {
        prompt_tokens: u.prompt_token_count,
        completion_tokens: u.candidates_token_count + u.thoughts_token_count,
        cached_tokens: u.cached_content_token_count,
        reasoning_tokens: u.thoughts_token_count,
    }
}

/// Forty-eight characters from the middle of a key file's private key (its random part).
fn key_fragment(key_file: &str) -> String {
    let file: Value = serde_json::from_str(key_file).unwrap();
    // Within one line: a leak may keep the PEM's line breaks or escape them.
    let line = file["private_key"]
        .as_str()
        .unwrap()
        .lines()
        .nth(8)
        .unwrap();
    line[8..56].to_owned()
}

/// An access token from the fake's token endpoint, as google-auth would get it.
async fn mint_token(sa: &TestServiceAccount) -> String {
    let assertion = sa.sign_assertion(&sa.standard_claims());
    let form = format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
    );
    let token: Value = client()
        .post(&sa.token_uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    token["access_token"].as_str().unwrap().to_owned()
}

/// Whether a matrix case reported `u`, reasoning tokens included (absent details count as 0).
fn usage_is(case: &Value, u: &FakeUsage) -> bool {
    let reasoning = case["usage"]["completion_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap_or(0);
    sdk_usage_is(case, u) && reasoning == u.reasoning_tokens
}

/// Parallel calls `get_weather {"city":"Paris"}` then `get_time`, with distinct non-empty ids.
fn two_calls(calls: &Value) -> bool {
    let ids: std::collections::HashSet<&str> = sdk_tool_calls(calls)
        .iter()
        .filter_map(|c| c["id"].as_str())
        .filter(|id| !id.is_empty())
        .collect();
    are_weather_then_time(calls) && ids.len() == 2
}

/// The cases of one column, evaluated on what the SDK returned.
fn evaluate(c: &Column, out: &Value) -> Vec<(&'static str, bool)> {
    let usage_ok = |case: &Value| usage_is(case, &c.usage);
    let e = &out["errors"]["provider_error"];
    vec![
        (
            "plain text",
            out["plain_text"]["type"] == "ChatCompletion"
                && out["plain_text"]["text"] == c.reply.as_str()
                && out["plain_text"]["finish_reason"] == "stop"
                && usage_ok(&out["plain_text"]),
        ),
        (
            "streamed text",
            out["streamed_text"]["text"] == c.reply.as_str()
                && out["streamed_text"]["finish_reason"] == "stop"
                && usage_ok(&out["streamed_text"]),
        ),
        (
            "tool call (parallel)",
            out["tool_call"]["finish_reason"] == "tool_calls"
                && two_calls(&out["tool_call"]["tool_calls"])
                && usage_ok(&out["tool_call"]),
        ),
        (
            "tool call streamed (parallel)",
            out["tool_call_stream"]["finish_reason"] == "tool_calls"
                && two_calls(&out["tool_call_stream"]["tool_calls"])
                && usage_ok(&out["tool_call_stream"]),
        ),
        (
            "tool-result turn",
            out["tool_result_turn"]["text"] == c.tool_result_reply.as_str()
                && usage_ok(&out["tool_result_turn"]),
        ),
        (
            "JSON mode",
            out["json_mode"]["text"] == c.json_reply
                && out["json_mode"]["text"]
                    .as_str()
                    .and_then(|t| serde_json::from_str::<Value>(t).ok())
                    .is_some_and(|v| v.is_object())
                && usage_ok(&out["json_mode"]),
        ),
        (
            "image input",
            out["image_input"]["text"] == c.image_reply.as_str() && usage_ok(&out["image_input"]),
        ),
        (
            "max-tokens stop",
            out["max_tokens_stop"]["finish_reason"] == "length"
                && out["max_tokens_stop"]["text"] == c.max_tokens_reply.as_str(),
        ),
        (
            "provider error",
            e["class"] == c.error_class
                && e["message"].as_str().is_some_and(|m| !m.is_empty())
                && c.error_code.is_none_or(|code| e["code"] == code),
        ),
    ]
}

/// Prints the cases as rows and the providers as columns.
#[allow(clippy::print_stdout, reason = "the table is the test's report")]
fn print_table(providers: &[&str], results: &[Vec<(&'static str, bool)>]) {
    print!("{:<32}", "case");
    for p in providers {
        print!(" {p:>9}");
    }
    println!();
    for (row, (case, _)) in results[0].iter().enumerate() {
        print!("{case:<32}");
        for column in results {
            print!(" {:>9}", if column[row].1 { "ok" } else { "FAIL" });
        }
        println!();
    }
}

/// The buyer key, with the proxy logging at debug level (for the secret search).
fn start_debug_proxy(name: &str, models_and_pools: &str) -> ProxyProcess {
    let toml = format!(
        "{models_and_pools}\n[[keys]]\nid = \"key-main\"\naccount = \"acct-1\"\nkey = \"env:TEST_BUYER_KEY\"\n"
    );
    ProxyProcess::start(
        binary(),
        name,
        &toml,
        &[("TEST_BUYER_KEY", KEY), ("TOKN_LOG", "debug")],
    )
}

/// Every seller secret the matrix's pools hold, and what Vertex mints from its key file.
fn seller_secrets(fakes: &Fakes) -> Vec<String> {
    let mut secrets: Vec<String> = [
        OPENAI_KEY,
        OPENAI_BROKEN_KEY,
        ANTHROPIC_KEY,
        ANTHROPIC_BROKEN_KEY,
        BEDROCK_SECRET,
        BEDROCK_BROKEN_SECRET,
        AZURE_KEY,
        AZURE_FILTERED_KEY,
        GEMINI_KEY,
        GEMINI_BROKEN_KEY,
        // Vertex access tokens, and the key files' private keys.
        "ya29.",
        "PRIVATE KEY",
    ]
    .map(str::to_owned)
    .to_vec();
    secrets.extend(fakes.private_key_fragments.iter().cloned());
    secrets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_passes_the_conformance_matrix_through_the_official_sdk() {
    let fakes = start_fakes(None).await;
    let proxy = start_debug_proxy("conformance", &fakes.toml);
    let runs = fakes.columns.iter().map(|c| {
        run_sdk_matrix(
            &proxy,
            &c.model,
            json!({"provider_error": {"model": c.error_model}}),
        )
    });
    let outs = futures_util::future::join_all(runs).await;

    let results: Vec<_> = fakes
        .columns
        .iter()
        .zip(&outs)
        .map(|(c, out)| evaluate(c, out))
        .collect();
    let providers: Vec<&str> = fakes.columns.iter().map(|c| c.provider).collect();
    print_table(&providers, &results);
    for ((c, out), result) in fakes.columns.iter().zip(&outs).zip(&results) {
        assert!(result.iter().all(|(_, ok)| *ok), "{}: {out:#}", c.provider);
        assert!(
            (c.rejected)().is_empty(),
            "{}: {:?}",
            c.provider,
            (c.rejected)()
        );
    }

    // No seller secret in the proxy's debug log or in anything the SDK received (answers and
    // error messages, relayed provider errors included).
    let log = proxy.log();
    assert!(log.len() > 10_000, "the debug log was written");
    // The search works: the fragments are in what the proxy was given.
    for fragment in &fakes.private_key_fragments {
        assert!(fakes.toml.contains(fragment.as_str()));
    }
    let answers = serde_json::to_string(&outs).unwrap();
    for secret in seller_secrets(&fakes) {
        assert!(!log.contains(&secret), "a seller secret is in the log");
        assert!(
            !answers.contains(&secret),
            "a seller secret reached a client"
        );
    }
}

/// Time from sending a request to the first chunk containing `needle`.
async fn time_to_first(req: reqwest::RequestBuilder, needle: &str) -> Duration {
    let started = Instant::now();
    let mut resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = Vec::new();
    let mut first = None;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        seen.extend_from_slice(&chunk);
        if first.is_none() && memchr::memmem::find(&seen, needle.as_bytes()).is_some() {
            first = Some(started.elapsed());
        }
    }
    first.expect("the first token arrived")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Streams are translated as they arrive: for every provider, time to first token through the
/// proxy next to the fake's own (medians of warm requests on loopback), printed as a table.
/// Each fake waits 25 ms before its first token and 30 ms between later ones, so a proxy that
/// buffered would show the whole stream's length instead; the test asserts only that much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stdout, reason = "the table is the test's report")]
async fn time_to_first_token_through_the_proxy_matches_each_fake() {
    const ROUNDS: usize = 7;
    let ttft = Duration::from_millis(25);
    let interval = Duration::from_millis(30);
    let fakes = start_fakes(Some((ttft, interval))).await;
    let proxy = start_with_buyer_key("conformance-ttft", &fakes.toml);
    println!(
        "{:<10} {:>10} {:>12} {:>10}",
        "provider", "fake ms", "proxy ms", "delta ms"
    );
    for c in &fakes.columns {
        let through = || {
            client()
                .post(format!("{}/chat/completions", proxy.base_url()))
                .bearer_auth(KEY)
                .json(&json!({"model": c.model, "stream": true,
                    "messages": [{"role": "user", "content": "Say hi"}]}))
        };
        // The first word as an OpenAI content delta.
        let translated = format!("\"content\":\"{}", c.first_word);
        // Warm both paths (connections, the Vertex token) before measuring.
        time_to_first((c.direct_stream)(), c.first_word).await;
        time_to_first(through(), &translated).await;
        let mut direct = Vec::new();
        let mut proxied = Vec::new();
        for _ in 0..ROUNDS {
            direct.push(time_to_first((c.direct_stream)(), c.first_word).await);
            proxied.push(time_to_first(through(), &translated).await);
        }
        let (d, p) = (median(direct), median(proxied));
        println!(
            "{:<10} {:>10.2} {:>12.2} {:>+10.2}",
            c.provider,
            d.as_secs_f64() * 1e3,
            p.as_secs_f64() * 1e3,
            (p.as_secs_f64() - d.as_secs_f64()) * 1e3
        );
        // Not a timing assertion: a buffering proxy would deliver the first token after the
        // last, at least four intervals later.
        assert!(p < d + interval * 3, "{}: {p:?} vs {d:?}", c.provider);
        assert!(
            (c.rejected)().is_empty(),
            "{}: {:?}",
            c.provider,
            (c.rejected)()
        );
    }
}
