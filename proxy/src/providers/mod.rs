//! The provider seam: one adapter per provider behind one trait, built once per pool from the
//! pool's credential.
//!
//! An adapter turns the client's OpenAI request into the provider's native request (or, for the
//! mock, answers it in process) and the provider's response back into OpenAI's wire format,
//! reading usage on the way. It owns everything its provider needs per pool (endpoint, paths,
//! credential headers, signing keys, minted tokens), so the rest of the proxy knows providers
//! only through this trait and [`adapter`], the one place they are listed.

mod anthropic;
pub mod aws;
mod azure;
mod bedrock;
mod gemini;
pub mod google_token;
mod mock;
mod openai;
mod translate;

use std::sync::Arc;

use bytes::Bytes;
use pingora::http::RequestHeader;
use tokn_config::Credential;

use crate::chat::ChatRequest;
use crate::embeddings::{EmbeddingsAnswer, EmbeddingsInput, EmbeddingsRequest};
use crate::error::{GatewayError, UpstreamError};
use crate::messages::MessagesRequest;
use crate::responses::ResponsesRequest;
use crate::upstream::Endpoint;
use crate::usage::Usage;
use google_token::AccessToken;

pub use crate::relay::{StreamTally, StreamTranslator};

/// The adapter for a pool with `credential`; `Err` names what this build cannot serve.
pub fn adapter(credential: &Credential) -> Result<Box<dyn ProviderAdapter>, String> {
    Ok(match credential {
        Credential::Openai(c) => Box::new(openai::OpenAiAdapter::new(c)?),
        Credential::Anthropic(c) => Box::new(anthropic::AnthropicAdapter::new(c)?),
        Credential::Bedrock(c) => Box::new(bedrock::BedrockAdapter::new(c)?),
        Credential::Vertex(c) => Box::new(gemini::GeminiAdapter::vertex(c)?),
        Credential::Gemini(c) => Box::new(gemini::GeminiAdapter::gemini(c)?),
        Credential::Azure(c) => Box::new(azure::AzureAdapter::new(c)?),
        Credential::Mock(_) => Box::new(mock::MockAdapter),
    })
}

/// One chat completion as an adapter sees it.
pub struct ChatCall<'a> {
    pub req: &'a ChatRequest<'a>,
    /// The client's body, already checked by `ChatRequest::parse`.
    pub body: &'a Bytes,
    /// The name the provider knows the model by.
    pub upstream_model: &'a str,
    /// Our request id (the mock's completion id is made from it).
    pub request_id: &'a str,
}

/// One Anthropic Messages call (`/v1/messages`, or `/v1/messages/count_tokens` when
/// `count_tokens`) as an adapter sees it.
pub struct MessagesCall<'a> {
    pub req: &'a MessagesRequest<'a>,
    /// The client's body, already checked by `MessagesRequest::parse`.
    pub body: &'a Bytes,
    pub upstream_model: &'a str,
    pub count_tokens: bool,
}

/// One Responses API call as an adapter sees it.
pub struct ResponsesCall<'a> {
    pub req: &'a ResponsesRequest<'a>,
    /// The client's body, already checked by `ResponsesRequest::parse`.
    pub body: &'a Bytes,
    pub upstream_model: &'a str,
    /// The pool that stored the response this one continues: the only one that may serve it.
    pub stored_by: Option<&'a str>,
}

/// One embeddings call as an adapter sees it.
pub struct EmbeddingsCall<'a> {
    pub req: &'a EmbeddingsRequest<'a>,
    pub body: &'a Bytes,
    pub upstream_model: &'a str,
    /// The texts, read on first use by an adapter that embeds them through its own API (a
    /// native pool never needs them).
    pub input: &'a std::sync::OnceLock<Result<EmbeddingsInput, GatewayError>>,
}

impl EmbeddingsCall<'_> {
    /// The texts, or why this body cannot be embedded by a translating adapter.
    pub fn texts(&self) -> Result<&EmbeddingsInput, GatewayError> {
        self.input
            .get_or_init(|| EmbeddingsInput::parse(self.body))
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// How a pool answers a chat completion.
pub enum Outbound<'a> {
    /// An HTTP request to the pool's endpoint.
    Http {
        endpoint: &'a Endpoint,
        header: Box<RequestHeader>,
        body: Bytes,
    },
    /// Answered in process (the mock): the body chunks an upstream would have sent.
    Local(Vec<Bytes>),
}

/// One provider's translation rules, with one pool's endpoint and credential.
pub trait ProviderAdapter: Send + Sync {
    /// The request (or in-process answer) for a chat completion.
    fn chat_request(&self, call: &ChatCall<'_>) -> Result<Outbound<'_>, GatewayError>;

    /// Whether this pool serves Anthropic's Messages API natively for `upstream_model`: the
    /// pass-through lane, where the client's body and betas reach the upstream as they are
    /// (Anthropic), or with only the envelope its provider wants (Claude on Bedrock).
    fn serves_messages(&self, _upstream_model: &str) -> bool {
        false
    }

    /// Whether this pool answers `count_tokens` (Anthropic's own API does; otherwise the
    /// gateway estimates).
    fn counts_message_tokens(&self) -> bool {
        false
    }

    /// A Messages call's refusal as the client gets it: Anthropic's error body, its wording
    /// unchanged (Claude Code decides on retries by it). Anthropic's own is relayed as it is.
    fn messages_refusal(&self, _status: u16, _error_type: Option<&str>, body: Bytes) -> Bytes {
        body
    }

    /// The request for a Messages call, on a pool that [serves them](Self::serves_messages).
    fn messages_request(&self, _call: &MessagesCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        Err(GatewayError::internal())
    }

    /// A complete Messages answer for the client, with the usage it reports (Anthropic's
    /// format: relayed as it is).
    fn messages_body(&self, body: Bytes) -> Result<(Bytes, Option<Usage>), GatewayError> {
        anthropic::message_usage(&body).map(|usage| (body, usage))
    }

    /// A `count_tokens` answer as the client gets it (Anthropic's `{"input_tokens": N}`;
    /// Anthropic's own and Vertex's are that already).
    fn count_tokens_body(&self, body: Bytes) -> Result<Bytes, GatewayError> {
        Ok(body)
    }

    /// A translator for one streamed Messages answer (Anthropic's events: relayed as they are,
    /// counted).
    fn messages_stream(&self) -> Box<dyn StreamTranslator> {
        Box::new(anthropic::MessagesRelay::default())
    }

    /// Whether this pool serves OpenAI's Responses API natively (the pass-through lane).
    fn serves_responses(&self) -> bool {
        false
    }

    /// The request for a Responses call, on a pool that [serves them](Self::serves_responses).
    fn responses_request(&self, _call: &ResponsesCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        Err(GatewayError::internal())
    }

    /// Whether this pool embeds texts with `upstream_model` (OpenAI and Azure natively; the
    /// others through their own embeddings APIs).
    fn serves_embeddings(&self, _upstream_model: &str) -> bool {
        false
    }

    /// The request for an embeddings call, on a pool that [serves them](Self::serves_embeddings).
    fn embeddings_request(&self, _call: &EmbeddingsCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        Err(GatewayError::internal())
    }

    /// A complete embeddings answer for the client, with the usage it reports: OpenAI's, as it
    /// is; the translating adapters make theirs OpenAI's through `answer`.
    fn embeddings_body(
        &self,
        body: Bytes,
        _answer: &EmbeddingsAnswer<'_>,
    ) -> Result<(Bytes, Option<Usage>), GatewayError> {
        crate::embeddings::embeddings_body(body)
    }

    /// A credential minted at run time (Vertex's access token), which the gateway waits for and
    /// adds as `authorization` before sending.
    fn access_token(&self) -> Option<&Arc<AccessToken>> {
        None
    }

    // The methods below default to OpenAI's wire format, which the OpenAI and Azure upstreams
    // and the mock speak; the native adapters translate.

    /// A complete (non-streaming) upstream body, translated, with the usage it reports.
    /// `upstream_model` names the model in answers that do not (Bedrock).
    fn complete_body(
        &self,
        body: Bytes,
        _upstream_model: &str,
    ) -> Result<(Bytes, Option<Usage>), GatewayError> {
        openai::complete_body(body)
    }

    /// A translator for one streamed response. `hide_usage_chunk`: the client did not ask for
    /// `include_usage`, so the usage chunk is counted but not forwarded.
    fn stream_translator(
        &self,
        hide_usage_chunk: bool,
        _upstream_model: &str,
    ) -> Box<dyn StreamTranslator> {
        Box::new(crate::relay::SseRelay::new(hide_usage_chunk))
    }

    /// Classifies a non-2xx answer from its status, error type header and (bounded) body.
    /// Providers signal exhaustion differently (OpenAI: 429 `insufficient_quota`; Gemini: 400
    /// `API_KEY_INVALID`; Bedrock: 400 `ServiceQuotaExceededException`, named only in the
    /// `x-amzn-ErrorType` header passed as `error_type`), so each overrides this baseline for
    /// what its body says and falls back to it.
    fn classify_failure(
        &self,
        status: u16,
        _error_type: Option<&str>,
        _body: &[u8],
    ) -> FailureClass {
        FailureClass::of_status(status)
    }

    /// The retry delay an error body names, for providers that put it there rather than in a
    /// `retry-after` header (Google's `RetryInfo`).
    fn retry_after_in_body(&self, _body: &[u8]) -> Option<u64> {
        None
    }

    /// A non-success answer about the request, read from the provider's error body; the
    /// gateway renders it (`GatewayError::upstream`). `error_type` as above.
    fn upstream_error(&self, status: u16, _error_type: Option<&str>, body: &[u8]) -> UpstreamError {
        openai::upstream_error(status, body)
    }
}

/// What a non-success upstream answer means for the pool that gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The credential is refused, or the seller's account cannot pay (out of credit, spend cap,
    /// no access to the model): quarantine the pool and fail over.
    Credential,
    /// Throttled or failing for now: back off (honouring `retry-after`) and fail over.
    Transient,
    /// About the request itself: relay it to the client.
    Request,
}

impl FailureClass {
    /// The baseline every provider shares: a refused credential (401/403); a timeout, conflict,
    /// throttle or server failure (408/409/429/5xx) is transient; anything else is the request's.
    pub fn of_status(status: u16) -> Self {
        match status {
            401 | 403 => Self::Credential,
            408 | 409 | 429 | 500..=599 => Self::Transient,
            _ => Self::Request,
        }
    }
}

/// A credential sent as one header, prepared once per pool; the value is marked sensitive so it
/// is never logged.
pub struct CredentialHeader {
    name: http::HeaderName,
    value: http::HeaderValue,
}

impl CredentialHeader {
    pub fn new(name: &'static str, value: &str) -> Result<Self, String> {
        let mut value = http::HeaderValue::try_from(value)
            .map_err(|_| "the credential is not a valid header value".to_owned())?;
        value.set_sensitive(true);
        Ok(Self {
            name: http::HeaderName::from_static(name),
            value,
        })
    }

    /// `authorization: Bearer {token}`.
    pub fn bearer(token: &str) -> Result<Self, String> {
        Self::new("authorization", &format!("Bearer {token}"))
    }

    pub fn add_to(&self, header: &mut RequestHeader) -> Result<(), GatewayError> {
        header
            .insert_header(self.name.clone(), self.value.clone())
            .map_err(|_| GatewayError::internal())
    }
}

/// The client's view of an upstream refusal, as the gateway renders it (for adapters' tests).
#[cfg(test)]
pub(crate) fn client_error(
    adapter: &dyn ProviderAdapter,
    status: u16,
    error_type: Option<&str>,
    body: &[u8],
) -> (u16, Bytes) {
    let e = GatewayError::upstream(status, adapter.upstream_error(status, error_type, body));
    (e.status(), e.to_json())
}

#[cfg(test)]
mod tests {
    use tokn_config::credential::{ApiKeyCredential, OpenaiCredential};
    use tokn_config::Secret;

    use super::*;

    /// The request a pool's adapter builds for a plain chat body.
    fn request(credential: Credential) -> (String, RequestHeader) {
        let body =
            Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let req = ChatRequest::parse(&body).unwrap();
        let adapter = adapter(&credential).unwrap();
        let call = ChatCall {
            req: &req,
            body: &body,
            upstream_model: "up",
            request_id: "req_1",
        };
        match adapter.chat_request(&call).unwrap() {
            Outbound::Http { header, .. } => (header.uri.to_string(), *header),
            Outbound::Local(_) => panic!("an HTTP pool"),
        }
    }

    fn header<'a>(h: &'a RequestHeader, name: &str) -> (&'a str, bool) {
        let v = &h.headers[name];
        (v.to_str().unwrap(), v.is_sensitive())
    }

    #[test]
    fn each_provider_gets_its_credential_header_and_path_prepared_once() {
        let anthropic = |base_url: Option<&str>| {
            Credential::Anthropic(ApiKeyCredential {
                api_key: Secret::new("sk-ant-secret"),
                base_url: base_url.map(str::to_owned),
            })
        };
        let (path, h) = request(anthropic(None));
        assert_eq!(path, "/v1/messages");
        assert_eq!(header(&h, "x-api-key"), ("sk-ant-secret", true));
        assert_eq!(header(&h, "host"), ("api.anthropic.com", false));
        // `…/v1` names the same root.
        let (path, h) = request(anthropic(Some("http://127.0.0.1:9/v1")));
        assert_eq!(path, "/v1/messages");
        assert_eq!(header(&h, "host"), ("127.0.0.1:9", false));

        let (path, h) = request(Credential::Openai(OpenaiCredential {
            api_key: Secret::new("sk-oai-secret"),
            base_url: None,
            organization: Some("org-1".into()),
        }));
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(header(&h, "authorization"), ("Bearer sk-oai-secret", true));
        assert_eq!(header(&h, "openai-organization"), ("org-1", true));
        assert_eq!(header(&h, "host"), ("api.openai.com", false));
    }

    #[test]
    fn every_provider_shares_the_baseline_for_timeouts_and_conflicts() {
        for status in [408, 409, 429, 500, 503] {
            assert_eq!(FailureClass::of_status(status), FailureClass::Transient);
        }
        for status in [401, 403] {
            assert_eq!(FailureClass::of_status(status), FailureClass::Credential);
        }
        for status in [400, 404, 413, 422] {
            assert_eq!(FailureClass::of_status(status), FailureClass::Request);
        }
    }
}
