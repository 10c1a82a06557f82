//! OpenAI and every server that speaks its Chat Completions API: a near pass-through.

use bytes::Bytes;
use serde::Deserialize;
use tokn_config::credential::OpenaiCredential;

use super::translate::json_post_header;
use super::{
    ChatCall, CredentialHeader, EmbeddingsCall, FailureClass, Outbound, ProviderAdapter,
    ResponsesCall,
};
use crate::error::{ErrorKind, GatewayError, UpstreamError};
use crate::relay::completion_usage;
use crate::upstream::Endpoint;
use crate::usage::Usage;

pub struct OpenAiAdapter {
    endpoint: Endpoint,
    /// `{base path}/chat/completions`.
    chat_path: String,
    /// `{base path}/responses`.
    responses_path: String,
    /// `{base path}/embeddings`.
    embeddings_path: String,
    key: CredentialHeader,
    organization: Option<CredentialHeader>,
}

impl OpenAiAdapter {
    pub fn new(c: &OpenaiCredential) -> Result<Self, String> {
        let endpoint = Endpoint::new(c.base_url())?;
        Ok(Self {
            chat_path: format!("{}/chat/completions", endpoint.url.base_path),
            responses_path: format!("{}/responses", endpoint.url.base_path),
            embeddings_path: format!("{}/embeddings", endpoint.url.base_path),
            endpoint,
            key: CredentialHeader::bearer(c.api_key.expose())?,
            organization: c
                .organization
                .as_deref()
                .map(|org| CredentialHeader::new("openai-organization", org))
                .transpose()?,
        })
    }
}

impl OpenAiAdapter {
    /// A POST of `body` to `path` with the pool's key (and organization).
    fn post(&self, path: &str, body: Bytes) -> Result<Outbound<'_>, GatewayError> {
        let mut header = json_post_header(path, &self.endpoint, Some(&self.key), &[], body.len())?;
        if let Some(org) = &self.organization {
            org.add_to(&mut header)?;
        }
        Ok(Outbound::Http {
            endpoint: &self.endpoint,
            header: Box::new(header),
            body,
        })
    }
}

impl ProviderAdapter for OpenAiAdapter {
    fn chat_request(&self, call: &ChatCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let body = call.req.upstream_body(call.body, call.upstream_model);
        self.post(&self.chat_path, body)
    }

    fn serves_responses(&self) -> bool {
        true
    }

    fn responses_request(&self, call: &ResponsesCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let body = call.req.upstream_body(call.body, call.upstream_model);
        self.post(&self.responses_path, body)
    }

    fn serves_embeddings(&self, _upstream_model: &str) -> bool {
        true
    }

    fn embeddings_request(&self, call: &EmbeddingsCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let body = call.req.upstream_body(call.body, call.upstream_model);
        self.post(&self.embeddings_path, body)
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

/// An OpenAI-format complete body and the usage it reports. It is relayed as is, so it must be
/// JSON a client can read: the usage parse skips the fields it does not name without checking
/// their text, so UTF-8 is checked on its own (found by the fuzz target).
pub(super) fn complete_body(body: Bytes) -> Result<(Bytes, Option<Usage>), GatewayError> {
    if std::str::from_utf8(&body).is_err() {
        return Err(GatewayError::upstream_bad_response());
    }
    let usage = completion_usage(&body).map_err(|_| GatewayError::upstream_bad_response())?;
    Ok((body, usage))
}

/// What a non-success OpenAI-format answer means for the pool that gave it.
pub(super) fn classify(status: u16, body: &[u8]) -> FailureClass {
    let error = ErrorEnvelope::parse(body).error;
    let is =
        |s: &Option<String>, values: &[&str]| s.as_deref().is_some_and(|v| values.contains(&v));
    let exhausted = is(&error.kind, &["insufficient_quota"])
        || is(
            &error.code_text(),
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
        404 if is(&error.code_text(), &["model_not_found"]) => FailureClass::Credential,
        _ => FailureClass::of_status(status),
    }
}

/// An OpenAI-format error body's fields (Azure's too, whose `code` may be a number and which
/// adds `innererror`).
pub(super) fn upstream_error(status: u16, body: &[u8]) -> UpstreamError {
    let Some(error) = ErrorEnvelope::parse_strict(body) else {
        return UpstreamError::unreadable(status);
    };
    UpstreamError {
        kind: error
            .kind
            .as_deref()
            .and_then(ErrorKind::parse)
            .unwrap_or(ErrorKind::of_status(status)),
        code: error.code_text().map(Into::into),
        param: error.param.map(Into::into),
        message: error.message,
        detail: error.innererror,
    }
}

#[derive(Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: ErrorFields,
}

impl ErrorEnvelope {
    fn parse(body: &[u8]) -> Self {
        serde_json::from_slice(body).unwrap_or_default()
    }

    /// The error object, only when the body is one.
    fn parse_strict(body: &[u8]) -> Option<ErrorFields> {
        #[derive(Deserialize)]
        struct Strict {
            error: ErrorFields,
        }
        serde_json::from_slice::<Strict>(body).ok().map(|e| e.error)
    }
}

#[derive(Deserialize, Default)]
pub(super) struct ErrorFields {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    /// A string, or in some Azure versions a number.
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    param: Option<String>,
    #[serde(default)]
    innererror: Option<serde_json::Value>,
}

impl ErrorFields {
    pub(super) fn parse(body: &[u8]) -> Self {
        ErrorEnvelope::parse(body).error
    }

    pub(super) fn code_text(&self) -> Option<String> {
        match &self.code {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokn_config::Secret;

    fn adapter() -> OpenAiAdapter {
        OpenAiAdapter::new(&OpenaiCredential {
            api_key: Secret::new("sk-test"),
            base_url: None,
            organization: None,
        })
        .unwrap()
    }

    #[test]
    fn tells_exhaustion_from_throttling_by_the_error_code() {
        let a = adapter();
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
