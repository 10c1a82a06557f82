//! The built-in `mock` provider: answers in process, with no network and no account, in OpenAI's
//! wire format. Content and usage are deterministic so demos and tests can assert on them:
//! prompt tokens = ⌈request body bytes / 4⌉, completion tokens = words generated (at most
//! `max_tokens`), one word per stream chunk.

use bytes::Bytes;
use serde_json::json;

use super::{openai, ChatCall, Outbound, ProviderAdapter, StreamTranslator};
use crate::chat::ChatRequest;
use crate::clock::unix_secs;
use crate::error::{GatewayError, UpstreamError};
use crate::relay::SseRelay;
use crate::usage::Usage;

/// The mock pool: no endpoint, no credential.
pub struct MockAdapter;

impl ProviderAdapter for MockAdapter {
    fn chat_request(&self, call: &ChatCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let id = format!("chatcmpl-{}", call.request_id);
        let req = call.req;
        Ok(Outbound::Local(respond(
            req,
            call.body.len(),
            req.stream,
            &id,
            unix_secs(),
        )))
    }

    /// The mock answers in OpenAI's wire format.
    fn complete_body(
        &self,
        body: Bytes,
        _upstream_model: &str,
    ) -> Result<(Bytes, Option<Usage>), GatewayError> {
        openai::complete_body(body)
    }

    fn stream_translator(
        &self,
        hide_usage_chunk: bool,
        _upstream_model: &str,
    ) -> Box<dyn StreamTranslator> {
        Box::new(SseRelay::new(hide_usage_chunk))
    }

    /// Never called: the mock never refuses.
    fn upstream_error(
        &self,
        status: u16,
        _error_type: Option<&str>,
        _body: &[u8],
    ) -> UpstreamError {
        UpstreamError::unreadable(status)
    }
}

/// The answer, one word per token.
const MOCK_REPLY: &str =
    "Hello from the tokn$ mock model. This answer is deterministic and costs nothing real.";

/// The upstream-format body chunks the mock "sends" for a request. `include_usage` is what the
/// upstream request asked for (the gateway always asks for streams).
fn respond(
    req: &ChatRequest<'_>,
    body_len: usize,
    include_usage: bool,
    id: &str,
    created: u64,
) -> Vec<Bytes> {
    let words: Vec<&str> = MOCK_REPLY.split(' ').collect();
    let limit = req
        .max_output_tokens
        .map_or(words.len(), |m| (m as usize).min(words.len()));
    let finish_reason = if limit < words.len() {
        "length"
    } else {
        "stop"
    };
    let prompt_tokens = body_len.div_ceil(4) as u64;
    let completion_tokens = limit as u64;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    });
    let model = req.model.as_ref();
    if !req.stream {
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": words[..limit].join(" "), "refusal": null},
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "usage": usage,
        });
        return vec![Bytes::from(body.to_string())];
    }
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        let c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            "usage": null,
        });
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut out = Vec::with_capacity(limit + 4);
    out.push(chunk(json!({"role": "assistant", "content": ""}), None));
    for (i, w) in words[..limit].iter().enumerate() {
        let text = if i == 0 {
            (*w).to_owned()
        } else {
            format!(" {w}")
        };
        out.push(chunk(json!({"content": text}), None));
    }
    out.push(chunk(json!({}), Some(finish_reason)));
    if include_usage {
        let c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage,
        });
        out.push(Bytes::from(format!("data: {c}\n\n")));
    }
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}
