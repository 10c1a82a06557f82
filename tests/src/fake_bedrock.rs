//! A fake AWS Bedrock Runtime Converse API (`POST /model/{modelId}/converse` and
//! `/converse-stream`), for the proxy's Bedrock adapter, and InvokeModel (`/invoke`,
//! `/invoke-with-response-stream`) for Claude models, for its Messages lane.
//!
//! Authentication is checked the way AWS does, with a verifier written here from the SigV4
//! specification (not the proxy's signer, so a signer bug fails a test): the `authorization`
//! header's scope (known access key, region, service `bedrock`, date), `x-amz-date` within five
//! minutes, `host`/`x-amz-date`/`content-type` (and `x-amz-security-token` for temporary keys)
//! signed, and the signature recomputed over the canonical request with the path encoded again
//! (`%3A` → `%253A`). Bedrock API keys come as `Authorization: Bearer`.
//!
//! Bodies are validated against Converse's rules: messages alternate from a user turn, content
//! blocks are single-member unions of known shape, `toolUse` only from the assistant and every
//! `toolResult` answers an earlier `toolUse`, tool blocks need a `toolConfig`, and
//! `inferenceConfig` has the right types and ranges. Streams are real
//! `application/vnd.amazon.eventstream` frames with both CRCs, `metadata` after `messageStop`.
//!
//! CountTokens (`POST /model/{modelId}/count-tokens`) counts Claude's input for a bare
//! foundation-model id (not a cross-region inference profile such as `us.anthropic.claude…`),
//! given `{"input": {"invokeModel": {"body": "<base64 of an InvokeModel body>"}}}` whose body
//! passes [`validate_invoke_body`] (`max_tokens` optional); see [`validate_count_tokens_body`].
//! It answers `{"inputTokens": N}`, N being [`crate::fake_anthropic::ANTHROPIC_INPUT_TOKENS`],
//! what Claude's InvokeModel answers report. The `converse` input is refused as unsupported here.
//!
//! Embeddings models answer InvokeModel (`/invoke`) only — their Converse and streaming
//! operations are a `ValidationException` — with their native bodies, checked as Bedrock does:
//! Titan Text Embeddings V2 (`amazon.titan-embed-text-v2…`, [`validate_titan_embed_body`]) and
//! Cohere Embed (`cohere.embed-…`, [`validate_cohere_embed_body`]). The vectors are
//! [`crate::fake_embedding`]s, the token counts [`crate::word_count`]s, also given in the
//! `X-Amzn-Bedrock-Input-Token-Count` header.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use http::Response;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::fake::Received;
use crate::fake_embeddings::{fake_embedding, word_count};
use crate::serve::{
    fake_server, json_response_with_request_id, lock, paced_stream, refuse, Body, FakeLog,
    FakeServer, Pace, ReadRequest,
};

/// The text reply, one output word per token.
pub const BEDROCK_REPLY: &str = "Hello from the fake Bedrock model.";

/// The reply when the system prompt asks for JSON.
pub const BEDROCK_JSON_REPLY: &str = r#"{"answer":"hi","confidence":1}"#;

/// How far `x-amz-date` may be from the fake's clock (AWS allows 5 minutes).
const CLOCK_SKEW_MAX_S: u64 = 300;

/// Usage the fake reports, in Converse's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BedrockUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_write_input_tokens: u64,
}

/// What the fake does for a request.
#[derive(Debug, Clone)]
pub struct BedrockBehavior {
    /// Non-2xx answers with Bedrock's error body; the exception type follows the status
    /// (400 ValidationException, 403 AccessDeniedException, 429 ThrottlingException, 500
    /// InternalServerException, 503 ServiceUnavailableException).
    pub status: u16,
    /// Tool calls `(name, input)` made when the request offers tools.
    pub tool_calls: Vec<(String, Value)>,
    pub usage: BedrockUsage,
    /// The exception a non-2xx answer names (`x-amzn-ErrorType`) instead of the status's usual
    /// one, e.g. `ServiceQuotaExceededException` (a 400).
    pub exception: Option<&'static str>,
    /// Streams send a `modelStreamErrorException` frame after the first text delta.
    pub stream_exception: bool,
    /// Delay before a stream's first content delta (its time to first token).
    pub ttft: Duration,
    /// Pause before each later content delta.
    pub chunk_interval: Duration,
}

impl Default for BedrockBehavior {
    fn default() -> Self {
        Self {
            status: 200,
            tool_calls: Vec::new(),
            usage: BedrockUsage {
                input_tokens: 17,
                output_tokens: 7,
                cache_read_input_tokens: 5,
                cache_write_input_tokens: 3,
            },
            exception: None,
            stream_exception: false,
            ttft: Duration::ZERO,
            chunk_interval: Duration::ZERO,
        }
    }
}

/// One AWS access key the fake accepts.
#[derive(Clone)]
struct AwsKey {
    secret: String,
    session_token: Option<String>,
}

#[derive(Default)]
/// What the fake keeps between requests, its log among it.
pub struct BedrockState {
    region: String,
    default: BedrockBehavior,
    keys: HashMap<String, AwsKey>,
    api_keys: HashSet<String>,
    by_credential: HashMap<String, BedrockBehavior>,
    log: FakeLog,
}

fake_server!(
    /// A running fake; stops when dropped.
    FakeBedrock = BedrockState
);

impl FakeServer<BedrockState> {
    /// Starts on `127.0.0.1:0`, accepting signatures for `region`.
    pub async fn start(region: &str, default: BedrockBehavior) -> std::io::Result<Self> {
        Self::serve(
            |_| BedrockState {
                region: region.to_owned(),
                default,
                ..BedrockState::default()
            },
            handle,
        )
        .await
    }

    /// Accepts SigV4 signatures by this key (with the session token, when given, required).
    pub fn add_aws_key(&self, access_key_id: &str, secret: &str, session_token: Option<&str>) {
        self.state().keys.insert(
            access_key_id.to_owned(),
            AwsKey {
                secret: secret.to_owned(),
                session_token: session_token.map(str::to_owned),
            },
        );
    }

    /// Accepts this Bedrock API key (bearer).
    pub fn add_api_key(&self, key: &str) {
        self.state().api_keys.insert(key.to_owned());
    }

    /// Requests authenticated by `credential` (access key id or API key) get `behavior`.
    pub fn set_behavior(&self, credential: &str, behavior: BedrockBehavior) {
        self.state()
            .by_credential
            .insert(credential.to_owned(), behavior);
    }
}

fn full(status: u16, body: &Value) -> Response<Body> {
    json_response_with_request_id(status, body, "x-amzn-requestid", "fake-bedrock-request")
}

/// Bedrock's error answer: `{"message"}` with the type in `x-amzn-ErrorType`.
pub fn bedrock_error(status: u16, kind: &str, message: &str) -> Response<Body> {
    let mut resp = full(status, &json!({ "message": message }));
    if let Ok(v) = http::HeaderValue::try_from(format!(
        "{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    )) {
        resp.headers_mut().insert("x-amzn-errortype", v);
    }
    resp
}

fn error_for_status(status: u16, exception: Option<&str>) -> Response<Body> {
    if let Some(kind) = exception {
        return bedrock_error(
            status,
            kind,
            "Your request exceeded a limit of this account.",
        );
    }
    let (kind, message) = match status {
        400 => ("ValidationException", "The provided request is not valid."),
        403 => (
            "AccessDeniedException",
            "You don't have access to the model with the specified model ID.",
        ),
        429 => (
            "ThrottlingException",
            "Too many requests, please wait before trying again.",
        ),
        503 => ("ServiceUnavailableException", "Service unavailable."),
        _ => ("InternalServerException", "Internal server error."),
    };
    bedrock_error(status, kind, message)
}

// === SigV4 verification (from the specification) ===

/// RFC 3986 percent-encoding of everything but unreserved characters.
fn uri_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return Vec::new();
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn unix_from_amz_date(text: &str) -> Option<u64> {
    if text.len() != 16 || &text[8..9] != "T" || !text.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hh, mm, ss) = (n(9..11)?, n(11..13)?, n(13..15)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// Checks a SigV4 `authorization`; the access key id on success.
fn verify_sigv4(
    state: &BedrockState,
    method: &str,
    path: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
) -> Result<String, String> {
    let auth = headers
        .get("authorization")
        .map(String::as_str)
        .unwrap_or_default();
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("authorization: not AWS4-HMAC-SHA256")?;
    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed_headers = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let (Some(credential), Some(signed_headers), Some(signature)) =
        (credential, signed_headers, signature)
    else {
        return Err("authorization: Credential, SignedHeaders and Signature required".into());
    };
    let scope: Vec<&str> = credential.split('/').collect();
    let [key_id, date, region, service, terminator] = scope[..] else {
        return Err("authorization: malformed credential scope".into());
    };
    let key = state
        .keys
        .get(key_id)
        .ok_or_else(|| "UnrecognizedClientException: unknown access key".to_owned())?;
    if region != state.region || service != "bedrock" || terminator != "aws4_request" {
        return Err(format!(
            "credential scope must be <date>/{}/bedrock/aws4_request",
            state.region
        ));
    }
    let amz_date = headers.get("x-amz-date").ok_or("x-amz-date is required")?;
    if !amz_date.starts_with(date) {
        return Err("credential scope date differs from x-amz-date".into());
    }
    let signed_at = unix_from_amz_date(amz_date).ok_or("x-amz-date: malformed")?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now.abs_diff(signed_at) > CLOCK_SKEW_MAX_S {
        return Err("x-amz-date: signature expired or not yet valid".into());
    }
    let names: Vec<&str> = signed_headers.split(';').collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    if sorted != names {
        return Err("SignedHeaders must be sorted".into());
    }
    // A body's type is signed too; a GET has none.
    let required: &[&str] = if method == "GET" {
        &["host", "x-amz-date"]
    } else {
        &["content-type", "host", "x-amz-date"]
    };
    for &required in required {
        if !names.contains(&required) {
            return Err(format!("SignedHeaders must include {required}"));
        }
    }
    match (&key.session_token, headers.get("x-amz-security-token")) {
        (Some(expected), Some(got)) if expected == got => {
            if !names.contains(&"x-amz-security-token") {
                return Err("x-amz-security-token must be signed".into());
            }
        }
        (Some(_), _) => return Err("x-amz-security-token missing or wrong".into()),
        (None, Some(_)) => return Err("x-amz-security-token given for a long-term key".into()),
        (None, None) => {}
    }
    // Canonical URI: the wire path, each segment encoded again.
    let canonical_uri = path
        .split('/')
        .map(uri_encode)
        .collect::<Vec<_>>()
        .join("/");
    let mut canonical_headers = String::new();
    for name in &names {
        let value = headers
            .get(*name)
            .ok_or_else(|| format!("signed header {name} is missing"))?;
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        canonical_headers.push_str(&format!("{name}:{value}\n"));
    }
    let canonical_request = format!(
        "{method}\n{canonical_uri}\n\n{canonical_headers}\n{signed_headers}\n{}",
        hex::encode(Sha256::digest(body))
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/bedrock/aws4_request\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let k_date = hmac(format!("AWS4{}", key.secret).as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, b"bedrock");
    let k_signing = hmac(&k_service, b"aws4_request");
    let expected = hex::encode(hmac(&k_signing, string_to_sign.as_bytes()));
    if expected != signature {
        return Err(
            "InvalidSignatureException: The request signature we calculated does not match the signature you provided"
                .into(),
        );
    }
    Ok(key_id.to_owned())
}

// === Converse validation ===

const TOP_LEVEL: &[&str] = &[
    "messages",
    "system",
    "inferenceConfig",
    "toolConfig",
    "additionalModelRequestFields",
    "additionalModelResponseFieldPaths",
    "guardrailConfig",
    "performanceConfig",
    "promptVariables",
    "requestMetadata",
    "outputConfig",
    "serviceTier",
];

/// The single member of a union object, or why it is not one.
fn union_member(block: &Value) -> Result<(&str, &Value), String> {
    let obj = block.as_object().ok_or("content block must be an object")?;
    let mut members = obj.iter();
    match (members.next(), members.next()) {
        (Some((k, v)), None) => Ok((k.as_str(), v)),
        _ => Err("content block must have exactly one member".into()),
    }
}

fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_tool_use_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Checks a Converse body against the API's rules; the first problem found.
pub fn validate_converse_body(body: &Value) -> Result<(), String> {
    let obj = body.as_object().ok_or("body must be a JSON object")?;
    if let Some(k) = obj.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
        return Err(format!("Unknown field: {k}"));
    }
    if let Some(system) = obj.get("system") {
        let list = system.as_array().ok_or("system must be an array")?;
        for block in list {
            match union_member(block)? {
                ("text", Value::String(t)) if !t.is_empty() => {}
                _ => return Err("system blocks must be non-empty {text}".into()),
            }
        }
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or("messages must be a non-empty array")?;
    let mut tool_use_ids = HashSet::new();
    let mut has_tool_blocks = false;
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if role != expected {
            return Err(format!(
                "messages[{i}].role must be {expected}: a conversation must alternate between user and assistant roles, starting with user"
            ));
        }
        let content = m["content"]
            .as_array()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("messages[{i}].content must be a non-empty array"))?;
        for block in content {
            match union_member(block)? {
                ("text", Value::String(t)) if !t.is_empty() => {}
                ("text", _) => return Err(format!("messages[{i}]: text must be non-empty")),
                ("image", image) if role == "user" => {
                    let format = image["format"].as_str().unwrap_or_default();
                    if !["png", "jpeg", "gif", "webp"].contains(&format) {
                        return Err(format!(
                            "messages[{i}]: image.format {format:?} unsupported"
                        ));
                    }
                    let bytes = image["source"]["bytes"].as_str().unwrap_or_default();
                    let base64_ok = !bytes.is_empty()
                        && bytes.len() % 4 == 0
                        && bytes
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
                    if !base64_ok {
                        return Err(format!("messages[{i}]: image.source.bytes must be base64"));
                    }
                }
                ("toolUse", tu) if role == "assistant" => {
                    has_tool_blocks = true;
                    let id = tu["toolUseId"].as_str().unwrap_or_default();
                    let name = tu["name"].as_str().unwrap_or_default();
                    if !valid_tool_use_id(id) || !valid_tool_name(name) || !tu["input"].is_object()
                    {
                        return Err(format!(
                            "messages[{i}]: toolUse needs toolUseId, name and an object input"
                        ));
                    }
                    tool_use_ids.insert(id.to_owned());
                }
                ("toolResult", tr) if role == "user" => {
                    has_tool_blocks = true;
                    let id = tr["toolUseId"].as_str().unwrap_or_default();
                    if !tool_use_ids.contains(id) {
                        return Err(format!(
                            "messages[{i}]: toolResult {id:?} answers no earlier toolUse"
                        ));
                    }
                    let parts = tr["content"].as_array().ok_or_else(|| {
                        format!("messages[{i}]: toolResult.content must be an array")
                    })?;
                    for part in parts {
                        match union_member(part)? {
                            ("text", Value::String(_)) | ("json", _) => {}
                            _ => {
                                return Err(format!(
                                    "messages[{i}]: toolResult content must be text or json"
                                ))
                            }
                        }
                    }
                    if let Some(status) = tr.get("status") {
                        if status != "success" && status != "error" {
                            return Err(format!("messages[{i}]: toolResult.status invalid"));
                        }
                    }
                }
                (kind, _) => {
                    return Err(format!(
                        "messages[{i}]: {kind} block not allowed for {role}"
                    ))
                }
            }
        }
    }
    if let Some(inference) = obj.get("inferenceConfig") {
        let inference = inference
            .as_object()
            .ok_or("inferenceConfig must be an object")?;
        for (k, v) in inference {
            let ok = match k.as_str() {
                "maxTokens" => v.as_u64().is_some_and(|n| n >= 1),
                "temperature" | "topP" => v.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)),
                "stopSequences" => v
                    .as_array()
                    .is_some_and(|a| a.len() <= 2500 && a.iter().all(Value::is_string)),
                _ => return Err(format!("inferenceConfig: unknown field {k}")),
            };
            if !ok {
                return Err(format!("inferenceConfig.{k}: invalid value {v}"));
            }
        }
    }
    match obj.get("toolConfig") {
        None if has_tool_blocks => {
            return Err(
                "The toolConfig field must be defined when using toolUse and toolResult content blocks."
                    .into(),
            )
        }
        None => {}
        Some(config) => {
            let tools = config["tools"]
                .as_array()
                .filter(|t| !t.is_empty())
                .ok_or("toolConfig.tools must be a non-empty array")?;
            for tool in tools {
                let spec = &tool["toolSpec"];
                let name = spec["name"].as_str().unwrap_or_default();
                if !valid_tool_name(name) || !spec["inputSchema"]["json"].is_object() {
                    return Err("toolSpec needs a valid name and inputSchema.json".into());
                }
                if spec.get("description").is_some_and(|d| !d.is_string()) {
                    return Err("toolSpec.description must be a string".into());
                }
            }
            if let Some(choice) = config.get("toolChoice") {
                match union_member(choice)? {
                    ("auto" | "any", v) if v.as_object().is_some_and(|o| o.is_empty()) => {}
                    ("tool", v) if v["name"].is_string() => {}
                    _ => return Err("toolChoice must be auto, any or tool{name}".into()),
                }
            }
        }
    }
    Ok(())
}

// === Embeddings (InvokeModel) ===

/// A model whose native body InvokeModel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Native {
    Claude,
    TitanEmbed,
    CohereEmbed,
}

/// Which native body a model id (as on the wire) takes, if the fake serves InvokeModel for it.
fn native_model(id: &str) -> Option<Native> {
    if id.starts_with("amazon.titan-embed-text-v2") {
        Some(Native::TitanEmbed)
    } else if id.starts_with("cohere.embed-") {
        Some(Native::CohereEmbed)
    } else if id.contains("anthropic.claude") {
        Some(Native::Claude)
    } else {
        None
    }
}

/// Titan Text Embeddings V2's dimensions when a request names none.
pub const TITAN_EMBED_DIMENSIONS: usize = 1024;

/// Cohere Embed's dimensions (English and multilingual v3).
pub const COHERE_EMBED_DIMENSIONS: usize = 1024;

/// The most texts one Cohere Embed request may carry.
const COHERE_TEXTS_MAX: usize = 96;

/// The longest text Cohere Embed takes, in characters.
const COHERE_TEXT_CHARS_MAX: usize = 2048;

/// The `embedding_types` Cohere Embed knows.
const COHERE_EMBEDDING_TYPES: &[&str] = &["float", "int8", "uint8", "binary", "ubinary"];

/// Titan Text Embeddings V2's body as Bedrock checks it: only `inputText` (a non-empty string,
/// required), `dimensions` (256, 512 or 1024), `normalize` (a boolean) and `embeddingTypes` (a
/// non-empty array of `float` / `binary`).
pub fn validate_titan_embed_body(body: &Value) -> Result<(), String> {
    let obj = body
        .as_object()
        .ok_or("Malformed input request: expected type: JSONObject")?;
    const KNOWN: &[&str] = &["inputText", "dimensions", "normalize", "embeddingTypes"];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!(
            "Malformed input request: extraneous key [{k}] is not permitted, please reformat your input and try again."
        ));
    }
    match obj.get("inputText") {
        Some(Value::String(t)) if !t.is_empty() => {}
        Some(Value::String(_)) => {
            return Err("Malformed input request: expected minLength: 1, actual: 0, please reformat your input and try again.".into())
        }
        Some(_) => {
            return Err("Malformed input request: #/inputText: expected type: String, please reformat your input and try again.".into())
        }
        None => {
            return Err("Malformed input request: #: required key [inputText] not found, please reformat your input and try again.".into())
        }
    }
    if obj
        .get("dimensions")
        .is_some_and(|d| !matches!(d.as_u64(), Some(256 | 512 | 1024)))
    {
        return Err("Malformed input request: #/dimensions: must be one of 256, 512, 1024, please reformat your input and try again.".into());
    }
    if obj.get("normalize").is_some_and(|n| !n.is_boolean()) {
        return Err("Malformed input request: #/normalize: expected type: Boolean, please reformat your input and try again.".into());
    }
    if let Some(types) = obj.get("embeddingTypes") {
        let ok = types
            .as_array()
            .is_some_and(|t| !t.is_empty() && t.iter().all(|t| t == "float" || t == "binary"));
        if !ok {
            return Err("Malformed input request: #/embeddingTypes: must be a non-empty array of \"float\" and \"binary\", please reformat your input and try again.".into());
        }
    }
    Ok(())
}

/// Cohere Embed's body as Bedrock checks it: only `texts` (1 to 96 strings of 1 to 2048
/// characters, required), `input_type` (required: `search_document`, `search_query`,
/// `classification` or `clustering`), `truncate` (`NONE`, `START` or `END`) and
/// `embedding_types` (a non-empty array of Cohere's types; this fake answers `float` only).
pub fn validate_cohere_embed_body(body: &Value) -> Result<(), String> {
    let obj = body
        .as_object()
        .ok_or("Malformed input request: expected type: JSONObject")?;
    const KNOWN: &[&str] = &["texts", "input_type", "truncate", "embedding_types"];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!(
            "Malformed input request: extraneous key [{k}] is not permitted, please reformat your input and try again."
        ));
    }
    let texts = obj
        .get("texts")
        .ok_or("Malformed input request: #: required key [texts] not found, please reformat your input and try again.")?
        .as_array()
        .ok_or("Malformed input request: #/texts: expected type: JSONArray, please reformat your input and try again.")?;
    if texts.is_empty() || texts.len() > COHERE_TEXTS_MAX {
        return Err(format!(
            "Malformed input request: #/texts: expected between 1 and {COHERE_TEXTS_MAX} items, found {}, please reformat your input and try again.",
            texts.len()
        ));
    }
    for (i, t) in texts.iter().enumerate() {
        let chars = t
            .as_str()
            .ok_or(format!("Malformed input request: #/texts/{i}: expected type: String, please reformat your input and try again."))?
            .chars()
            .count();
        if !(1..=COHERE_TEXT_CHARS_MAX).contains(&chars) {
            return Err(format!(
                "Malformed input request: #/texts/{i}: expected between 1 and {COHERE_TEXT_CHARS_MAX} characters, found {chars}, please reformat your input and try again."
            ));
        }
    }
    match obj.get("input_type").and_then(Value::as_str) {
        Some("search_document" | "search_query" | "classification" | "clustering") => {}
        Some(other) => {
            return Err(format!(
                "Malformed input request: #/input_type: {other} is not a valid enum value, please reformat your input and try again."
            ))
        }
        None if obj.contains_key("input_type") => {
            return Err("Malformed input request: #/input_type: expected type: String, please reformat your input and try again.".into())
        }
        None => {
            return Err("Malformed input request: #: required key [input_type] not found, please reformat your input and try again.".into())
        }
    }
    if obj
        .get("truncate")
        .is_some_and(|t| !matches!(t.as_str(), Some("NONE" | "START" | "END")))
    {
        return Err("Malformed input request: #/truncate: must be one of NONE, START, END, please reformat your input and try again.".into());
    }
    if let Some(types) = obj.get("embedding_types") {
        let types = types
            .as_array()
            .filter(|t| !t.is_empty())
            .ok_or("Malformed input request: #/embedding_types: expected a non-empty JSONArray, please reformat your input and try again.")?;
        for t in types {
            match t.as_str() {
                Some("float") => {}
                Some(known) if COHERE_EMBEDDING_TYPES.contains(&known) => {
                    return Err(format!(
                        "embedding_types: the fake Bedrock answers float embeddings only, not {known}"
                    ))
                }
                _ => {
                    return Err(format!(
                        "Malformed input request: #/embedding_types: {t} is not a valid enum value, please reformat your input and try again."
                    ))
                }
            }
        }
    }
    Ok(())
}

/// A 200 InvokeModel answer with Bedrock's invocation headers.
fn invoke_answer(body: &Value, input_tokens: u64) -> Response<Body> {
    let mut resp = full(200, body);
    for (name, value) in [
        ("x-amzn-bedrock-input-token-count", input_tokens.to_string()),
        ("x-amzn-bedrock-invocation-latency", "1".to_owned()),
    ] {
        if let Ok(v) = http::HeaderValue::try_from(value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

/// Titan's answer: the float vector (also under `embeddingsByType.float`, and its signs under
/// `binary` when asked for), the input's words as its token count.
fn titan_embed_response(req: &Value) -> Response<Body> {
    let text = req["inputText"].as_str().unwrap_or_default();
    let dims = req["dimensions"]
        .as_u64()
        .map_or(TITAN_EMBED_DIMENSIONS, |d| d as usize);
    let vector = fake_embedding(text, dims);
    let mut by_type = json!({ "float": vector });
    let wants_binary = req["embeddingTypes"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t == "binary"));
    if wants_binary {
        let bits: Vec<u8> = vector.iter().map(|v| u8::from(*v > 0.0)).collect();
        by_type["binary"] = json!(bits);
    }
    let tokens = word_count(text);
    invoke_answer(
        &json!({"embedding": vector, "inputTextTokenCount": tokens, "embeddingsByType": by_type}),
        tokens,
    )
}

/// Cohere's answer: one vector per text, in order (`embeddings_floats`, or
/// `embeddings_by_type` with `{"float": […]}` when `embedding_types` is given); the texts'
/// words, summed, in `X-Amzn-Bedrock-Input-Token-Count`.
fn cohere_embed_response(req: &Value, served: usize) -> Response<Body> {
    let texts: Vec<&str> = req["texts"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let vectors: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| fake_embedding(t, COHERE_EMBED_DIMENSIONS))
        .collect();
    let (response_type, embeddings) = if req.get("embedding_types").is_some() {
        ("embeddings_by_type", json!({ "float": vectors }))
    } else {
        ("embeddings_floats", json!(vectors))
    };
    let tokens = texts.iter().map(|t| word_count(t)).sum();
    invoke_answer(
        &json!({"id": format!("fake-cohere-embed-{served:04}"), "response_type": response_type,
            "texts": texts, "embeddings": embeddings}),
        tokens,
    )
}

// === Handler ===

async fn handle(
    req: ReadRequest,
    state: Arc<Mutex<BedrockState>>,
) -> Result<Response<Body>, Infallible> {
    let (method, path, version, headers, body) = req.parts();
    let body = body.unwrap_or_default();
    let reject = |status: u16, kind: &str, why: String| {
        refuse(&state, &why, bedrock_error(status, kind, &why))
    };
    // The control endpoint's model list, as a credential check reads it.
    if path == "/foundation-models" && method == http::Method::GET {
        let st = lock(&state);
        let auth = headers
            .get("authorization")
            .map(String::as_str)
            .unwrap_or_default();
        let checked = match auth.strip_prefix("Bearer ") {
            Some(key) if st.api_keys.contains(key) => Ok(key.to_owned()),
            Some(_) => Err("UnrecognizedClientException: invalid Bedrock API key".to_owned()),
            None => verify_sigv4(&st, "GET", &path, &headers, &body),
        };
        drop(st);
        return match checked {
            Ok(_) => Ok(full(
                200,
                &json!({"modelSummaries": [{"modelId": "anthropic.claude-3-5-haiku-20241022-v1:0",
                    "providerName": "Anthropic", "outputModalities": ["TEXT"]}]}),
            )),
            Err(why) if why.starts_with("UnrecognizedClient") => {
                reject(403, "UnrecognizedClientException", why)
            }
            Err(why) => reject(403, "InvalidSignatureException", why),
        };
    }
    let operation = path
        .strip_prefix("/model/")
        .and_then(|rest| rest.rsplit_once('/'))
        .filter(|(id, _)| !id.is_empty() && !id.contains(':'));
    // InvokeModel takes a model's native body: Anthropic's Messages for Claude, Titan's or
    // Cohere's embeddings request for their embeddings models.
    let native = operation.and_then(|(id, _)| native_model(id));
    let embeddings = matches!(native, Some(Native::TitanEmbed | Native::CohereEmbed));
    // CountTokens, and whether it counts for the model named.
    let count_tokens = matches!(operation, Some((_, "count-tokens")));
    let countable = operation.is_some_and(|(id, _)| counts_tokens(id));
    let (invoke, stream) = match (operation, native) {
        (Some((_, "converse" | "count-tokens")), _) => (false, false),
        (Some((_, "converse-stream")), _) => (false, true),
        (Some((_, "invoke")), Some(_)) => (true, false),
        (Some((_, "invoke-with-response-stream")), Some(_)) => (true, true),
        _ => {
            return reject(
                404,
                "UnknownOperationException",
                format!("Not found: {method} {path}"),
            )
        }
    };
    if method != http::Method::POST {
        return reject(405, "UnknownOperationException", "POST only".into());
    }
    let credential = {
        let st = lock(&state);
        let auth = headers
            .get("authorization")
            .map(String::as_str)
            .unwrap_or_default();
        match auth.strip_prefix("Bearer ") {
            Some(key) if st.api_keys.contains(key) => Ok(key.to_owned()),
            Some(_) => Err("UnrecognizedClientException: invalid Bedrock API key".to_owned()),
            None => verify_sigv4(&st, method.as_str(), &path, &headers, &body),
        }
    };
    let credential = match credential {
        Ok(c) => c,
        Err(why) => {
            let kind = if why.starts_with("UnrecognizedClient") {
                "UnrecognizedClientException"
            } else {
                "InvalidSignatureException"
            };
            return reject(403, kind, why);
        }
    };
    if count_tokens && !countable {
        return reject(
            400,
            "ValidationException",
            "The provided model doesn't support counting tokens.".into(),
        );
    }
    if embeddings && !invoke {
        return reject(
            400,
            "ValidationException",
            "This action doesn't support the model that you provided. Try again with a supported text or chat model.".into(),
        );
    }
    if embeddings && stream {
        return reject(
            400,
            "ValidationException",
            "The model is unsupported for streaming.".into(),
        );
    }
    if headers.get("content-type").map(String::as_str) != Some("application/json") {
        return reject(
            400,
            "ValidationException",
            "content-type must be application/json".into(),
        );
    }
    let Ok(parsed) = serde_json::from_slice::<Value>(&body) else {
        return reject(400, "ValidationException", "body: invalid JSON".into());
    };
    let valid = match native {
        _ if count_tokens => validate_count_tokens_body(&parsed),
        _ if !invoke => validate_converse_body(&parsed),
        Some(Native::TitanEmbed) => validate_titan_embed_body(&parsed),
        Some(Native::CohereEmbed) => validate_cohere_embed_body(&parsed),
        _ => validate_invoke_body(&parsed),
    };
    if let Err(why) = valid {
        return reject(400, "ValidationException", why);
    }
    let (behavior, served) = {
        let mut st = lock(&state);
        st.log.received.push(Received {
            version,
            path,
            headers,
            body: parsed.clone(),
        });
        let b = st
            .by_credential
            .get(&credential)
            .cloned()
            .unwrap_or_else(|| st.default.clone());
        (b, st.log.received.len())
    };
    if behavior.status != 200 {
        return Ok(error_for_status(behavior.status, behavior.exception));
    }
    if count_tokens {
        return Ok(full(
            200,
            &json!({ "inputTokens": crate::fake_anthropic::ANTHROPIC_INPUT_TOKENS }),
        ));
    }
    match native {
        Some(Native::TitanEmbed) if invoke => return Ok(titan_embed_response(&parsed)),
        Some(Native::CohereEmbed) if invoke => return Ok(cohere_embed_response(&parsed, served)),
        _ => {}
    }
    if invoke {
        return Ok(invoke_response(&parsed, &behavior, stream));
    }
    let answer = answer(&parsed, &behavior);
    if stream {
        return Ok(stream_response(&answer, &behavior));
    }
    let mut content = Vec::new();
    if !answer.text.is_empty() {
        content.push(json!({ "text": answer.text }));
    }
    for (id, name, input) in &answer.tools {
        content.push(json!({"toolUse": {"toolUseId": id, "name": name, "input": input}}));
    }
    Ok(full(
        200,
        &json!({"output": {"message": {"role": "assistant", "content": content}},
            "stopReason": answer.stop_reason,
            "usage": usage_json(&behavior.usage, answer.output_tokens),
            "metrics": {"latencyMs": 12}}),
    ))
}

struct Answer {
    text: String,
    tools: Vec<(String, String, Value)>,
    stop_reason: &'static str,
    output_tokens: u64,
}

fn answer(req: &Value, b: &BedrockBehavior) -> Answer {
    let messages = req["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let results: Vec<String> = last["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|x| x.get("toolResult"))
                .map(|x| {
                    x["content"]
                        .as_array()
                        .map(|parts| {
                            parts
                                .iter()
                                .map(|p| p["text"].as_str().unwrap_or_default().to_owned())
                                .collect::<String>()
                        })
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    if !results.is_empty() {
        return Answer {
            text: format!("Tool results: {}.", results.join("; ")),
            tools: Vec::new(),
            stop_reason: "end_turn",
            output_tokens: b.usage.output_tokens,
        };
    }
    if req.get("toolConfig").is_some() && !b.tool_calls.is_empty() {
        return Answer {
            text: "Let me check.".into(),
            tools: b
                .tool_calls
                .iter()
                .enumerate()
                .map(|(i, (name, input))| {
                    (format!("tooluse_fake{i:02}"), name.clone(), input.clone())
                })
                .collect(),
            stop_reason: "tool_use",
            output_tokens: b.usage.output_tokens,
        };
    }
    if req["system"].to_string().contains("JSON") {
        return Answer {
            text: BEDROCK_JSON_REPLY.into(),
            tools: Vec::new(),
            stop_reason: "end_turn",
            output_tokens: b.usage.output_tokens,
        };
    }
    let words: Vec<&str> = BEDROCK_REPLY.split(' ').collect();
    let limit = req["inferenceConfig"]["maxTokens"]
        .as_u64()
        .map_or(usize::MAX, |n| n as usize);
    if limit < words.len() {
        return Answer {
            text: words[..limit].join(" "),
            tools: Vec::new(),
            stop_reason: "max_tokens",
            output_tokens: limit as u64,
        };
    }
    Answer {
        text: words.join(" "),
        tools: Vec::new(),
        stop_reason: "end_turn",
        output_tokens: b.usage.output_tokens,
    }
}

fn usage_json(u: &BedrockUsage, output_tokens: u64) -> Value {
    let total =
        u.input_tokens + u.cache_read_input_tokens + u.cache_write_input_tokens + output_tokens;
    json!({"inputTokens": u.input_tokens, "outputTokens": output_tokens, "totalTokens": total,
        "cacheReadInputTokens": u.cache_read_input_tokens,
        "cacheWriteInputTokens": u.cache_write_input_tokens})
}

// === Event stream encoding ===

/// One `application/vnd.amazon.eventstream` frame with string headers: prelude (total and
/// headers lengths, prelude CRC), headers, payload, message CRC (CRC-32 of everything before).
pub fn encode_frame(headers: &[(&str, &str)], payload: &[u8]) -> Bytes {
    let mut encoded_headers = BytesMut::new();
    for (name, value) in headers {
        encoded_headers.put_u8(name.len() as u8);
        encoded_headers.put_slice(name.as_bytes());
        encoded_headers.put_u8(7);
        encoded_headers.put_u16(value.len() as u16);
        encoded_headers.put_slice(value.as_bytes());
    }
    let total = 16 + encoded_headers.len() + payload.len();
    let mut frame = BytesMut::with_capacity(total);
    frame.put_u32(total as u32);
    frame.put_u32(encoded_headers.len() as u32);
    let prelude_crc = crc32fast::hash(&frame[..8]);
    frame.put_u32(prelude_crc);
    frame.put_slice(&encoded_headers);
    frame.put_slice(payload);
    let message_crc = crc32fast::hash(&frame);
    frame.put_u32(message_crc);
    frame.freeze()
}

fn event(kind: &str, payload: &Value) -> Bytes {
    encode_frame(
        &[
            (":event-type", kind),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.to_string().as_bytes(),
    )
}

fn exception(kind: &str, message: &str) -> Bytes {
    encode_frame(
        &[
            (":exception-type", kind),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ],
        json!({ "message": message }).to_string().as_bytes(),
    )
}

/// InvokeModel's body for Claude, as Bedrock checks it: Anthropic's Messages body with
/// `anthropic_version: "bedrock-2023-05-31"`, the model in the path (not the body), no
/// `stream` (the operation says it), betas as an `anthropic_beta` array of strings.
pub fn validate_invoke_body(body: &Value) -> Result<(), String> {
    let obj = body.as_object().ok_or("body: not a JSON object")?;
    if obj.get("anthropic_version").and_then(Value::as_str) != Some(ANTHROPIC_BEDROCK_VERSION) {
        return Err(format!(
            "anthropic_version: must be {ANTHROPIC_BEDROCK_VERSION}"
        ));
    }
    for field in ["model", "stream"] {
        if obj.contains_key(field) {
            return Err(format!("{field}: Extra inputs are not permitted"));
        }
    }
    let betas: Vec<&str> = match obj.get("anthropic_beta") {
        None => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|b| {
                b.as_str()
                    .ok_or("anthropic_beta: must be an array of strings")
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("anthropic_beta: must be an array of strings".into()),
    };
    if obj.contains_key("context_management")
        && !betas.iter().any(|b| b.starts_with("context-management-"))
    {
        return Err("context_management: Extra inputs are not permitted".into());
    }
    let mut messages = body.clone();
    if let Some(m) = messages.as_object_mut() {
        m.remove("anthropic_version");
        m.remove("anthropic_beta");
        m.insert("model".into(), json!("claude-on-bedrock"));
    }
    crate::fake_anthropic::validate_messages_body(&messages)
}

/// `anthropic_version` InvokeModel takes for Claude.
pub const ANTHROPIC_BEDROCK_VERSION: &str = "bedrock-2023-05-31";

/// The prefixes of cross-region inference profiles (`us.anthropic.claude…`), which CountTokens
/// does not take.
const INFERENCE_PROFILE_PREFIXES: &[&str] = &["us.", "eu.", "apac.", "jp.", "au.", "global."];

/// Whether CountTokens counts for `id` (as on the wire): a Claude foundation model named bare,
/// not through a cross-region inference profile.
fn counts_tokens(id: &str) -> bool {
    id.contains("anthropic.claude") && !INFERENCE_PROFILE_PREFIXES.iter().any(|p| id.starts_with(p))
}

/// CountTokens' body as Bedrock checks it, for the one input this fake counts:
/// `{"input": {"invokeModel": {"body": "<standard base64 of an InvokeModel body>"}}}`, the
/// decoded body a valid InvokeModel body for Claude ([`validate_invoke_body`]) except that
/// `max_tokens` may be left out. `{"input": {"converse": …}}` is refused as unsupported here.
pub fn validate_count_tokens_body(body: &Value) -> Result<(), String> {
    use base64::Engine;
    let obj = body.as_object().ok_or("body must be a JSON object")?;
    if let Some(k) = obj.keys().find(|k| *k != "input") {
        return Err(format!("Unknown field: {k}"));
    }
    let input = obj
        .get("input")
        .ok_or("input: Field required")?
        .as_object()
        .ok_or("input must be an object")?;
    let mut members = input.iter();
    let invoke_model = match (members.next(), members.next()) {
        (Some((k, v)), None) if k == "invokeModel" => v,
        (Some((k, _)), None) if k == "converse" => {
            return Err(
                "input.converse: the fake Bedrock does not support counting Converse input; send input.invokeModel".into(),
            )
        }
        (Some((k, _)), None) => return Err(format!("input: unknown member {k}")),
        _ => return Err("input must have exactly one member: invokeModel or converse".into()),
    };
    let invoke_model = invoke_model
        .as_object()
        .ok_or("input.invokeModel must be an object")?;
    if let Some(k) = invoke_model.keys().find(|k| *k != "body") {
        return Err(format!("Unknown field: input.invokeModel.{k}"));
    }
    let encoded = invoke_model
        .get("body")
        .and_then(Value::as_str)
        .ok_or("input.invokeModel.body: Field required (the base64 of an InvokeModel body)")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "input.invokeModel.body: not valid base64".to_owned())?;
    let inner: Value = serde_json::from_slice(&decoded)
        .map_err(|_| "input.invokeModel.body: not a JSON InvokeModel body".to_owned())?;
    validate_counted_invoke_body(&inner)
}

/// An InvokeModel body for Claude as CountTokens takes it: [`validate_invoke_body`]'s rules,
/// `max_tokens` optional (checked when present).
fn validate_counted_invoke_body(body: &Value) -> Result<(), String> {
    let mut counted = body.clone();
    if let Some(m) = counted.as_object_mut() {
        m.entry("max_tokens").or_insert(json!(64_000));
    }
    validate_invoke_body(&counted)
}

/// InvokeModel's answer for Claude: Anthropic's message, or its events each in a `chunk` frame
/// (`{"bytes": base64 of the event's JSON}`), the last with Bedrock's invocation metrics.
fn invoke_response(req: &Value, b: &BedrockBehavior, stream: bool) -> Response<Body> {
    use base64::Engine;
    let claude = crate::fake_anthropic::AnthropicBehavior {
        tool_calls: b.tool_calls.clone(),
        ..Default::default()
    };
    if !stream {
        return full(
            200,
            &crate::fake_anthropic::message_json(req, &claude, "msg_bdrk_fake"),
        );
    }
    let u = claude.usage;
    let frames = crate::fake_anthropic::message_events(req, &claude, "msg_bdrk_fake")
        .into_iter()
        .map(|(name, mut data)| {
            if name == "message_stop" {
                data["amazon-bedrock-invocationMetrics"] = json!({
                    "inputTokenCount": u.input_tokens, "outputTokenCount": u.output_tokens,
                    "invocationLatency": 12, "firstByteLatency": 3});
            }
            let bytes = base64::engine::general_purpose::STANDARD.encode(data.to_string());
            (
                name == "content_block_delta",
                event("chunk", &json!({ "bytes": bytes })),
            )
        })
        .collect();
    let pace = Pace {
        ttft: b.ttft,
        interval: b.chunk_interval,
    };
    paced_stream(frames, pace, "application/vnd.amazon.eventstream")
}

/// The native frame sequence for an answer.
fn stream_frames(a: &Answer, b: &BedrockBehavior) -> Vec<Bytes> {
    let mut out = vec![event("messageStart", &json!({"role": "assistant"}))];
    let mut index = 0;
    if !a.text.is_empty() {
        // Text blocks get no contentBlockStart, as on the real service.
        for (i, word) in a.text.split(' ').enumerate() {
            let text = if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            };
            out.push(event(
                "contentBlockDelta",
                &json!({"contentBlockIndex": index, "delta": {"text": text}}),
            ));
            if b.stream_exception {
                out.push(exception(
                    "modelStreamErrorException",
                    "The model stream failed.",
                ));
                return out;
            }
        }
        out.push(event(
            "contentBlockStop",
            &json!({ "contentBlockIndex": index }),
        ));
        index += 1;
    }
    for (id, name, input) in &a.tools {
        out.push(event(
            "contentBlockStart",
            &json!({"contentBlockIndex": index,
                "start": {"toolUse": {"toolUseId": id, "name": name}}}),
        ));
        let args = input.to_string();
        let cut = (0..=args.len() / 2)
            .rev()
            .find(|&c| args.is_char_boundary(c))
            .unwrap_or(0);
        for piece in [&args[..cut], &args[cut..]] {
            out.push(event(
                "contentBlockDelta",
                &json!({"contentBlockIndex": index, "delta": {"toolUse": {"input": piece}}}),
            ));
        }
        out.push(event(
            "contentBlockStop",
            &json!({ "contentBlockIndex": index }),
        ));
        index += 1;
    }
    out.push(event(
        "messageStop",
        &json!({ "stopReason": a.stop_reason }),
    ));
    out.push(event(
        "metadata",
        &json!({"usage": usage_json(&b.usage, a.output_tokens), "metrics": {"latencyMs": 12}}),
    ));
    out
}

fn stream_response(a: &Answer, b: &BedrockBehavior) -> Response<Body> {
    let frames = stream_frames(a, b)
        .into_iter()
        .map(|f| (f.windows(17).any(|w| w == b"contentBlockDelta"), f))
        .collect();
    let pace = Pace {
        ttft: b.ttft,
        interval: b.chunk_interval,
    };
    let mut resp = paced_stream(frames, pace, "application/vnd.amazon.eventstream");
    resp.headers_mut().insert(
        "x-amzn-requestid",
        http::HeaderValue::from_static("fake-bedrock-request"),
    );
    resp
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

    const TITAN: &str = "amazon.titan-embed-text-v2%3A0";
    const COHERE: &str = "cohere.embed-english-v3";

    async fn started() -> FakeBedrock {
        let fake = FakeBedrock::start("us-east-1", BedrockBehavior::default())
            .await
            .unwrap();
        fake.add_api_key("bedrock-api-key");
        fake
    }

    /// Posts `body` to `/model/{model}/{operation}` with a Bedrock API key: status, headers,
    /// body.
    async fn call(
        fake: &FakeBedrock,
        model: &str,
        operation: &str,
        body: &Value,
    ) -> (u16, http::HeaderMap, Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}/model/{model}/{operation}", fake.base_url()))
            .bearer_auth("bedrock-api-key")
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.json().await.unwrap())
    }

    fn validation_error(headers: &http::HeaderMap) -> bool {
        headers["x-amzn-errortype"]
            .to_str()
            .unwrap()
            .starts_with("ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/")
    }

    #[tokio::test]
    async fn titan_embeddings_answer_over_invoke_model() {
        let fake = started().await;
        let body = json!({"inputText": "the quick brown fox"});
        let (status, headers, v) = call(&fake, TITAN, "invoke", &body).await;
        assert_eq!(status, 200, "{v}");
        let expected = crate::fake_embedding("the quick brown fox", TITAN_EMBED_DIMENSIONS);
        assert_eq!(v["embedding"], json!(expected));
        assert_eq!(v["embeddingsByType"]["float"], json!(expected));
        assert_eq!(v["inputTextTokenCount"], 4);
        assert_eq!(headers["x-amzn-bedrock-input-token-count"], "4");
        assert_eq!(headers["x-amzn-bedrock-invocation-latency"], "1");

        let body = json!({"inputText": "abc", "dimensions": 256, "normalize": true,
            "embeddingTypes": ["float", "binary"]});
        let (status, _, v) = call(&fake, TITAN, "invoke", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["embedding"].as_array().unwrap().len(), 256);
        assert_eq!(v["embedding"], json!(crate::fake_embedding("abc", 256)));
        assert_eq!(v["embeddingsByType"]["binary"][6], 1);
        assert_eq!(v["embeddingsByType"]["binary"][7], 0);
        let received = fake.received();
        assert_eq!(received.len(), 2);
        assert_eq!(received[0].path, format!("/model/{TITAN}/invoke"));
        assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    }

    #[tokio::test]
    async fn cohere_embeddings_answer_over_invoke_model() {
        let fake = started().await;
        let body = json!({"texts": ["one two three", "héllo"], "input_type": "search_document",
            "truncate": "END"});
        let (status, headers, v) = call(&fake, COHERE, "invoke", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["response_type"], "embeddings_floats");
        assert!(v["id"].as_str().is_some_and(|id| !id.is_empty()));
        assert_eq!(v["texts"], json!(["one two three", "héllo"]));
        assert_eq!(
            v["embeddings"],
            json!([
                crate::fake_embedding("one two three", COHERE_EMBED_DIMENSIONS),
                crate::fake_embedding("héllo", COHERE_EMBED_DIMENSIONS)
            ])
        );
        assert_eq!(headers["x-amzn-bedrock-input-token-count"], "4");
        assert_eq!(headers["x-amzn-bedrock-invocation-latency"], "1");

        let body = json!({"texts": ["abc"], "input_type": "search_query",
            "embedding_types": ["float"]});
        let (status, _, v) = call(&fake, COHERE, "invoke", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["response_type"], "embeddings_by_type");
        assert_eq!(
            v["embeddings"]["float"][0],
            json!(crate::fake_embedding("abc", COHERE_EMBED_DIMENSIONS))
        );
        assert_eq!(fake.received().len(), 2);
    }

    #[tokio::test]
    async fn embeddings_models_take_invoke_model_only_and_valid_bodies() {
        let fake = started().await;
        let titan = json!({"inputText": "x"});
        let cohere = json!({"texts": ["x"], "input_type": "clustering"});
        let converse = json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}]});
        for (model, body) in [(TITAN, &titan), (COHERE, &cohere)] {
            for (operation, body) in [
                ("converse", &converse),
                ("converse-stream", &converse),
                ("invoke-with-response-stream", body),
            ] {
                let (status, headers, v) = call(&fake, model, operation, body).await;
                assert_eq!(status, 400, "{model}/{operation}: {v}");
                assert!(validation_error(&headers), "{headers:?}");
                assert!(v["message"].is_string());
            }
        }
        // Each model's body is its own.
        let (status, headers, _) = call(&fake, TITAN, "invoke", &cohere).await;
        assert_eq!(status, 400);
        assert!(validation_error(&headers));
        let (status, _, _) = call(&fake, COHERE, "invoke", &titan).await;
        assert_eq!(status, 400);
        assert!(fake.received().is_empty());
        assert_eq!(fake.rejected().len(), 8);
        // An unknown API key is refused before anything else.
        let resp = reqwest::Client::new()
            .post(format!("{}/model/{TITAN}/invoke", fake.base_url()))
            .bearer_auth("wrong")
            .json(&titan)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
    }

    #[test]
    fn titan_bodies_are_validated() {
        assert!(validate_titan_embed_body(&json!({"inputText": "x"})).is_ok());
        assert!(
            validate_titan_embed_body(&json!({"inputText": "x", "dimensions": 512,
            "normalize": false, "embeddingTypes": ["binary"]}))
            .is_ok()
        );
        for bad in [
            json!({}),
            json!({"inputText": ""}),
            json!({"inputText": 3}),
            json!({"inputText": "x", "dimensions": 768}),
            json!({"inputText": "x", "dimensions": "256"}),
            json!({"inputText": "x", "normalize": "yes"}),
            json!({"inputText": "x", "embeddingTypes": []}),
            json!({"inputText": "x", "embeddingTypes": ["int8"]}),
            json!({"inputText": "x", "embeddingTypes": "float"}),
            json!({"inputText": "x", "texts": ["x"]}),
            json!(["x"]),
        ] {
            assert!(validate_titan_embed_body(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cohere_bodies_are_validated() {
        let ok = json!({"texts": ["x"], "input_type": "classification"});
        assert!(validate_cohere_embed_body(&ok).is_ok());
        let long = "y".repeat(2048);
        assert!(
            validate_cohere_embed_body(&json!({"texts": vec![long.as_str(); 96],
            "input_type": "search_document", "truncate": "NONE",
            "embedding_types": ["float"]}))
            .is_ok()
        );
        let too_long = "y".repeat(2049);
        for bad in [
            json!({"input_type": "classification"}),
            json!({"texts": [], "input_type": "classification"}),
            json!({"texts": vec!["x"; 97], "input_type": "classification"}),
            json!({"texts": [""], "input_type": "classification"}),
            json!({"texts": [too_long], "input_type": "classification"}),
            json!({"texts": [1], "input_type": "classification"}),
            json!({"texts": "x", "input_type": "classification"}),
            json!({"texts": ["x"]}),
            json!({"texts": ["x"], "input_type": "search"}),
            json!({"texts": ["x"], "input_type": 1}),
            json!({"texts": ["x"], "input_type": "clustering", "truncate": "LEFT"}),
            json!({"texts": ["x"], "input_type": "clustering", "embedding_types": []}),
            json!({"texts": ["x"], "input_type": "clustering", "embedding_types": ["f16"]}),
            json!({"texts": ["x"], "input_type": "clustering", "inputText": "x"}),
        ] {
            assert!(validate_cohere_embed_body(&bad).is_err(), "{bad}");
        }
    }

    const CLAUDE: &str = "anthropic.claude-sonnet-4-5-20250929-v1%3A0";

    /// CountTokens' body around an InvokeModel body.
    fn count_body(invoke: &Value) -> Value {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(invoke.to_string());
        json!({"input": {"invokeModel": {"body": encoded}}})
    }

    fn claude_body() -> Value {
        json!({"anthropic_version": ANTHROPIC_BEDROCK_VERSION,
            "messages": [{"role": "user", "content": "Hello, Claude"}]})
    }

    #[tokio::test]
    async fn count_tokens_counts_claude_invoke_bodies() {
        let fake = started().await;
        let (status, headers, v) =
            call(&fake, CLAUDE, "count-tokens", &count_body(&claude_body())).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v,
            json!({ "inputTokens": crate::fake_anthropic::ANTHROPIC_INPUT_TOKENS })
        );
        assert_eq!(headers["x-amzn-requestid"], "fake-bedrock-request");
        // With `max_tokens`, system, tools, tool choice, thinking and betas, as InvokeModel takes.
        let full_body = json!({"anthropic_version": ANTHROPIC_BEDROCK_VERSION, "max_tokens": 4096,
            "anthropic_beta": ["context-management-2025-06-27"],
            "system": [{"type": "text", "text": "Be brief."}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "auto"},
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather?"}]}]});
        let (status, _, v) = call(&fake, CLAUDE, "count-tokens", &count_body(&full_body)).await;
        assert_eq!(status, 200, "{v}");
        // The count is what InvokeModel reports for the same body.
        let mut invoke = claude_body();
        invoke["max_tokens"] = json!(64);
        let (status, _, answer) = call(&fake, CLAUDE, "invoke", &invoke).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["usage"]["input_tokens"], v["inputTokens"]);
        let received = fake.received();
        assert_eq!(received.len(), 3);
        assert_eq!(received[0].path, format!("/model/{CLAUDE}/count-tokens"));
        assert_eq!(received[0].body, count_body(&claude_body()));
        assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    }

    #[tokio::test]
    async fn count_tokens_refuses_profiles_other_models_and_bad_bodies() {
        let fake = started().await;
        let good = count_body(&claude_body());
        for model in [
            "us.anthropic.claude-sonnet-4-5-20250929-v1%3A0",
            "eu.anthropic.claude-sonnet-4-5-20250929-v1%3A0",
            "apac.anthropic.claude-3-5-sonnet-20241022-v2%3A0",
            "jp.anthropic.claude-sonnet-4-5-20250929-v1%3A0",
            "au.anthropic.claude-sonnet-4-5-20250929-v1%3A0",
            "global.anthropic.claude-sonnet-4-5-20250929-v1%3A0",
            "amazon.nova-pro-v1%3A0",
            TITAN,
        ] {
            let (status, headers, v) = call(&fake, model, "count-tokens", &good).await;
            assert_eq!(status, 400, "{model}: {v}");
            assert!(validation_error(&headers), "{headers:?}");
            assert_eq!(
                v,
                json!({"message": "The provided model doesn't support counting tokens."})
            );
        }
        let converse = json!({"input": {"converse": {"messages": [{"role": "user",
            "content": [{"text": "hi"}]}]}}});
        let (status, headers, v) = call(&fake, CLAUDE, "count-tokens", &converse).await;
        assert_eq!(status, 400, "{v}");
        assert!(validation_error(&headers));
        assert!(v["message"].as_str().unwrap().contains("converse"), "{v}");
        let without = |field: &str| {
            let mut b = claude_body();
            b.as_object_mut().unwrap().remove(field);
            b
        };
        let with = |field: &str, value: Value| {
            let mut b = claude_body();
            b[field] = value;
            b
        };
        use base64::Engine;
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            json!({"anthropic_version": ANTHROPIC_BEDROCK_VERSION,
                "messages": [{"role": "user", "content": "??>>"}]})
            .to_string(),
        );
        let bad_bodies = [
            json!({}),
            json!([]),
            json!({"input": {}}),
            json!({"input": {"invokeModel": {"body": "x"}, "converse": {}}}),
            json!({"input": {"invokeModel": {}}}),
            json!({"input": {"invokeModel": {"body": 3}}}),
            json!({"input": {"invokeModel": {"body": "not base64!"}}}),
            json!({"input": {"invokeModel": {"body": url_safe}}}),
            json!({"input": {"invokeModel": {"body": ""}}}),
            json!({"input": {"invokeModel": {"body": "aGVsbG8="}}}),
            json!({"input": {"invokeModel": {"body": "W10="}}}),
            json!({"input": {"invokeModel": {"body": "x", "contentType": "application/json"}}}),
            json!({"input": {"invokeModel": {"body": "x"}}, "modelId": CLAUDE}),
            json!({"input": "x"}),
            count_body(&without("anthropic_version")),
            count_body(&with("anthropic_version", json!("2023-06-01"))),
            count_body(&with("model", json!("claude-sonnet-4-5"))),
            count_body(&with("stream", json!(false))),
            count_body(&with("max_tokens", json!(0))),
            count_body(&with("max_tokens", json!("64"))),
            count_body(&with("messages", json!([]))),
            count_body(&with(
                "anthropic_beta",
                json!("context-management-2025-06-27"),
            )),
            count_body(&with("context_management", json!({"edits": []}))),
            count_body(&with(
                "thinking",
                json!({"type": "enabled", "budget_tokens": 10}),
            )),
        ];
        for body in &bad_bodies {
            let (status, headers, v) = call(&fake, CLAUDE, "count-tokens", body).await;
            assert_eq!(status, 400, "{body}: {v}");
            assert!(validation_error(&headers), "{headers:?}");
            assert!(v["message"].is_string(), "{v}");
        }
        assert!(fake.received().is_empty(), "{:?}", fake.received());
        assert_eq!(fake.rejected().len(), 8 + 1 + bad_bodies.len());
        // A wrong API key is refused before anything else; an unencoded `:` is no route.
        let resp = reqwest::Client::new()
            .post(format!("{}/model/{CLAUDE}/count-tokens", fake.base_url()))
            .bearer_auth("wrong")
            .json(&good)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
        let (status, _, _) = call(
            &fake,
            "anthropic.claude-sonnet-4-5-20250929-v1:0",
            "count-tokens",
            &good,
        )
        .await;
        assert_eq!(status, 404);
    }

    #[test]
    fn frames_match_awss_published_vector() {
        // The "all headers"-free vector: an empty frame is 16 bytes with known CRCs.
        let frame = encode_frame(&[], b"");
        assert_eq!(
            &frame[..],
            &[0, 0, 0, 0x10, 0, 0, 0, 0, 0x05, 0xc2, 0x48, 0xeb, 0x7d, 0x98, 0xc8, 0xff]
        );
    }

    #[test]
    fn amz_dates_convert() {
        assert_eq!(unix_from_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(unix_from_amz_date("20150830T123600Z"), Some(1_440_938_160));
    }

    #[test]
    fn validation_refuses_a_tool_result_without_its_tool_use() {
        let body = json!({"messages": [{"role": "user", "content": [{"toolResult":
            {"toolUseId": "x", "content": [{"text": "1"}]}}]}],
            "toolConfig": {"tools": [{"toolSpec": {"name": "f", "inputSchema": {"json": {}}}}]}});
        assert!(validate_converse_body(&body).is_err());
    }
}
