//! OpenAI's Responses API (`POST /v1/responses`), which Codex CLI and the Agents SDK speak, on
//! a pass-through lane to pools that serve it natively (OpenAI): the client's body goes up with
//! only `model` renamed, and the answer — one response object, or its event sequence through
//! the mandatory `response.completed` — comes back as it is, its usage read on the way.
//!
//! The gateway keeps no responses. A response the upstream stored (`store` not `false`) belongs
//! to one seller's account, so the gateway remembers which pool stored it (`StoredResponses`, by
//! id, bounded, per proxy) and a request continuing it (`previous_response_id`) goes to that
//! pool alone; an id it does not know is refused with a 400 (Codex never sends one: it resends
//! the whole history with `store: false`).

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::chat::{check_body_text, parse_error, text_field, typed, ModelField};
use crate::error::GatewayError;
use crate::relay::{
    event_data, find_event_end, FramingError, StreamTally, StreamTranslator, SSE_EVENT_BYTES_MAX,
};
use crate::usage::Usage;

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    previous_response_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt_cache_key: Option<&'a RawValue>,
    #[serde(borrow, default)]
    store: Option<&'a RawValue>,
}

/// A Responses API request as the gateway sees it, borrowed from the body.
#[derive(Debug)]
pub struct ResponsesRequest<'a> {
    pub model: ModelField<'a>,
    pub stream: bool,
    pub max_output_tokens: Option<u64>,
    /// Names the conversation (Codex: its thread id; sticky routing).
    pub prompt_cache_key: Option<Cow<'a, str>>,
    /// The stored response this one continues.
    pub previous_response_id: Option<Cow<'a, str>>,
    /// Whether the upstream stores the response (OpenAI's default: yes).
    pub store: bool,
}

impl<'a> ResponsesRequest<'a> {
    /// Checks the body and borrows what the gateway needs from it.
    pub fn parse(body: &'a [u8]) -> Result<Self, GatewayError> {
        let fields: Fields<'a> = serde_json::from_slice(body).map_err(parse_error)?;
        check_body_text(body)?;
        let model = ModelField::read(body, fields.model, "Missing required parameter: 'model'.")?;
        let store = typed::<bool>(fields.store, "store", "a boolean")?.unwrap_or(true);
        let stream = typed::<bool>(fields.stream, "stream", "a boolean")?.unwrap_or(false);
        let max_output_tokens = typed::<u64>(
            fields.max_output_tokens,
            "max_output_tokens",
            "a positive integer",
        )?;
        Ok(Self {
            model,
            stream,
            max_output_tokens,
            prompt_cache_key: text_field(fields.prompt_cache_key, "prompt_cache_key")?,
            previous_response_id: text_field(fields.previous_response_id, "previous_response_id")?,
            store,
        })
    }

    /// The body for the upstream (`model` renamed, nothing else touched).
    pub fn upstream_body(&self, original: &Bytes, upstream_model: &str) -> Bytes {
        self.model.upstream_body(original, upstream_model)
    }
}

/// A `previous_response_id` no pool of this gateway is known to have stored.
pub fn unknown_previous_response() -> GatewayError {
    GatewayError::bad_field(
        "previous_response_id",
        "previous_response_id names a response this gateway did not see stored (or no longer \
         reaches the pool that stored it). Send the whole conversation in `input` (with \
         `store: false`), as Codex does.",
    )
}

/// Where a stored response's id is written once the answer names it (the response object, or
/// the stream's `response.created`).
pub type ResponseIdCell = Arc<OnceLock<String>>;

/// Responses' usage.
#[derive(Deserialize, Default)]
struct UsageWire {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    input_tokens_details: Option<InputDetails>,
    #[serde(default)]
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Deserialize, Default)]
struct InputDetails {
    #[serde(default)]
    cached_tokens: u64,
}

#[derive(Deserialize, Default)]
struct OutputDetails {
    #[serde(default)]
    reasoning_tokens: u64,
}

impl From<UsageWire> for Usage {
    fn from(u: UsageWire) -> Self {
        Usage {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
            cached_tokens: u.input_tokens_details.unwrap_or_default().cached_tokens,
            // OpenAI's prompt cache costs nothing to write.
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            reasoning_tokens: u.output_tokens_details.unwrap_or_default().reasoning_tokens,
        }
    }
}

#[derive(Deserialize)]
struct ResponseView {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    usage: Option<UsageWire>,
}

/// A complete response object as it is, with the usage it reports; its id goes to `id`.
pub fn response_body(
    body: Bytes,
    id: &ResponseIdCell,
) -> Result<(Bytes, Option<Usage>), GatewayError> {
    if std::str::from_utf8(&body).is_err() {
        return Err(GatewayError::upstream_bad_response());
    }
    let view: ResponseView =
        serde_json::from_slice(&body).map_err(|_| GatewayError::upstream_bad_response())?;
    if let Some(v) = view.id {
        let _ = id.set(v);
    }
    Ok((body, view.usage.map(Usage::from)))
}

/// Relays a Responses event stream as it came, event by event, counting: the text and tool
/// input generated (`*.delta`), and the usage of the terminal event (`response.completed`,
/// `.incomplete` or `.failed`), which ends the stream.
#[derive(Default)]
pub struct ResponsesRelay {
    pending: BytesMut,
    tally: StreamTally,
    /// The response's id, from `response.created`.
    id: ResponseIdCell,
}

#[derive(Deserialize)]
struct EventView<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    delta: Option<Cow<'a, str>>,
    #[serde(default)]
    response: Option<ResponseView>,
}

/// What in an event's JSON can matter to the relay: a `delta` member (its text is counted) or a
/// terminal event's type (its usage is read). Every other event — the largest ones among them,
/// which repeat the whole response — is relayed unparsed. A key cannot hide in a string (its
/// quotes would be escaped); a type's name inside some text only costs a parse.
const EVENT_MARKS: [&[u8]; 6] = [
    b"\"delta\":",
    b"response.created",
    b"response.completed",
    b"response.incomplete",
    b"response.failed",
    b"\"error\"",
];

impl ResponsesRelay {
    /// A relay that writes the response's id to `id`.
    pub fn new(id: ResponseIdCell) -> Self {
        Self {
            id,
            ..Self::default()
        }
    }

    fn inspect(&mut self, event: &[u8]) {
        let Some(data) = event_data(event) else {
            return;
        };
        if !EVENT_MARKS
            .iter()
            .any(|mark| memchr::memmem::find(&data, mark).is_some())
        {
            return;
        }
        let Ok(view) = serde_json::from_slice::<EventView<'_>>(&data) else {
            return;
        };
        if let Some(delta) = &view.delta {
            self.tally.generated_bytes += delta.len() as u64;
        }
        if view.kind == "response.created" {
            if let Some(id) = view.response.as_ref().and_then(|r| r.id.clone()) {
                let _ = self.id.set(id);
            }
        }
        if matches!(
            view.kind.as_ref(),
            "response.completed" | "response.incomplete" | "response.failed" | "error"
        ) {
            if let Some(usage) = view.response.and_then(|r| r.usage) {
                self.tally.usage = Some(usage.into());
            }
            self.tally.done = true;
        }
    }
}

impl StreamTranslator for ResponsesRelay {
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError> {
        self.pending.extend_from_slice(input);
        let mut out = BytesMut::with_capacity(self.pending.len());
        while let Some((end, next)) = find_event_end(&self.pending) {
            let event = self.pending.split_to(next);
            if !self.tally.done {
                self.inspect(&event[..end]);
                out.extend_from_slice(&event);
            }
        }
        if self.pending.len() > SSE_EVENT_BYTES_MAX {
            return Err(FramingError);
        }
        Ok(out.freeze())
    }

    fn finish(&mut self) -> Bytes {
        let rest = self.pending.split().freeze();
        if !rest.is_empty() && !self.tally.done {
            self.inspect(&rest);
        }
        rest
    }

    fn tally(&self) -> &StreamTally {
        &self.tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_continuation_and_storage_are_read_and_the_model_is_renamed_alone() {
        let req = ResponsesRequest::parse(
            br#"{"model":"m","input":"hi","previous_response_id":"resp_1"}"#,
        )
        .unwrap();
        assert_eq!(req.previous_response_id.as_deref(), Some("resp_1"));
        assert!(req.store, "OpenAI stores by default");
        for bad in [
            &br#"{"model":"m","input":"hi","previous_response_id":7}"#[..],
            br#"{"model":"m","input":"hi","store":"no"}"#,
        ] {
            assert_eq!(ResponsesRequest::parse(bad).unwrap_err().status(), 400);
        }
        let body = Bytes::from_static(br#"{"model":"m","input":"hi","store":false,"x":1}"#);
        let req = ResponsesRequest::parse(&body).unwrap();
        assert!(!req.store);
        assert_eq!(
            &req.upstream_body(&body, "gpt-up")[..],
            br#"{"model":"gpt-up","input":"hi","store":false,"x":1}"#
        );
    }

    #[test]
    fn the_stream_is_relayed_as_it_came_and_ends_with_response_completed() {
        let sse = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_9\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi there\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":30,\"input_tokens_details\":{\"cached_tokens\":10},\"output_tokens\":5,\"output_tokens_details\":{\"reasoning_tokens\":2}}}}\n\n",
        );
        let id = ResponseIdCell::default();
        let mut relay = ResponsesRelay::new(id.clone());
        let out = relay.feed(sse.as_bytes()).unwrap();
        assert_eq!(&out[..], sse.as_bytes());
        assert!(relay.is_done());
        assert_eq!(relay.generated_bytes(), 8);
        assert_eq!(
            relay.usage(),
            Some(Usage {
                prompt_tokens: 30,
                completion_tokens: 5,
                cached_tokens: 10,
                cache_write_tokens: 0,
                cache_write_1h_tokens: 0,
                reasoning_tokens: 2
            })
        );
        assert_eq!(id.get().map(String::as_str), Some("resp_9"));
    }
}
