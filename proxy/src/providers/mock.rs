//! The built-in `mock` provider: answers in process, with no network and no account, in OpenAI's
//! wire format. Content and usage are deterministic so demos and tests can assert on them:
//! prompt tokens = ⌈request body bytes / 4⌉, completion tokens = words generated (at most
//! `max_tokens`), one word per stream chunk.

use bytes::Bytes;
use serde_json::{json, Value};

use super::{ChatCall, Outbound, ProviderAdapter};
use crate::chat::ChatRequest;
use crate::clock::unix_secs;
use crate::error::GatewayError;

/// The mock pool: no endpoint, no credential.
pub struct MockAdapter;

impl ProviderAdapter for MockAdapter {
    fn chat_request(&self, call: &ChatCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let id = format!("chatcmpl-{}", call.request_id);
        let req = call.req;
        Ok(Outbound::Local(respond(
            req,
            call.body.len(),
            &id,
            unix_secs(),
        )))
    }
}

/// The answer, one word per token (fourteen: the tests' token counts and costs rest on it). The
/// mock is billed like any model but listed only on the embedded store, whose credit is play
/// money.
const MOCK_REPLY: &str =
    "Hello from the tokn$ mock model. This answer is deterministic, billed in play money.";

/// The upstream-format body chunks the mock "sends" for a request: one body, or (streams) one
/// chunk per word with the usage chunk the gateway always asks upstreams for.
fn respond(req: &ChatRequest<'_>, body_len: usize, id: &str, created: u64) -> Vec<Bytes> {
    let words: Vec<&str> = MOCK_REPLY.split(' ').collect();
    let limit = req
        .max_output_tokens
        .map_or(words.len(), |m| (m as usize).min(words.len()));
    let prompt_tokens = body_len.div_ceil(4) as u64;
    let reply = Reply {
        id,
        created,
        model: req.model.as_ref(),
        words: &words[..limit],
        finish_reason: if limit < words.len() {
            "length"
        } else {
            "stop"
        },
        usage: json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": limit,
            "total_tokens": prompt_tokens + limit as u64,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }),
    };
    if req.stream {
        reply.chunks()
    } else {
        vec![reply.whole()]
    }
}

struct Reply<'a> {
    id: &'a str,
    created: u64,
    model: &'a str,
    words: &'a [&'a str],
    finish_reason: &'static str,
    usage: Value,
}

impl Reply<'_> {
    fn whole(&self) -> Bytes {
        let body = json!({
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.words.join(" "), "refusal": null},
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage,
        });
        Bytes::from(body.to_string())
    }

    fn chunks(&self) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(self.words.len() + 4);
        out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
        for (i, w) in self.words.iter().enumerate() {
            let text = if i == 0 {
                (*w).to_owned()
            } else {
                format!(" {w}")
            };
            out.push(self.chunk(json!({"content": text}), None));
        }
        out.push(self.chunk(json!({}), Some(self.finish_reason)));
        let usage = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [], "usage": self.usage,
        });
        out.push(Bytes::from(format!("data: {usage}\n\n")));
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
        out
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            "usage": null,
        });
        Bytes::from(format!("data: {c}\n\n"))
    }
}
