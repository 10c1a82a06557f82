//! Google's `generateContent` API, as the Gemini API (`x-goog-api-key`) and Vertex AI (OAuth
//! bearer token minted from a service account) serve it: same request and response bodies,
//! different paths and credentials.
//!
//! Requests are rebuilt: system and developer messages become `systemInstruction`, assistant
//! turns `model` contents with `functionCall` parts, tool messages `functionResponse` parts in a
//! user turn (named by the function, found through the earlier call's id), consecutive turns of
//! one role are merged (Google wants them alternating). Responses are translated whole or, for
//! `alt=sse` streams, event by event as they arrive.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokn_config::credential::{ApiKeyCredential, VertexCredential};

use super::google_token::AccessToken;
use super::translate::{
    assistant_tool_calls, bad_messages, completion_id, conversation, function_tools,
    json_post_header, offered_tools, push_path_segment, refuse_unsupported, stop_sequences,
    text_and_image_parts, text_parts, tool_call_delta, tool_call_id, unix_secs, usage_json,
    write_chunk, write_error_event, write_usage_chunk, ChunkHeader,
};
use super::{
    ChatCall, CredentialHeader, EmbeddingsCall, FailureClass, MessagesCall, Outbound,
    ProviderAdapter, StreamTally, StreamTranslator,
};
use crate::chat::ChatRequest;
use crate::embeddings::{EmbeddingsAnswer, EmbeddingsInput};
use crate::error::{anthropic_error_body, ErrorKind, GatewayError, UpstreamError};
use crate::relay::{event_data, find_event_end, FramingError, SSE_EVENT_BYTES_MAX};
use crate::upstream::Endpoint;
use crate::usage::Usage;

/// Where a Gemini API pool without a `base_url` goes.
const GEMINI_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// Tool-call ids carry the call's `thoughtSignature` after this mark, so that the client's echo
/// of the id in its next turn gives Google the signature back (Gemini 3 refuses a function-call
/// history without it; OpenAI's wire format has no other field that clients round-trip).
const THOUGHT_SIGNATURE_MARK: &str = "~ts~";

/// `anthropic_version` Vertex takes for Claude.
const VERTEX_ANTHROPIC_VERSION: &str = "vertex-2023-10-16";

/// Google takes at most this many stop sequences.
const STOP_SEQUENCES_MAX: usize = 5;

/// The Gemini API and Vertex AI: one adapter, since both take and give the same bodies.
///
/// Choices: `n` > 1 is refused (candidate counts above 1 are not served by every model, and a
/// multi-choice stream would need per-choice state; the other native adapters refuse it too).
/// `parallel_tool_calls: false` is accepted and ignored: Google has no switch for it, the
/// translators do not see the request, and agent frameworks send it routinely, so refusing it
/// would break them while a second call in one turn is something every OpenAI client handles.
/// Hints without an equivalent (`reasoning_effort`, `user`, `store`, `metadata`,
/// `service_tier`) and penalties of 0 add nothing to the request.
pub struct GeminiAdapter {
    endpoint: Endpoint,
    /// Everything before the model id: `{base}/v1beta/models/` (Gemini API) or
    /// `{base}/v1/projects/{project}/locations/{location}/publishers/google/models/` (Vertex).
    /// The model id and `:generateContent` / `:streamGenerateContent?alt=sse` follow.
    models_path: String,
    /// Vertex: `{base}/v1/projects/{project}/locations/{location}/publishers/anthropic/models/`,
    /// where Claude is served on Anthropic's Messages API (`:rawPredict`, `:streamRawPredict`).
    claude_path: Option<String>,
    auth: GoogleAuth,
}

enum GoogleAuth {
    /// The Gemini API's key, sent as `x-goog-api-key` (never in the URL, where access logs
    /// would keep it).
    ApiKey(CredentialHeader),
    /// Vertex: the service account's access token, added by the gateway once minted.
    Token(Arc<AccessToken>),
}

impl GeminiAdapter {
    /// A Gemini API pool (`…/v1beta` names the same root as the bare host).
    pub fn gemini(c: &ApiKeyCredential) -> Result<Self, String> {
        let endpoint = Endpoint::new(c.base_url.as_deref().unwrap_or(GEMINI_BASE_URL))?;
        let base = &endpoint.url.base_path;
        let root = base.strip_suffix("/v1beta").unwrap_or(base);
        Ok(Self {
            models_path: format!("{root}/v1beta/models/"),
            claude_path: None,
            endpoint,
            auth: GoogleAuth::ApiKey(CredentialHeader::new("x-goog-api-key", c.api_key.expose())?),
        })
    }

    /// A Vertex AI pool of the credential's project in its location.
    pub fn vertex(c: &VertexCredential) -> Result<Self, String> {
        let account = c
            .service_account()
            .map_err(|why| format!("service_account_json: {why}"))?;
        let endpoint = Endpoint::new(&c.base_url())?;
        let base = &endpoint.url.base_path;
        let root = base.strip_suffix("/v1").unwrap_or(base);
        let project = c.project(&account);
        let location = &c.location;
        Ok(Self {
            models_path: format!(
                "{root}/v1/projects/{project}/locations/{location}/publishers/google/models/"
            ),
            claude_path: Some(format!(
                "{root}/v1/projects/{project}/locations/{location}/publishers/anthropic/models/"
            )),
            endpoint,
            auth: GoogleAuth::Token(AccessToken::shared(Arc::new(account))),
        })
    }

    /// The request path for `upstream_model`.
    fn path(&self, upstream_model: &str, stream: bool) -> String {
        let method = if stream {
            ":streamGenerateContent?alt=sse"
        } else {
            ":generateContent"
        };
        let mut path = self.models_path.clone();
        push_path_segment(&mut path, upstream_model);
        path.push_str(method);
        path
    }
}

impl ProviderAdapter for GeminiAdapter {
    fn chat_request(&self, call: &ChatCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let content = generate_content_body(call.req, call.body)?;
        let body = Bytes::from(serde_json::to_vec(&content).map_err(|_| GatewayError::internal())?);
        let path = self.path(call.upstream_model, call.req.stream);
        let key = match &self.auth {
            GoogleAuth::ApiKey(key) => Some(key),
            GoogleAuth::Token(_) => None,
        };
        let header = json_post_header(&path, &self.endpoint, key, &[], body.len())?;
        Ok(Outbound::Http {
            endpoint: &self.endpoint,
            header: Box::new(header),
            body,
        })
    }

    /// Claude on Vertex: Anthropic's Messages API behind `rawPredict`.
    fn serves_messages(&self, upstream_model: &str) -> bool {
        self.claude_path.is_some() && upstream_model.starts_with("claude")
    }

    /// `count-tokens:rawPredict` counts for Claude.
    fn counts_message_tokens(&self) -> bool {
        self.claude_path.is_some()
    }

    /// The client's body with Vertex's `anthropic_version` and without `model` (in the path;
    /// counting's one endpoint takes it in the body); `stream` stays (it picks nothing on
    /// Vertex, the method does, but Anthropic's body has it), and the client's `anthropic-beta`
    /// stays a header.
    fn messages_request(&self, call: &MessagesCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let claude_path = self
            .claude_path
            .as_deref()
            .ok_or_else(GatewayError::internal)?;
        let mut path = claude_path.to_owned();
        let mut add = vec![("anthropic_version", json!(VERTEX_ANTHROPIC_VERSION))];
        if call.count_tokens {
            // One counting endpoint for every Claude model: the model goes in the body.
            path.push_str("count-tokens:rawPredict");
            add.push(("model", json!(call.upstream_model)));
        } else {
            push_path_segment(&mut path, call.upstream_model);
            path.push_str(if call.req.stream {
                ":streamRawPredict"
            } else {
                ":rawPredict"
            });
        }
        let body =
            crate::messages::with_envelope(call.body, &add, &["model", "anthropic_version"])?;
        let mut header = json_post_header(&path, &self.endpoint, None, &[], body.len())?;
        if let Some(beta) = &call.req.beta {
            header
                .insert_header("anthropic-beta", beta.clone())
                .map_err(|_| GatewayError::internal())?;
        }
        Ok(Outbound::Http {
            endpoint: &self.endpoint,
            header: Box::new(header),
            body,
        })
    }

    /// Vertex answers Claude's own refusals in Anthropic's shape (relayed as they are) and its
    /// own (authentication, quota) in Google's, which become Anthropic's with Google's words.
    fn messages_refusal(&self, status: u16, _error_type: Option<&str>, body: Bytes) -> Bytes {
        if crate::messages::is_anthropic_error(&body) {
            return body;
        }
        let error = ErrorFields::parse(&body);
        let message = error
            .message
            .as_deref()
            .unwrap_or("The upstream provider refused the request.");
        anthropic_error_body(status, message)
    }

    /// Google's embedding models (`gemini-embedding-001`, `text-embedding-005`).
    fn serves_embeddings(&self, upstream_model: &str) -> bool {
        upstream_model.contains("embedding")
    }

    /// The texts to `batchEmbedContents` (Gemini API) or to `predict` (Vertex).
    fn embeddings_request(&self, call: &EmbeddingsCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let input = call.texts()?;
        let (method, body, key) = match &self.auth {
            GoogleAuth::ApiKey(key) => (
                ":batchEmbedContents",
                batch_embed_body(call.upstream_model, input),
                Some(key),
            ),
            GoogleAuth::Token(_) => (":predict", predict_body(input), None),
        };
        let body = Bytes::from(serde_json::to_vec(&body).map_err(|_| GatewayError::internal())?);
        let mut path = self.models_path.clone();
        push_path_segment(&mut path, call.upstream_model);
        path.push_str(method);
        let header = json_post_header(&path, &self.endpoint, key, &[], body.len())?;
        Ok(Outbound::Http {
            endpoint: &self.endpoint,
            header: Box::new(header),
            body,
        })
    }

    /// The Gemini API reports no tokens (the rule counts them); Vertex reports each text's.
    fn embeddings_body(
        &self,
        body: Bytes,
        answer: &EmbeddingsAnswer<'_>,
    ) -> Result<(Bytes, Option<Usage>), GatewayError> {
        let bad = |_| GatewayError::upstream_bad_response();
        match &self.auth {
            GoogleAuth::ApiKey(_) => {
                let wire: BatchEmbedWire = serde_json::from_slice(&body).map_err(bad)?;
                answer.openai(
                    wire.embeddings.into_iter().map(|e| e.values).collect(),
                    None,
                )
            }
            GoogleAuth::Token(_) => {
                let wire: PredictWire = serde_json::from_slice(&body).map_err(bad)?;
                let tokens = wire
                    .predictions
                    .iter()
                    .map(|p| p.embeddings.statistics.token_count)
                    .sum::<f64>();
                let vectors = wire
                    .predictions
                    .into_iter()
                    .map(|p| p.embeddings.values)
                    .collect();
                // A count is whole; Vertex's JSON may write it as `6.0`.
                answer.openai(vectors, Some(tokens.round() as u64))
            }
        }
    }

    fn access_token(&self) -> Option<&Arc<AccessToken>> {
        match &self.auth {
            GoogleAuth::Token(token) => Some(token),
            GoogleAuth::ApiKey(_) => None,
        }
    }

    fn complete_body(
        &self,
        body: Bytes,
        model: &str,
    ) -> Result<(Bytes, Option<Usage>), GatewayError> {
        let response: ResponseWire =
            serde_json::from_slice(&body).map_err(|_| GatewayError::upstream_bad_response())?;
        let usage = response.usage_metadata.unwrap_or_default().usage();
        let completion = completion_object(response, model, unix_secs());
        let out = serde_json::to_vec(&completion).map_err(|_| GatewayError::internal())?;
        Ok((Bytes::from(out), Some(usage)))
    }

    fn stream_translator(&self, hide_usage_chunk: bool, model: &str) -> Box<dyn StreamTranslator> {
        Box::new(GenerateContentStream::new(hide_usage_chunk, model))
    }

    fn classify_failure(
        &self,
        status: u16,
        _error_type: Option<&str>,
        body: &[u8],
    ) -> FailureClass {
        let error = ErrorFields::parse(body);
        let credential_reason = error.reasons().any(|r| {
            matches!(
                r,
                "API_KEY_INVALID"
                    | "API_KEY_EXPIRED"
                    | "BILLING_DISABLED"
                    | "SERVICE_DISABLED"
                    | "CONSUMER_SUSPENDED"
                    | "ACCESS_TOKEN_EXPIRED"
                    | "ACCESS_TOKEN_SCOPE_INSUFFICIENT"
                    | "IAM_PERMISSION_DENIED"
            )
        });
        match (status, error.status.as_deref().unwrap_or_default()) {
            // Gemini answers a revoked or invalid key with 400, not 401.
            _ if credential_reason => FailureClass::Credential,
            // Our key or token was refused.
            (401, _) | (_, "UNAUTHENTICATED") => FailureClass::Credential,
            // Google's 403 is about this pool only when a reason says so (above): a file the
            // request names that the project cannot read is a 403 too, and must not take pools
            // offline. A 403 that is not Google's (a front end refusing us) is the pool's.
            (_, "PERMISSION_DENIED") => FailureClass::Request,
            (403, _) => FailureClass::Credential,
            // "User location is not supported", "free tier not available, enable billing": the
            // pool's project cannot serve, another may.
            (_, "FAILED_PRECONDITION") => FailureClass::Credential,
            // The catalog says this pool serves the model; its project or region disagrees.
            (404, _) => FailureClass::Credential,
            (408 | 409 | 429 | 499 | 500..=599, _)
            | (_, "RESOURCE_EXHAUSTED" | "UNAVAILABLE" | "INTERNAL" | "DEADLINE_EXCEEDED") => {
                FailureClass::Transient
            }
            _ => FailureClass::Request,
        }
    }

    fn upstream_error(&self, status: u16, _error_type: Option<&str>, body: &[u8]) -> UpstreamError {
        upstream_error(status, &ErrorFields::parse(body))
    }

    fn retry_after_in_body(&self, body: &[u8]) -> Option<u64> {
        ErrorFields::parse(body).retry_delay_s()
    }
}

// === Request ===

/// The `generateContent` body for an OpenAI chat request (already checked by `ChatRequest::parse`).
pub(crate) fn generate_content_body(
    req: &ChatRequest<'_>,
    body: &[u8],
) -> Result<Value, GatewayError> {
    let params: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|_| GatewayError::invalid_json("The request body is not a JSON object."))?;
    refuse_unsupported(req, &params, "Gemini")?;
    let get = |k: &str| params.get(k).filter(|v| !v.is_null());

    let mut out = Map::new();
    let list = get("messages").and_then(Value::as_array);
    let (system, contents) = translate_messages(list.map_or(&[][..], Vec::as_slice))?;
    if contents.is_empty() {
        return Err(bad_messages(
            "Gemini models need at least one non-empty user or assistant message.",
        ));
    }
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({ "parts": system }));
    }
    out.insert("contents".into(), Value::Array(contents));

    let config = generation_config(req, &params)?;
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }

    add_tools(&get, &mut out)?;
    Ok(Value::Object(out))
}

/// `tools` (function declarations) and `toolConfig`; a `tool_choice` that forces a call
/// needs tools.
fn add_tools<'a>(
    get: &impl Fn(&str) -> Option<&'a Value>,
    out: &mut Map<String, Value>,
) -> Result<(), GatewayError> {
    let tools = offered_tools(get("tools"))?
        .map(function_declarations)
        .transpose()?;
    let calling = get("tool_choice")
        .map(function_calling_config)
        .transpose()?;
    match (tools, calling) {
        (Some(declarations), calling) => {
            out.insert(
                "tools".into(),
                json!([{ "functionDeclarations": declarations }]),
            );
            if let Some(calling) = calling {
                out.insert(
                    "toolConfig".into(),
                    json!({ "functionCallingConfig": calling }),
                );
            }
            Ok(())
        }
        (None, Some(calling)) if calling["mode"] != "NONE" && calling["mode"] != "AUTO" => Err(
            GatewayError::bad_field("tool_choice", "`tool_choice` needs `tools`."),
        ),
        (None, _) => Ok(()),
    }
}

/// `generationConfig`: output limit, sampling, stops, seed, penalties and JSON modes.
fn generation_config(
    req: &ChatRequest<'_>,
    params: &Map<String, Value>,
) -> Result<Map<String, Value>, GatewayError> {
    let get = |k: &str| params.get(k).filter(|v| !v.is_null());
    let mut config = Map::new();
    if let Some(max_tokens) = req.max_output_tokens {
        if max_tokens == 0 {
            return Err(GatewayError::bad_field(
                "max_tokens",
                "Gemini models need `max_tokens` of at least 1.",
            ));
        }
        config.insert("maxOutputTokens".into(), max_tokens.into());
    }
    // Same 0–2 range as OpenAI's (checked by `ChatRequest::parse`).
    if let Some(t) = get("temperature") {
        config.insert("temperature".into(), t.clone());
    }
    if let Some(p) = get("top_p") {
        config.insert("topP".into(), p.clone());
    }
    if let Some(stop) = stop_sequences(get("stop"))? {
        if stop.as_array().map_or(0, Vec::len) > STOP_SEQUENCES_MAX {
            return Err(GatewayError::bad_field(
                "stop",
                "Gemini models take at most 5 stop sequences.",
            ));
        }
        config.insert("stopSequences".into(), stop);
    }
    if let Some(seed) = get("seed") {
        // Google's seed is an int32.
        if seed.as_i64().is_none_or(|v| i32::try_from(v).is_err()) {
            return Err(GatewayError::bad_field(
                "seed",
                "`seed` must be an integer within the 32-bit range.",
            ));
        }
        config.insert("seed".into(), seed.clone());
    }
    // Some Gemini models refuse penalties outright: only a non-zero one is worth sending.
    for (param, field) in [
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        if let Some(p) = get(param).filter(|p| p.as_f64() != Some(0.0)) {
            config.insert(field.into(), p.clone());
        }
    }
    if let Some(format) = get("response_format") {
        add_json_mode(format, &mut config)?;
    }
    Ok(config)
}

/// `response_format` as Google's response MIME type and JSON schema.
fn add_json_mode(format: &Value, config: &mut Map<String, Value>) -> Result<(), GatewayError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => {}
        Some("json_object") => {
            config.insert("responseMimeType".into(), "application/json".into());
        }
        Some("json_schema") => {
            config.insert("responseMimeType".into(), "application/json".into());
            if let Some(schema) = format.pointer("/json_schema/schema") {
                config.insert("responseJsonSchema".into(), schema.clone());
            }
        }
        _ => {
            return Err(GatewayError::bad_field(
                "response_format",
                "`response_format.type` must be text, json_object or json_schema.",
            ))
        }
    }
    Ok(())
}

/// OpenAI messages → (`systemInstruction` parts, alternating `user`/`model` contents).
fn translate_messages(list: &[Value]) -> Result<(Vec<Value>, Vec<Value>), GatewayError> {
    // Tool messages name only the call's id; Google wants the function's name.
    let mut call_names: HashMap<&str, &str> = HashMap::new();
    let text = |t: &str| json!({ "text": t });
    conversation(list, "Gemini", "parts", text, |role, m| {
        Ok(match role {
            "user" => ("user", user_parts(m.get("content"))?),
            "assistant" => ("model", model_parts(m, &mut call_names)?),
            _ => ("user", vec![function_response(m, &call_names)?]),
        })
    })
}

fn user_parts(content: Option<&Value>) -> Result<Vec<Value>, GatewayError> {
    text_and_image_parts(content, "Gemini", image_part)
}

/// A base64 `data:` URL → `inlineData`; a public http(s) URL → `fileData` (the type guessed
/// from the extension).
fn image_part(url: &str) -> Result<Value, GatewayError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (mime_type, data) = rest
            .split_once(";base64,")
            .filter(|(mime, _)| !mime.is_empty())
            .ok_or_else(|| {
                bad_messages("Image data URLs must be base64 (`data:<type>;base64,…`).")
            })?;
        return Ok(json!({"inlineData": {"mimeType": mime_type, "data": data}}));
    }
    // Cloud Storage objects and Gemini Files belong to a project: a buyer's are not the
    // pool's to read (and asking would be refused as if the pool were at fault).
    let google_file = url.contains("generativelanguage.googleapis.com/") && url.contains("/files/");
    if (url.starts_with("https://") || url.starts_with("http://")) && !google_file {
        return Ok(json!({"fileData": {"mimeType": image_mime_type(url), "fileUri": url}}));
    }
    Err(bad_messages(
        "An image URL must be a data: URL or a public http(s) URL.",
    ))
}

/// The image type a URL's extension names; JPEG when it names none.
fn image_mime_type(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let file = path.rsplit('/').next().unwrap_or_default();
    let ext = file.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("heic") => "image/heic",
        Some("heif") => "image/heif",
        _ => "image/jpeg",
    }
}

/// An assistant message → text and `functionCall` parts; records each call's function name.
fn model_parts<'a>(
    m: &'a Value,
    call_names: &mut HashMap<&'a str, &'a str>,
) -> Result<Vec<Value>, GatewayError> {
    let mut parts: Vec<Value> = text_parts(m.get("content"), "Gemini")?
        .into_iter()
        .map(|t| json!({ "text": t }))
        .collect();
    for call in assistant_tool_calls(m, "Gemini")? {
        let (id, name, args) = (call.id, call.name, call.arguments);
        call_names.insert(id, name);
        let mut part = json!({"functionCall": {"name": name, "args": args}});
        if let Some((_, signature)) = id.split_once(THOUGHT_SIGNATURE_MARK) {
            part["thoughtSignature"] = signature.into();
        }
        parts.push(part);
    }
    Ok(parts)
}

/// A tool message → a `functionResponse` part. Its `response` must be an object: a JSON object
/// result is sent as is, anything else as `{"result": <text>}`.
fn function_response(m: &Value, call_names: &HashMap<&str, &str>) -> Result<Value, GatewayError> {
    let id = tool_call_id(m)?;
    let name = call_names.get(id).ok_or_else(|| {
        bad_messages("A `tool` message's `tool_call_id` must match a tool call of an earlier assistant message.")
    })?;
    let text = text_parts(m.get("content"), "Gemini")?.concat();
    let response = match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({ "result": text }),
    };
    Ok(json!({"functionResponse": {"name": name, "response": response}}))
}

/// OpenAI function tools → `functionDeclarations`. Their `parameters` are JSON Schema, which
/// `parametersJsonSchema` takes as is (`parameters` would want Google's OpenAPI subset).
fn function_declarations(list: &[Value]) -> Result<Vec<Value>, GatewayError> {
    let tools = function_tools(list, "Gemini")?;
    Ok(tools
        .iter()
        .map(|t| {
            let mut declaration = json!({ "name": t.name });
            if let Some(d) = t.description {
                declaration["description"] = d.into();
            }
            if let Some(p) = t.parameters {
                declaration["parametersJsonSchema"] = p.clone();
            }
            declaration
        })
        .collect())
}

/// `tool_choice` → `functionCallingConfig`.
fn function_calling_config(choice: &Value) -> Result<Value, GatewayError> {
    let named = choice.pointer("/function/name").and_then(Value::as_str);
    match (choice.as_str(), named) {
        (Some("none"), _) => Ok(json!({"mode": "NONE"})),
        (Some("auto"), _) => Ok(json!({"mode": "AUTO"})),
        (Some("required"), _) => Ok(json!({"mode": "ANY"})),
        (None, Some(name)) => Ok(json!({"mode": "ANY", "allowedFunctionNames": [name]})),
        _ => Err(GatewayError::bad_field(
            "tool_choice",
            "`tool_choice` must be none, auto, required or a named function.",
        )),
    }
}

// === Response ===

/// A `GenerateContentResponse` (whole, or one streamed chunk of it).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ResponseWire {
    #[serde(default)]
    candidates: Vec<CandidateWire>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedbackWire>,
    #[serde(default)]
    usage_metadata: Option<UsageWire>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    response_id: Option<String>,
    /// Set when a stream carries an error as a `data:` event.
    #[serde(default)]
    error: Option<ErrorFields>,
}

impl ResponseWire {
    /// The first candidate (the only one: `n` is 1).
    fn candidate(&mut self) -> Option<CandidateWire> {
        (!self.candidates.is_empty()).then(|| self.candidates.swap_remove(0))
    }

    fn blocked(&self) -> bool {
        self.prompt_feedback
            .as_ref()
            .is_some_and(|f| f.block_reason.is_some())
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CandidateWire {
    #[serde(default)]
    content: Option<ContentWire>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct ContentWire {
    #[serde(default)]
    parts: Vec<PartWire>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PartWire {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: bool,
    #[serde(default)]
    function_call: Option<FunctionCallWire>,
    #[serde(default)]
    thought_signature: Option<String>,
}

#[derive(Deserialize, Default)]
struct FunctionCallWire {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PromptFeedbackWire {
    #[serde(default)]
    block_reason: Option<String>,
}

/// `usageMetadata`; absent fields are 0.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct UsageWire {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
    #[serde(default)]
    tool_use_prompt_token_count: u64,
}

impl UsageWire {
    /// `candidatesTokenCount` excludes thinking, which OpenAI counts as (reasoning) completion
    /// tokens; tool-use prompt tokens are prompt tokens; cached tokens are a subset of the prompt.
    fn usage(self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_token_count + self.tool_use_prompt_token_count,
            completion_tokens: self.candidates_token_count + self.thoughts_token_count,
            cached_tokens: self.cached_content_token_count,
            // Gemini bills cache storage by the hour, not per request: nothing is written here.
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            reasoning_tokens: self.thoughts_token_count,
        }
    }
}

/// What one candidate part becomes for the client.
enum Piece {
    Text(String),
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
}

/// The client-facing pieces of `parts`: visible text (thoughts skipped) and tool calls. Calls
/// without Google's `id` get `call_{uniq}_{n}`, `n` counted by `calls` across the response.
fn pieces(parts: Vec<PartWire>, uniq: &str, calls: &mut u32) -> Vec<Piece> {
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        if let Some(call) = part.function_call {
            let mut id = call
                .id
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| format!("call_{uniq}_{calls}"));
            *calls += 1;
            if let Some(signature) = part.thought_signature.filter(|s| !s.is_empty()) {
                id.push_str(THOUGHT_SIGNATURE_MARK);
                id.push_str(&signature);
            }
            let arguments = match call.args {
                None | Some(Value::Null) => "{}".to_owned(),
                Some(args) => args.to_string(),
            };
            out.push(Piece::ToolCall {
                id,
                name: call.name,
                arguments,
            });
        } else if let Some(text) = part.text.filter(|t| !part.thought && !t.is_empty()) {
            out.push(Piece::Text(text));
        }
    }
    out
}

/// Google's `finishReason` as OpenAI's `finish_reason`. Google says `STOP` after a function
/// call, so any call made means `tool_calls`; a blocked prompt is a content filter.
fn finish_reason(reason: Option<&str>, called_tools: bool, blocked: bool) -> &'static str {
    if called_tools {
        return "tool_calls";
    }
    if blocked {
        return "content_filter";
    }
    match reason {
        Some("MAX_TOKENS") => "length",
        Some(
            "SAFETY" | "RECITATION" | "LANGUAGE" | "OTHER" | "BLOCKLIST" | "PROHIBITED_CONTENT"
            | "SPII" | "NO_IMAGE",
        ) => "content_filter",
        Some(r) if r.starts_with("IMAGE_") => "content_filter",
        _ => "stop",
    }
}

/// Our completion id: Google's `responseId` behind OpenAI's prefix, or a new one.
fn completion_id_of(response_id: Option<&str>, created: u64) -> String {
    match response_id.filter(|id| !id.is_empty()) {
        Some(id) => format!("chatcmpl-{id}"),
        None => completion_id("gemini", created),
    }
}

/// A whole response → an OpenAI `chat.completion`. A prompt Google blocked (no candidates,
/// `promptFeedback.blockReason`) is an empty answer with `finish_reason: content_filter`, not an
/// error: Google answered 200 and counted the prompt's tokens, and OpenAI clients know the
/// reason.
/// `model`: the upstream model name, when the answer names no `modelVersion`.
fn completion_object(mut response: ResponseWire, model: &str, created: u64) -> Value {
    let usage = response.usage_metadata.unwrap_or_default().usage();
    let id = completion_id_of(response.response_id.as_deref(), created);
    let blocked = response.blocked();
    let candidate = response.candidate().unwrap_or_default();
    let parts = candidate.content.map(|c| c.parts).unwrap_or_default();
    let uniq = id.strip_prefix("chatcmpl-").unwrap_or(&id);
    let mut calls = 0;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for piece in pieces(parts, uniq, &mut calls) {
        match piece {
            Piece::Text(t) => text.push_str(&t),
            Piece::ToolCall {
                id,
                name,
                arguments,
            } => tool_calls.push(json!({"id": id, "type": "function",
                "function": {"name": name, "arguments": arguments}})),
        }
    }
    let finish = finish_reason(
        candidate.finish_reason.as_deref(),
        !tool_calls.is_empty(),
        blocked,
    );
    let content = if text.is_empty() && !tool_calls.is_empty() {
        Value::Null
    } else {
        text.into()
    };
    let mut message = json!({"role": "assistant", "content": content, "refusal": null});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": response.model_version.as_deref().unwrap_or(model),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish,
        }],
        "usage": usage_json(usage),
    })
}

// === Streaming ===

/// Translates a `streamGenerateContent?alt=sse` stream into OpenAI chunks, event by event.
///
/// Google ends the stream by ending the body (no `[DONE]`), so the finish chunk, the usage chunk
/// and `[DONE]` go out from `finish`, and only when a `finishReason` (or a blocked prompt) was
/// seen: without one the stream was cut and stays not done. An error arrives as a bare JSON
/// object, possibly over several lines; it becomes an OpenAI error event that ends the stream.
pub struct GenerateContentStream {
    hide_usage_chunk: bool,
    pending: BytesMut,
    /// Set from the first event.
    id: Option<String>,
    model: String,
    created: u64,
    tool_calls: u32,
    finish_reason: Option<String>,
    blocked: bool,
    /// The last `usageMetadata`: each is a cumulative snapshot, never an increment.
    usage: Option<UsageWire>,
    tally: StreamTally,
}

impl GenerateContentStream {
    /// `model`: the upstream model name, until an event names its `modelVersion`.
    pub fn new(hide_usage_chunk: bool, model: &str) -> Self {
        Self {
            hide_usage_chunk,
            pending: BytesMut::new(),
            id: None,
            model: model.to_owned(),
            created: unix_secs(),
            tool_calls: 0,
            finish_reason: None,
            blocked: false,
            usage: None,
            tally: StreamTally::default(),
        }
    }

    fn header(&self) -> ChunkHeader<'_> {
        ChunkHeader {
            id: self.id.as_deref().unwrap_or_default(),
            created: self.created,
            model: &self.model,
            hide_usage_chunk: self.hide_usage_chunk,
        }
    }

    /// One SSE event, or a bare JSON object (how Google sends an error mid-stream), its OpenAI
    /// bytes appended to `out`.
    fn event(&mut self, event: &[u8], out: &mut BytesMut) {
        match event_data(event) {
            Some(data) => self.response(&data, out),
            None if event.trim_ascii_start().starts_with(b"{") => self.response(event, out),
            None => {}
        }
    }

    /// One `GenerateContentResponse` (or Google's error object).
    fn response(&mut self, data: &[u8], out: &mut BytesMut) {
        let Ok(mut response) = serde_json::from_slice::<ResponseWire>(data) else {
            return;
        };
        if let Some(error) = response.error.take() {
            return self.error(&error, out);
        }
        if self.id.is_none() {
            self.id = Some(completion_id_of(
                response.response_id.as_deref(),
                self.created,
            ));
            if let Some(version) = response.model_version.take() {
                self.model = version;
            }
            write_chunk(
                out,
                &self.header(),
                json!({"role": "assistant", "content": ""}),
                None,
            );
        }
        self.blocked |= response.blocked();
        if let Some(usage) = response.usage_metadata {
            self.usage = Some(usage);
            self.tally.usage = self.usage.map(UsageWire::usage);
        }
        let Some(candidate) = response.candidate() else {
            return;
        };
        if let Some(reason) = candidate.finish_reason {
            self.finish_reason = Some(reason);
        }
        let parts = candidate.content.map(|c| c.parts).unwrap_or_default();
        let id = self.id.clone().unwrap_or_default();
        let uniq = id.strip_prefix("chatcmpl-").unwrap_or(&id);
        let mut calls = self.tool_calls;
        for piece in pieces(parts, uniq, &mut calls) {
            let delta = match piece {
                Piece::Text(text) => {
                    self.tally.generated_bytes += text.len() as u64;
                    json!({ "content": text })
                }
                Piece::ToolCall {
                    id,
                    name,
                    arguments,
                } => {
                    self.tally.generated_bytes += (name.len() + arguments.len()) as u64;
                    let index = self.tool_calls;
                    self.tool_calls += 1;
                    tool_call_delta(index, &id, &name, &arguments)
                }
            };
            write_chunk(out, &self.header(), delta, None);
        }
    }

    fn error(&mut self, error: &ErrorFields, out: &mut BytesMut) {
        let status = error.code.unwrap_or(500);
        write_error_event(out, status, upstream_error(status, error));
        self.tally.done = true;
    }

    /// A bare JSON object that is complete before its terminating blank line: handled now, so
    /// the client hears of an error without waiting for more bytes.
    fn complete_bare_json(&mut self, out: &mut BytesMut) {
        let text = self.pending.trim_ascii();
        if !(text.starts_with(b"{") && text.ends_with(b"}")) {
            return;
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok() {
            let event = self.pending.split();
            self.response(&event, out);
        }
    }
}

impl StreamTranslator for GenerateContentStream {
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError> {
        let mut out = BytesMut::new();
        if self.tally.done {
            return Ok(out.freeze());
        }
        self.pending.extend_from_slice(input);
        while let Some((event_end, next)) = find_event_end(&self.pending) {
            let event = self.pending.split_to(next);
            self.event(&event[..event_end], &mut out);
            if self.tally.done {
                self.pending.clear();
                return Ok(out.freeze());
            }
        }
        self.complete_bare_json(&mut out);
        if self.pending.len() > SSE_EVENT_BYTES_MAX {
            return Err(FramingError);
        }
        Ok(out.freeze())
    }

    fn finish(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        if self.tally.done {
            return out.freeze();
        }
        let rest = self.pending.split();
        self.event(&rest, &mut out);
        if self.tally.done || (self.finish_reason.is_none() && !self.blocked) {
            return out.freeze();
        }
        let finish = finish_reason(
            self.finish_reason.as_deref(),
            self.tool_calls > 0,
            self.blocked,
        );
        write_chunk(&mut out, &self.header(), json!({}), Some(finish));
        if let (Some(usage), false) = (self.usage, self.hide_usage_chunk) {
            write_usage_chunk(&mut out, &self.header(), usage_json(usage.usage()));
        }
        out.put_slice(b"data: [DONE]\n\n");
        self.tally.done = true;
        out.freeze()
    }

    fn tally(&self) -> &StreamTally {
        &self.tally
    }
}

// === Embeddings ===

/// `batchEmbedContents`: one request per text, each naming the model.
fn batch_embed_body(upstream_model: &str, input: &EmbeddingsInput) -> Value {
    let model = format!("models/{upstream_model}");
    let requests: Vec<Value> = input
        .texts
        .iter()
        .map(|text| {
            let mut r = json!({"model": model, "content": {"parts": [{"text": text}]}});
            if let Some(d) = input.dimensions {
                r["outputDimensionality"] = json!(d);
            }
            r
        })
        .collect();
    json!({ "requests": requests })
}

/// Vertex's `predict`: one instance per text.
fn predict_body(input: &EmbeddingsInput) -> Value {
    let instances: Vec<Value> = input
        .texts
        .iter()
        .map(|text| json!({ "content": text }))
        .collect();
    let mut body = json!({ "instances": instances });
    if let Some(d) = input.dimensions {
        body["parameters"] = json!({ "outputDimensionality": d });
    }
    body
}

#[derive(Deserialize)]
struct BatchEmbedWire {
    embeddings: Vec<ValuesWire>,
}

#[derive(Deserialize)]
struct ValuesWire {
    values: Vec<f32>,
}

#[derive(Deserialize)]
struct PredictWire {
    predictions: Vec<PredictionWire>,
}

#[derive(Deserialize)]
struct PredictionWire {
    embeddings: PredictedEmbedding,
}

#[derive(Deserialize)]
struct PredictedEmbedding {
    values: Vec<f32>,
    #[serde(default)]
    statistics: StatisticsWire,
}

#[derive(Deserialize, Default)]
struct StatisticsWire {
    #[serde(default)]
    token_count: f64,
}

// === Errors ===

#[derive(Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: ErrorFields,
}

/// Google's error: `{"error": {"code", "message", "status", "details": [{"reason", …}]}}`.
#[derive(Deserialize, Default)]
struct ErrorFields {
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    details: Vec<ErrorDetailWire>,
}

#[derive(Deserialize, Default)]
struct ErrorDetailWire {
    #[serde(default)]
    reason: Option<String>,
    /// `google.rpc.RetryInfo`: how long to wait, as a protobuf duration (`"7s"`, `"0.5s"`).
    #[serde(default, rename = "retryDelay")]
    retry_delay: Option<String>,
}

impl ErrorFields {
    /// The error in `body`: an object, or (non-SSE streams) an array holding one.
    fn parse(body: &[u8]) -> Self {
        // serde would also read an array as the struct's fields in order: look first.
        if body.trim_ascii_start().starts_with(b"[") {
            return serde_json::from_slice::<Vec<ErrorEnvelope>>(body)
                .ok()
                .and_then(|list| list.into_iter().next())
                .map(|e| e.error)
                .unwrap_or_default();
        }
        serde_json::from_slice::<ErrorEnvelope>(body)
            .map(|e| e.error)
            .unwrap_or_default()
    }

    fn reasons(&self) -> impl Iterator<Item = &str> {
        self.details.iter().filter_map(|d| d.reason.as_deref())
    }

    /// The first `RetryInfo` delay, in whole seconds (rounded up).
    fn retry_delay_s(&self) -> Option<u64> {
        let delay = self.details.iter().find_map(|d| d.retry_delay.as_deref())?;
        let seconds: f64 = delay.strip_suffix('s')?.parse().ok()?;
        (seconds.is_finite() && seconds >= 0.0).then(|| seconds.ceil() as u64)
    }
}

/// A Google error in OpenAI's terms.
fn upstream_error(status: u16, error: &ErrorFields) -> UpstreamError {
    let key_refused = error
        .reasons()
        .any(|r| matches!(r, "API_KEY_INVALID" | "API_KEY_EXPIRED"));
    let (kind, code) = match error.status.as_deref() {
        _ if key_refused => (ErrorKind::Authentication, "invalid_api_key"),
        Some("INVALID_ARGUMENT" | "OUT_OF_RANGE") => {
            (ErrorKind::InvalidRequest, "invalid_request_error")
        }
        Some("FAILED_PRECONDITION") => (ErrorKind::InvalidRequest, "failed_precondition"),
        Some("UNAUTHENTICATED") => (ErrorKind::Authentication, "invalid_api_key"),
        Some("PERMISSION_DENIED") => (ErrorKind::Permission, "permission_error"),
        Some("NOT_FOUND") => (ErrorKind::InvalidRequest, "not_found_error"),
        Some("RESOURCE_EXHAUSTED") => (ErrorKind::RateLimit, "rate_limit_exceeded"),
        Some("UNAVAILABLE") => (ErrorKind::Server, "overloaded"),
        Some("DEADLINE_EXCEEDED") => (ErrorKind::Timeout, "timeout"),
        _ if status >= 500 => (ErrorKind::Server, "upstream_error"),
        _ => (ErrorKind::InvalidRequest, "upstream_error"),
    };
    UpstreamError::new(kind, code, error.message.as_deref())
}

#[cfg(test)]
mod tests;
