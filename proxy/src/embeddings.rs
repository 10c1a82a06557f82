//! OpenAI's embeddings API (`POST /v1/embeddings`). Pools that serve it natively (OpenAI, Azure)
//! take a pass-through lane: the client's body goes up with only `model` renamed, the answer
//! comes back as it is, and its `usage.prompt_tokens` is billed at the model's input price (an
//! embedding has no output tokens). Other providers' adapters embed the request's texts
//! ([`EmbeddingsInput`]) through their own APIs and answer in OpenAI's shape
//! ([`openai_answer`]); where a provider reports no token count (Gemini's API, Cohere on Bedrock
//! without its header) the input is billed as ⌈UTF-8 bytes of the texts / 4⌉ tokens, recorded as
//! `estimated`.

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
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

/// What a translating adapter needs of an embeddings request: its texts, in order, and how the
/// client wants the vectors.
#[derive(Debug, Clone)]
pub struct EmbeddingsInput {
    pub texts: Vec<String>,
    /// `dimensions`: the vectors' length, where the model can shorten them.
    pub dimensions: Option<u64>,
    /// `encoding_format: "base64"` (the OpenAI SDK's default): each vector as the base64 of
    /// its little-endian `f32`s.
    pub base64: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFields<'a> {
    #[serde(borrow, rename = "model")]
    _model: &'a RawValue,
    input: Texts,
    #[serde(default)]
    dimensions: Option<u64>,
    #[serde(default, borrow)]
    encoding_format: Option<&'a str>,
    #[serde(default, borrow, rename = "user")]
    _user: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Texts {
    One(String),
    Many(Vec<String>),
}

/// Texts one request may carry to a translated lane (OpenAI's own limit).
const TEXTS_MAX: usize = 2048;

impl EmbeddingsInput {
    /// The texts of a body `EmbeddingsRequest::parse` accepted; token ids (which only OpenAI's
    /// models read) and fields OpenAI does not define are refused.
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let fields: InputFields<'_> = serde_json::from_slice(body).map_err(|e| {
            if e.to_string().contains("untagged enum") {
                GatewayError::bad_field(
                    "input",
                    "`input` must be a string or an array of strings for this model (token ids \
                     are read by OpenAI's models only).",
                )
            } else {
                parse_error(e)
            }
        })?;
        let texts = match fields.input {
            Texts::One(t) => vec![t],
            Texts::Many(ts) => ts,
        };
        if texts.is_empty() || texts.len() > TEXTS_MAX || texts.iter().any(String::is_empty) {
            return Err(GatewayError::bad_field(
                "input",
                "`input` must hold 1 to 2048 texts, none of them empty.",
            ));
        }
        if fields.dimensions == Some(0) {
            return Err(GatewayError::bad_field(
                "dimensions",
                "`dimensions` must be at least 1.",
            ));
        }
        let base64 = match fields.encoding_format {
            None | Some("float") => false,
            Some("base64") => true,
            Some(_) => {
                return Err(GatewayError::bad_field(
                    "encoding_format",
                    "`encoding_format` must be `float` or `base64`.",
                ))
            }
        };
        Ok(Self {
            texts,
            dimensions: fields.dimensions,
            base64,
        })
    }

    /// UTF-8 bytes of all texts: what the token rule counts where a provider reports none.
    pub fn text_bytes(&self) -> u64 {
        self.texts.iter().map(|t| t.len() as u64).sum()
    }
}

/// What the gateway knows when a translated embeddings answer comes back.
pub struct EmbeddingsAnswer<'a> {
    /// The catalog model, named in the answer.
    pub model: &'a str,
    pub input: &'a EmbeddingsInput,
    /// Input tokens the upstream reported in a header (Bedrock's
    /// `x-amzn-bedrock-input-token-count`).
    pub header_tokens: Option<u64>,
}

impl EmbeddingsAnswer<'_> {
    /// The answer in OpenAI's shape from the provider's vectors (in input order) and the input
    /// tokens it reported; without a report, ⌈text bytes / 4⌉ tokens are shown and the usage
    /// is left to the gateway's estimate, which counts the same.
    pub fn openai(
        &self,
        vectors: Vec<Vec<f32>>,
        reported_tokens: Option<u64>,
    ) -> Result<(Bytes, Option<Usage>), GatewayError> {
        if vectors.len() != self.input.texts.len() {
            return Err(GatewayError::upstream_bad_response());
        }
        let reported = reported_tokens.or(self.header_tokens);
        let tokens = reported.unwrap_or_else(|| self.input.text_bytes().div_ceil(4));
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| Embedding {
                object: "embedding",
                index,
                embedding: if self.input.base64 {
                    Vector::Base64(base64_of(&v))
                } else {
                    Vector::Floats(v)
                },
            })
            .collect();
        let list = EmbeddingList {
            object: "list",
            data,
            model: self.model,
            usage: ListUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        };
        let body = serde_json::to_vec(&list).map_err(|_| GatewayError::internal())?;
        let usage = reported.map(|prompt_tokens| Usage {
            prompt_tokens,
            ..Usage::default()
        });
        Ok((Bytes::from(body), usage))
    }
}

/// The base64 of a vector's little-endian `f32`s, as OpenAI sends `encoding_format: base64`.
fn base64_of(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: ListUsage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct ListUsage {
    prompt_tokens: u64,
    total_tokens: u64,
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

    #[test]
    fn a_translated_lane_reads_texts_and_answers_in_openais_shape() {
        let input = EmbeddingsInput::parse(
            br#"{"model":"m","input":["ab","cdef"],"dimensions":2,"encoding_format":"base64"}"#,
        )
        .unwrap();
        assert_eq!(input.texts, ["ab", "cdef"]);
        assert_eq!(
            (input.dimensions, input.base64, input.text_bytes()),
            (Some(2), true, 6)
        );
        for (body, param) in [
            (&br#"{"model":"m","input":[1,2]}"#[..], Some("input")),
            (br#"{"model":"m","input":[]}"#, Some("input")),
            (
                br#"{"model":"m","input":"a","encoding_format":"hex"}"#,
                Some("encoding_format"),
            ),
            (
                br#"{"model":"m","input":"a","dimensions":0}"#,
                Some("dimensions"),
            ),
            (br#"{"model":"m","input":"a","extra":1}"#, None),
        ] {
            let e = EmbeddingsInput::parse(body).unwrap_err();
            assert_eq!(e.status(), 400, "{e:?}");
            assert_eq!(e.param(), param, "{e:?}");
        }

        // Base64 of little-endian f32s; tokens as the provider reported them.
        let answer = EmbeddingsAnswer {
            model: "emb",
            input: &input,
            header_tokens: None,
        };
        let (body, usage) = answer
            .openai(vec![vec![1.0, 0.5], vec![0.0, -2.0]], Some(9))
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "emb");
        assert_eq!(v["data"][1]["index"], 1);
        let b64 = v["data"][0]["embedding"].as_str().unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(raw, [1.0f32.to_le_bytes(), 0.5f32.to_le_bytes()].concat());
        assert_eq!(v["usage"]["prompt_tokens"], 9);
        assert_eq!(usage.unwrap().prompt_tokens, 9);

        // No report: the rule's count is shown, the usage left to the gateway's estimate.
        let (body, usage) = answer.openai(vec![vec![1.0], vec![2.0]], None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], 2, "⌈6 bytes / 4⌉");
        assert!(usage.is_none());
        // A vector short is the upstream's fault.
        assert_eq!(
            answer.openai(vec![vec![1.0]], None).unwrap_err().status(),
            502
        );
    }
}
