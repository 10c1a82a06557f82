//! The provider seam: one adapter per provider behind one trait.
//!
//! An adapter turns the client's OpenAI request into the provider's native request and the
//! provider's response back into OpenAI's wire format, reading usage on the way. Where the bytes
//! travel (pooled HTTP connection or the in-process mock) is the pool's `Transport`, not the
//! adapter's business. `anthropic.rs` speaks the native Messages API; Bedrock, Gemini/Vertex and
//! Azure adapters plug in here.

mod anthropic;
pub mod aws;
pub mod azure;
mod bedrock;
pub mod gemini;
pub mod google_token;
pub mod mock;
mod openai;
mod translate;

use bytes::Bytes;
use pingora::http::RequestHeader;
use tokn_config::ProviderKind;

use crate::chat::ChatRequest;
use crate::error::GatewayError;
use crate::relay::FramingError;
use crate::snapshot::{HttpTarget, Model};
use crate::usage::Usage;

/// Turns an upstream's streamed body into OpenAI SSE bytes for the client, counting usage.
pub trait StreamTranslator: Send + Sync {
    /// Upstream bytes in; bytes to send the client now out.
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError>;
    /// The upstream closed: whatever is left to send.
    fn finish(&mut self) -> Bytes;
    /// Usage the upstream reported so far.
    fn usage(&self) -> Option<Usage>;
    /// Bytes of generated text relayed so far (for estimates when no usage comes).
    fn generated_bytes(&self) -> u64;
    /// The stream reached its terminator (`data: [DONE]`).
    fn is_done(&self) -> bool;
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

/// One provider's translation rules.
pub trait ProviderAdapter: Send + Sync {
    /// The upstream request header and body for a chat completion.
    fn chat_request(
        &self,
        req: &ChatRequest<'_>,
        body: &Bytes,
        model: &Model,
        target: &HttpTarget,
    ) -> Result<(RequestHeader, Bytes), GatewayError>;

    /// A complete (non-streaming) upstream body, translated, with the usage it reports.
    /// `model`: the upstream model name, for answers that do not carry one (Bedrock).
    fn complete_body(
        &self,
        body: Bytes,
        model: &str,
    ) -> Result<(Bytes, Option<Usage>), GatewayError>;

    /// A translator for one streamed response. `hide_usage_chunk`: the client did not ask for
    /// `include_usage`, so the usage chunk is counted but not forwarded. `model` as above.
    fn stream_translator(&self, hide_usage_chunk: bool, model: &str) -> Box<dyn StreamTranslator>;

    /// Classifies a non-2xx answer from its status, error type header and (bounded) body.
    /// Providers signal exhaustion differently (OpenAI: 429 `insufficient_quota`; Gemini: 400
    /// `API_KEY_INVALID`; Bedrock: 400 `ServiceQuotaExceededException`, named only in the
    /// `x-amzn-ErrorType` header passed as `error_type`), so the status alone is not enough.
    fn classify_failure(&self, status: u16, error_type: Option<&str>, body: &[u8]) -> FailureClass;

    /// The retry delay an error body names, for providers that put it there rather than in a
    /// `retry-after` header (Google's `RetryInfo`).
    fn retry_after_in_body(&self, _body: &[u8]) -> Option<u64> {
        None
    }

    /// A non-success answer about the request, as the client gets it: OpenAI's error shape and
    /// status. OpenAI-format upstreams' answers pass through. `error_type` as above.
    fn error_response(&self, status: u16, _error_type: Option<&str>, body: Bytes) -> (u16, Bytes) {
        (status, body)
    }
}

/// The adapter for a provider, if this build has one. The mock speaks OpenAI's wire format, so
/// it shares that adapter. (Configuration refuses pools of providers without one.)
pub fn adapter(kind: ProviderKind) -> Option<&'static dyn ProviderAdapter> {
    match kind {
        ProviderKind::Openai | ProviderKind::Mock => Some(&openai::OpenAiAdapter),
        ProviderKind::Anthropic => Some(&anthropic::AnthropicAdapter),
        ProviderKind::Azure => Some(&azure::AzureAdapter),
        ProviderKind::Bedrock => Some(&bedrock::BedrockAdapter),
        ProviderKind::Vertex | ProviderKind::Gemini => Some(&gemini::GeminiAdapter),
    }
}
