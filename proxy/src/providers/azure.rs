//! Azure OpenAI: OpenAI's Chat Completions wire format behind Azure's addressing, key header and
//! content filters.
//!
//! Requests and complete bodies are OpenAI's (the OpenAI adapter's functions build and read them);
//! what differs is where a request goes (see [`AzureTarget`]), the `api-key` header (prepared in
//! the snapshot), streams that carry content-filter annotations OpenAI clients do not expect, and
//! Azure's error bodies (`{"error":{"code","message","status","innererror"}}`).

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokn_config::credential::AzureCredential;

use super::openai::{self, ErrorFields};
use super::translate::{json_post_header, push_path_segment};
use super::{
    ChatCall, CredentialHeader, EmbeddingsCall, FailureClass, Outbound, ProviderAdapter,
    ResponsesCall, StreamTally, StreamTranslator,
};
use crate::error::GatewayError;
use crate::relay::{event_data, find_event_end, FramingError, SseRelay, SSE_EVENT_BYTES_MAX};
use crate::upstream::Endpoint;

/// `api_version = "v1"` selects the `/openai/v1/` surface.
const V1_SURFACE: &str = "v1";

/// Bodies are OpenAI's (Azure adds filter results OpenAI clients ignore), and so are error
/// bodies, whose `code` may be a number and whose `innererror` (the content filter's verdict)
/// the client keeps: the trait's OpenAI defaults read them. Streams are cleaned (`AzureStream`).
pub struct AzureAdapter {
    endpoint: Endpoint,
    key: CredentialHeader,
    route: AzureRoute,
}

impl AzureAdapter {
    pub fn new(c: &AzureCredential) -> Result<Self, String> {
        let endpoint = Endpoint::new(&c.endpoint).map_err(|e| e.replace("base_url", "endpoint"))?;
        Ok(Self {
            route: AzureRoute::new(
                &endpoint.url.base_path,
                c.deployment.as_deref(),
                c.api_version(),
            ),
            endpoint,
            key: CredentialHeader::new("api-key", c.api_key.expose())?,
        })
    }
}

/// Where an Azure pool's chat requests go, prepared once per pool. With `root` the resource
/// endpoint's path (usually empty):
///
/// - deployments surface (`api_version` a date, default `2024-10-21`):
///   `POST {root}/openai/deployments/{deployment}/chat/completions?api-version={version}`;
/// - v1 surface (`api_version = "v1"`): `POST {root}/openai/v1/chat/completions`, with the
///   deployment as the body's `model`.
///
/// The deployment is the credential's `deployment`, or else the model's upstream name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AzureRoute {
    /// The configured deployment (`None`: the model's upstream name, per request).
    deployment: Option<String>,
    /// `{root}/openai/v1/` on the v1 surface, `{root}/openai/deployments/` on the other.
    prefix: String,
    /// `?api-version=…` after the operation on the deployments surface; `None` on v1.
    version_query: Option<String>,
    /// The chat path when it does not depend on the model (the hot path's, built once).
    fixed_chat_path: Option<String>,
    /// The Responses API's path: `{root}/openai/v1/responses`, or on the deployments surface
    /// `{root}/openai/responses?api-version=…` (no deployment in the path: it is the body's
    /// `model`).
    responses_path: String,
}

impl AzureRoute {
    /// `base_path`: the endpoint's path; a trailing `/openai` or `/openai/v1` (as in URLs
    /// copied from Azure's portal) names the same resource root.
    fn new(base_path: &str, deployment: Option<&str>, version: &str) -> Self {
        let root = base_path
            .strip_suffix("/openai/v1")
            .or_else(|| base_path.strip_suffix("/openai"))
            .unwrap_or(base_path);
        let v1 = version == V1_SURFACE;
        let mut route = Self {
            deployment: deployment.map(str::to_owned),
            prefix: if v1 {
                format!("{root}/openai/v1/")
            } else {
                format!("{root}/openai/deployments/")
            },
            version_query: (!v1).then(|| format!("?api-version={version}")),
            fixed_chat_path: None,
            responses_path: if v1 {
                format!("{root}/openai/v1/responses")
            } else {
                format!("{root}/openai/responses?api-version={version}")
            },
        };
        if v1 || deployment.is_some() {
            route.fixed_chat_path = Some(route.route_to("", CHAT).0.into_owned());
        }
        route
    }

    /// The chat path and the body's `model` for a request to `upstream_model`.
    fn route<'a>(&'a self, upstream_model: &'a str) -> (Cow<'a, str>, &'a str) {
        match &self.fixed_chat_path {
            Some(path) => (
                Cow::Borrowed(path.as_str()),
                self.deployment.as_deref().unwrap_or(upstream_model),
            ),
            None => self.route_to(upstream_model, CHAT),
        }
    }

    /// The path of `operation` (`chat/completions`, `embeddings`) and the body's `model`.
    fn route_to<'a>(&'a self, upstream_model: &'a str, operation: &str) -> (Cow<'a, str>, &'a str) {
        let deployment = self.deployment.as_deref().unwrap_or(upstream_model);
        let path = match &self.version_query {
            None => format!("{}{operation}", self.prefix),
            Some(query) => format!("{}{}/{operation}{query}", self.prefix, encode(deployment)),
        };
        (Cow::Owned(path), deployment)
    }
}

/// The chat operation's path.
const CHAT: &str = "chat/completions";

/// A deployment name as a path segment: Azure's names are letters, digits, `-`, `_` and `.`;
/// anything else (from a model's upstream name) is percent-encoded.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    push_path_segment(&mut out, segment);
    out
}

impl AzureAdapter {
    /// A POST of `body` to `path` with the pool's key.
    fn post(&self, path: &str, body: Bytes) -> Result<Outbound<'_>, GatewayError> {
        let header = json_post_header(path, &self.endpoint, Some(&self.key), &[], body.len())?;
        Ok(Outbound::Http {
            endpoint: &self.endpoint,
            header: Box::new(header),
            body,
        })
    }
}

impl ProviderAdapter for AzureAdapter {
    fn chat_request(&self, call: &ChatCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let (path, deployment) = self.route.route(call.upstream_model);
        self.post(&path, call.req.upstream_body(call.body, deployment))
    }

    fn stream_translator(
        &self,
        hide_usage_chunk: bool,
        _upstream_model: &str,
    ) -> Box<dyn StreamTranslator> {
        Box::new(AzureStream::new(hide_usage_chunk))
    }

    /// Azure serves OpenAI's Responses API: passed through, the deployment as `model`.
    fn serves_responses(&self) -> bool {
        true
    }

    fn responses_request(&self, call: &ResponsesCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let deployment = self.route.deployment.as_deref();
        let body = call
            .req
            .upstream_body(call.body, deployment.unwrap_or(call.upstream_model));
        self.post(&self.route.responses_path, body)
    }

    /// Embedding deployments take OpenAI's body on the same surfaces as chat.
    fn serves_embeddings(&self, _upstream_model: &str) -> bool {
        true
    }

    fn embeddings_request(&self, call: &EmbeddingsCall<'_>) -> Result<Outbound<'_>, GatewayError> {
        let (path, deployment) = self.route.route_to(call.upstream_model, "embeddings");
        self.post(&path, call.req.upstream_body(call.body, deployment))
    }

    fn classify_failure(
        &self,
        status: u16,
        _error_type: Option<&str>,
        body: &[u8],
    ) -> FailureClass {
        let code = ErrorFields::parse(body).code_text();
        match (status, code.as_deref()) {
            // The pool is configured to serve the model; its resource has no such deployment.
            (404, Some("DeploymentNotFound")) => FailureClass::Credential,
            (400, Some("content_filter")) => FailureClass::Request,
            _ => openai::classify(status, body),
        }
    }
}

// === Streams ===

/// Azure's chat stream made OpenAI-clean, then relayed by the OpenAI relay (usage, `[DONE]`,
/// the hidden usage chunk). Azure adds chunks OpenAI clients trip over: the first one carries
/// only `prompt_filter_results` with `choices: []` (and empty `id`/`model`), and asynchronous
/// filtering adds choices with `content_filter_results` but no `delta`. Chunks with nothing but
/// filter results are dropped; choices without a `delta` are dropped, or given an empty one when
/// they carry a `finish_reason`. Every other event passes byte for byte.
pub struct AzureStream {
    pending: BytesMut,
    relay: SseRelay,
}

#[derive(Deserialize)]
struct ChunkShape<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceShape<'a>>>,
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChoiceShape<'a> {
    #[serde(default, borrow)]
    delta: Option<&'a RawValue>,
}

enum Clean {
    Keep,
    Drop,
    Replace(Vec<u8>),
}

impl AzureStream {
    pub fn new(hide_usage_chunk: bool) -> Self {
        Self {
            pending: BytesMut::new(),
            relay: SseRelay::new(hide_usage_chunk),
        }
    }

    /// One complete event (with its terminating blank line) into `out`, cleaned.
    fn push_event(out: &mut BytesMut, event: &[u8], content_end: usize) {
        match clean(&event[..content_end]) {
            Clean::Keep => out.extend_from_slice(event),
            Clean::Drop => {}
            Clean::Replace(data) => {
                out.put_slice(b"data: ");
                out.put_slice(&data);
                out.put_slice(b"\n\n");
            }
        }
    }
}

/// What to do with one event's content.
fn clean(event: &[u8]) -> Clean {
    let Some(data) = event_data(event) else {
        return Clean::Keep;
    };
    let Ok(chunk) = serde_json::from_slice::<ChunkShape<'_>>(&data) else {
        // `[DONE]`, or not a chunk (an error object): the relay passes it on.
        return Clean::Keep;
    };
    if chunk.error.is_some() {
        return Clean::Keep;
    }
    let choices = chunk.choices.unwrap_or_default();
    if choices.is_empty() {
        // The usage chunk is OpenAI's; a chunk with only `prompt_filter_results` is Azure's.
        return if chunk.usage.is_some() {
            Clean::Keep
        } else {
            Clean::Drop
        };
    }
    if choices.iter().all(|c| c.delta.is_some()) {
        return Clean::Keep;
    }
    let Ok(mut whole) = serde_json::from_slice::<Map<String, Value>>(&data) else {
        return Clean::Keep;
    };
    let kept: Vec<Value> = match whole.remove("choices") {
        Some(Value::Array(list)) => list
            .into_iter()
            .filter_map(|mut choice| {
                let obj = choice.as_object_mut()?;
                if obj.get("delta").is_some_and(|d| !d.is_null()) {
                    return Some(choice);
                }
                if obj.get("finish_reason").is_some_and(|f| !f.is_null()) {
                    obj.insert("delta".into(), json!({}));
                    return Some(choice);
                }
                None
            })
            .collect(),
        _ => Vec::new(),
    };
    if kept.is_empty() && chunk.usage.is_none() {
        return Clean::Drop;
    }
    whole.insert("choices".into(), Value::Array(kept));
    match serde_json::to_vec(&whole) {
        Ok(data) => Clean::Replace(data),
        Err(_) => Clean::Drop,
    }
}

impl StreamTranslator for AzureStream {
    fn feed(&mut self, input: &[u8]) -> Result<Bytes, FramingError> {
        self.pending.extend_from_slice(input);
        let mut out = BytesMut::with_capacity(self.pending.len());
        while let Some((content_end, next)) = find_event_end(&self.pending) {
            let event = self.pending.split_to(next);
            Self::push_event(&mut out, &event, content_end);
        }
        if self.pending.len() > SSE_EVENT_BYTES_MAX {
            return Err(FramingError);
        }
        self.relay.feed(&out)
    }

    fn finish(&mut self) -> Bytes {
        let rest = self.pending.split();
        let mut out = BytesMut::new();
        if !rest.is_empty() {
            match clean(&rest) {
                Clean::Keep => out.extend_from_slice(&rest),
                Clean::Drop => {}
                Clean::Replace(data) => {
                    out.put_slice(b"data: ");
                    out.put_slice(&data);
                    out.put_slice(b"\n\n");
                }
            }
        }
        let mut sent = BytesMut::new();
        if let Ok(now) = self.relay.feed(&out) {
            sent.extend_from_slice(&now);
        }
        sent.extend_from_slice(&self.relay.finish());
        sent.freeze()
    }

    fn tally(&self) -> &StreamTally {
        self.relay.tally()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::client_error;
    use crate::usage::Usage;

    #[test]
    fn builds_the_url_of_each_surface() {
        let t = AzureRoute::new("", Some("gpt4o-prod"), AzureCredential::API_VERSION_DEFAULT);
        assert_eq!(
            t.route("gpt-4o"),
            (
                "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21".into(),
                "gpt4o-prod"
            )
        );
        let t = AzureRoute::new("/openai", None, "2025-04-01-preview");
        assert_eq!(
            t.route("gpt-4o-mini"),
            (
                "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2025-04-01-preview"
                    .into(),
                "gpt-4o-mini"
            )
        );
        assert_eq!(
            t.route("a b/c").0,
            "/openai/deployments/a%20b%2Fc/chat/completions?api-version=2025-04-01-preview"
        );
        assert_eq!(
            t.route_to("emb", "embeddings"),
            (
                "/openai/deployments/emb/embeddings?api-version=2025-04-01-preview".into(),
                "emb"
            )
        );
        assert_eq!(
            AzureRoute::new("", Some("d"), "v1").route_to("x", "embeddings"),
            ("/openai/v1/embeddings".into(), "d")
        );
        assert_eq!(
            AzureRoute::new("/openai", None, "2025-04-01-preview").responses_path,
            "/openai/responses?api-version=2025-04-01-preview"
        );
        assert_eq!(
            AzureRoute::new("", None, "v1").responses_path,
            "/openai/v1/responses"
        );
        for base in ["", "/openai", "/openai/v1"] {
            let t = AzureRoute::new(base, Some("dep"), "v1");
            assert_eq!(
                t.route("gpt-4o"),
                ("/openai/v1/chat/completions".into(), "dep")
            );
        }
        let t = AzureRoute::new("/proxy", None, "v1");
        assert_eq!(
            t.route("gpt-4o"),
            ("/proxy/openai/v1/chat/completions".into(), "gpt-4o")
        );
    }

    const STREAM: &str = concat!(
        "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{\"prompt_index\":0,\"content_filter_results\":{\"hate\":{\"filtered\":false,\"severity\":\"safe\"}}}]}\n\n",
        "data: {\"choices\":[{\"content_filter_results\":{},\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null,\"index\":0}],\"created\":1,\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"content_filter_results\":{\"hate\":{\"filtered\":false,\"severity\":\"safe\"}},\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null,\"index\":0}],\"created\":1,\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"content_filter_offsets\":{\"check_offset\":0,\"start_offset\":0,\"end_offset\":2},\"content_filter_results\":{},\"finish_reason\":null,\"index\":0}],\"created\":1,\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"content_filter_results\":{},\"finish_reason\":\"content_filter\",\"index\":0}],\"created\":1,\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[],\"created\":1,\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":15,\"total_tokens\":35,\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n",
        "data: [DONE]\n\n",
    );

    fn run(hide: bool, piece: usize) -> (Vec<Value>, String, AzureStream) {
        let mut s = AzureStream::new(hide);
        let mut out = Vec::new();
        for chunk in STREAM.as_bytes().chunks(piece) {
            out.extend_from_slice(&s.feed(chunk).unwrap());
        }
        out.extend_from_slice(&s.finish());
        let text = String::from_utf8(out).unwrap();
        let chunks = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        (chunks, text, s)
    }

    #[test]
    fn filter_chunks_are_dropped_or_repaired_and_usage_is_counted() {
        for piece in [1, 9, 100, 100_000] {
            let (chunks, text, s) = run(false, piece);
            assert!(text.ends_with("data: [DONE]\n\n"));
            assert!(!text.contains("prompt_filter_results"), "{text}");
            assert!(!text.contains("content_filter_offsets"), "{text}");
            assert_eq!(chunks.len(), 4, "{text}");
            for c in &chunks[..3] {
                assert_eq!(c["id"], "chatcmpl-1");
                assert!(c["choices"][0]["delta"].is_object(), "{c}");
            }
            assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hi");
            assert_eq!(chunks[2]["choices"][0]["finish_reason"], "content_filter");
            assert_eq!(
                s.usage(),
                Some(Usage {
                    prompt_tokens: 20,
                    completion_tokens: 15,
                    cached_tokens: 4,
                    cache_write_tokens: 0,
                    cache_write_1h_tokens: 0,
                    reasoning_tokens: 2
                })
            );
            assert!(s.is_done());
            assert_eq!(s.generated_bytes(), 2);
        }
        let (chunks, text, _) = run(true, 7);
        assert_eq!(chunks.len(), 3);
        assert!(!text.contains("prompt_tokens"));
    }

    #[test]
    fn an_unterminated_last_event_is_cleaned_too() {
        let mut s = AzureStream::new(false);
        let first = s
            .feed(b"data: {\"choices\":[],\"prompt_filter_results\":[]}")
            .unwrap();
        assert!(first.is_empty());
        assert!(s.finish().is_empty());
        let mut s = AzureStream::new(false);
        assert!(s
            .feed(b"data: {\"error\":{\"message\":\"x\"}}")
            .unwrap()
            .is_empty());
        assert_eq!(&s.finish()[..], b"data: {\"error\":{\"message\":\"x\"}}");
    }

    #[test]
    fn maps_azure_errors() {
        let a = AzureAdapter::new(&AzureCredential {
            endpoint: "https://r.openai.azure.com".into(),
            api_key: tokn_config::Secret::new("k"),
            deployment: None,
            api_version: None,
        })
        .unwrap();
        let filtered = br#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy.","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":true,"severity":"high"}}}}}"#;
        assert_eq!(
            a.classify_failure(400, None, filtered),
            FailureClass::Request
        );
        let (status, body) = client_error(&a, 400, None, filtered);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], "content_filter");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "prompt");
        assert_eq!(
            body["error"]["innererror"]["code"],
            "ResponsibleAIPolicyViolation"
        );

        let denied = br#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}"#;
        assert_eq!(
            a.classify_failure(401, None, denied),
            FailureClass::Credential
        );
        assert_eq!(a.classify_failure(403, None, b""), FailureClass::Credential);
        let (_, body) = client_error(&a, 401, None, denied);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["type"], "authentication_error");
        assert_eq!(body["error"]["code"], "401");

        let missing = br#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#;
        assert_eq!(
            a.classify_failure(404, None, missing),
            FailureClass::Credential
        );
        let throttled = br#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded the rate limit. Please retry after 6 seconds."}}"#;
        assert_eq!(
            a.classify_failure(429, None, throttled),
            FailureClass::Transient
        );
        assert_eq!(
            a.classify_failure(500, None, b"oops"),
            FailureClass::Transient
        );
        assert_eq!(a.classify_failure(503, None, b""), FailureClass::Transient);
        let numeric = br#"{"error":{"code":400,"message":"bad"}}"#;
        assert_eq!(
            a.classify_failure(400, None, numeric),
            FailureClass::Request
        );
        let (status, body) = client_error(&a, 502, None, b"not json");
        assert_eq!(status, 502);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["type"], "server_error");
    }
}
