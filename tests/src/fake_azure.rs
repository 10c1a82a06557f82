//! A fake Azure OpenAI resource (`https://{resource}.openai.azure.com`), for the proxy's Azure
//! adapter.
//!
//! It validates what it receives the way Azure does: `POST
//! /openai/deployments/{deployment}/chat/completions?api-version={known version}` or `POST
//! /openai/v1/chat/completions` with the deployment as the body's `model`; a deployment the
//! resource has; the key in `api-key` (a request that also carries `Authorization` is refused, so
//! a gateway leaking a bearer header fails); a JSON body valid for Chat Completions (the same
//! checks as OpenAI's, [`crate::fake::validate_chat_body`]). Refusals use Azure's error JSON
//! (`{"error":{"code","message"}}`).
//!
//! It answers like Azure: complete bodies with `prompt_filter_results` and per-choice
//! `content_filter_results`; streams whose first chunk has `choices: []` and only
//! `prompt_filter_results`, content chunks with `content_filter_results`, an asynchronous-filter
//! annotation (a choice without `delta`), and the usage chunk when asked. Per `api-key`
//! [`AzureBehavior`]: errors (401, 429 with `retry-after`, 400 `content_filter`, 500), a tool
//! call, an output cut by the content filter.
//!
//! Embeddings too, on both surfaces: `POST /openai/deployments/{deployment}/embeddings?api-version=…`
//! (a body `model` optional and ignored) and `POST /openai/v1/embeddings` (the deployment as the
//! body's `model`), the same key checks, OpenAI's embeddings body
//! ([`crate::fake_responses::validate_embeddings_body`]) with text inputs only (token arrays are
//! refused). The answer is OpenAI's list: one [`crate::fake_embedding`] per input (1536
//! dimensions unless `dimensions` says otherwise, base64 when `encoding_format` asks for it),
//! `model` the deployment, usage the inputs' [`crate::word_count`]s.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use serde_json::{json, Value};

use crate::fake::{
    argument_pieces, text_reply, usage_json, validate_chat_body, FakeUsage, Received,
};
use crate::fake_embeddings::{fake_embedding, openai_embeddings_list, word_count};
use crate::fake_responses::validate_embeddings_body;
use crate::serve::{
    fake_server, json_response_with_request_id, lock, paced_stream, refuse, Body, FakeLog,
    FakeServer, Pace, ReadRequest,
};

/// `api-version`s of the deployments surface the fake accepts.
pub const AZURE_API_VERSIONS: &[&str] = &[
    "2024-02-01",
    "2024-06-01",
    "2024-10-21",
    "2024-12-01-preview",
    "2025-04-01-preview",
];

/// Versions older than `2024-08-01-preview` refuse `stream_options` (no usage in streams).
const VERSIONS_WITHOUT_STREAM_OPTIONS: &[&str] = &["2024-02-01", "2024-06-01"];

/// Embedding dimensions when a request names none (text-embedding-3-small's, ada-002's).
pub const AZURE_EMBEDDING_DIMENSIONS: usize = 1536;

/// The most dimensions an embeddings request may ask for (text-embedding-3-large's).
const AZURE_EMBEDDING_DIMENSIONS_MAX: u64 = 3072;

/// The most inputs one embeddings request may carry.
const AZURE_EMBEDDING_INPUTS_MAX: usize = 2048;

/// The underlying model Azure names in its answers.
pub const AZURE_MODEL: &str = "gpt-4o-2024-08-06";

/// The reply's words (one completion token each).
pub const AZURE_REPLY: &str = "Hello from the fake Azure deployment.";

/// The reply when the request asks for JSON (`response_format`).
pub const AZURE_JSON_REPLY: &str = r#"{"answer":"hi","confidence":1}"#;

/// What the fake does for a request.
#[derive(Debug, Clone)]
pub struct AzureBehavior {
    /// 200, or an error: 401, 429 (with `retry_after_s`), 400 (`content_filter`), 500.
    pub status: u16,
    pub retry_after_s: Option<u64>,
    /// Call the offered tools among `get_weather` (`{"city":"Paris"}`) and `get_time`
    /// (`{"tz":"Europe/Paris"}`), in parallel when both are offered.
    pub tool_call: bool,
    /// The output filter stops the answer after its first word (`finish_reason:
    /// content_filter`).
    pub filter_output: bool,
    pub usage: FakeUsage,
    /// Delay before a stream's first content chunk (its time to first token).
    pub ttft: Duration,
    /// Pause before each later content chunk.
    pub chunk_interval: Duration,
}

impl Default for AzureBehavior {
    fn default() -> Self {
        Self {
            status: 200,
            retry_after_s: None,
            tool_call: false,
            filter_output: false,
            usage: FakeUsage {
                prompt_tokens: 23,
                completion_tokens: 6,
                cached_tokens: 7,
                reasoning_tokens: 2,
            },
            ttft: Duration::ZERO,
            chunk_interval: Duration::ZERO,
        }
    }
}

/// What the fake keeps: behaviors, deployments, its log.
pub struct AzureState {
    default: AzureBehavior,
    by_key: HashMap<String, AzureBehavior>,
    deployments: Vec<String>,
    log: FakeLog,
    next_id: u64,
}

fake_server!(
    /// A running fake; stops when dropped.
    FakeAzure = AzureState
);

impl FakeServer<AzureState> {
    /// Starts on `127.0.0.1:0` with a resource that has `deployments`.
    pub async fn start(default: AzureBehavior, deployments: &[&str]) -> std::io::Result<Self> {
        Self::serve(
            |_| AzureState {
                default,
                by_key: HashMap::new(),
                deployments: deployments.iter().map(|d| (*d).to_owned()).collect(),
                log: FakeLog::default(),
                next_id: 0,
            },
            handle,
        )
        .await
    }

    /// Requests carrying `api-key: <key>` get `behavior`.
    pub fn set_behavior(&self, key: &str, behavior: AzureBehavior) {
        self.state().by_key.insert(key.to_owned(), behavior);
    }
}

fn full(status: u16, body: &Value) -> Response<Body> {
    json_response_with_request_id(status, body, "apim-request-id", "fake-azure-request")
}

/// Azure's error body: `{"error":{"code","message"}}`.
pub fn azure_error(status: u16, code: &str, message: &str) -> Response<Body> {
    full(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

fn filter_results() -> Value {
    let safe = json!({"filtered": false, "severity": "safe"});
    json!({"hate": safe, "self_harm": safe, "sexual": safe, "violence": safe})
}

fn prompt_filter_results() -> Value {
    json!([{"prompt_index": 0, "content_filter_results": filter_results()}])
}

/// What a request asks of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Chat,
    Embeddings,
    /// The Responses API: `/openai/v1/responses`, or `/openai/responses?api-version=…` (preview),
    /// the deployment as the body's `model` on both.
    Responses,
}

/// The deployment a surface without it in the path takes from the body's `model`.
fn body_deployment(
    body: &Value,
    operation: Operation,
) -> Result<(String, Operation), (u16, &'static str, String)> {
    body["model"]
        .as_str()
        .filter(|m| !m.is_empty())
        .map(|m| (m.to_owned(), operation))
        .ok_or((
            400,
            "BadRequest",
            "model: the deployment name is required".into(),
        ))
}

/// The query's `api-version`.
fn api_version(query: Option<&str>) -> Option<&str> {
    query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="))
}

/// The deployment a request names and what it asks, or why it is refused (status, code,
/// message).
fn deployment_of(
    path: &str,
    query: Option<&str>,
    body: &Value,
) -> Result<(String, Operation), (u16, &'static str, String)> {
    let v1 = match path {
        "/openai/v1/chat/completions" => Some(Operation::Chat),
        "/openai/v1/embeddings" => Some(Operation::Embeddings),
        "/openai/v1/responses" => Some(Operation::Responses),
        _ => None,
    };
    if let Some(operation) = v1 {
        if query.is_some_and(|q| q.contains("api-version=")) {
            return Err((
                400,
                "BadRequest",
                "api-version is not allowed on the v1 surface".into(),
            ));
        }
        return body_deployment(body, operation);
    }
    if path == "/openai/responses" {
        if !api_version(query)
            .is_some_and(|v| v.ends_with("-preview") && AZURE_API_VERSIONS.contains(&v))
        {
            return Err((
                404,
                "404",
                "Resource not found (the Responses API needs a preview api-version)".into(),
            ));
        }
        return body_deployment(body, Operation::Responses);
    }
    let (deployment, operation) = path
        .strip_prefix("/openai/deployments/")
        .and_then(|rest| {
            rest.strip_suffix("/chat/completions")
                .map(|d| (d, Operation::Chat))
                .or_else(|| {
                    rest.strip_suffix("/embeddings")
                        .map(|d| (d, Operation::Embeddings))
                })
        })
        .filter(|(d, _)| !d.is_empty() && !d.contains('/'))
        .ok_or((404, "404", "Resource not found".to_owned()))?;
    match api_version(query) {
        None => Err((
            404,
            "404",
            "Resource not found (api-version is missing)".into(),
        )),
        Some(v) if !AZURE_API_VERSIONS.contains(&v) => Err((
            404,
            "404",
            format!("Resource not found (unsupported api-version {v})"),
        )),
        Some(v)
            if operation == Operation::Chat
                && VERSIONS_WITHOUT_STREAM_OPTIONS.contains(&v)
                && body.get("stream_options").is_some() =>
        {
            Err((
                400,
                "BadRequest",
                "Unrecognized request argument supplied: stream_options".into(),
            ))
        }
        Some(_) => Ok((deployment.to_owned(), operation)),
    }
}

/// The Responses API's answer, as OpenAI's (Azure serves the same API): whole, or its event
/// sequence through `response.completed`.
fn responses_answer(req: &Value, b: &AzureBehavior) -> Response<Body> {
    let behavior = crate::Behavior {
        usage: b.usage,
        tool_calls: if b.tool_call {
            vec![("get_weather".to_owned(), json!({"city": "Paris"}))]
        } else {
            Vec::new()
        },
        ..crate::Behavior::default()
    };
    if req["stream"] != true {
        return full(200, &crate::fake_responses::response_json(req, &behavior));
    }
    let events: Vec<Bytes> = crate::fake_responses::response_events(req, &behavior);
    let mut resp = Response::new(http_body_util::BodyExt::boxed(
        http_body_util::BodyExt::map_err(
            http_body_util::Full::new(Bytes::from(events.concat())),
            |never: Infallible| match never {},
        ),
    ));
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/event-stream"),
    );
    resp
}

/// An embeddings body as Azure checks it: OpenAI's rules (the model optional when the path
/// names the deployment), a string `user`, at most 2048 inputs, `dimensions` at most 3072, and
/// text inputs only (this fake refuses token arrays). The input texts, in order.
fn validate_embeddings(body: &Value, deployment: &str) -> Result<Vec<String>, String> {
    let mut checked = body.clone();
    if let Some(obj) = checked.as_object_mut() {
        obj.entry("model").or_insert_with(|| json!(deployment));
    }
    validate_embeddings_body(&checked)?;
    if body.get("user").is_some_and(|u| !u.is_string()) {
        return Err("'user' must be a string.".into());
    }
    if body["dimensions"]
        .as_u64()
        .is_some_and(|d| d > AZURE_EMBEDDING_DIMENSIONS_MAX)
    {
        return Err(format!(
            "'dimensions' must be at most {AZURE_EMBEDDING_DIMENSIONS_MAX}."
        ));
    }
    let texts: Option<Vec<String>> = match &body["input"] {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    };
    let texts = texts.ok_or(
        "'input' must be a string or an array of strings: this resource refuses token arrays.",
    )?;
    if texts.len() > AZURE_EMBEDDING_INPUTS_MAX {
        return Err(format!(
            "Too many inputs. The max number of inputs is {AZURE_EMBEDDING_INPUTS_MAX}."
        ));
    }
    Ok(texts)
}

/// OpenAI's embeddings list for `texts`, as Azure answers it.
fn embeddings_answer(body: &Value, deployment: &str, texts: &[String]) -> Value {
    let dims = body["dimensions"]
        .as_u64()
        .map_or(AZURE_EMBEDDING_DIMENSIONS, |d| d as usize);
    let vectors: Vec<Vec<f32>> = texts.iter().map(|t| fake_embedding(t, dims)).collect();
    let tokens = texts.iter().map(|t| word_count(t)).sum();
    openai_embeddings_list(
        &vectors,
        body["encoding_format"] == "base64",
        &json!(deployment),
        tokens,
    )
}

/// `GET /openai/models?api-version=…`, what a credential check calls: an api-key set to fail
/// with 401 fails here too.
fn list_models(
    state: &Mutex<AzureState>,
    query: Option<&str>,
    headers: &std::collections::HashMap<String, String>,
) -> Response<Body> {
    let Some(key) = headers.get("api-key").filter(|k| !k.is_empty()) else {
        return azure_error(401, "401", "Access denied due to missing subscription key.");
    };
    let version = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="));
    if !version.is_some_and(|v| AZURE_API_VERSIONS.contains(&v)) {
        return azure_error(404, "404", "Resource not found (api-version)");
    }
    match lock(state).by_key.get(key).map_or(200, |b| b.status) {
        401 => azure_error(401, "401", "Access denied due to invalid subscription key."),
        _ => full(
            200,
            &json!({"object": "list", "data": [{"id": "gpt-4o", "object": "model",
                "created_at": 0, "status": "succeeded"}]}),
        ),
    }
}

async fn handle(
    req: ReadRequest,
    state: Arc<Mutex<AzureState>>,
) -> Result<Response<Body>, Infallible> {
    let query = req.query.clone();
    let (method, path, version, headers, body) = req.parts();
    let reject = |status: u16, code: &str, why: String| {
        refuse(&state, &why, azure_error(status, code, &why))
    };
    if method == http::Method::GET && path == "/openai/models" {
        return Ok(list_models(&state, query.as_deref(), &headers));
    }
    if method != http::Method::POST {
        return reject(404, "404", format!("Resource not found: {method} {path}"));
    }
    if headers.contains_key("authorization") {
        return reject(
            401,
            "401",
            "Authorization header given with an api-key: send one credential".into(),
        );
    }
    let Some(key) = headers.get("api-key").filter(|k| !k.is_empty()).cloned() else {
        return reject(
            401,
            "401",
            "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.".into(),
        );
    };
    if !headers
        .get("content-type")
        .is_some_and(|c| c.starts_with("application/json"))
    {
        return reject(
            415,
            "UnsupportedMediaType",
            "content-type must be application/json".into(),
        );
    }
    let Some(parsed) = body.and_then(|b| serde_json::from_slice::<Value>(&b).ok()) else {
        return reject(400, "BadRequest", "body: invalid JSON".into());
    };
    let (deployment, operation) = match deployment_of(&path, query.as_deref(), &parsed) {
        Ok(d) => d,
        Err((status, code, why)) => return reject(status, code, why),
    };
    let texts = match operation {
        Operation::Chat => validate_chat_body(&parsed)
            .map(|()| Vec::new())
            .map_err(|e| e.message),
        Operation::Embeddings => validate_embeddings(&parsed, &deployment),
        Operation::Responses => {
            crate::fake_responses::validate_responses_body(&parsed).map(|()| Vec::new())
        }
    };
    let texts = match texts {
        Ok(texts) => texts,
        Err(why) => return reject(400, "BadRequest", why),
    };
    let (behavior, id) = {
        let mut st = lock(&state);
        if !st.deployments.contains(&deployment) {
            drop(st);
            return reject(
                404,
                "DeploymentNotFound",
                format!("The API deployment {deployment} for this resource does not exist."),
            );
        }
        st.log.received.push(Received {
            version,
            path: match &query {
                Some(q) => format!("{path}?{q}"),
                None => path,
            },
            headers,
            body: parsed.clone(),
        });
        st.next_id += 1;
        let b = st
            .by_key
            .get(&key)
            .cloned()
            .unwrap_or_else(|| st.default.clone());
        (b, format!("chatcmpl-azure{:04}", st.next_id))
    };
    match behavior.status {
        200 => {}
        400 => {
            return Ok(full(
                400,
                &json!({"error": {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry.",
                    "type": null, "param": "prompt", "code": "content_filter", "status": 400,
                    "innererror": {"code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": {"hate": {"filtered": true, "severity": "high"},
                            "self_harm": {"filtered": false, "severity": "safe"},
                            "sexual": {"filtered": false, "severity": "safe"},
                            "violence": {"filtered": false, "severity": "safe"}}}}}),
            ))
        }
        401 => {
            return Ok(azure_error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."))
        }
        429 => {
            let after = behavior.retry_after_s.unwrap_or(1);
            let name = match operation {
                Operation::Chat => "ChatCompletions_Create",
                Operation::Embeddings => "Embeddings_Create",
                Operation::Responses => "Responses_Create",
            };
            let mut resp = azure_error(429, "429", &format!("Requests to the {name} Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after {after} seconds."));
            if let Ok(v) = http::HeaderValue::try_from(after.to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
            return Ok(resp);
        }
        s => {
            return Ok(azure_error(
                s,
                "InternalServerError",
                "The server had an error while processing your request.",
            ))
        }
    }
    if operation == Operation::Embeddings {
        return Ok(full(200, &embeddings_answer(&parsed, &deployment, &texts)));
    }
    if operation == Operation::Responses {
        return Ok(responses_answer(&parsed, &behavior));
    }
    let answer = answer(&parsed, &behavior);
    if parsed["stream"] == true {
        let include_usage = parsed["stream_options"]["include_usage"] == true;
        return Ok(stream_response(&id, &answer, &behavior, include_usage));
    }
    let message = if answer.tools.is_empty() {
        json!({"role": "assistant", "content": answer.words.join(" ")})
    } else {
        let calls: Vec<Value> = answer
            .tools
            .iter()
            .map(|(call_id, name, args)| {
                json!({"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": args}})
            })
            .collect();
        json!({"role": "assistant", "content": null, "tool_calls": calls})
    };
    Ok(full(
        200,
        &json!({"id": id, "object": "chat.completion", "created": 1_732_000_000, "model": AZURE_MODEL,
            "system_fingerprint": "fp_azure",
            "prompt_filter_results": prompt_filter_results(),
            "choices": [{"index": 0, "message": message, "logprobs": null,
                "finish_reason": answer.finish_reason, "content_filter_results": filter_results()}],
            "usage": usage_json(&behavior.usage)}),
    ))
}

struct Answer {
    words: Vec<String>,
    /// `(id, name, arguments)`.
    tools: Vec<(String, String, String)>,
    finish_reason: &'static str,
}

fn answer(req: &Value, b: &AzureBehavior) -> Answer {
    let messages = req["messages"].as_array().map_or(&[][..], Vec::as_slice);
    let last_is_tool = messages.last().is_some_and(|m| m["role"] == "tool");
    let offered: Vec<&str> = req["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t["function"]["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    if b.tool_call && !last_is_tool {
        let tools: Vec<(String, String, String)> = [
            ("get_weather", r#"{"city":"Paris"}"#),
            ("get_time", r#"{"tz":"Europe/Paris"}"#),
        ]
        .into_iter()
        .filter(|(name, _)| offered.contains(name))
        .enumerate()
        .map(|(i, (name, args))| (format!("call_azure_{}", i + 1), name.into(), args.into()))
        .collect();
        if !tools.is_empty() {
            return Answer {
                words: Vec::new(),
                tools,
                finish_reason: "tool_calls",
            };
        }
    }
    let (mut words, mut finish_reason) = text_reply(req, AZURE_JSON_REPLY, || {
        AZURE_REPLY.split(' ').map(str::to_owned).collect()
    });
    if b.filter_output {
        words.truncate(1);
        finish_reason = "content_filter";
    }
    Answer {
        words,
        tools: Vec::new(),
        finish_reason,
    }
}

fn data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn stream_events(
    id: &str,
    a: &Answer,
    b: &AzureBehavior,
    include_usage: bool,
) -> Vec<(bool, Bytes)> {
    let chunk = |choice: Value| {
        data(
            &json!({"id": id, "object": "chat.completion.chunk", "created": 1_732_000_000,
            "model": AZURE_MODEL, "system_fingerprint": "fp_azure", "choices": [choice]}),
        )
    };
    // Azure's first chunk: only the prompt's filter results.
    let mut out = vec![(
        false,
        data(
            &json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
            "prompt_filter_results": prompt_filter_results()}),
        ),
    )];
    out.push((
        false,
        chunk(json!({"index": 0, "content_filter_results": {},
        "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null})),
    ));
    match a.tools.is_empty() {
        false => {
            for (i, (call_id, name, args)) in a.tools.iter().enumerate() {
                out.push((
                    true,
                    chunk(json!({"index": 0, "content_filter_results": {},
                    "delta": {"tool_calls": [{"index": i, "id": call_id, "type": "function",
                        "function": {"name": name, "arguments": ""}}]},
                    "finish_reason": null, "logprobs": null})),
                ));
                for piece in argument_pieces(args, 2) {
                    out.push((
                        true,
                        chunk(json!({"index": 0, "content_filter_results": {},
                        "delta": {"tool_calls": [{"index": i, "function": {"arguments": piece}}]},
                        "finish_reason": null, "logprobs": null})),
                    ));
                }
            }
        }
        true => {
            for (i, w) in a.words.iter().enumerate() {
                let text = if i == 0 { w.clone() } else { format!(" {w}") };
                out.push((
                    true,
                    chunk(
                        json!({"index": 0, "content_filter_results": filter_results(),
                    "delta": {"content": text}, "finish_reason": null, "logprobs": null}),
                    ),
                ));
            }
            // Asynchronous filtering: an annotation of text already sent, with no `delta`.
            out.push((
                false,
                chunk(
                    json!({"index": 0, "content_filter_results": filter_results(),
                "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 12},
                "finish_reason": null}),
                ),
            ));
        }
    }
    if a.finish_reason == "content_filter" {
        // The filter's verdict comes without a `delta`.
        out.push((
            false,
            chunk(json!({"index": 0,
            "content_filter_results": {"hate": {"filtered": true, "severity": "high"}},
            "finish_reason": "content_filter"})),
        ));
    } else {
        out.push((
            false,
            chunk(
                json!({"index": 0, "content_filter_results": {}, "delta": {},
            "finish_reason": a.finish_reason, "logprobs": null}),
            ),
        ));
    }
    if include_usage {
        out.push((
            false,
            data(
                &json!({"id": id, "object": "chat.completion.chunk", "created": 1_732_000_000,
                "model": AZURE_MODEL, "choices": [], "usage": usage_json(&b.usage)}),
            ),
        ));
    }
    out.push((false, Bytes::from_static(b"data: [DONE]\n\n")));
    out
}

fn stream_response(id: &str, a: &Answer, b: &AzureBehavior, include_usage: bool) -> Response<Body> {
    let pace = Pace {
        ttft: b.ttft,
        interval: b.chunk_interval,
    };
    paced_stream(
        stream_events(id, a, b, include_usage),
        pace,
        "text/event-stream; charset=utf-8",
    )
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]

    use super::*;
    use base64::Engine as _;

    const DEPLOYMENT: &str = "embed-small";

    async fn started() -> FakeAzure {
        FakeAzure::start(AzureBehavior::default(), &[DEPLOYMENT, "chat-4o"])
            .await
            .unwrap()
    }

    fn deployments_url(fake: &FakeAzure, deployment: &str, version: &str) -> String {
        format!(
            "{}/openai/deployments/{deployment}/embeddings?api-version={version}",
            fake.base_url()
        )
    }

    async fn post(url: &str, key: &str, body: &Value) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .post(url)
            .header("api-key", key)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    #[tokio::test]
    async fn embeddings_on_the_deployments_surface() {
        let fake = started().await;
        let url = deployments_url(&fake, DEPLOYMENT, "2024-10-21");
        let body = json!({"input": ["the quick brown fox", "héllo"], "user": "u-1"});
        let (status, v) = post(&url, "azkey", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], DEPLOYMENT);
        assert_eq!(v["usage"]["prompt_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 5);
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        for (i, text) in ["the quick brown fox", "héllo"].iter().enumerate() {
            assert_eq!(data[i]["object"], "embedding");
            assert_eq!(data[i]["index"], i);
            assert_eq!(
                data[i]["embedding"],
                json!(crate::fake_embedding(text, AZURE_EMBEDDING_DIMENSIONS))
            );
        }
        // A body model is ignored here; base64 is the little-endian floats.
        let body = json!({"input": "abc", "model": "whatever", "dimensions": 3,
            "encoding_format": "base64"});
        let (status, v) = post(&url, "azkey", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["model"], DEPLOYMENT);
        assert_eq!(v["usage"]["prompt_tokens"], 1);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(floats, crate::fake_embedding("abc", 3));
        let received = fake.received();
        assert_eq!(received.len(), 2);
        assert_eq!(
            received[0].path,
            format!("/openai/deployments/{DEPLOYMENT}/embeddings?api-version=2024-10-21")
        );
        assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    }

    #[tokio::test]
    async fn embeddings_on_the_v1_surface() {
        let fake = started().await;
        let url = format!("{}/openai/v1/embeddings", fake.base_url());
        let body = json!({"model": DEPLOYMENT, "input": "one two", "dimensions": 5,
            "encoding_format": "float"});
        let (status, v) = post(&url, "azkey", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["model"], DEPLOYMENT);
        assert_eq!(
            v["data"][0]["embedding"],
            json!(crate::fake_embedding("one two", 5))
        );
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        assert_eq!(fake.received()[0].path, "/openai/v1/embeddings");

        let (status, v) = post(&url, "azkey", &json!({"input": "x"})).await;
        assert_eq!(status, 400);
        assert_eq!(v["error"]["code"], "BadRequest");
        let (status, _) = post(
            &format!("{url}?api-version=2024-10-21"),
            "azkey",
            &json!({"model": DEPLOYMENT, "input": "x"}),
        )
        .await;
        assert_eq!(status, 400);
        let (status, v) = post(&url, "azkey", &json!({"model": "nope", "input": "x"})).await;
        assert_eq!(status, 404);
        assert_eq!(v["error"]["code"], "DeploymentNotFound");
        assert_eq!(fake.received().len(), 1);
        assert_eq!(fake.rejected().len(), 3);
    }

    #[tokio::test]
    async fn embeddings_refuse_what_azure_refuses() {
        let fake = started().await;
        let url = deployments_url(&fake, DEPLOYMENT, "2024-10-21");
        let cases = [
            json!({"input": ""}),
            json!({"input": []}),
            json!({"input": ["a", ""]}),
            json!({"input": [1, 2, 3]}),
            json!({"input": [[1, 2], [3]]}),
            json!({"input": 5}),
            json!({}),
            json!({"input": "x", "dimensions": 0}),
            json!({"input": "x", "dimensions": 4000}),
            json!({"input": "x", "encoding_format": "int8"}),
            json!({"input": "x", "user": 5}),
            json!({"input": "x", "stream": true}),
            json!({"input": vec!["x"; 2049]}),
            json!(["x"]),
        ];
        for body in &cases {
            let (status, v) = post(&url, "azkey", body).await;
            assert_eq!(status, 400, "{body}: {v}");
            assert_eq!(v["error"]["code"], "BadRequest", "{v}");
            assert!(v["error"]["message"].is_string());
        }
        assert_eq!(fake.rejected().len(), cases.len());
        let body = json!({"input": "x"});
        let (status, _) = post(
            &deployments_url(&fake, DEPLOYMENT, "2099-01-01"),
            "azkey",
            &body,
        )
        .await;
        assert_eq!(status, 404);
        let (status, v) = post(
            &deployments_url(&fake, "missing", "2024-10-21"),
            "azkey",
            &body,
        )
        .await;
        assert_eq!(status, 404);
        assert_eq!(v["error"]["code"], "DeploymentNotFound");
        let resp = reqwest::Client::new()
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let resp = reqwest::Client::new()
            .post(&url)
            .header("api-key", "azkey")
            .bearer_auth("leak")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert!(fake.received().is_empty());

        fake.set_behavior(
            "azkey-busy",
            AzureBehavior {
                status: 429,
                retry_after_s: Some(3),
                ..AzureBehavior::default()
            },
        );
        let resp = reqwest::Client::new()
            .post(&url)
            .header("api-key", "azkey-busy")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "3");
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Embeddings_Create"));
    }
}
