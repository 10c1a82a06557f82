//! The client's `POST /v1/messages` body: Anthropic's Messages API, which Claude Code speaks.
//! The gateway reads only what it acts on — `model`, `max_tokens`, `stream`, that `messages` is
//! an array — and checks the body as it checks a chat body (JSON, UTF-8, no lone surrogate,
//! bounded depth). Everything else (`cache_control`, thinking blocks with their signatures,
//! `metadata`, tool `strict`, fields of betas this gateway has not heard of) travels to an
//! Anthropic upstream byte for byte: Anthropic validates its own API, and a field dropped here
//! would silently change what the client asked for.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::chat::{check_body_text, json_string, parse_error, typed, ModelField};
use crate::error::GatewayError;

/// The fields the gateway acts on; every other field is left in the body unread.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
}

/// A Messages API request as the gateway sees it, borrowed from the body.
#[derive(Debug)]
pub struct MessagesRequest<'a> {
    pub model: ModelField<'a>,
    pub stream: bool,
    /// Absent on `count_tokens`; a Messages call without it is refused by the upstream itself.
    pub max_tokens: Option<u64>,
    /// `anthropic-version` and `anthropic-beta` as the client sent them: forwarded verbatim.
    pub version: Option<http::HeaderValue>,
    pub beta: Option<http::HeaderValue>,
}

impl<'a> MessagesRequest<'a> {
    /// Checks the body and borrows what the gateway needs from it; `headers` are the client's.
    pub fn parse(body: &'a [u8], headers: &http::HeaderMap) -> Result<Self, GatewayError> {
        let fields: Fields<'a> = serde_json::from_slice(body).map_err(parse_error)?;
        check_body_text(body)?;
        let model = ModelField::read(body, fields.model, "model: Field required")?;
        if !fields.messages.is_some_and(|m| m.get().starts_with('[')) {
            return Err(GatewayError::bad_field(
                "messages",
                "messages: Field required (an array of messages)",
            ));
        }
        let stream = typed::<bool>(fields.stream, "stream", "a boolean")?.unwrap_or(false);
        let max_tokens = typed::<u64>(fields.max_tokens, "max_tokens", "a positive integer")?;
        Ok(Self {
            model,
            stream,
            max_tokens,
            version: headers.get("anthropic-version").cloned(),
            beta: headers.get("anthropic-beta").cloned(),
        })
    }

    /// The body for the upstream (`model` renamed, nothing else touched).
    pub fn upstream_body(&self, original: &Bytes, upstream_model: &str) -> Bytes {
        self.model.upstream_body(original, upstream_model)
    }
}

/// A Messages body in a provider's envelope: the client's members byte for byte, less `drop`,
/// with `add` first (Bedrock and Vertex want `anthropic_version` in the body, the model in the
/// path). Member order is not kept; JSON objects have none.
pub fn with_envelope(
    body: &[u8],
    add: &[(&str, serde_json::Value)],
    drop: &[&str],
) -> Result<Bytes, GatewayError> {
    let members: std::collections::BTreeMap<String, &RawValue> = serde_json::from_slice(body)
        .map_err(|_| GatewayError::invalid_json("The body must be a JSON object."))?;
    let mut out = Vec::with_capacity(body.len() + 96);
    out.push(b'{');
    for (name, value) in add {
        push_member(&mut out, name, value.to_string().as_bytes());
    }
    for (name, value) in members.iter().filter(|(n, _)| !drop.contains(&n.as_str())) {
        push_member(&mut out, name, value.get().as_bytes());
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

/// Appends `"name":value` to an object being written (`{` and the members so far).
fn push_member(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    if out.len() > 1 {
        out.push(b',');
    }
    out.extend_from_slice(&json_string(name));
    out.push(b':');
    out.extend_from_slice(value);
}

/// Whether `body` is Anthropic's error body (`{"type": "error", …}`).
pub fn is_anthropic_error(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<&'a str>,
    }
    serde_json::from_slice::<Kind<'_>>(body).is_ok_and(|k| k.kind == Some("error"))
}
