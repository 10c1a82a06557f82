//! The one error type of the data plane. It alone decides what a failure becomes on the wire:
//! the HTTP status, the OpenAI error body (whole, or as the SSE event that ends a stream), and
//! the metric label. Adapters describe an upstream's refusal as an [`UpstreamError`]; it is
//! rendered here like every other error.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

/// A failure a buyer sees, rendered as `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayError {
    status: u16,
    kind: ErrorKind,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: Cow<'static, str>,
    /// Seconds a client should wait before retrying (sent as `retry-after`).
    retry_after_s: Option<u64>,
    /// Low-cardinality label for metrics and usage records (never an upstream's own code).
    label: &'static str,
    /// An upstream's own code, param and detail, when the error is its refusal (boxed: errors
    /// travel in every `Result` of the request path).
    upstream: Option<Box<UpstreamFields>>,
}

#[derive(Debug, Clone, PartialEq)]
struct UpstreamFields {
    code: Cow<'static, str>,
    param: Option<Cow<'static, str>>,
    /// A provider's own detail the client keeps (Azure's content-filter `innererror`).
    detail: Option<Value>,
}

/// The OpenAI `error.type` values the gateway uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    Permission,
    NotFound,
    RateLimit,
    /// A buyer key's own requests-per-minute limit (OpenAI's `rate_limit_exceeded`).
    RateLimitExceeded,
    /// A buyer key's spending cap, or a seller's account that cannot pay (`insufficient_quota`).
    InsufficientQuota,
    Server,
    Upstream,
    Timeout,
}

impl ErrorKind {
    const ALL: [Self; 10] = [
        Self::InvalidRequest,
        Self::Authentication,
        Self::Permission,
        Self::NotFound,
        Self::RateLimit,
        Self::RateLimitExceeded,
        Self::InsufficientQuota,
        Self::Server,
        Self::Upstream,
        Self::Timeout,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request_error",
            Self::Authentication => "authentication_error",
            Self::Permission => "permission_error",
            Self::NotFound => "not_found_error",
            Self::RateLimit => "rate_limit_error",
            Self::RateLimitExceeded => "rate_limit_exceeded",
            Self::InsufficientQuota => "insufficient_quota",
            Self::Server => "server_error",
            Self::Upstream => "upstream_error",
            Self::Timeout => "timeout_error",
        }
    }

    /// An OpenAI-format upstream's `error.type`, when it is one of ours.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kind of an upstream refusal that names none: read from its status.
    pub fn of_status(status: u16) -> Self {
        match status {
            401 => Self::Authentication,
            403 => Self::Permission,
            429 => Self::RateLimit,
            500.. => Self::Server,
            _ => Self::InvalidRequest,
        }
    }
}

/// Anthropic's error body, `{"type":"error","error":{"type","message"}}`, its type read from
/// the status as Anthropic's API assigns them (Claude Code retries on 429, 529 and
/// `overloaded_error`).
pub fn anthropic_error_body(status: u16, message: &str) -> Bytes {
    let kind = match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 | 405 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .unwrap_or_default()
}

/// A model name as the client sent it, echoed back bounded and sanitised.
fn shown_model(model: &str) -> String {
    model
        .chars()
        .take(128)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The wire format of the API a request arrived on, which its errors are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// OpenAI's (`/v1/chat/completions`, `/v1/models`).
    #[default]
    OpenAi,
    /// Anthropic's Messages API (`/v1/messages`).
    Anthropic,
}

/// An upstream's refusal of the request as its adapter reads it: OpenAI's error fields, from
/// the provider's own error body. `GatewayError::upstream` renders it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamError {
    pub kind: ErrorKind,
    /// The provider's code, or the OpenAI code for its condition; `upstream_error` when absent.
    pub code: Option<Cow<'static, str>>,
    pub param: Option<Cow<'static, str>>,
    /// The provider's message; a generic one when absent.
    pub message: Option<String>,
    pub detail: Option<Value>,
}

impl UpstreamError {
    pub fn new(kind: ErrorKind, code: &'static str, message: Option<&str>) -> Self {
        Self {
            kind,
            code: Some(Cow::Borrowed(code)),
            param: None,
            message: message.map(str::to_owned),
            detail: None,
        }
    }

    /// A refusal whose body says nothing readable.
    pub fn unreadable(status: u16) -> Self {
        Self {
            kind: ErrorKind::of_status(status),
            code: None,
            param: None,
            message: None,
            detail: None,
        }
    }
}

/// Upstream error messages relayed to clients are cut to this many characters.
const UPSTREAM_MESSAGE_CHARS_MAX: usize = 1000;

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    innererror: Option<&'a Value>,
}

impl GatewayError {
    fn new(
        status: u16,
        kind: ErrorKind,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            kind,
            code: Some(code),
            param: None,
            message: message.into(),
            retry_after_s: None,
            label: code,
            upstream: None,
        }
    }

    fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    fn with_retry_after(mut self, retry_after_s: Option<u64>) -> Self {
        self.retry_after_s = retry_after_s;
        self
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn retry_after_s(&self) -> Option<u64> {
        self.retry_after_s
    }

    pub fn code(&self) -> Option<&str> {
        match &self.upstream {
            Some(u) => Some(&u.code),
            None => self.code,
        }
    }

    pub fn param(&self) -> Option<&str> {
        match &self.upstream {
            Some(u) => u.param.as_deref(),
            None => self.param,
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// An upstream's refusal of the request, as the client gets it. Statuses keep their meaning
    /// for the client: 4xx as they are, 503/504 too, Anthropic's 529 (overloaded) is 503, any
    /// other 5xx is a bad gateway. The message is the provider's, bounded and without control
    /// characters.
    pub fn upstream(status: u16, e: UpstreamError) -> Self {
        let status = match status {
            529 => 503,
            503 | 504 => status,
            500..=599 => 502,
            s => s,
        };
        let message: String = e
            .message
            .as_deref()
            .unwrap_or("The upstream provider rejected the request.")
            .chars()
            .filter(|c| !c.is_control())
            .take(UPSTREAM_MESSAGE_CHARS_MAX)
            .collect();
        Self {
            status,
            kind: e.kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after_s: None,
            label: "upstream_rejected",
            upstream: Some(Box::new(UpstreamFields {
                code: e.code.unwrap_or(Cow::Borrowed("upstream_error")),
                param: e.param,
                detail: e.detail,
            })),
        }
    }

    /// The client went away; nothing can be sent, but the request is still recorded.
    pub fn client_disconnected() -> Self {
        Self::new(
            499,
            ErrorKind::InvalidRequest,
            "client_disconnected",
            "client disconnected",
        )
    }

    pub fn missing_key() -> Self {
        Self::new(
            401,
            ErrorKind::Authentication,
            "missing_api_key",
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
        )
    }

    pub fn invalid_key() -> Self {
        Self::new(
            401,
            ErrorKind::Authentication,
            "invalid_api_key",
            "Incorrect API key provided.",
        )
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, ErrorKind::InvalidRequest, "invalid_request", message)
    }

    pub fn bad_field(param: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, ErrorKind::InvalidRequest, "invalid_value", message).with_param(param)
    }

    pub fn invalid_json(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, ErrorKind::InvalidRequest, "invalid_json", message)
    }

    pub fn body_too_large(limit_bytes: usize) -> Self {
        Self::new(
            413,
            ErrorKind::InvalidRequest,
            "request_too_large",
            format!("The request body is larger than this gateway's limit of {limit_bytes} bytes."),
        )
    }

    pub fn body_timeout() -> Self {
        Self::new(
            408,
            ErrorKind::InvalidRequest,
            "request_timeout",
            "The request body was not received in time.",
        )
    }

    /// OpenAI answers 404 both for models that do not exist and for those the key may not use.
    pub fn model_not_found(model: &str) -> Self {
        let shown = shown_model(model);
        Self::new(
            404,
            ErrorKind::InvalidRequest,
            "model_not_found",
            format!("The model `{shown}` does not exist or you do not have access to it."),
        )
        .with_param("model")
    }

    /// The model exists, but none of its pools serves the API the request came to.
    pub fn not_served_on(model: &str, api: &str) -> Self {
        let shown = shown_model(model);
        Self::new(
            400,
            ErrorKind::InvalidRequest,
            "model_not_served_on_this_api",
            format!("The model `{shown}` is not served on the {api} by this gateway."),
        )
        .with_param("model")
    }

    pub fn route_not_found(method: &str, path: &str) -> Self {
        let path: String = path.chars().take(200).filter(|c| !c.is_control()).collect();
        Self::new(
            404,
            ErrorKind::NotFound,
            "unknown_url",
            format!("Unknown request URL: {method} {path}."),
        )
    }

    pub fn method_not_allowed(method: &str) -> Self {
        let method: String = method
            .chars()
            .take(16)
            .filter(|c| c.is_ascii_alphabetic())
            .collect();
        Self::new(
            405,
            ErrorKind::InvalidRequest,
            "method_not_allowed",
            format!("Method {method} is not allowed on this URL."),
        )
    }

    /// No pool may serve the model now; `retry_after_s`: when the first one may again.
    pub fn no_live_pool(retry_after_s: u64) -> Self {
        Self::new(
            503,
            ErrorKind::Server,
            "no_capacity",
            "No capacity is available for this model right now. Please retry shortly.",
        )
        .with_retry_after(Some(retry_after_s))
    }

    /// The key sent more requests this minute than it may; `retry_after_s` is the time to the
    /// next minute window.
    pub fn rate_limited(requests_per_minute: u32, retry_after_s: u64) -> Self {
        Self::new(
            429,
            ErrorKind::RateLimitExceeded,
            "rate_limit_exceeded",
            format!(
                "Rate limit reached: this API key allows {requests_per_minute} requests per minute. Please retry after {retry_after_s} s."
            ),
        )
        .with_retry_after(Some(retry_after_s))
    }

    /// The key has spent its cap.
    pub fn quota_exceeded() -> Self {
        Self::new(
            429,
            ErrorKind::InsufficientQuota,
            "insufficient_quota",
            "This API key has reached its spending cap. Raise the cap or use another key.",
        )
    }

    /// The buyer's available balance does not cover the request's maximum cost (its prompt and
    /// its output cap). Nothing was sent upstream.
    pub fn insufficient_funds(available_micros: i64, needed_micros: u64) -> Self {
        Self::new(
            402,
            ErrorKind::InsufficientQuota,
            "insufficient_quota",
            format!(
                "Your balance does not cover this request: it may cost up to {needed_micros} micro-USD and {} are available. Add credit, or lower max_tokens.",
                available_micros.max(0)
            ),
        )
    }

    /// Balances cannot be checked right now (hot state unreachable) and the gateway's policy is
    /// to serve nothing it cannot check.
    pub fn balance_unavailable() -> Self {
        Self::new(
            503,
            ErrorKind::Server,
            "balance_unavailable",
            "The gateway cannot check balances right now. Please retry shortly.",
        )
        .with_retry_after(Some(1))
    }

    /// Keys cannot be checked: the hot state (Redis) is unreachable and this proxy has no
    /// cached answer for the key.
    pub fn hot_state_unavailable() -> Self {
        Self::new(
            503,
            ErrorKind::Server,
            "key_store_unavailable",
            "The gateway cannot verify API keys right now. Please retry shortly.",
        )
        .with_retry_after(Some(1))
    }

    /// The usage spool is full (the control plane has not taken records for a long while) and
    /// the operator's policy is to serve nothing that cannot be billed.
    pub fn usage_spool_full() -> Self {
        Self::new(
            503,
            ErrorKind::Server,
            "usage_backlog_full",
            "The gateway cannot record usage right now. Please retry shortly.",
        )
        .with_retry_after(Some(5))
    }

    pub fn upstream_unavailable() -> Self {
        Self::new(
            502,
            ErrorKind::Upstream,
            "upstream_unavailable",
            "The upstream provider could not serve the request.",
        )
    }

    /// Every pool tried was throttled (429): the client gets 429 too, with the provider's
    /// `retry-after` when it gave one.
    pub fn upstream_throttled(retry_after_s: Option<u64>) -> Self {
        Self::new(
            429,
            ErrorKind::RateLimit,
            "upstream_rate_limited",
            "The upstream provider is rate limiting this model. Please retry shortly.",
        )
        .with_retry_after(retry_after_s)
    }

    /// Every pool tried was overloaded (503, Anthropic's 529).
    pub fn upstream_overloaded(retry_after_s: Option<u64>) -> Self {
        Self::new(
            503,
            ErrorKind::Server,
            "upstream_overloaded",
            "The upstream provider is overloaded. Please retry shortly.",
        )
        .with_retry_after(retry_after_s)
    }

    pub fn upstream_bad_response() -> Self {
        Self::new(
            502,
            ErrorKind::Upstream,
            "upstream_bad_response",
            "The upstream provider sent a response the gateway could not read.",
        )
    }

    pub fn upstream_timeout() -> Self {
        Self::new(
            504,
            ErrorKind::Timeout,
            "upstream_timeout",
            "The upstream provider did not answer in time.",
        )
    }

    /// The request came back to this gateway (`x-tokn-via`): a pool points at tokn itself.
    pub fn loop_detected(hops: usize) -> Self {
        Self::new(
            508,
            ErrorKind::InvalidRequest,
            "loop_detected",
            format!(
                "This request already passed through this gateway, or through {hops} gateways (x-tokn-via): a pool's base_url leads back to tokn. Nothing was billed."
            ),
        )
    }

    pub fn internal() -> Self {
        Self::new(
            500,
            ErrorKind::Server,
            "internal_error",
            "The gateway failed to process the request.",
        )
    }

    /// The JSON body of the error response.
    pub fn to_json(&self) -> Bytes {
        let envelope = Envelope {
            error: Body {
                message: &self.message,
                kind: self.kind.as_str(),
                param: self.param(),
                code: self.code(),
                innererror: self.upstream.as_ref().and_then(|u| u.detail.as_ref()),
            },
        };
        // Serialising a struct of strings cannot fail; fall back to a fixed body regardless.
        serde_json::to_vec(&envelope)
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from_static(br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#))
    }

    /// The error as a final SSE event, for a stream whose header was already sent.
    pub fn to_sse_event(&self) -> Bytes {
        let json = self.to_json();
        let mut out = Vec::with_capacity(json.len() + 8);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    /// The error in the shape the client's API uses.
    pub fn render(&self, dialect: Dialect) -> Bytes {
        match dialect {
            Dialect::OpenAi => self.to_json(),
            Dialect::Anthropic => self.to_anthropic_json(),
        }
    }

    /// The error as the event that ends a stream whose header was already sent, in the shape
    /// the client's API uses.
    pub fn render_sse_event(&self, dialect: Dialect) -> Bytes {
        match dialect {
            Dialect::OpenAi => self.to_sse_event(),
            Dialect::Anthropic => {
                let json = self.to_anthropic_json();
                let mut out = Vec::with_capacity(json.len() + 22);
                out.extend_from_slice(b"event: error\ndata: ");
                out.extend_from_slice(&json);
                out.extend_from_slice(b"\n\n");
                Bytes::from(out)
            }
        }
    }

    fn to_anthropic_json(&self) -> Bytes {
        anthropic_error_body(self.status, &self.message)
    }

    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        self.label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_openai_error_shape() {
        let body: serde_json::Value =
            serde_json::from_slice(&GatewayError::model_not_found("gpt-x").to_json()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert!(body["error"]["message"].as_str().unwrap().contains("gpt-x"));
        let body: serde_json::Value =
            serde_json::from_slice(&GatewayError::invalid_key().to_json()).unwrap();
        assert_eq!(body["error"]["param"], serde_json::Value::Null);
    }

    #[test]
    fn key_limits_render_openai_codes_and_retry_after() {
        let e = GatewayError::rate_limited(10, 42);
        assert_eq!((e.status(), e.retry_after_s()), (429, Some(42)));
        let body: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_exceeded");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        let body: serde_json::Value =
            serde_json::from_slice(&GatewayError::quota_exceeded().to_json()).unwrap();
        assert_eq!(body["error"]["type"], "insufficient_quota");
        assert_eq!(body["error"]["code"], "insufficient_quota");
        let e = GatewayError::hot_state_unavailable();
        assert_eq!((e.status(), e.retry_after_s()), (503, Some(1)));
    }

    #[test]
    fn echoed_input_is_bounded_and_stripped_of_control_characters() {
        let e = GatewayError::model_not_found(&format!("a\u{0}b{}", "x".repeat(10_000)));
        assert!(e.message().len() < 300);
        assert!(!e.message().contains('\u{0}'));
    }

    #[test]
    fn upstream_refusals_are_rendered_once_with_one_status_rule_and_one_cap() {
        let render = |status, e| {
            let e = GatewayError::upstream(status, e);
            let body: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
            (e.status(), body, e.metric_label())
        };
        for (upstream, client) in [
            (400, 400),
            (422, 422),
            (500, 502),
            (502, 502),
            (503, 503),
            (504, 504),
            (529, 503),
        ] {
            assert_eq!(
                render(upstream, UpstreamError::unreadable(upstream)).0,
                client
            );
        }
        let (_, body, label) = render(400, UpstreamError::unreadable(400));
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "upstream_error");
        assert_eq!(
            body["error"]["message"],
            "The upstream provider rejected the request."
        );
        // Metrics never carry an upstream's own code.
        assert_eq!(label, "upstream_rejected");

        let long = format!("bad\u{1b}[31m{}", "x".repeat(5000));
        let mut e = UpstreamError::new(ErrorKind::InvalidRequest, "content_filter", Some(&long));
        e.param = Some("prompt".into());
        e.detail = Some(serde_json::json!({"code": "ResponsibleAIPolicyViolation"}));
        let (_, body, _) = render(400, e);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.chars().count() <= UPSTREAM_MESSAGE_CHARS_MAX && !message.contains('\u{1b}')
        );
        assert_eq!(body["error"]["param"], "prompt");
        assert_eq!(
            body["error"]["innererror"]["code"],
            "ResponsibleAIPolicyViolation"
        );
        // As the event that ends a stream.
        let event = GatewayError::upstream(429, UpstreamError::unreadable(429)).to_sse_event();
        assert!(event.starts_with(b"data: {\"error\":") && event.ends_with(b"\n\n"));
    }

    #[test]
    fn a_departed_client_is_a_499_recorded_as_such() {
        let e = GatewayError::client_disconnected();
        assert_eq!((e.status(), e.metric_label()), (499, "client_disconnected"));
    }
}
