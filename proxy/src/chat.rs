//! The client's `POST /v1/chat/completions` body: checked without building a DOM, and rewritten
//! for the upstream by splicing bytes (the body is never re-serialised).

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// Top-level parameters of the OpenAI Chat Completions API. Like OpenAI itself, the gateway
/// refuses anything else ("Unrecognized request argument supplied").
const KNOWN_PARAMS: &[&str] = &[
    "model",
    "messages",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "prompt_cache_retention",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
];

const ROLES: &[&str] = &[
    "developer",
    "system",
    "user",
    "assistant",
    "tool",
    "function",
];

/// The fields of a chat request the gateway acts on, borrowed from the body.
#[derive(Debug)]
pub struct ChatRequest<'a> {
    body: &'a [u8],
    pub model: Cow<'a, str>,
    model_span: Range<usize>,
    pub stream: bool,
    /// `stream_options.include_usage` as the client sent it.
    pub client_include_usage: bool,
    stream_options: Option<(&'a RawValue, Range<usize>)>,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_output_tokens: Option<u64>,
    pub n: u64,
    /// Names the conversation (sticky routing).
    pub prompt_cache_key: Option<Cow<'a, str>>,
}

#[derive(Default)]
struct Fields<'a> {
    model: Option<&'a RawValue>,
    /// Checked in the same pass that reads the body (messages are most of a body's bytes).
    messages: Option<MessagesCheck>,
    stream: Option<&'a RawValue>,
    stream_options: Option<&'a RawValue>,
    max_tokens: Option<&'a RawValue>,
    max_completion_tokens: Option<&'a RawValue>,
    n: Option<&'a RawValue>,
    temperature: Option<&'a RawValue>,
    top_p: Option<&'a RawValue>,
    prompt_cache_key: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut f = Fields::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "messages" {
                let check: MessagesCheck = map.next_value()?;
                if f.messages.replace(check).is_some() {
                    return Err(de::Error::custom("duplicate field `messages`"));
                }
                continue;
            }
            let value: &'de RawValue = map.next_value()?;
            let slot = match key.as_ref() {
                "model" => &mut f.model,
                "stream" => &mut f.stream,
                "stream_options" => &mut f.stream_options,
                "max_tokens" => &mut f.max_tokens,
                "max_completion_tokens" => &mut f.max_completion_tokens,
                "n" => &mut f.n,
                "temperature" => &mut f.temperature,
                "top_p" => &mut f.top_p,
                "prompt_cache_key" => &mut f.prompt_cache_key,
                k if KNOWN_PARAMS.contains(&k) => continue,
                k => {
                    let shown: String = k.chars().take(64).filter(|c| !c.is_control()).collect();
                    return Err(de::Error::custom(format_args!(
                        "Unrecognized request argument supplied: {shown}"
                    )));
                }
            };
            if slot.replace(value).is_some() {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
        }
        Ok(f)
    }
}

/// Visitor methods for the JSON scalars, each answering `$value` (the scalar is consumed).
macro_rules! scalars_are {
    ($ty:ty => $value:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<$ty, E> {
            Ok($value)
        }
        scalars_are!(non_string $ty => $value);
    };
    (non_string $ty:ty => $value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<$ty, E> {
            Ok($value)
        }
    };
}

const MESSAGES_SHAPE: &str =
    "`messages` must be an array of message objects, each with a string `role`.";

/// `messages`, checked while the body is read: an array of objects, each with a known string
/// `role`. A bad shape is recorded, not raised, so the error can name the parameter.
#[derive(Default)]
struct MessagesCheck {
    count: usize,
    problem: Option<String>,
}

impl<'de> Deserialize<'de> for MessagesCheck {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessagesCheck;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MessagesCheck, A::Error> {
                let mut check = MessagesCheck::default();
                while let Some(MessageRole(verdict)) = seq.next_element()? {
                    check.count += 1;
                    if let (None, Err(problem)) = (&check.problem, verdict) {
                        check.problem = Some(problem);
                    }
                }
                Ok(check)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MessagesCheck, A::Error> {
                drain_map(map)?;
                Ok(MessagesCheck::shape_problem())
            }
            scalars_are!(MessagesCheck => MessagesCheck::shape_problem());
        }
        d.deserialize_any(V)
    }
}

impl MessagesCheck {
    fn shape_problem() -> Self {
        Self {
            count: 0,
            problem: Some(MESSAGES_SHAPE.to_owned()),
        }
    }
}

/// One message's verdict: `Ok` when it is an object with a known string `role`.
struct MessageRole(Result<(), String>);

impl<'de> Deserialize<'de> for MessageRole {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MessageRoleVisitor)
    }
}

struct MessageRoleVisitor;

impl<'de> Visitor<'de> for MessageRoleVisitor {
    type Value = MessageRole;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MessageRole, A::Error> {
        let mut verdict = Err(MESSAGES_SHAPE.to_owned());
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key != "role" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            verdict = match map.next_value::<RoleValue<'de>>()?.0 {
                Some(role) if ROLES.contains(&role.as_ref()) => Ok(()),
                Some(role) => {
                    let shown: String = role.chars().take(32).filter(|c| !c.is_control()).collect();
                    Err(format!("Invalid message role `{shown}`."))
                }
                None => Err(MESSAGES_SHAPE.to_owned()),
            };
        }
        Ok(MessageRole(verdict))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MessageRole, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(MessageRole(Err(MESSAGES_SHAPE.to_owned())))
    }

    scalars_are!(MessageRole => MessageRole(Err(MESSAGES_SHAPE.to_owned())));
}

/// A `role` value: the string, or `None` for any other JSON value (consumed).
struct RoleValue<'de>(Option<Cow<'de, str>>);

impl<'de> Deserialize<'de> for RoleValue<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RoleValue<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a role string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<RoleValue<'de>, E> {
                Ok(RoleValue(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RoleValue<'de>, E> {
                Ok(RoleValue(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RoleValue<'de>, A::Error> {
                drain_map(map)?;
                Ok(RoleValue(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RoleValue<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RoleValue(None))
            }
            scalars_are!(non_string RoleValue<'de> => RoleValue(None));
        }
        d.deserialize_any(V)
    }
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
    #[serde(rename = "include_obfuscation")]
    _include_obfuscation: Option<bool>,
}

impl<'a> ChatRequest<'a> {
    /// Checks the body and borrows what the gateway needs from it.
    pub fn parse(body: &'a [u8]) -> Result<Self, GatewayError> {
        let fields: Fields<'a> = serde_json::from_slice(body).map_err(parse_error)?;
        check_body_text(body)?;
        let model_raw = fields.model.ok_or_else(|| {
            GatewayError::bad_field("model", "You must provide a model parameter.")
        })?;
        let model = model_name(model_raw)?;
        check_messages(fields.messages)?;
        let stream = typed::<bool>(fields.stream, "stream", "a boolean")?.unwrap_or(false);
        let client_include_usage = client_include_usage(fields.stream_options, stream)?;
        let max_completion = typed::<u64>(
            fields.max_completion_tokens,
            "max_completion_tokens",
            "a non-negative integer",
        )?;
        let max_tokens = typed::<u64>(fields.max_tokens, "max_tokens", "a non-negative integer")?;
        let n = typed::<u64>(fields.n, "n", "an integer between 1 and 128")?.unwrap_or(1);
        if !(1..=128).contains(&n) {
            return Err(GatewayError::bad_field(
                "n",
                "`n` must be an integer between 1 and 128.",
            ));
        }
        let (temperature, top_p) = (fields.temperature, fields.top_p);
        check_range(
            temperature,
            "temperature",
            0.0..=2.0,
            "a number between 0 and 2",
        )?;
        check_range(top_p, "top_p", 0.0..=1.0, "a number between 0 and 1")?;
        Ok(Self {
            body,
            model_span: span_of(body, model_raw),
            model,
            stream,
            client_include_usage,
            stream_options: fields
                .stream_options
                .filter(|r| r.get() != "null")
                .map(|r| (r, span_of(body, r))),
            max_output_tokens: max_completion.or(max_tokens),
            n,
            prompt_cache_key: text_field(fields.prompt_cache_key, "prompt_cache_key")?,
        })
    }

    /// The body to send an OpenAI-compatible upstream: `model` renamed to the upstream's name and,
    /// for streams, `stream_options.include_usage` forced on so usage is always reported.
    /// Returns `original` itself (no copy) when nothing changes.
    pub fn upstream_body(&self, original: &Bytes, upstream_model: &str) -> Bytes {
        let mut edits: Vec<(Range<usize>, Vec<u8>)> = Vec::with_capacity(2);
        if self.model != upstream_model {
            edits.push((self.model_span.clone(), json_string(upstream_model)));
        }
        if self.stream && !self.client_include_usage {
            match &self.stream_options {
                Some((raw, span)) => {
                    // Keep the client's other stream options; parse them as a map and set one key.
                    let mut map: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(raw.get()).unwrap_or_default();
                    map.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
                    let text = serde_json::to_vec(&map)
                        .unwrap_or_else(|_| b"{\"include_usage\":true}".to_vec());
                    edits.push((span.clone(), text));
                }
                None => {
                    let open = self.body.iter().position(|&b| b == b'{').unwrap_or(0);
                    edits.push((
                        open + 1..open + 1,
                        br#""stream_options":{"include_usage":true},"#.to_vec(),
                    ));
                }
            }
        }
        if edits.is_empty() {
            return original.clone();
        }
        spliced(self.body, edits)
    }
}

/// A body's `model`, and where it sits: for APIs whose bodies go upstream as they are, but for
/// the model's name.
#[derive(Debug)]
pub struct ModelField<'a> {
    body: &'a [u8],
    pub name: Cow<'a, str>,
    span: Range<usize>,
}

impl<'a> ModelField<'a> {
    /// `raw`, the body's `model`: a non-empty string (`missing`: the error when absent).
    pub(crate) fn read(
        body: &'a [u8],
        raw: Option<&'a RawValue>,
        missing: &'static str,
    ) -> Result<Self, GatewayError> {
        let raw = raw.ok_or_else(|| GatewayError::bad_field("model", missing))?;
        Ok(Self {
            body,
            name: model_name(raw)?,
            span: span_of(body, raw),
        })
    }

    /// The body for the upstream: `model` renamed to the upstream's name, nothing else touched
    /// (`original` itself when the names agree).
    pub fn upstream_body(&self, original: &Bytes, upstream_model: &str) -> Bytes {
        if self.name == upstream_model {
            return original.clone();
        }
        spliced(
            self.body,
            vec![(self.span.clone(), json_string(upstream_model))],
        )
    }
}

/// `body` with each range of `edits` (not overlapping) replaced by its text.
pub(crate) fn spliced(body: &[u8], mut edits: Vec<(Range<usize>, Vec<u8>)>) -> Bytes {
    edits.sort_by_key(|(r, _)| r.start);
    let extra: usize = edits.iter().map(|(_, t)| t.len()).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut at = 0;
    for (range, text) in edits {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(&text);
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    Bytes::from(out)
}

/// What serde only skipped is forwarded as is: it must be text an upstream reads too
/// ([`check_text`]).
pub(crate) fn check_body_text(body: &[u8]) -> Result<(), GatewayError> {
    check_text(body).map_err(|why| {
        GatewayError::invalid_json(format!(
            "We could not parse the JSON body of your request: {why}"
        ))
    })
}

/// Deepest nesting of arrays and objects a body may have (serde_json's own default limit;
/// tool schemas nest a few dozen levels at most).
const DEPTH_MAX: usize = 128;

/// Checks what parsing only skipped over (message contents, tools, everything forwarded
/// untouched), on a body the JSON grammar already accepted: UTF-8 throughout, no lone UTF-16
/// surrogate in a `\u` escape, nesting at most [`DEPTH_MAX`]. Upstreams refuse such bodies
/// with errors that would otherwise count against the seller's pool. One pass; strings are
/// crossed by `memchr` from quote or backslash to the next.
fn check_text(body: &[u8]) -> Result<(), &'static str> {
    std::str::from_utf8(body).map_err(|_| "the body is not valid UTF-8")?;
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        i += 1;
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > DEPTH_MAX {
                    return Err("the body nests arrays and objects more than 128 deep");
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'"' => i = string_end(body, i)?,
            _ => {}
        }
    }
    Ok(())
}

/// The index after the string whose contents start at `i`, checking its `\u` escapes.
fn string_end(body: &[u8], mut i: usize) -> Result<usize, &'static str> {
    const LONE: &str = "a string holds a lone UTF-16 surrogate escape";
    loop {
        let at = i + memchr::memchr2(b'"', b'\\', &body[i..]).ok_or("unterminated string")?;
        if body[at] == b'"' {
            return Ok(at + 1);
        }
        // A backslash: the escaped character, or `u` and four hex digits.
        if body.get(at + 1) != Some(&b'u') {
            i = at + 2;
            continue;
        }
        let unit = hex4(body, at + 2).ok_or("bad \\u escape")?;
        i = at + 6;
        match unit {
            0xD800..=0xDBFF => {
                // A high surrogate stands only before a low one.
                let low = (body.get(i..i + 2) == Some(&b"\\u"[..]))
                    .then(|| hex4(body, i + 2))
                    .flatten();
                if !low.is_some_and(|l| (0xDC00..=0xDFFF).contains(&l)) {
                    return Err(LONE);
                }
                i += 6;
            }
            0xDC00..=0xDFFF => return Err(LONE),
            _ => {}
        }
    }
}

fn hex4(body: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(body.get(at..at + 4)?).ok()?;
    u16::from_str_radix(digits, 16).ok()
}

/// The body's JSON error, as the client reads it.
pub(crate) fn parse_error(e: serde_json::Error) -> GatewayError {
    let msg = e.to_string();
    if msg.starts_with("Unrecognized request argument") || msg.starts_with("duplicate field") {
        // Strip serde's " at line 1 column N" suffix for the SDK user.
        let head = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
        GatewayError::bad_request(head)
    } else {
        GatewayError::invalid_json(format!(
            "We could not parse the JSON body of your request: {msg}"
        ))
    }
}

pub(crate) fn model_name(raw: &RawValue) -> Result<Cow<'_, str>, GatewayError> {
    let model: Cow<'_, str> = serde_json::from_str(raw.get())
        .map_err(|_| GatewayError::bad_field("model", "`model` must be a string."))?;
    if model.is_empty() {
        return Err(GatewayError::bad_field(
            "model",
            "`model` must not be empty.",
        ));
    }
    Ok(model)
}

fn check_messages(messages: Option<MessagesCheck>) -> Result<(), GatewayError> {
    let messages = messages.ok_or_else(|| {
        GatewayError::bad_field("messages", "Missing required parameter: 'messages'.")
    })?;
    if let Some(problem) = messages.problem {
        return Err(GatewayError::bad_field("messages", problem));
    }
    if messages.count == 0 {
        return Err(GatewayError::bad_field(
            "messages",
            "`messages` must not be empty.",
        ));
    }
    Ok(())
}

/// Whether the client itself asked for the usage chunk (`stream_options.include_usage`).
fn client_include_usage(raw: Option<&RawValue>, stream: bool) -> Result<bool, GatewayError> {
    let Some(raw) = raw.filter(|r| r.get() != "null") else {
        return Ok(false);
    };
    if !stream {
        return Err(GatewayError::bad_field(
            "stream_options",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ));
    }
    let opts: StreamOptions = serde_json::from_str(raw.get()).map_err(|_| {
        GatewayError::bad_field(
            "stream_options",
            "`stream_options` must be an object with boolean `include_usage` and `include_obfuscation`.",
        )
    })?;
    Ok(opts.include_usage.unwrap_or(false))
}

/// A sampling parameter: a number in `min..=max` when present.
fn check_range(
    raw: Option<&RawValue>,
    param: &'static str,
    range: std::ops::RangeInclusive<f64>,
    what: &str,
) -> Result<(), GatewayError> {
    match typed::<f64>(raw, param, what)? {
        Some(v) if !range.contains(&v) => Err(GatewayError::bad_field(
            param,
            format!("`{param}` must be {what}."),
        )),
        _ => Ok(()),
    }
}

/// A string parameter, borrowed from the body when it has no escapes.
pub(crate) fn text_field<'a>(
    raw: Option<&'a RawValue>,
    param: &'static str,
) -> Result<Option<Cow<'a, str>>, GatewayError> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => serde_json::from_str::<Cow<'a, str>>(r.get())
            .map(Some)
            .map_err(|_| GatewayError::bad_field(param, format!("`{param}` must be a string."))),
    }
}

pub(crate) fn typed<T: serde::de::DeserializeOwned>(
    raw: Option<&RawValue>,
    param: &'static str,
    what: &str,
) -> Result<Option<T>, GatewayError> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => serde_json::from_str(r.get())
            .map(Some)
            .map_err(|_| GatewayError::bad_field(param, format!("`{param}` must be {what}."))),
    }
}

/// Byte range of a borrowed JSON value inside the body it was parsed from.
pub(crate) fn span_of(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

pub(crate) fn json_string(s: &str) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_else(|_| b"\"\"".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ChatRequest<'_>, GatewayError> {
        ChatRequest::parse(body.as_bytes())
    }

    fn rewrite(body: &str, upstream_model: &str) -> serde_json::Value {
        let bytes = Bytes::from(body.to_owned());
        let req = ChatRequest::parse(&bytes).unwrap();
        serde_json::from_slice(&req.upstream_body(&bytes, upstream_model)).unwrap()
    }

    /// A body whose first message's content is `content` (raw JSON).
    fn with_content(content: &[u8]) -> Vec<u8> {
        let mut body = br#"{"model":"m","messages":[{"role":"user","content":"#.to_vec();
        body.extend_from_slice(content);
        body.extend_from_slice(b"}]}");
        body
    }

    #[test]
    fn what_parsing_skips_is_checked_too_surrogates_utf8_and_depth() {
        let nested = |depth: usize| {
            with_content(format!("{}1{}", "[".repeat(depth), "]".repeat(depth)).as_bytes())
        };
        let mut not_utf8 = br#""a"#.to_vec();
        not_utf8.extend_from_slice(&[0xff, 0xfe, b'"']);
        let refused: [(&str, Vec<u8>); 7] = [
            ("lone high surrogate", with_content(br#""a\ud800b""#)),
            ("lone low surrogate", with_content(br#""\udc00""#)),
            ("high then not a low", with_content(br#""\ud800\u0041""#)),
            ("high at the end", with_content(br#""x\uD83D""#)),
            ("invalid UTF-8", with_content(&not_utf8)),
            ("100,000 deep", nested(100_000)),
            // Nesting counts from the body: it, the message array and the message are three.
            ("one too deep", nested(DEPTH_MAX - 2)),
        ];
        for (what, body) in refused {
            let e = ChatRequest::parse(&body).map(|_| ()).expect_err(what);
            assert_eq!(e.status(), 400, "{what}");
            assert_eq!(e.code(), Some("invalid_json"), "{what}: {}", e.message());
        }
        // A surrogate pair, other escapes, quotes and brackets inside strings, and nesting up
        // to the limit are fine.
        let deepest = nested(DEPTH_MAX - 3);
        let accepted: [&[u8]; 4] = [
            br#""\ud83d\ude00 \" [[[{{ \\ \n \u00e9""#,
            "\"caf\u{e9} \u{1f600}\"".as_bytes(),
            br#"[{"type":"text","text":"]]]}}}"}]"#,
            &deepest,
        ];
        for (i, content) in accepted.into_iter().enumerate() {
            let body = if i == 3 {
                content.to_vec()
            } else {
                with_content(content)
            };
            assert!(
                ChatRequest::parse(&body).is_ok(),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn reads_the_fields_it_needs() {
        let r = parse(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":7,"stream_options":{"include_usage":true},"tools":[]}"#).unwrap();
        assert_eq!(r.model, "m");
        assert!(r.stream && r.client_include_usage);
        assert_eq!(r.max_output_tokens, Some(7));
    }

    #[test]
    fn rejects_bad_input_with_the_param_named() {
        let cases = [
            ("not json", None, "invalid_json"),
            ("[1,2]", None, "invalid_json"),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
                "invalid_value",
            ),
            (
                r#"{"model":3,"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
                "invalid_value",
            ),
            (r#"{"model":"m"}"#, Some("messages"), "invalid_value"),
            (
                r#"{"model":"m","messages":[]}"#,
                Some("messages"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"role":5,"content":"x"}]}"#,
                Some("messages"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"role":{"a":[1]}},"user"]}"#,
                Some("messages"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":{"role":"user"}}"#,
                Some("messages"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"content":"x"}]}"#,
                Some("messages"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
                Some("messages"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#,
                Some("stream"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":-1}"#,
                Some("max_tokens"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"n":0}"#,
                Some("n"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"temperature":9}"#,
                Some("temperature"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"stream_options":{"include_usage":true}}"#,
                Some("stream_options"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"stream":true,"stream_options":{"x":1}}"#,
                Some("stream_options"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"bogus":1}"#,
                None,
                "invalid_request",
            ),
            (
                r#"{"model":"m","model":"n","messages":[{"role":"user"}]}"#,
                None,
                "invalid_request",
            ),
        ];
        for (body, param, code) in cases {
            let e = parse(body).expect_err(body);
            assert_eq!(e.status(), 400, "{body}");
            assert_eq!(e.param(), param, "{body}");
            assert_eq!(e.code(), Some(code), "{body}: {}", e.message());
        }
        let e = parse(r#"{"model":"m","messages":[{"role":"user"}],"bogus":1}"#).unwrap_err();
        assert_eq!(e.message(), "Unrecognized request argument supplied: bogus");
    }

    #[test]
    fn injects_include_usage_for_streams_and_keeps_everything_else() {
        let v = rewrite(
            r#" {"model":"m","messages":[{"role":"user","content":"é\"x"}],"stream":true}"#,
            "m",
        );
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["content"], "é\"x");
        let v = rewrite(
            r#"{"model":"m","messages":[{"role":"user"}],"stream":true,"stream_options":{"include_obfuscation":false}}"#,
            "m",
        );
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_obfuscation":false,"include_usage":true})
        );
        let v = rewrite(
            r#"{"model":"m","messages":[{"role":"user"}],"stream":true,"stream_options":{"include_usage":false}}"#,
            "m",
        );
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn renames_the_model_and_leaves_unchanged_bodies_uncopied() {
        let v = rewrite(
            r#"{"messages":[{"role":"user"}],"model":"alias"}"#,
            "real-\"model",
        );
        assert_eq!(v["model"], "real-\"model");
        let bytes = Bytes::from_static(br#"{"model":"m","messages":[{"role":"user"}]}"#);
        let req = ChatRequest::parse(&bytes).unwrap();
        let out = req.upstream_body(&bytes, "m");
        assert_eq!(out.as_ptr(), bytes.as_ptr());
    }
}
