//! OpenAI and every server that speaks its Chat Completions API: a near pass-through.

use bytes::Bytes;
use pingora::http::RequestHeader;

use serde::Deserialize;

use super::translate::json_post_header;
use super::{FailureClass, ProviderAdapter, StreamTranslator};
use crate::chat::ChatRequest;
use crate::error::GatewayError;
use crate::relay::{completion_usage, FramingError, SseRelay};
use crate::snapshot::{HttpTarget, Model};
use crate::usage::Usage;

pub struct OpenAiAdapter;

impl ProviderAdapter for OpenAiAdapter {
    fn chat_request(
        &self,
        req: &ChatRequest<'_>,
        body: &Bytes,
        model: &Model,
        target: &HttpTarget,
    ) -> Result<(RequestHeader, Bytes), GatewayError> {
        chat_request_to(req, body, &model.upstream_model, &target.chat_path, target)
    }

    fn complete_body(
        &self,
        body: Bytes,
        _model: &str,
    ) -> Result<(Bytes, Option<Usage>), GatewayError> {
        let usage = completion_usage(&body).map_err(|_| GatewayError::upstream_bad_response())?;
        Ok((body, usage))
    }

    fn stream_translator(&self, hide_usage_chunk: bool, _model: &str) -> Box<dyn StreamTranslator> {
        Box::new(SseRelay::new(hide_usage_chunk))
    }

    fn classify_failure(
        &self,
        status: u16,
        _error_type: Option<&str>,
        body: &[u8],
    ) -> FailureClass {
        classify(status, body)
    }
}

/// An OpenAI-format chat request to `path` naming `upstream_model`, with the target's prepared
/// credential and host headers (shared by the adapters whose wire format is OpenAI's).
pub(crate) fn chat_request_to(
    req: &ChatRequest<'_>,
    body: &Bytes,
    upstream_model: &str,
    path: &str,
    target: &HttpTarget,
) -> Result<(RequestHeader, Bytes), GatewayError> {
    let body = req.upstream_body(body, upstream_model);
    let header = json_post_header(path, target, &[], body.len(), true)?;
    Ok((header, body))
}

/// What a non-success OpenAI-format answer means for the pool that gave it.
pub(crate) fn classify(status: u16, body: &[u8]) -> FailureClass {
    let error = serde_json::from_slice::<ErrorEnvelope>(body)
        .map(|e| e.error)
        .unwrap_or_default();
    let is =
        |s: &Option<String>, values: &[&str]| s.as_deref().is_some_and(|v| values.contains(&v));
    let exhausted = is(&error.kind, &["insufficient_quota"])
        || is(
            &error.code,
            &[
                "insufficient_quota",
                "credit_balance_exhausted",
                "organization_spend_limit_exceeded",
                "project_spend_limit_exceeded",
                "organization_usage_limit_exceeded",
                "billing_hard_limit_reached",
            ],
        );
    match status {
        401 | 403 => FailureClass::Credential,
        _ if exhausted => FailureClass::Credential,
        // The catalog says this pool serves the model; its key disagrees.
        404 if is(&error.code, &["model_not_found"]) => FailureClass::Credential,
        408 | 409 | 429 | 500..=599 => FailureClass::Transient,
        _ => FailureClass::Request,
    }
}

#[derive(Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: ErrorFields,
}

#[derive(Deserialize, Default)]
struct ErrorFields {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

impl StreamTranslator for SseRelay {
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError> {
        SseRelay::feed(self, input)
    }
    fn finish(&mut self) -> Bytes {
        SseRelay::finish(self)
    }
    fn usage(&self) -> Option<Usage> {
        SseRelay::usage(self)
    }
    fn generated_bytes(&self) -> u64 {
        SseRelay::generated_bytes(self)
    }
    fn is_done(&self) -> bool {
        SseRelay::is_done(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_exhaustion_from_throttling_by_the_error_code() {
        let a = OpenAiAdapter;
        let body = |kind: &str, code: &str| {
            format!(r#"{{"error":{{"message":"m","type":"{kind}","param":null,"code":"{code}"}}}}"#)
        };
        let cases = [
            (
                429,
                body("insufficient_quota", "credit_balance_exhausted"),
                FailureClass::Credential,
            ),
            (
                429,
                body("insufficient_quota", "insufficient_quota"),
                FailureClass::Credential,
            ),
            (
                429,
                body("requests", "rate_limit_exceeded"),
                FailureClass::Transient,
            ),
            (429, "not json".to_owned(), FailureClass::Transient),
            (
                400,
                body("invalid_request_error", "billing_hard_limit_reached"),
                FailureClass::Credential,
            ),
            (
                400,
                body("invalid_request_error", "context_length_exceeded"),
                FailureClass::Request,
            ),
            (
                401,
                body("invalid_request_error", "invalid_api_key"),
                FailureClass::Credential,
            ),
            (403, String::new(), FailureClass::Credential),
            (
                404,
                body("invalid_request_error", "model_not_found"),
                FailureClass::Credential,
            ),
            (
                503,
                body("service_unavailable_error", "server_is_overloaded"),
                FailureClass::Transient,
            ),
            (
                422,
                body("invalid_request_error", "x"),
                FailureClass::Request,
            ),
        ];
        for (status, body, want) in cases {
            assert_eq!(
                a.classify_failure(status, None, body.as_bytes()),
                want,
                "{status} {body}"
            );
        }
    }
}
