//! AWS Bedrock Runtime's Converse API (`POST /model/{modelId}/converse` and
//! `/converse-stream`) behind OpenAI's Chat Completions surface.
//!
//! Requests are rebuilt: system and developer messages become `system` blocks, tool calls
//! `toolUse` blocks, tool messages `toolResult` blocks in a user turn, consecutive turns of one
//! role are merged (Converse wants them alternating). The model id is one path segment,
//! percent-encoded (`:` → `%3A`). Pools with AWS keys sign every request with SigV4 (service
//! `bedrock`, double-encoded canonical path) over its final body at the moment it is built;
//! pools with a Bedrock API key send it as `Authorization: Bearer`.
//!
//! Streams are `application/vnd.amazon.eventstream` frames, decoded incrementally (both CRCs
//! checked); each event yields its OpenAI chunk at once. `metadata` (usage) comes after
//! `messageStop`, so the finish chunk goes out on `messageStop` and the usage chunk and
//! `[DONE]` on `metadata`. An exception frame ends the stream with an OpenAI error event.
//!
//! Anthropic Messages clients reach Claude models on InvokeModel instead (`/invoke`,
//! `/invoke-with-response-stream`): their body with Bedrock's envelope (`anthropic_version`,
//! `anthropic_beta`, no `model` or `stream`), the answer Anthropic's own, the stream's `chunk`
//! frames unwrapped back into Anthropic's events.
//!
//! Embeddings go to InvokeModel too: Titan Text Embeddings v2 takes one text per call
//! (`inputText`, `dimensions`; its answer counts `inputTextTokenCount`), Cohere Embed takes up to
//! 96 (`texts`, `input_type: search_document`; its input tokens come in the
//! `x-amzn-bedrock-input-token-count` header).

use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use pingora::http::RequestHeader;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokn_config::credential::{self, BedrockCredential};

use super::aws::eventstream::{Decoder, Message};
use super::aws::sigv4;
use super::translate::{
    assistant_tool_calls, bad_messages, completion_id, conversation, function_tools,
    json_mode_instruction, json_post_header, offered_tools, push_path_segment, stop_sequences,
    text_and_image_parts, text_parts, tool_call_arguments_delta, tool_call_id,
    tool_call_start_delta, unix_secs, usage_json, write_chunk, write_error_event,
    write_usage_chunk, ChunkHeader, ToolCallIndexes,
};
use super::{
    ChatCall, CredentialHeader, EmbeddingsCall, FailureClass, MessagesCall, Outbound,
    ProviderAdapter, StreamTally, StreamTranslator,
};
use crate::chat::ChatRequest;
use crate::embeddings::EmbeddingsAnswer;
use crate::error::{anthropic_error_body, ErrorKind, GatewayError, UpstreamError};
use crate::relay::FramingError;
use crate::upstream::Endpoint;
use crate::usage::Usage;

/// The SigV4 signing name of Bedrock Runtime (not its endpoint prefix).
const SIGNING_SERVICE: &str = "bedrock";

pub struct BedrockAdapter {
    endpoint: Endpoint,
    auth: BedrockAuth,
}

/// How a Bedrock pool authenticates, prepared once.
enum BedrockAuth {
    /// Every request is signed when it is built, over its final body.
    SigV4 {
        region: String,
        credentials: sigv4::Credentials,
    },
    /// A Bedrock API key.
    Bearer(CredentialHeader),
}

impl BedrockAdapter {
    pub fn new(c: &BedrockCredential) -> Result<Self, String> {
        let auth = match c.auth() {
            Some(credential::BedrockAuth::AccessKeys {
                access_key_id,
                secret_access_key,
                session_token,
            }) => BedrockAuth::SigV4 {
                region: c.region.clone(),
                credentials: sigv4::Credentials {
                    access_key_id: access_key_id.to_owned(),
                    secret_access_key: secret_access_key.expose().to_owned(),
                    session_token: session_token.map(|t| t.expose().to_owned()),
                },
            },
            Some(credential::BedrockAuth::ApiKey(key)) => {
                BedrockAuth::Bearer(CredentialHeader::bearer(key.expose())?)
            }
            None => return Err("a bedrock credential names no authentication".to_owned()),
        };
        Ok(Self {
            endpoint: Endpoint::new(&c.base_url())?,
            auth,
        })
    }

    /// A POST of `body` to `path`, with the pool's key or signature.
    fn post(&self, path: String, stream: bool, body: Bytes) -> Result<Outbound<'_>, GatewayError> {
        let accept = if stream {
            "application/vnd.amazon.eventstream"
        } else {
            "application/json"
        };
        let bearer = match &self.auth {
            BedrockAuth::Bearer(key) => Some(key),
            BedrockAuth::SigV4 { .. } => None,
        };
        let mut header = json_post_header(
            &path,
            &self.endpoint,
            bearer,
            &[("accept", accept)],
            body.len(),
        )?;
        self.sign(&mut header, &path, accept, &body)?;
        Ok(Outbound::Http {
            endpoint: &self.endpoint,
            header: Box::new(header),
            body,
        })
    }

    /// Signs a request with SigV4: the signature's headers are added to `header`.
    fn sign(
        &self,
        header: &mut RequestHeader,
        path: &str,
        accept: &str,
        body: &[u8],
    ) -> Result<(), GatewayError> {
        let BedrockAuth::SigV4 {
            region,
            credentials,
        } = &self.auth
        else {
            return Ok(());
        };
        fn internal<E>(_: E) -> GatewayError {
            GatewayError::internal()
        }
        let host = self.endpoint.host_header.to_str().map_err(internal)?;
        let time = sigv4::AmzDate::from_system_time(SystemTime::now()).map_err(internal)?;
        let signed = sigv4::sign(
            &sigv4::Request {
                method: "POST",
                host,
                path,
                query: "",
                headers: &[("content-type", "application/json"), ("accept", accept)],
                payload: sigv4::Payload::Bytes(body),
            },
            credentials,
            &sigv4::Params {
                region,
                service: SIGNING_SERVICE,
                time,
                path_encoding: sigv4::PathEncoding::Double,
                content_sha256_header: false,
            },
        )
        .map_err(internal)?;
        for (name, value) in signed.headers() {
            let mut value = http::HeaderValue::try_from(value).map_err(internal)?;
            if name != "x-amz-date" {
                value.set_sensitive(true);
            }
            header.insert_header(name, value).map_err(internal)?;
        }
        Ok(())
    }
}

impl ProviderAdapter for BedrockAdapter {
    fn chat_request(&self, call: &ChatCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let converse = converse_body(call.req, call.body)?;
        let body =
            Bytes::from(serde_json::to_vec(&converse).map_err(|_| GatewayError::internal())?);
        let stream = call.req.stream;
        let operation = if stream {
            "/converse-stream"
        } else {
            "/converse"
        };
        let path = model_path(&self.endpoint.url.base_path, call.upstream_model, operation);
        self.post(path, stream, body)
    }

    /// Claude models: InvokeModel takes Anthropic's Messages body.
    fn serves_messages(&self, upstream_model: &str) -> bool {
        is_claude(upstream_model)
    }

    /// CountTokens counts an InvokeModel body.
    fn counts_message_tokens(&self) -> bool {
        true
    }

    fn messages_request(&self, call: &MessagesCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let body = invoke_body(call.body, call.req.beta.as_ref())?;
        if call.count_tokens {
            // CountTokens takes the InvokeModel body (base64) and a foundation model's own id:
            // it refuses the cross-region inference profiles the catalog usually names.
            let body = json!({"input": {"invokeModel": {
                "body": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &body)}}});
            let body =
                Bytes::from(serde_json::to_vec(&body).map_err(|_| GatewayError::internal())?);
            let model = foundation_model(call.upstream_model);
            let path = model_path(&self.endpoint.url.base_path, model, "/count-tokens");
            return self.post(path, false, body);
        }
        let stream = call.req.stream;
        let path = model_path(
            &self.endpoint.url.base_path,
            call.upstream_model,
            if stream {
                "/invoke-with-response-stream"
            } else {
                "/invoke"
            },
        );
        self.post(path, stream, body)
    }

    fn messages_stream(&self) -> Box<dyn StreamTranslator> {
        Box::new(InvokeStream::default())
    }

    fn count_tokens_body(&self, body: Bytes) -> Result<Bytes, GatewayError> {
        counted_tokens(&body)
    }

    /// Bedrock's error (`{"message"}`, the exception in `x-amzn-ErrorType`) in Anthropic's
    /// shape, its message as Bedrock worded it (for Claude, Anthropic's own words).
    fn messages_refusal(&self, status: u16, error_type: Option<&str>, body: Bytes) -> Bytes {
        let error = ErrorWire::parse(&body, error_type);
        let message = error.message.as_deref();
        anthropic_error_body(
            status,
            message.unwrap_or("The upstream refused the request."),
        )
    }

    fn serves_embeddings(&self, upstream_model: &str) -> bool {
        EmbeddingFamily::of(upstream_model).is_some()
    }

    fn embeddings_request(&self, call: &EmbeddingsCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let input = call.texts()?;
        let body = match EmbeddingFamily::of(call.upstream_model) {
            Some(EmbeddingFamily::Titan) => {
                let [text] = input.texts.as_slice() else {
                    return Err(GatewayError::bad_field(
                        "input",
                        "This model embeds one text per request: send `input` as a string.",
                    ));
                };
                let mut body = json!({ "inputText": text });
                if let Some(d) = input.dimensions {
                    body["dimensions"] = json!(d);
                }
                body
            }
            Some(EmbeddingFamily::Cohere) => {
                if input.dimensions.is_some() {
                    return Err(GatewayError::bad_field(
                        "dimensions",
                        "This model's vectors have one length: leave `dimensions` out.",
                    ));
                }
                // Documents, as OpenAI's embeddings are used (search both sides alike).
                json!({ "texts": input.texts, "input_type": "search_document" })
            }
            None => return Err(GatewayError::internal()),
        };
        let body = Bytes::from(serde_json::to_vec(&body).map_err(|_| GatewayError::internal())?);
        let path = model_path(&self.endpoint.url.base_path, call.upstream_model, "/invoke");
        self.post(path, false, body)
    }

    fn embeddings_body(
        &self,
        body: Bytes,
        answer: &EmbeddingsAnswer<'_>,
    ) -> Result<(Bytes, Option<Usage>), GatewayError> {
        let wire: EmbeddingWire =
            serde_json::from_slice(&body).map_err(|_| GatewayError::upstream_bad_response())?;
        match wire {
            EmbeddingWire::Titan {
                embedding,
                input_text_token_count,
            } => answer.openai(vec![embedding], Some(input_text_token_count)),
            EmbeddingWire::Cohere { embeddings } => answer.openai(embeddings, None),
        }
    }

    fn complete_body(
        &self,
        body: Bytes,
        model: &str,
    ) -> Result<(Bytes, Option<Usage>), GatewayError> {
        let response: ConverseWire =
            serde_json::from_slice(&body).map_err(|_| GatewayError::upstream_bad_response())?;
        let usage = response.usage.unwrap_or_default();
        let completion = completion_object(response, model, unix_secs());
        let out = serde_json::to_vec(&completion).map_err(|_| GatewayError::internal())?;
        Ok((Bytes::from(out), Some(usage.usage())))
    }

    fn stream_translator(&self, hide_usage_chunk: bool, model: &str) -> Box<dyn StreamTranslator> {
        Box::new(ConverseStream::new(hide_usage_chunk, model))
    }

    fn classify_failure(&self, status: u16, error_type: Option<&str>, body: &[u8]) -> FailureClass {
        let error = ErrorWire::parse(body, error_type);
        match (status, error.kind.as_str()) {
            // Refused keys, an expired STS session, an exhausted account quota (a 400).
            (
                _,
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "ExpiredTokenException"
                | "ServiceQuotaExceededException",
            ) => FailureClass::Credential,
            // The catalog says this pool serves the model; its account disagrees.
            (404, _) => FailureClass::Credential,
            (
                _,
                "ThrottlingException"
                | "ModelNotReadyException"
                | "ServiceUnavailableException"
                | "InternalServerException"
                | "ModelTimeoutException",
            ) => FailureClass::Transient,
            _ => FailureClass::of_status(status),
        }
    }

    fn upstream_error(&self, status: u16, error_type: Option<&str>, body: &[u8]) -> UpstreamError {
        let error = ErrorWire::parse(body, error_type);
        upstream_error(status, &error.kind, error.message.as_deref())
    }
}

/// The embedding models InvokeModel serves, by how their bodies look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EmbeddingFamily {
    /// `amazon.titan-embed-text-v2:0`.
    Titan,
    /// `cohere.embed-english-v3`, `cohere.embed-multilingual-v3` (and their regional ids).
    Cohere,
}

impl EmbeddingFamily {
    fn of(model_id: &str) -> Option<Self> {
        if model_id.contains("amazon.titan-embed-text") {
            Some(Self::Titan)
        } else if model_id.contains("cohere.embed") {
            Some(Self::Cohere)
        } else {
            None
        }
    }
}

/// An embeddings answer: Titan's one vector with its token count, or Cohere's vectors.
#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingWire {
    #[serde(rename_all = "camelCase")]
    Titan {
        embedding: Vec<f32>,
        input_text_token_count: u64,
    },
    Cohere {
        embeddings: Vec<Vec<f32>>,
    },
}

/// CountTokens' answer (`{"inputTokens": N}`) in Anthropic's shape.
fn counted_tokens(body: &[u8]) -> Result<Bytes, GatewayError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Counted {
        input_tokens: u64,
    }
    let counted: Counted =
        serde_json::from_slice(body).map_err(|_| GatewayError::upstream_bad_response())?;
    Ok(Bytes::from(
        json!({ "input_tokens": counted.input_tokens }).to_string(),
    ))
}

/// The foundation model an inference profile id names (`us.anthropic.claude-…` →
/// `anthropic.claude-…`): a geography or `global` before the provider's name.
fn foundation_model(model_id: &str) -> &str {
    const PROFILES: [&str; 7] = ["us.", "us-gov.", "eu.", "apac.", "jp.", "au.", "global."];
    PROFILES
        .iter()
        .find_map(|p| model_id.strip_prefix(p))
        .unwrap_or(model_id)
}

/// `{base}/model/{percent-encoded id}{operation}`.
fn model_path(base_path: &str, model_id: &str, operation: &str) -> String {
    let mut path = String::with_capacity(base_path.len() + model_id.len() * 3 + 32);
    path.push_str(base_path.trim_end_matches('/'));
    path.push_str("/model/");
    push_path_segment(&mut path, model_id);
    path.push_str(operation);
    path
}

// === Claude through InvokeModel (the Messages lane) ===

/// `anthropic_version` InvokeModel takes for Claude.
const INVOKE_ANTHROPIC_VERSION: &str = "bedrock-2023-05-31";

/// Claude on Bedrock: `anthropic.claude-…`, an inference profile (`us.anthropic.claude-…`,
/// `global.…`), or an ARN naming one.
fn is_claude(model_id: &str) -> bool {
    model_id.contains("anthropic.claude")
}

/// InvokeModel's body for a Messages body: the client's fields byte for byte, less `model`
/// (in the path) and `stream` (the operation says it), with Bedrock's `anthropic_version` and
/// the client's `anthropic-beta` header as the `anthropic_beta` list.
fn invoke_body(body: &[u8], beta: Option<&http::HeaderValue>) -> Result<Bytes, GatewayError> {
    let mut add = vec![("anthropic_version", json!(INVOKE_ANTHROPIC_VERSION))];
    if let Some(beta) = beta {
        let list: Vec<&str> = beta
            .to_str()
            .map_err(|_| GatewayError::bad_request("anthropic-beta: not a valid header value"))?
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .collect();
        add.push(("anthropic_beta", json!(list)));
    }
    crate::messages::with_envelope(
        body,
        &add,
        &["model", "stream", "anthropic_version", "anthropic_beta"],
    )
}

/// InvokeModel's stream for Claude as Anthropic's SSE: each `chunk` frame's payload
/// (`{"bytes": base64 of an Anthropic event}`) becomes the event it carries, counted by the
/// Messages relay; an exception frame becomes Anthropic's `error` event.
#[derive(Default)]
struct InvokeStream {
    decoder: Decoder,
    relay: super::anthropic::MessagesRelay,
}

#[derive(Deserialize)]
struct ChunkWire {
    bytes: String,
}

impl InvokeStream {
    /// The SSE event a frame carries, if any.
    fn event(message: &Message) -> Option<Vec<u8>> {
        use base64::Engine;
        if message.is_failure() {
            let (kind, text) = exception_of(message);
            let text = text.as_deref().unwrap_or("The upstream failed.");
            let body = anthropic_error_body(status_of(&kind), text);
            return Some([&b"event: error\ndata: "[..], &body, b"\n\n"].concat());
        }
        if message.event_type() != Some("chunk") {
            return None;
        }
        let chunk: ChunkWire = serde_json::from_slice(&message.payload).ok()?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(chunk.bytes)
            .ok()?;
        #[derive(Deserialize)]
        struct Named<'a> {
            #[serde(rename = "type", borrow)]
            kind: &'a str,
        }
        let name = serde_json::from_slice::<Named<'_>>(&data)
            .ok()?
            .kind
            .to_owned();
        Some([b"event: ", name.as_bytes(), b"\ndata: ", &data, b"\n\n"].concat())
    }
}

impl StreamTranslator for InvokeStream {
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError> {
        self.decoder.feed(input);
        let mut sse = Vec::new();
        loop {
            match self.decoder.next_message() {
                Ok(Some(message)) => sse.extend(Self::event(&message).unwrap_or_default()),
                Ok(None) => break,
                Err(_) => return Err(FramingError),
            }
        }
        self.relay.feed(&sse)
    }

    fn finish(&mut self) -> Bytes {
        self.relay.finish()
    }

    fn tally(&self) -> &StreamTally {
        self.relay.tally()
    }
}

/// An exception frame's exception name and message.
fn exception_of(message: &Message) -> (String, Option<String>) {
    let kind = message
        .exception_type()
        .or_else(|| message.error_code())
        .unwrap_or_default();
    let payload: ErrorWire = serde_json::from_slice(&message.payload).unwrap_or_default();
    let text = payload
        .message
        .or_else(|| message.error_message().map(str::to_owned));
    (exception_name(kind), text)
}

/// The status Bedrock answers an exception with.
fn status_of(kind: &str) -> u16 {
    match kind {
        "ThrottlingException" => 429,
        "ValidationException" => 400,
        "AccessDeniedException" => 403,
        "ResourceNotFoundException" => 404,
        "ServiceUnavailableException" => 503,
        _ => 500,
    }
}

// === Request ===

/// The Converse body for an OpenAI chat request (already checked by `ChatRequest::parse`).
pub(crate) fn converse_body(req: &ChatRequest<'_>, body: &[u8]) -> Result<Value, GatewayError> {
    let params: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|_| GatewayError::invalid_json("The request body is not a JSON object."))?;
    if req.n > 1 {
        return Err(GatewayError::bad_field(
            "n",
            "Bedrock models return one choice: `n` must be 1.",
        ));
    }
    let get = |k: &str| params.get(k).filter(|v| !v.is_null());
    for param in [
        "logprobs",
        "top_logprobs",
        "audio",
        "prediction",
        "functions",
    ] {
        if !matches!(get(param), Some(Value::Bool(false)) | None) {
            return Err(GatewayError::bad_field(
                param,
                format!("`{param}` is not supported for Bedrock models."),
            ));
        }
    }
    let mut out = conversation_fields(&get)?;
    let inference = inference_config(req, &get)?;
    if !inference.is_empty() {
        out.insert("inferenceConfig".into(), Value::Object(inference));
    }
    if let Some(config) = tool_config(&get)? {
        out.insert("toolConfig".into(), Value::Object(config));
    }
    Ok(Value::Object(out))
}

/// `system` (with a JSON mode's instruction) and `messages`.
fn conversation_fields<'a>(
    get: &impl Fn(&str) -> Option<&'a Value>,
) -> Result<Map<String, Value>, GatewayError> {
    let list = get("messages").and_then(Value::as_array);
    let (mut system, messages) = translate_messages(list.map_or(&[][..], Vec::as_slice))?;
    if messages.is_empty() {
        return Err(bad_messages(
            "Bedrock models need at least one non-empty user or assistant message.",
        ));
    }
    if messages.first().and_then(|m| m["role"].as_str()) != Some("user") {
        return Err(bad_messages(
            "Bedrock models need the conversation to start with a user message.",
        ));
    }
    if let Some(format) = get("response_format") {
        if let Some(instruction) = json_mode_instruction(format)? {
            system.push(json!({ "text": instruction }));
        }
    }
    let mut out = Map::new();
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    Ok(out)
}

/// `inferenceConfig`: output limit, sampling and stop sequences.
fn inference_config<'a>(
    req: &ChatRequest<'_>,
    get: &impl Fn(&str) -> Option<&'a Value>,
) -> Result<Map<String, Value>, GatewayError> {
    let mut inference = Map::new();
    if let Some(max_tokens) = req.max_output_tokens {
        if max_tokens == 0 {
            return Err(GatewayError::bad_field(
                "max_tokens",
                "Bedrock models need `max_tokens` of at least 1.",
            ));
        }
        inference.insert("maxTokens".into(), max_tokens.into());
    }
    if let Some(t) = get("temperature").and_then(Value::as_f64) {
        if t > 1.0 {
            return Err(GatewayError::bad_field(
                "temperature",
                "Bedrock models take a `temperature` between 0 and 1.",
            ));
        }
        inference.insert("temperature".into(), t.into());
    }
    if let Some(p) = get("top_p").and_then(Value::as_f64) {
        inference.insert("topP".into(), p.into());
    }
    if let Some(stop) = stop_sequences(get("stop"))? {
        inference.insert("stopSequences".into(), stop);
    }
    Ok(inference)
}

/// `toolConfig`: the tools and the tool choice (`None` without tools).
fn tool_config<'a>(
    get: &impl Fn(&str) -> Option<&'a Value>,
) -> Result<Option<Map<String, Value>>, GatewayError> {
    let Some(tools) = offered_tools(get("tools"))? else {
        return Ok(None);
    };
    let tools = translate_tools(tools)?;
    let mut config = Map::new();
    config.insert("tools".into(), Value::Array(tools));
    let choice = match get("tool_choice") {
        None => None,
        Some(Value::String(s)) if s == "auto" => Some(json!({"auto": {}})),
        Some(Value::String(s)) if s == "required" => Some(json!({"any": {}})),
        // Converse has no "none": the tools stay declared (a history with tool blocks needs
        // them) and the model is left to choose.
        Some(Value::String(s)) if s == "none" => None,
        Some(c) => match c.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => Some(json!({"tool": {"name": name}})),
            None => {
                return Err(GatewayError::bad_field(
                    "tool_choice",
                    "`tool_choice` must be none, auto, required or a named function.",
                ))
            }
        },
    };
    if let Some(choice) = choice {
        config.insert("toolChoice".into(), choice);
    }
    Ok(Some(config))
}

/// OpenAI messages → (`system` blocks, alternating Converse turns).
fn translate_messages(list: &[Value]) -> Result<(Vec<Value>, Vec<Value>), GatewayError> {
    let text = |t: &str| json!({ "text": t });
    conversation(list, "Bedrock", "content", text, |role, m| {
        Ok(match role {
            "user" => ("user", user_blocks(m.get("content"))?),
            "assistant" => ("assistant", assistant_blocks(m)?),
            _ => ("user", vec![tool_result(m)?]),
        })
    })
}

fn user_blocks(content: Option<&Value>) -> Result<Vec<Value>, GatewayError> {
    text_and_image_parts(content, "Bedrock", image_block)
}

/// A base64 `data:` URL → an image block with its bytes (Converse takes no image URLs).
fn image_block(url: &str) -> Result<Value, GatewayError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(bad_messages(
            "Bedrock models take images as data: URLs (`data:image/png;base64,…`) only.",
        ));
    };
    let (media_type, data) = rest
        .split_once(";base64,")
        .ok_or_else(|| bad_messages("Image data URLs must be base64 (`data:<type>;base64,…`)."))?;
    let format = match media_type {
        "image/png" => "png",
        "image/jpeg" | "image/jpg" => "jpeg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        _ => {
            return Err(bad_messages(
                "Bedrock models take PNG, JPEG, GIF and WebP images.",
            ))
        }
    };
    Ok(json!({"image": {"format": format, "source": {"bytes": data}}}))
}

fn assistant_blocks(m: &Value) -> Result<Vec<Value>, GatewayError> {
    let mut blocks: Vec<Value> = text_parts(m.get("content"), "Bedrock")?
        .into_iter()
        .map(|t| json!({ "text": t }))
        .collect();
    for call in assistant_tool_calls(m, "Bedrock")? {
        blocks.push(json!({"toolUse": {"toolUseId": call.id, "name": call.name,
            "input": call.arguments}}));
    }
    Ok(blocks)
}

fn tool_result(m: &Value) -> Result<Value, GatewayError> {
    let id = tool_call_id(m)?;
    let texts = text_parts(m.get("content"), "Bedrock")?;
    let content: Vec<Value> = if texts.is_empty() {
        vec![json!({"text": ""})]
    } else {
        texts.into_iter().map(|t| json!({ "text": t })).collect()
    };
    Ok(json!({"toolResult": {"toolUseId": id, "content": content, "status": "success"}}))
}

fn translate_tools(list: &[Value]) -> Result<Vec<Value>, GatewayError> {
    let tools = function_tools(list, "Bedrock")?;
    Ok(tools
        .iter()
        .map(|t| {
            let mut spec = json!({"name": t.name, "inputSchema": {"json": t.schema_or_empty()}});
            if let Some(d) = t.description {
                spec["description"] = d.into();
            }
            json!({ "toolSpec": spec })
        })
        .collect())
}

// === Response ===

#[derive(Deserialize)]
struct ConverseWire {
    #[serde(default)]
    output: OutputWire,
    #[serde(default, rename = "stopReason")]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<UsageWire>,
}

#[derive(Deserialize, Default)]
struct OutputWire {
    #[serde(default)]
    message: MessageWire,
}

#[derive(Deserialize, Default)]
struct MessageWire {
    #[serde(default)]
    content: Vec<BlockWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockWire {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    tool_use: Option<ToolUseWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolUseWire {
    tool_use_id: String,
    name: String,
    #[serde(default)]
    input: Value,
}

/// Converse usage: `inputTokens` excludes cache reads and writes, which OpenAI's prompt count
/// includes (the reads reported as cached).
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct UsageWire {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    cache_write_input_tokens: u64,
}

impl UsageWire {
    fn usage(self) -> Usage {
        Usage {
            prompt_tokens: self.input_tokens
                + self.cache_read_input_tokens
                + self.cache_write_input_tokens,
            completion_tokens: self.output_tokens,
            cached_tokens: self.cache_read_input_tokens,
            cache_write_tokens: self.cache_write_input_tokens,
            cache_write_1h_tokens: 0,
            reasoning_tokens: 0,
        }
    }

    fn openai_json(self) -> Value {
        usage_json(self.usage())
    }
}

fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("guardrail_intervened" | "content_filtered") => "content_filter",
        _ => "stop",
    }
}

fn completion_object(response: ConverseWire, model: &str, created: u64) -> Value {
    let usage = response.usage.unwrap_or_default();
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in response.output.message.content {
        if let Some(t) = block.text {
            text.push_str(&t);
        }
        if let Some(call) = block.tool_use {
            let arguments = if call.input.is_null() {
                "{}".to_owned()
            } else {
                call.input.to_string()
            };
            tool_calls.push(json!({"id": call.tool_use_id, "type": "function",
                "function": {"name": call.name, "arguments": arguments}}));
        }
    }
    let content = if text.is_empty() && !tool_calls.is_empty() {
        Value::Null
    } else {
        text.into()
    };
    let mut msg = json!({"role": "assistant", "content": content, "refusal": null});
    if !tool_calls.is_empty() {
        msg["tool_calls"] = Value::Array(tool_calls);
    }
    json!({
        "id": completion_id("bedrock", created),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": msg,
            "logprobs": null,
            "finish_reason": finish_reason(response.stop_reason.as_deref()),
        }],
        "usage": usage.openai_json(),
    })
}

// === Streaming ===

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct StreamEventWire {
    #[serde(default)]
    content_block_index: Option<u64>,
    #[serde(default)]
    start: Option<StartWire>,
    #[serde(default)]
    delta: Option<DeltaWire>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<UsageWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartWire {
    #[serde(default)]
    tool_use: Option<StartToolUseWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartToolUseWire {
    tool_use_id: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeltaWire {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    tool_use: Option<ToolUseDeltaWire>,
}

#[derive(Deserialize)]
struct ToolUseDeltaWire {
    #[serde(default)]
    input: String,
}

/// Translates a ConverseStream event stream into OpenAI chat completion chunks, frame by frame.
pub struct ConverseStream {
    hide_usage_chunk: bool,
    /// The upstream model id: Converse chunks name none.
    model: String,
    decoder: Decoder,
    id: String,
    created: u64,
    tool_calls: ToolCallIndexes,
    usage: Option<UsageWire>,
    stopped: bool,
    tally: StreamTally,
}

impl ConverseStream {
    pub fn new(hide_usage_chunk: bool, model: &str) -> Self {
        let created = unix_secs();
        Self {
            hide_usage_chunk,
            model: model.to_owned(),
            decoder: Decoder::new(),
            id: completion_id("bedrock", created),
            created,
            tool_calls: ToolCallIndexes::default(),
            usage: None,
            stopped: false,
            tally: StreamTally::default(),
        }
    }

    fn header(&self) -> ChunkHeader<'_> {
        ChunkHeader {
            id: &self.id,
            created: self.created,
            model: &self.model,
            hide_usage_chunk: self.hide_usage_chunk,
        }
    }

    fn chunk(&self, out: &mut BytesMut, delta: Value, finish: Option<&str>) {
        write_chunk(out, &self.header(), delta, finish);
    }

    /// One event-stream message in, its OpenAI bytes appended to `out`.
    fn message(&mut self, message: &Message, out: &mut BytesMut) {
        if message.is_failure() {
            return self.exception(message, out);
        }
        let Ok(event) = serde_json::from_slice::<StreamEventWire>(&message.payload) else {
            return;
        };
        match message.event_type().unwrap_or_default() {
            "messageStart" => {
                self.chunk(out, json!({"role": "assistant", "content": ""}), None);
            }
            "contentBlockStart" => self.block_start(event, out),
            "contentBlockDelta" => self.block_delta(event, out),
            "messageStop" => {
                self.stopped = true;
                let finish = finish_reason(event.stop_reason.as_deref());
                self.chunk(out, json!({}), Some(finish));
            }
            "metadata" => self.metadata(event, out),
            _ => {}
        }
    }

    /// An exception frame ends the stream with an OpenAI error event.
    fn exception(&mut self, message: &Message, out: &mut BytesMut) {
        let (kind, text) = exception_of(message);
        let status = status_of(&kind);
        write_error_event(out, status, upstream_error(status, &kind, text.as_deref()));
        self.tally.done = true;
    }

    /// A tool call starts: its id and name.
    fn block_start(&mut self, event: StreamEventWire, out: &mut BytesMut) {
        let Some(tool) = event.start.and_then(|s| s.tool_use) else {
            return;
        };
        let index = event.content_block_index.unwrap_or_default();
        let n = self.tool_calls.start(index);
        self.tally.generated_bytes += tool.name.len() as u64;
        self.chunk(
            out,
            tool_call_start_delta(n, &tool.tool_use_id, &tool.name),
            None,
        );
    }

    /// Text, or a piece of a tool call's arguments.
    fn block_delta(&mut self, event: StreamEventWire, out: &mut BytesMut) {
        let Some(delta) = event.delta else {
            return;
        };
        if let Some(text) = delta.text.filter(|t| !t.is_empty()) {
            self.tally.generated_bytes += text.len() as u64;
            self.chunk(out, json!({ "content": text }), None);
        }
        let Some(tool) = delta.tool_use.filter(|t| !t.input.is_empty()) else {
            return;
        };
        let index = event.content_block_index.unwrap_or_default();
        if let Some(n) = self.tool_calls.of(index) {
            self.tally.generated_bytes += tool.input.len() as u64;
            self.chunk(out, tool_call_arguments_delta(n, &tool.input), None);
        }
    }

    /// Usage, after `messageStop`: the usage chunk, then `[DONE]`.
    fn metadata(&mut self, event: StreamEventWire, out: &mut BytesMut) {
        if let Some(usage) = event.usage {
            self.usage = Some(usage);
            self.tally.usage = self.usage.map(UsageWire::usage);
            if !self.hide_usage_chunk {
                write_usage_chunk(out, &self.header(), usage.openai_json());
            }
        }
        if self.stopped {
            out.put_slice(b"data: [DONE]\n\n");
            self.tally.done = true;
        }
    }
}

impl StreamTranslator for ConverseStream {
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError> {
        let mut out = BytesMut::new();
        if self.tally.done {
            return Ok(out.freeze());
        }
        self.decoder.feed(input);
        loop {
            match self.decoder.next_message() {
                Ok(Some(message)) => {
                    self.message(&message, &mut out);
                    if self.tally.done {
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => return Err(FramingError),
            }
        }
        Ok(out.freeze())
    }

    fn finish(&mut self) -> Bytes {
        // A stream that stopped but sent no `metadata`: close it for the client.
        if !self.tally.done && self.stopped {
            self.tally.done = true;
            return Bytes::from_static(b"data: [DONE]\n\n");
        }
        Bytes::new()
    }

    fn tally(&self) -> &StreamTally {
        &self.tally
    }
}

// === Errors ===

/// A Bedrock error: `{"message": …}` with the exception named in the `x-amzn-ErrorType` header
/// or, from some front ends, in the body's `__type` or `code`.
#[derive(Deserialize, Default)]
struct ErrorWire {
    #[serde(default, alias = "Message")]
    message: Option<String>,
    #[serde(default, rename = "__type", alias = "code")]
    kind_raw: Option<String>,
    #[serde(skip)]
    kind: String,
}

impl ErrorWire {
    fn parse(body: &[u8], error_type: Option<&str>) -> Self {
        let mut error: Self = serde_json::from_slice(body).unwrap_or_default();
        let raw = error.kind_raw.as_deref().or(error_type).unwrap_or_default();
        error.kind = exception_name(raw);
        error
    }
}

/// `com.amazon…#ThrottlingException:http://…` or `throttlingException` → `ThrottlingException`.
fn exception_name(raw: &str) -> String {
    let name = raw.split(':').next().unwrap_or_default();
    let name = name.rsplit('#').next().unwrap_or_default();
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// A Bedrock exception in OpenAI's terms.
fn upstream_error(status: u16, kind: &str, message: Option<&str>) -> UpstreamError {
    let (openai_kind, code) = match kind {
        "ValidationException" => (ErrorKind::InvalidRequest, "invalid_request_error"),
        "AccessDeniedException" => (ErrorKind::Permission, "permission_error"),
        "UnrecognizedClientException" => (ErrorKind::Authentication, "authentication_error"),
        "ResourceNotFoundException" => (ErrorKind::InvalidRequest, "not_found_error"),
        "ThrottlingException" => (ErrorKind::RateLimit, "rate_limit_exceeded"),
        "ServiceQuotaExceededException" => (ErrorKind::InsufficientQuota, "insufficient_quota"),
        "ModelTimeoutException" => (ErrorKind::Timeout, "timeout"),
        "ServiceUnavailableException" | "ModelNotReadyException" => {
            (ErrorKind::Server, "overloaded")
        }
        _ => (ErrorKind::of_status(status), "upstream_error"),
    };
    UpstreamError::new(openai_kind, code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invoke_body_keeps_the_clients_values_byte_for_byte_in_bedrocks_envelope() {
        let body = br#"{"model":"claude","stream":true,"max_tokens":8,"temperature":0.50,
            "messages":[{"role":"user","content":[{"type":"text","text":"caf\u00e9","cache_control":{"type":"ephemeral"}}]}]}"#;
        let beta = http::HeaderValue::from_static("a-2025-01-01, b-2025-02-02");
        let out = invoke_body(body, Some(&beta)).unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.starts_with(
            r#"{"anthropic_version":"bedrock-2023-05-31","anthropic_beta":["a-2025-01-01","b-2025-02-02"]"#
        ));
        // Values as the client wrote them: `0.50`, the escape, `cache_control`.
        assert!(text.contains(r#""temperature":0.50"#), "{text}");
        assert!(text.contains(r#"caf\u00e9"#), "{text}");
        let v: Value = serde_json::from_str(text).unwrap();
        assert!(v.get("model").is_none() && v.get("stream").is_none());
        assert_eq!(
            v["messages"][0]["content"][0]["cache_control"]["type"],
            "ephemeral"
        );
        assert!(is_claude(
            "global.anthropic.claude-sonnet-4-5-20250929-v1:0"
        ));
        assert!(!is_claude("amazon.nova-pro-v1:0"));
    }

    #[test]
    fn model_ids_are_one_encoded_path_segment() {
        assert_eq!(
            model_path("", "anthropic.claude-3-5-haiku-20241022-v1:0", "/converse"),
            "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse"
        );
        assert_eq!(
            model_path("/x/", "arn:aws:bedrock:us-east-1:1:x/y", "/converse-stream"),
            "/x/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ax%2Fy/converse-stream"
        );
    }

    #[test]
    fn exception_names_are_normalised() {
        assert_eq!(exception_name("throttlingException"), "ThrottlingException");
        assert_eq!(
            exception_name("com.amazon.coral#ValidationException:http://internal"),
            "ValidationException"
        );
        assert_eq!(exception_name(""), "");
    }

    fn frame(headers: &[(&str, &str)], payload: &str) -> Vec<u8> {
        let mut h = Vec::new();
        for (name, value) in headers {
            h.push(name.len() as u8);
            h.extend_from_slice(name.as_bytes());
            h.push(7);
            h.extend_from_slice(&(value.len() as u16).to_be_bytes());
            h.extend_from_slice(value.as_bytes());
        }
        let total = 16 + h.len() + payload.len();
        let mut f = Vec::with_capacity(total);
        f.extend_from_slice(&(total as u32).to_be_bytes());
        f.extend_from_slice(&(h.len() as u32).to_be_bytes());
        let prelude_crc = crc32fast::hash(&f);
        f.extend_from_slice(&prelude_crc.to_be_bytes());
        f.extend_from_slice(&h);
        f.extend_from_slice(payload.as_bytes());
        let crc = crc32fast::hash(&f);
        f.extend_from_slice(&crc.to_be_bytes());
        f
    }

    fn event(kind: &str, payload: &str) -> Vec<u8> {
        frame(
            &[
                (":event-type", kind),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload,
        )
    }

    fn tool_stream() -> Vec<Vec<u8>> {
        vec![
            event("messageStart", r#"{"role":"assistant"}"#),
            event(
                "contentBlockDelta",
                r#"{"contentBlockIndex":0,"delta":{"text":"Hi"}}"#,
            ),
            event("contentBlockStop", r#"{"contentBlockIndex":0}"#),
            event(
                "contentBlockStart",
                r#"{"contentBlockIndex":1,"start":{"toolUse":{"toolUseId":"t1","name":"f"}}}"#,
            ),
            event(
                "contentBlockDelta",
                r#"{"contentBlockIndex":1,"delta":{"toolUse":{"input":"{\"a\":"}}}"#,
            ),
            event(
                "contentBlockDelta",
                r#"{"contentBlockIndex":1,"delta":{"toolUse":{"input":"1}"}}}"#,
            ),
            event("contentBlockStop", r#"{"contentBlockIndex":1}"#),
            event("messageStop", r#"{"stopReason":"tool_use"}"#),
            event(
                "metadata",
                r#"{"usage":{"inputTokens":10,"outputTokens":4,"cacheReadInputTokens":2,"cacheWriteInputTokens":1},"metrics":{"latencyMs":5}}"#,
            ),
        ]
    }

    fn data_lines(out: &[u8]) -> Vec<String> {
        String::from_utf8(out.to_vec())
            .unwrap()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn each_frame_is_translated_the_moment_it_is_complete() {
        let mut t = ConverseStream::new(false, "m");
        let frames = tool_stream();
        let mut lines = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let (head, last) = f.split_at(f.len() - 1);
            assert!(t.feed(head).unwrap().is_empty(), "frame {i} emitted early");
            lines.push(data_lines(&t.feed(last).unwrap()));
        }
        assert_eq!(lines[0].len(), 1); // role chunk
        assert!(lines[1][0].contains(r#""content":"Hi""#));
        assert!(lines[2].is_empty());
        let start: Value = serde_json::from_str(&lines[3][0]).unwrap();
        assert_eq!(
            start["choices"][0]["delta"]["tool_calls"][0],
            json!({"index": 0, "id": "t1", "type": "function",
                "function": {"name": "f", "arguments": ""}})
        );
        let args: String = lines[4..6]
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(&l[0]).unwrap();
                v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(args, r#"{"a":1}"#);
        // messageStop: the finish chunk, but no [DONE] before the metadata.
        assert_eq!(lines[7].len(), 1);
        assert!(lines[7][0].contains(r#""finish_reason":"tool_calls""#));
        assert_eq!(lines[8].len(), 2);
        let usage: Value = serde_json::from_str(&lines[8][0]).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["prompt_tokens"], 13);
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(lines[8][1], "[DONE]");
        assert!(t.is_done());
        let u = t.usage().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
            (13, 4, 2)
        );
    }

    #[test]
    fn any_split_gives_the_same_chunks() {
        let all: Vec<u8> = tool_stream().concat();
        let strip_ids = |out: Vec<String>| -> Vec<Value> {
            out.iter()
                .filter(|l| *l != "[DONE]")
                .map(|l| {
                    let mut v: Value = serde_json::from_str(l).unwrap();
                    v["id"] = Value::Null;
                    v["created"] = Value::Null;
                    v
                })
                .collect()
        };
        let mut whole = ConverseStream::new(true, "m");
        let expected = strip_ids(data_lines(&whole.feed(&all).unwrap()));
        for step in [1, 3, 7, 64] {
            let mut t = ConverseStream::new(true, "m");
            let mut out = Vec::new();
            for piece in all.chunks(step) {
                out.extend_from_slice(&t.feed(piece).unwrap());
            }
            assert_eq!(strip_ids(data_lines(&out)), expected, "step {step}");
            assert!(t.is_done());
        }
        // Hidden usage: no `choices: []` chunk, usage still counted.
        assert!(expected.iter().all(|c| c["choices"] != json!([])));
        assert_eq!(whole.usage().unwrap().completion_tokens, 4);
    }

    #[test]
    fn exceptions_become_error_events_and_bad_crcs_fail_the_stream() {
        let mut t = ConverseStream::new(false, "m");
        let mut bytes = event("messageStart", r#"{"role":"assistant"}"#);
        bytes.extend(frame(
            &[
                (":exception-type", "throttlingException"),
                (":content-type", "application/json"),
                (":message-type", "exception"),
            ],
            r#"{"message":"Too many tokens"}"#,
        ));
        let lines = data_lines(&t.feed(&bytes).unwrap());
        let error: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
        assert_eq!(error["error"]["message"], "Too many tokens");
        assert_eq!(error["error"]["code"], "rate_limit_exceeded");
        assert!(t.is_done());

        let mut corrupt = event("messageStart", r#"{"role":"assistant"}"#);
        let n = corrupt.len();
        corrupt[n - 5] ^= 0x01;
        assert!(ConverseStream::new(false, "m").feed(&corrupt).is_err());
    }

    #[test]
    fn usage_counts_cache_reads_and_writes_as_prompt() {
        let u: UsageWire = serde_json::from_str(
            r#"{"inputTokens":10,"outputTokens":5,"cacheReadInputTokens":3,"cacheWriteInputTokens":2}"#,
        )
        .unwrap();
        let u = u.usage();
        assert_eq!(
            (
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_tokens,
                u.cache_write_tokens
            ),
            (15, 5, 3, 2)
        );
    }

    #[test]
    fn counting_names_the_foundation_model_and_answers_in_anthropics_shape() {
        for (id, bare) in [
            (
                "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
                "anthropic.claude-sonnet-4-5-20250929-v1:0",
            ),
            (
                "us.anthropic.claude-haiku-4-5",
                "anthropic.claude-haiku-4-5",
            ),
            ("anthropic.claude-opus-4-1", "anthropic.claude-opus-4-1"),
        ] {
            assert_eq!(foundation_model(id), bare);
        }
        assert_eq!(
            &counted_tokens(br#"{"inputTokens":21}"#).unwrap()[..],
            br#"{"input_tokens":21}"#
        );
        assert_eq!(counted_tokens(b"{}").unwrap_err().status(), 502);
    }
}
