//! OpenAI and every server that speaks its Chat Completions API: a near pass-through.

use bytes::Bytes;
use pingora::http::RequestHeader;

use super::{ProviderAdapter, StreamTranslator};
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
        let body = req.upstream_body(body, &model.upstream_model);
        let mut header = RequestHeader::build("POST", target.chat_path.as_bytes(), Some(6))
            .map_err(|_| GatewayError::internal())?;
        let content_length = body.len().to_string();
        for (name, value) in [
            ("host", target.host_header.clone()),
            ("authorization", target.authorization.clone()),
            (
                "content-type",
                http::HeaderValue::from_static("application/json"),
            ),
            (
                "accept-encoding",
                http::HeaderValue::from_static("identity"),
            ),
            (
                "user-agent",
                http::HeaderValue::from_static(concat!("tokn/", env!("CARGO_PKG_VERSION"))),
            ),
        ] {
            header
                .insert_header(name, value)
                .map_err(|_| GatewayError::internal())?;
        }
        header
            .insert_header("content-length", content_length)
            .map_err(|_| GatewayError::internal())?;
        Ok((header, body))
    }

    fn complete_body(&self, body: Bytes) -> Result<(Bytes, Option<Usage>), GatewayError> {
        let usage = completion_usage(&body).map_err(|_| GatewayError::upstream_bad_response())?;
        Ok((body, usage))
    }

    fn stream_translator(&self, hide_usage_chunk: bool) -> Box<dyn StreamTranslator> {
        Box::new(SseRelay::new(hide_usage_chunk))
    }
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
