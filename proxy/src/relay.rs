//! Reading OpenAI-format responses on their way to the client: usage out of a complete body; the
//! `StreamTranslator` every adapter's stream implements; and the OpenAI SSE relay, which
//! forwards each complete event as it arrives, counts usage, and hides the usage chunk the
//! gateway asked for on the client's behalf.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::usage::Usage;

/// One SSE event may not grow past this without a terminating blank line.
pub(crate) const SSE_EVENT_BYTES_MAX: usize = 8 * 1024 * 1024;

#[derive(Deserialize, Default)]
struct UsageWire {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize, Default)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl From<UsageWire> for Usage {
    fn from(w: UsageWire) -> Self {
        Usage {
            prompt_tokens: w.prompt_tokens,
            completion_tokens: w.completion_tokens,
            cached_tokens: w
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            // OpenAI's prompt cache costs nothing to write.
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            reasoning_tokens: w
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct CompletionView {
    #[serde(default)]
    usage: Option<UsageWire>,
}

/// Usage reported in a complete (non-streaming) chat completion body, if any.
pub fn completion_usage(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    let view: CompletionView = serde_json::from_slice(body)?;
    Ok(view.usage.map(Usage::from))
}

#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceView<'a>>>,
    #[serde(default)]
    usage: Option<UsageWire>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default, borrow)]
    delta: Option<DeltaView<'a>>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<&'a RawValue>,
}

/// Turns an upstream's streamed body into OpenAI SSE bytes for the client, counting usage.
pub trait StreamTranslator: Send + Sync {
    /// Upstream bytes in; bytes to send the client now out.
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError>;
    /// The upstream closed: whatever is left to send.
    fn finish(&mut self) -> Bytes;
    /// What the stream has counted so far.
    fn tally(&self) -> &StreamTally;

    /// Usage the upstream reported so far.
    fn usage(&self) -> Option<Usage> {
        self.tally().usage
    }
    /// Bytes of generated text relayed so far (for estimates when no usage comes).
    fn generated_bytes(&self) -> u64 {
        self.tally().generated_bytes
    }
    /// The stream reached its terminator (`data: [DONE]`).
    fn is_done(&self) -> bool {
        self.tally().done
    }
}

/// What every stream translator counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamTally {
    pub usage: Option<Usage>,
    pub generated_bytes: u64,
    pub done: bool,
}

/// Relays an OpenAI chat completion SSE stream event by event.
pub struct SseRelay {
    hide_usage_chunk: bool,
    pending: BytesMut,
    tally: StreamTally,
}

/// The upstream broke the SSE framing.
#[derive(Debug)]
pub struct FramingError;

impl SseRelay {
    /// `hide_usage_chunk`: the client did not ask for `include_usage`, the gateway did.
    pub fn new(hide_usage_chunk: bool) -> Self {
        Self {
            hide_usage_chunk,
            pending: BytesMut::new(),
            tally: StreamTally::default(),
        }
    }

    /// Looks at one event; returns whether it goes to the client.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let Some(data) = event_data(event) else {
            return true;
        };
        if data.as_ref() == b"[DONE]" {
            self.tally.done = true;
            return true;
        }
        let Ok(chunk) = serde_json::from_slice::<ChunkView<'_>>(&data) else {
            // Not a chunk we understand (an error object, a comment): pass it on untouched.
            return true;
        };
        let choices = chunk.choices.unwrap_or_default();
        for c in &choices {
            if let Some(d) = &c.delta {
                self.tally.generated_bytes += d.content.as_ref().map_or(0, |s| s.len() as u64)
                    + d.refusal.as_ref().map_or(0, |s| s.len() as u64)
                    + d.tool_calls.map_or(0, |t| t.get().len() as u64);
            }
        }
        match chunk.usage {
            Some(u) => {
                self.tally.usage = Some(u.into());
                !(self.hide_usage_chunk && choices.is_empty())
            }
            None => true,
        }
    }
}

impl StreamTranslator for SseRelay {
    /// Takes upstream bytes; returns the bytes to send the client now (complete events only).
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError> {
        self.pending.extend_from_slice(input);
        let mut out = BytesMut::with_capacity(self.pending.len());
        while let Some((event_end, next)) = find_event_end(&self.pending) {
            let event = self.pending.split_to(next);
            if self.inspect(&event[..event_end]) {
                out.extend_from_slice(&event);
            }
        }
        if self.pending.len() > SSE_EVENT_BYTES_MAX {
            return Err(FramingError);
        }
        Ok(out.freeze())
    }

    /// Whatever the upstream left unterminated when it closed (forwarded as is).
    fn finish(&mut self) -> Bytes {
        let rest = self.pending.split().freeze();
        if !rest.is_empty() {
            self.inspect(&rest.clone());
        }
        rest
    }

    fn tally(&self) -> &StreamTally {
        &self.tally
    }
}

/// How an answer in chat's format becomes another API's (the translation lanes: Anthropic's
/// Messages, OpenAI's Responses), for one request.
pub trait FromChat: Send + Sync {
    /// The stream's events for one chat chunk's data (`[DONE]` included), appended to `out`,
    /// with the usage counted so far; `true` once the stream has ended.
    fn chunk(&mut self, data: &[u8], usage: Option<Usage>, out: &mut BytesMut) -> bool;
    /// A whole chat completion (already the client's) as the other API's answer.
    fn whole(&self, chat: &[u8], usage: &Usage) -> Result<Bytes, crate::error::GatewayError>;
}

/// A stream translated twice: the adapter's own translator makes chat chunks of the upstream's
/// stream and counts its usage; `lane` makes those chunks another API's events.
pub struct ThroughChat {
    inner: Box<dyn StreamTranslator>,
    lane: Box<dyn FromChat>,
    pending: BytesMut,
    tally: StreamTally,
}

impl ThroughChat {
    pub fn new(inner: Box<dyn StreamTranslator>, lane: Box<dyn FromChat>) -> Self {
        Self {
            inner,
            lane,
            pending: BytesMut::new(),
            tally: StreamTally::default(),
        }
    }

    /// Chat bytes in; the lane's events for the complete chunks out. Counts are the inner
    /// translator's, the end the lane's.
    fn translate(&mut self, chat: &[u8]) -> Bytes {
        let done = self.tally.done;
        self.tally = *self.inner.tally();
        self.tally.done = done;
        self.pending.extend_from_slice(chat);
        let mut out = BytesMut::new();
        while let Some((end, next)) = find_event_end(&self.pending) {
            let event = self.pending.split_to(next);
            if self.tally.done {
                continue;
            }
            if let Some(data) = event_data(&event[..end]) {
                self.tally.done = self.lane.chunk(&data, self.inner.usage(), &mut out);
            }
        }
        out.freeze()
    }
}

impl StreamTranslator for ThroughChat {
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError> {
        let chat = self.inner.feed(input)?;
        let out = self.translate(&chat);
        if self.pending.len() > SSE_EVENT_BYTES_MAX {
            return Err(FramingError);
        }
        Ok(out)
    }

    fn finish(&mut self) -> Bytes {
        let chat = self.inner.finish();
        self.translate(&chat)
    }

    fn tally(&self) -> &StreamTally {
        &self.tally
    }
}

/// What tokn adds to a stream's usage object: what the call cost the buyer, what it would have
/// cost at list price, and the buyer's available balance after it (when known).
#[derive(Debug, Clone, Copy)]
pub struct CostFields {
    pub cost_micros: u64,
    pub list_cost_micros: u64,
    pub balance_micros: Option<i64>,
}

/// Whether `out` may hold a usage chunk (a usage object that is not null).
pub fn has_usage_chunk(out: &[u8]) -> bool {
    memchr::memmem::find(out, b"\"usage\":{").is_some()
}

/// `out` with the cost fields added to the usage object of the usage chunk (OpenAI's chunk with
/// `choices: []`, Anthropic's `message_delta`, Responses' `response.completed`), if `out` holds
/// it; every other event unchanged.
/// Only a stream's last write is given here.
pub fn with_cost_fields(out: Bytes, fields: &CostFields) -> Bytes {
    if !has_usage_chunk(&out) {
        return out;
    }
    let mut events = Vec::new();
    let mut rest = &out[..];
    while let Some((content_end, next)) = find_event_end(rest) {
        let (event, after) = rest.split_at(next);
        events.push((event, content_end));
        rest = after;
    }
    // Only the last usage event gets them (a Messages stream may send its count more than once).
    let patched = events
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, (event, end))| Some((i, usage_chunk_with(&event[..*end], fields)?)));
    let mut result = BytesMut::with_capacity(out.len() + 96);
    for (i, (event, content_end)) in events.into_iter().enumerate() {
        match patched.as_ref().filter(|(at, _)| *at == i) {
            Some((_, json)) => {
                // The event's other lines (Anthropic's `event:` name) stay as they were.
                for line in event[..content_end].split(|&b| b == b'\n') {
                    if !line.is_empty() && !line.starts_with(b"data:") {
                        result.extend_from_slice(line);
                        result.extend_from_slice(b"\n");
                    }
                }
                result.extend_from_slice(b"data: ");
                result.extend_from_slice(json);
                result.extend_from_slice(b"\n\n");
            }
            None => result.extend_from_slice(event),
        }
    }
    result.extend_from_slice(rest);
    result.freeze()
}

/// The event's JSON with the cost fields in its usage object, if it is the usage chunk.
fn usage_chunk_with(event: &[u8], fields: &CostFields) -> Option<Vec<u8>> {
    let data = event_data(event)?;
    let mut chunk: serde_json::Value = serde_json::from_slice(&data).ok()?;
    // Chat's usage chunk, Anthropic's `message_delta`, Responses' `response.completed` (whose
    // usage is the response's).
    let usage = if chunk["choices"].as_array().is_some_and(Vec::is_empty)
        || chunk["type"] == "message_delta"
    {
        chunk.get_mut("usage")?
    } else if chunk["type"] == "response.completed" {
        chunk.get_mut("response")?.get_mut("usage")?
    } else {
        return None;
    };
    let usage = usage.as_object_mut()?;
    usage.insert("cost_micros".into(), fields.cost_micros.into());
    usage.insert("list_cost_micros".into(), fields.list_cost_micros.into());
    if let Some(b) = fields.balance_micros {
        usage.insert("balance_micros".into(), b.into());
    }
    serde_json::to_vec(&chunk).ok()
}

/// End of the first event's content and start of the next event, if a blank line ends it.
pub(crate) fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let nl = from + i;
        let rest = &buf[nl + 1..];
        if rest.first() == Some(&b'\n') {
            return Some((nl, nl + 2));
        }
        if rest.starts_with(b"\r\n") {
            return Some((nl, nl + 3));
        }
        from = nl + 1;
    }
    None
}

/// The `data:` payload of an event (multi-line data joined with `\n`), if it has any.
pub(crate) fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = line.strip_prefix(b"data:") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        data = Some(match data {
            None => Cow::Borrowed(value),
            Some(prev) => {
                let mut joined = prev.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                Cow::Owned(joined)
            }
        });
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{}\"}}]}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":15,\"total_tokens\":35,\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n",
        "data: [DONE]\n\n",
    );

    fn relay_in_pieces(hide: bool, piece: usize) -> (String, SseRelay) {
        let mut relay = SseRelay::new(hide);
        let mut out = Vec::new();
        for chunk in STREAM.as_bytes().chunks(piece) {
            out.extend_from_slice(&relay.feed(chunk).unwrap());
        }
        out.extend_from_slice(&relay.finish());
        (String::from_utf8(out).unwrap(), relay)
    }

    #[test]
    fn passes_everything_through_when_the_client_asked_for_usage() {
        for piece in [1, 7, 64, 10_000] {
            let (out, relay) = relay_in_pieces(false, piece);
            assert_eq!(out, STREAM);
            assert!(relay.is_done());
            assert_eq!(
                relay.usage(),
                Some(Usage {
                    prompt_tokens: 20,
                    completion_tokens: 15,
                    cached_tokens: 4,
                    cache_write_tokens: 0,
                    cache_write_1h_tokens: 0,
                    reasoning_tokens: 2
                })
            );
        }
    }

    #[test]
    fn hides_only_the_usage_chunk_when_the_gateway_asked() {
        let (out, relay) = relay_in_pieces(true, 13);
        assert!(!out.contains("prompt_tokens"));
        assert!(out.contains("Hello") && out.ends_with("data: [DONE]\n\n"));
        assert_eq!(relay.usage().unwrap().completion_tokens, 15);
        assert_eq!(
            relay.generated_bytes(),
            5 + "[{\"index\":0,\"function\":{\"arguments\":\"{}\"}}]".len() as u64
        );
    }

    #[test]
    fn handles_crlf_framing_and_multiline_data() {
        let mut relay = SseRelay::new(false);
        let input: &[u8] = b"data: [DO\r\n\r\ndata: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
        let out = relay.feed(input).unwrap();
        assert_eq!(&out[..], input);
        assert_eq!(relay.usage().unwrap().completion_tokens, 2);
    }

    #[test]
    fn an_endless_event_is_a_framing_error() {
        let mut relay = SseRelay::new(false);
        let big = vec![b'x'; SSE_EVENT_BYTES_MAX + 1];
        assert!(relay.feed(&big).is_err());
    }

    #[test]
    fn the_usage_chunk_tells_what_the_call_cost() {
        let fields = CostFields {
            cost_micros: 7,
            list_cost_micros: 12,
            balance_micros: Some(993),
        };
        let last = Bytes::from(STREAM.split_inclusive("\n\n").skip(3).collect::<String>());
        let out = with_cost_fields(last, &fields);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let usage: serde_json::Value =
            serde_json::from_str(text.lines().next().unwrap().strip_prefix("data: ").unwrap())
                .unwrap();
        assert_eq!(usage["usage"]["cost_micros"], 7);
        assert_eq!(usage["usage"]["list_cost_micros"], 12);
        assert_eq!(usage["usage"]["balance_micros"], 993);
        assert_eq!(usage["usage"]["prompt_tokens"], 20);
        // A write without the usage chunk is passed through untouched.
        let plain = Bytes::from_static(b"data: [DONE]\n\n");
        assert_eq!(with_cost_fields(plain.clone(), &fields), plain);
    }

    #[test]
    fn reads_usage_from_a_complete_body() {
        let u = completion_usage(br#"{"id":"x","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#).unwrap();
        assert_eq!(u.unwrap().prompt_tokens, 9);
        assert!(completion_usage(br#"{"id":"x"}"#).unwrap().is_none());
        assert!(completion_usage(b"garbage").is_err());
    }
}
