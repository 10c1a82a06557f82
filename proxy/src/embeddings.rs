//! OpenAI's embeddings API (`POST /v1/embeddings`) on a pass-through lane to pools that serve it
//! natively (OpenAI): the client's body goes up with only `model` renamed, the answer comes back
//! as it is, and its `usage.prompt_tokens` is billed at the model's input price (an embedding
//! has no output tokens).

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::chat::{check_body_text, parse_error, ModelField};
use crate::error::GatewayError;
use crate::usage::Usage;

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
}

/// An embeddings request as the gateway sees it, borrowed from the body.
#[derive(Debug)]
pub struct EmbeddingsRequest<'a> {
    pub model: ModelField<'a>,
}

impl<'a> EmbeddingsRequest<'a> {
    /// Checks the body and borrows what the gateway needs from it: `model`, and that there is
    /// an `input` (a string, or an array of strings or token ids: OpenAI checks its shape).
    pub fn parse(body: &'a [u8]) -> Result<Self, GatewayError> {
        let fields: Fields<'a> = serde_json::from_slice(body).map_err(parse_error)?;
        check_body_text(body)?;
        let model = ModelField::read(body, fields.model, "You must provide a model parameter.")?;
        let input = fields.input.map(RawValue::get).unwrap_or("null");
        if !(input.starts_with('"') || input.starts_with('[')) {
            return Err(GatewayError::bad_field(
                "input",
                "`input` must be a string or an array of strings or token ids.",
            ));
        }
        Ok(Self { model })
    }

    /// The body for the upstream (`model` renamed, nothing else touched).
    pub fn upstream_body(&self, original: &Bytes, upstream_model: &str) -> Bytes {
        self.model.upstream_body(original, upstream_model)
    }
}

#[derive(Deserialize)]
struct View {
    #[serde(default)]
    usage: Option<UsageWire>,
}

#[derive(Deserialize)]
struct UsageWire {
    #[serde(default)]
    prompt_tokens: u64,
}

/// A complete embeddings answer as it is, with its usage (input tokens only).
pub fn embeddings_body(body: Bytes) -> Result<(Bytes, Option<Usage>), GatewayError> {
    if std::str::from_utf8(&body).is_err() {
        return Err(GatewayError::upstream_bad_response());
    }
    let view: View =
        serde_json::from_slice(&body).map_err(|_| GatewayError::upstream_bad_response())?;
    let usage = view.usage.map(|u| Usage {
        prompt_tokens: u.prompt_tokens,
        ..Usage::default()
    });
    Ok((body, usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_checked_for_a_shape_and_the_model_renamed_alone() {
        for body in [
            &br#"{"model":"e"}"#[..],
            br#"{"model":"e","input":5}"#,
            br#"{"model":"e","input":{"a":1}}"#,
        ] {
            assert_eq!(EmbeddingsRequest::parse(body).unwrap_err().status(), 400);
        }
        let body = Bytes::from_static(br#"{"input":["a","b"],"model":"e","dimensions":256}"#);
        let req = EmbeddingsRequest::parse(&body).unwrap();
        assert_eq!(
            &req.upstream_body(&body, "text-embedding-3-small")[..],
            br#"{"input":["a","b"],"model":"text-embedding-3-small","dimensions":256}"#
        );
        let (_, usage) = embeddings_body(Bytes::from_static(
            br#"{"object":"list","data":[],"usage":{"prompt_tokens":7,"total_tokens":7}}"#,
        ))
        .unwrap();
        assert_eq!(usage.unwrap().prompt_tokens, 7);
    }
}
