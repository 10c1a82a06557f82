//! Stripe over plain HTTPS: the few calls tokn$ makes (Checkout Sessions, Accounts, Account
//! Links, Transfers and their reversals, Events, Balance), form-encoded, with the API version
//! pinned, an `Idempotency-Key` derived from our own ids on every POST, and retries with backoff
//! on what may succeed when tried again (no answer, 429, 5xx; `Stripe-Should-Retry` overrides).
//! A small module rather than `async-stripe`: see ARCHITECTURE.md.

pub mod form;
pub mod objects;
pub mod webhook;

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokn_config::control_plane::ValidStripe;
use tracing::warn;

pub use form::Form;

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripeError {
    /// No answer (connection refused or reset, timeout) after every retry: the call may or may
    /// not have taken effect; repeating it with the same idempotency key is safe.
    Network,
    /// Stripe answered with an error.
    Api(ApiFailure),
    /// Stripe answered 2xx with a body this version cannot read.
    Decode(String),
}

/// An error Stripe answered (`{"error":{type, code, message, param}}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiFailure {
    #[serde(skip)]
    pub status: u16,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(skip)]
    pub request_id: Option<String>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ApiFailure,
}

impl StripeError {
    /// Stripe's error code (`balance_insufficient`, …).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api(f) => f.code.as_deref(),
            _ => None,
        }
    }

    /// Whether the outcome is unknown: the call may have taken effect (no answer, a 2xx we
    /// could not read) or may yet (409, 429, 5xx) — asking again with the same key is the way
    /// to know.
    pub fn uncertain(&self) -> bool {
        match self {
            Self::Network | Self::Decode(_) => true,
            Self::Api(f) => f.status == 429 || f.status == 409 || f.status >= 500,
        }
    }

    /// For the operator: status, type, code and Stripe's message (which never holds our key).
    pub fn describe(&self) -> String {
        match self {
            Self::Network => "Stripe did not answer".to_owned(),
            Self::Decode(what) => format!("Stripe's answer could not be read: {what}"),
            Self::Api(f) => format!(
                "Stripe {} {}{}: {}",
                f.status,
                f.kind,
                f.code
                    .as_deref()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default(),
                f.message
            ),
        }
    }
}

impl std::fmt::Display for StripeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A client of one Stripe account (the platform's).
pub struct Stripe {
    http: reqwest::Client,
    base: String,
    /// `Bearer …`, marked sensitive on every request.
    authorization: http::HeaderValue,
    version: String,
    retries_max: u32,
    retry_base: Duration,
}

impl Stripe {
    pub fn new(s: &ValidStripe) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(s.config.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("stripe http client: {e}"))?;
        let mut authorization = http::HeaderValue::from_str(&format!("Bearer {}", s.secret_key))
            .map_err(|_| "stripe.secret_key: not a valid header value".to_owned())?;
        authorization.set_sensitive(true);
        Ok(Self {
            http,
            base: s.config.base_url.trim_end_matches('/').to_owned(),
            authorization,
            version: s.config.api_version.clone(),
            retries_max: s.config.retries_max,
            retry_base: Duration::from_millis(s.config.retry_base_ms),
        })
    }

    /// `POST {path}` with `form`; `idempotency_key` names the operation in our terms
    /// (`checkout:pur_…`, `payout:po_…`), so a retry after any crash replays Stripe's first
    /// answer instead of acting twice.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        idempotency_key: &str,
        form: &Form,
    ) -> Result<T, StripeError> {
        let body = form.encode();
        self.call(|| {
            self.http
                .post(format!("{}{path}", self.base))
                .header("idempotency-key", idempotency_key)
                .header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body.clone())
        })
        .await
    }

    /// `GET {path}?{query}`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Form,
    ) -> Result<T, StripeError> {
        let url = if query.pairs().is_empty() {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}?{}", self.base, query.encode())
        };
        self.call(|| self.http.get(url.clone())).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, StripeError> {
        let mut attempt = 0;
        loop {
            let sent = request()
                .header(http::header::AUTHORIZATION, self.authorization.clone())
                .header("stripe-version", &self.version)
                .header(http::header::USER_AGENT, "tokn-control")
                .send()
                .await;
            let outcome = match sent {
                Ok(resp) => read(resp).await,
                Err(_) => Err((StripeError::Network, None)),
            };
            let (error, should_retry) = match outcome {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let retry = should_retry.unwrap_or(match &error {
                StripeError::Network => true,
                StripeError::Api(f) => f.status == 429 || f.status >= 500,
                StripeError::Decode(_) => false,
            });
            if !retry || attempt >= self.retries_max {
                return Err(error);
            }
            attempt += 1;
            warn!(message = "A Stripe call failed; trying again.", error = %error.describe(), attempt);
            tokio::time::sleep(backoff(self.retry_base, attempt)).await;
        }
    }
}

/// The answer's value, or its error and what `Stripe-Should-Retry` said about it.
async fn read<T: DeserializeOwned>(
    resp: reqwest::Response,
) -> Result<T, (StripeError, Option<bool>)> {
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let should_retry = header("stripe-should-retry").map(|v| v == "true");
    let request_id = header("request-id");
    let Ok(body) = resp.bytes().await else {
        return Err((StripeError::Network, should_retry));
    };
    if (200..300).contains(&status) {
        return serde_json::from_slice(&body)
            .map_err(|e| (StripeError::Decode(e.to_string()), Some(false)));
    }
    let mut failure = serde_json::from_slice::<ErrorEnvelope>(&body)
        .map(|e| e.error)
        .unwrap_or_else(|_| ApiFailure {
            status,
            kind: "api_error".to_owned(),
            code: None,
            message: "an error without a Stripe error body".to_owned(),
            param: None,
            request_id: None,
        });
    failure.status = status;
    failure.request_id = request_id;
    Err((StripeError::Api(failure), should_retry))
}

/// `base · 2^(n−1)`, at most 5 s, with jitter in its upper half (as Stripe's own libraries).
fn backoff(base: Duration, attempt: u32) -> Duration {
    let full = base
        .saturating_mul(1 << attempt.saturating_sub(1).min(10))
        .min(Duration::from_secs(5));
    let half = full / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Micro-USD to cents, rounded down (the remainder stays where it was).
pub fn cents_of(micros: i64) -> i64 {
    micros.div_euclid(10_000)
}

/// Cents to micro-USD.
pub fn micros_of(cents: i64) -> i64 {
    cents.saturating_mul(10_000)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn backoff_doubles_to_five_seconds_with_jitter_in_its_upper_half() {
        let base = Duration::from_millis(500);
        for (attempt, full) in [
            (1, 500),
            (2, 1000),
            (3, 2000),
            (4, 4000),
            (5, 5000),
            (30, 5000),
        ] {
            let d = super::backoff(base, attempt);
            assert!(
                d >= Duration::from_millis(full / 2) && d <= Duration::from_millis(full),
                "{attempt}: {d:?}"
            );
        }
    }

    #[test]
    fn cents_round_down() {
        assert_eq!(super::cents_of(12_345_678), 1_234);
        assert_eq!(super::cents_of(9_999), 0);
        assert_eq!(super::micros_of(1_234), 12_340_000);
    }
}
