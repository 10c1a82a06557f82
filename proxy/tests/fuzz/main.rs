//! Fuzzing on stable, with proptest: every parser that reads bytes from outside — the SSE relay
//! and each provider's stream translator (Bedrock's binary event stream included), each
//! provider's whole-body translator, the chat body parser with each provider's request
//! translation, the translation lanes (Anthropic Messages and Responses, both ways) and the
//! Responses relay, and the configuration loader — is fed inputs made from the committed corpus
//! (`tests/fuzz/corpus/`) by random edits, or plain random bytes, split at random points.
//!
//! Each target checks more than "no panic": streams give the same usage and end whether their
//! bytes arrive whole or in pieces, translated streams send the client only well-formed SSE
//! (`[DONE]` or a JSON object per `data:` line), and refusals are client errors.
//!
//! Budget: `TOKN_FUZZ_CASES` inputs per target (CI: the default, 2,000). The long run:
//! `TOKN_FUZZ_CASES=1000000 cargo test --release -p tokn-proxy --test fuzz -- --nocapture`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use tokn_proxy::chat::ChatRequest;
use tokn_proxy::messages_lane::{self, MessagesFromChat};
use tokn_proxy::providers::StreamTranslator;
use tokn_proxy::providers::{self, ChatCall, Outbound, ProviderAdapter};
use tokn_proxy::relay::{FromChat, StreamTally, ThroughChat};
use tokn_proxy::responses::{ResponseIdCell, ResponsesRelay};
use tokn_proxy::responses_lane::{self, ResponsesFromChat};
use tokn_proxy::usage::Usage;

fn cases() -> u32 {
    std::env::var("TOKN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn corpus(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Bytes that mean something to the parsers: framing, JSON punctuation, escapes, big numbers.
const TOKENS: &[&[u8]] = &[
    b"\n\n",
    b"\r\n",
    b"\n",
    b"data: ",
    b"data:",
    b"event: ",
    b"[DONE]",
    b": ping\n\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b",",
    b":",
    b"null",
    b"-1",
    b"1e309",
    b"18446744073709551616",
    b"\\ud800",
    b"\\u0000",
    b"\xff\xfe",
    b"\"usage\":",
    b"\"choices\":[]",
    b"\"type\":\"message_delta\"",
    b"\"usageMetadata\":{}",
    b"\x00\x00\x00\x10",
];

/// One edit of an input.
#[derive(Debug, Clone)]
enum Edit {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Token(Index, Index),
    Delete(Index, u8),
    Duplicate(Index, u8),
    Truncate(Index),
}

impl Edit {
    fn apply(&self, s: &mut Vec<u8>) {
        let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match self {
            Self::Flip(i, b) if !s.is_empty() => {
                let i = i.index(s.len());
                s[i] ^= b | 1;
            }
            Self::Flip(..) => {}
            Self::Insert(i, bytes) => {
                let i = at(i, s.len());
                s.splice(i..i, bytes.iter().copied());
            }
            Self::Token(i, t) => {
                let i = at(i, s.len());
                let t = TOKENS[t.index(TOKENS.len())];
                s.splice(i..i, t.iter().copied());
            }
            Self::Delete(i, n) => {
                let i = at(i, s.len());
                let end = (i + usize::from(*n)).min(s.len());
                s.drain(i..end);
            }
            Self::Duplicate(i, n) => {
                let i = at(i, s.len());
                let end = (i + usize::from(*n)).min(s.len());
                let copy = s[i..end].to_vec();
                s.splice(end..end, copy);
            }
            Self::Truncate(i) => {
                let i = at(i, s.len());
                s.truncate(i);
            }
        }
    }
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Edit::Token(i, t)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, n)| Edit::Duplicate(i, n)),
        any::<Index>().prop_map(Edit::Truncate),
    ]
}

/// One of `seeds` after a few random edits; now and then random bytes instead.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256),
        6 => (0..n, prop::collection::vec(edit(), 0..6)).prop_map(move |(k, edits)| {
            let mut s = seeds[k].clone();
            for e in &edits {
                e.apply(&mut s);
            }
            s
        }),
    ]
}

/// Cut points for feeding an input in pieces.
fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..6)
}

fn pieces<'a>(input: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
    at.push(0);
    at.push(input.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &input[w[0]..w[1]]).collect()
}

/// Runs `test` on `cases()` inputs from `strategy`; a failure panics with the smallest input
/// proptest found.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{name}: {e}");
    }
    eprintln!("{name}: {n} inputs, no failure, {:.1?}", started.elapsed());
}

/// Builds one provider's adapter.
type MakeAdapter = fn() -> Box<dyn ProviderAdapter>;

fn adapter(credential: Value) -> Box<dyn ProviderAdapter> {
    providers::adapter(&serde_json::from_value(credential).unwrap()).unwrap()
}

fn openai() -> Box<dyn ProviderAdapter> {
    adapter(json!({"provider": "openai", "api_key": "sk-fuzz"}))
}
fn azure() -> Box<dyn ProviderAdapter> {
    adapter(
        json!({"provider": "azure", "endpoint": "https://fuzz.openai.azure.com", "api_key": "k"}),
    )
}
fn anthropic() -> Box<dyn ProviderAdapter> {
    adapter(json!({"provider": "anthropic", "api_key": "sk-ant-fuzz"}))
}
fn gemini() -> Box<dyn ProviderAdapter> {
    adapter(json!({"provider": "gemini", "api_key": "fuzz"}))
}
fn bedrock() -> Box<dyn ProviderAdapter> {
    adapter(json!({"provider": "bedrock", "region": "us-east-1",
        "access_key_id": "AKIDFUZZ", "secret_access_key": "fuzz"}))
}

/// Feeds `input` to a fresh translator in `parts`: what the client got, the tally, whether the
/// framing failed.
fn translate(make: &MakeTranslator, parts: &[&[u8]]) -> (Vec<u8>, StreamTally, bool) {
    let mut t = make();
    let mut out = Vec::new();
    for part in parts {
        match t.feed(part) {
            Ok(b) => out.extend_from_slice(&b),
            Err(_) => return (out, *t.tally(), true),
        }
    }
    out.extend_from_slice(&t.finish());
    (out, *t.tally(), false)
}

/// Every `data:` line of a translated stream is `[DONE]` or a JSON object.
fn well_formed_sse(out: &[u8]) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(out);
    for line in text.lines() {
        if let Some(data) = line.strip_prefix("data: ") {
            if data != "[DONE]" {
                let v: Result<Value, _> = serde_json::from_str(data);
                prop_assert!(
                    v.as_ref().is_ok_and(Value::is_object),
                    "not a JSON object: {data}"
                );
            }
        }
    }
    Ok(())
}

/// A fresh stream translator per input.
type MakeTranslator = dyn Fn() -> Box<dyn StreamTranslator>;
/// A translation lane, new for each input.
type MakeLane = fn() -> Box<dyn FromChat>;
/// A lane's client request made a chat request, or the status refusing it.
type ToChat = fn(&[u8]) -> Result<(), u16>;

/// The stream target: same tally whole or in pieces; translated output well-formed.
fn stream_target(
    name: &str,
    make: fn() -> Box<dyn ProviderAdapter>,
    seeds: Vec<Vec<u8>>,
    translated: bool,
) {
    let adapter = make();
    translator_target(
        name,
        &move || adapter.stream_translator(false, "fuzz-model"),
        seeds,
        translated,
    );
}

fn translator_target(name: &str, make: &MakeTranslator, seeds: Vec<Vec<u8>>, translated: bool) {
    fuzz(name, (mutated(seeds), cuts()), |(input, cuts)| {
        let (whole_out, whole, whole_failed) = translate(make, &[&input]);
        let (split_out, split, split_failed) = translate(make, &pieces(&input, &cuts));
        if !whole_failed && !split_failed {
            prop_assert_eq!(whole, split, "usage or end differs with the cuts");
            if !translated {
                prop_assert_eq!(&whole_out, &split_out);
            }
        }
        if translated {
            well_formed_sse(&whole_out)?;
            well_formed_sse(&split_out)?;
        }
        Ok(())
    });
}

#[test]
fn the_openai_sse_relay() {
    stream_target("openai stream", openai, vec![corpus("openai.sse")], false);
}

#[test]
fn the_azure_stream() {
    stream_target("azure stream", azure, vec![corpus("openai.sse")], false);
}

#[test]
fn the_anthropic_stream_translator() {
    stream_target(
        "anthropic stream",
        anthropic,
        vec![corpus("anthropic.sse")],
        true,
    );
}

#[test]
fn the_gemini_stream_translator() {
    stream_target("gemini stream", gemini, vec![corpus("gemini.sse")], true);
}

/// Bedrock's stream is AWS event-stream frames: the corpus holds their events (one JSON object
/// a line; not `.jsonl`, a name the repository ignores for usage logs); the seeds are
/// the frames encoded, whole and one by one.
#[test]
fn the_bedrock_event_stream_decoder_and_translator() {
    let mut all = Vec::new();
    let mut seeds = Vec::new();
    for line in String::from_utf8(corpus("bedrock-events.txt"))
        .unwrap()
        .lines()
    {
        let event: Value = serde_json::from_str(line).unwrap();
        let frame = tokn_testkit::fake_bedrock::encode_frame(
            &[
                (":event-type", event["event"].as_str().unwrap()),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            event["payload"].to_string().as_bytes(),
        );
        all.extend_from_slice(&frame);
        seeds.push(frame.to_vec());
    }
    seeds.push(all);
    stream_target("bedrock stream", bedrock, seeds, true);
}

/// The translation lanes' streams: an OpenAI chat stream made Anthropic Messages events or
/// Responses events (through the chat translator that counts usage), and the Responses
/// pass-through relay of an upstream that speaks Responses.
#[test]
fn the_lane_stream_translators() {
    let lanes: [(&str, MakeLane); 2] = [
        ("messages lane stream", || {
            Box::new(MessagesFromChat::new("fuzz-model"))
        }),
        ("responses lane stream", || {
            Box::new(ResponsesFromChat::new("fuzz-model", Vec::new()))
        }),
    ];
    for (name, lane) in lanes {
        let adapter = openai();
        translator_target(
            name,
            &move || {
                Box::new(ThroughChat::new(
                    adapter.stream_translator(false, "fuzz-model"),
                    lane(),
                ))
            },
            vec![corpus("openai.sse")],
            true,
        );
    }
    translator_target(
        "responses relay",
        &|| Box::new(ResponsesRelay::new(ResponseIdCell::default())),
        vec![corpus("responses.sse")],
        false,
    );
}

/// The lanes' bodies: a client's Messages or Responses request made a chat request (or refused
/// with a client error), and a whole chat completion made the lane's answer (a JSON object).
#[test]
fn the_lane_body_translators() {
    let requests: [(&str, &str, ToChat); 2] = [
        ("messages lane request", "messages.json", |b| {
            messages_lane::chat_body(b)
                .map(drop)
                .map_err(|e| e.status())
        }),
        ("responses lane request", "responses.json", |b| {
            responses_lane::chat_body(b)
                .map(drop)
                .map_err(|e| e.status())
        }),
    ];
    for (name, seed, to_chat) in requests {
        fuzz(name, mutated(vec![corpus(seed)]), |input| {
            if let Err(status) = to_chat(&input) {
                prop_assert!((400..500).contains(&status), "{status}");
            }
            Ok(())
        });
    }
    let lanes: [(&str, Box<dyn FromChat>); 2] = [
        (
            "messages lane answer",
            Box::new(MessagesFromChat::new("fuzz-model")),
        ),
        (
            "responses lane answer",
            Box::new(ResponsesFromChat::new("fuzz-model", Vec::new())),
        ),
    ];
    for (name, lane) in lanes {
        fuzz(name, mutated(vec![corpus("openai.json")]), |input| {
            if let Ok(body) = lane.whole(&input, &Usage::default()) {
                let v: Result<Value, _> = serde_json::from_slice(&body);
                prop_assert!(v.is_ok_and(|v| v.is_object()), "not a JSON object");
            }
            Ok(())
        });
    }
}

/// Whole (non-streaming) bodies through each provider's translator: a body relayed as is
/// (OpenAI's format) is at least UTF-8 text; a translated one is a JSON object.
#[test]
fn the_whole_body_translators() {
    let targets: [(&str, MakeAdapter, &str, bool); 5] = [
        ("openai body", openai, "openai.json", false),
        ("azure body", azure, "openai.json", false),
        ("anthropic body", anthropic, "anthropic.json", true),
        ("gemini body", gemini, "gemini.json", true),
        ("bedrock body", bedrock, "bedrock.json", true),
    ];
    for (name, make, seed, translated) in targets {
        let adapter = make();
        fuzz(name, mutated(vec![corpus(seed)]), |input| {
            if let Ok((body, _usage)) = adapter.complete_body(Bytes::from(input), "fuzz-model") {
                if translated {
                    let v: Result<Value, _> = serde_json::from_slice(&body);
                    prop_assert!(v.is_ok_and(|v| v.is_object()), "not a JSON object");
                } else {
                    prop_assert!(
                        std::str::from_utf8(&body).is_ok(),
                        "relayed body is not UTF-8"
                    );
                }
            }
            Ok(())
        });
    }
}

/// Client bodies: parsed (or refused with a client error), then translated for every provider.
#[test]
fn the_chat_body_parser_and_request_translators() {
    let adapters = [openai(), azure(), anthropic(), gemini(), bedrock()];
    fuzz("chat body", mutated(vec![corpus("chat.json")]), |input| {
        let body = Bytes::from(input);
        match ChatRequest::parse(&body) {
            Err(e) => prop_assert!((400..500).contains(&e.status()), "{}", e.status()),
            Ok(req) => {
                for a in &adapters {
                    let call = ChatCall {
                        req: &req,
                        body: &body,
                        upstream_model: "fuzz-model",
                        request_id: "req_fuzz",
                    };
                    match a.chat_request(&call) {
                        Ok(Outbound::Http { body, .. }) => {
                            let v: Result<Value, _> = serde_json::from_slice(&body);
                            prop_assert!(v.is_ok(), "the upstream body is not JSON");
                        }
                        Ok(Outbound::Local(_)) => {}
                        Err(e) => prop_assert!((400..500).contains(&e.status()), "{}", e.status()),
                    }
                }
            }
        }
        Ok(())
    });
}

/// The configuration loader: any text is a configuration or a list of problems.
#[test]
fn the_configuration_loader() {
    let seed = tokn_config::DEFAULT_CONFIG_TOML.as_bytes().to_vec();
    fuzz("config", mutated(vec![seed]), |input| {
        let text = String::from_utf8_lossy(&input);
        let _ = tokn_config::load(&text, Vec::<(String, String)>::new(), &|_| None);
        Ok(())
    });
}
