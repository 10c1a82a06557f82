//! OAuth access tokens for Vertex AI pools, minted from the pool's service account.
//!
//! A token lives an hour; every request of every snapshot that names the same service account
//! shares one [`AccessToken`] (a configuration push does not throw the token away). The hot
//! path reads the cached header; a token close to expiry is refreshed in the background while
//! the current one still serves, and only a missing or expired token makes a request wait for
//! the mint — one mint at a time, however many requests wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use serde::Deserialize;
use tokn_config::google::{ServiceAccount, CLOUD_PLATFORM_SCOPE};
use tracing::{info, warn};

/// Refresh this long before expiry (or at three quarters of a short token's life).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// A mint that takes longer than this failed.
const MINT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest token response read.
const MINT_RESPONSE_MAX: usize = 64 * 1024;

/// After a failed mint, callers get the same error for this long instead of minting again
/// (the token endpoint is not hammered, and queued waiters do not retry one by one).
const FAILURE_HOLD: Duration = Duration::from_secs(5);

/// Token lifetimes are taken as at most a day (Google grants an hour), so no answer can push
/// an expiry out of range.
const LIFETIME_MAX_S: u64 = 86_400;

/// Why no token could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MintError {
    /// The token endpoint refused the service account (revoked key, disabled account).
    Refused,
    /// The endpoint could not be reached or failed: try again later.
    Unavailable,
}

struct Minted {
    header: HeaderValue,
    refresh_at: Instant,
    expires_at: Instant,
}

/// One service account's current token.
pub struct AccessToken {
    account: Arc<ServiceAccount>,
    current: ArcSwapOption<Minted>,
    /// Held while a mint is in flight, so concurrent waiters share it; holds the last failure
    /// (when, what), which waiters share too.
    minting: tokio::sync::Mutex<Option<(Instant, MintError)>>,
    refreshing: AtomicBool,
}

/// An account is its email, its token endpoint and its key: a key file naming another seller's
/// account with a different key never shares that account's token.
type RegistryKey = (String, String, [u8; 32]);

/// Tokens by service account, shared across snapshots while any snapshot holds them.
static REGISTRY: LazyLock<Mutex<HashMap<RegistryKey, Weak<AccessToken>>>> =
    LazyLock::new(Default::default);

/// One client for every mint: tokens are minted once an hour per account.
static CLIENT: LazyLock<reqwest::Client> = LazyLock::new(|| {
    reqwest::Client::builder()
        .timeout(MINT_TIMEOUT)
        // The key file names the endpoint; it does not get to send us elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
});

impl AccessToken {
    /// The token holder for `account`, shared with every other pool of the same account.
    pub fn shared(account: Arc<ServiceAccount>) -> Arc<Self> {
        let key = (
            account.client_email.clone(),
            account.token_uri.clone(),
            account.key_fingerprint(),
        );
        let mut registry = match REGISTRY.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        registry.retain(|_, weak| weak.strong_count() > 0);
        if let Some(existing) = registry.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        let token = Arc::new(Self {
            account,
            current: ArcSwapOption::empty(),
            minting: tokio::sync::Mutex::new(None),
            refreshing: AtomicBool::new(false),
        });
        registry.insert(key, Arc::downgrade(&token));
        token
    }

    /// The `authorization` header to send now: the cached token when it is fresh, refreshed in
    /// the background when it is close to expiry, minted (and waited for) when there is none.
    pub async fn header(self: &Arc<Self>) -> Result<HeaderValue, MintError> {
        let now = Instant::now();
        if let Some(m) = self.current.load().as_ref() {
            if now < m.refresh_at {
                return Ok(m.header.clone());
            }
            if now < m.expires_at {
                if !self.refreshing.swap(true, Ordering::AcqRel) {
                    let this = self.clone();
                    tokio::spawn(async move {
                        // A failed refresh is retried by the next request; the token still serves.
                        let _ = this.mint_once(Instant::now()).await;
                        this.refreshing.store(false, Ordering::Release);
                    });
                }
                return Ok(m.header.clone());
            }
        }
        self.mint_once(now).await
    }

    /// Forgets the token (the provider refused it): the next request mints a new one.
    pub fn invalidate(&self) {
        self.current.store(None);
    }

    /// Mints unless another caller did since `asked_at`, or a mint failed since then or within
    /// [`FAILURE_HOLD`] (that failure is the answer).
    async fn mint_once(&self, asked_at: Instant) -> Result<HeaderValue, MintError> {
        let mut last_failure = self.minting.lock().await;
        if let Some(m) = self.current.load().as_ref() {
            if m.refresh_at > asked_at {
                return Ok(m.header.clone());
            }
        }
        if let Some((at, e)) = *last_failure {
            if at >= asked_at || at.elapsed() < FAILURE_HOLD {
                return Err(e);
            }
        }
        match self.mint().await {
            Ok(minted) => {
                let header = minted.header.clone();
                self.current.store(Some(Arc::new(minted)));
                *last_failure = None;
                Ok(header)
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e));
                Err(e)
            }
        }
    }

    async fn mint(&self) -> Result<Minted, MintError> {
        let sa = &self.account;
        let now_s = crate::clock::unix_secs();
        let form = sa
            .token_request_body(CLOUD_PLATFORM_SCOPE, now_s)
            .map_err(|why| {
                warn!(message = "Could not sign a service-account assertion.", client_email = %sa.client_email, why);
                MintError::Refused
            })?;
        let started = Instant::now();
        let response = CLIENT
            .post(&sa.token_uri)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(|e| {
                warn!(message = "Token endpoint unreachable.", client_email = %sa.client_email, timeout = e.is_timeout());
                MintError::Unavailable
            })?;
        let status = response.status().as_u16();
        let body = read_bounded(response).await.ok_or(MintError::Unavailable)?;
        if !(200..300).contains(&status) {
            // The body is Google's `{"error","error_description"}`: it names no secret.
            let reason = serde_json::from_slice::<TokenError>(&body)
                .map(|e| e.error)
                .unwrap_or_default();
            warn!(message = "Token endpoint refused the service account.", client_email = %sa.client_email, status, reason);
            return Err(if status >= 500 || status == 429 {
                MintError::Unavailable
            } else {
                MintError::Refused
            });
        }
        let token: TokenResponse =
            serde_json::from_slice(&body).map_err(|_| MintError::Unavailable)?;
        let mut header = HeaderValue::try_from(format!("Bearer {}", token.access_token))
            .map_err(|_| MintError::Unavailable)?;
        header.set_sensitive(true);
        let lifetime = Duration::from_secs(token.expires_in.clamp(1, LIFETIME_MAX_S));
        let margin = REFRESH_MARGIN.min(lifetime / 4);
        info!(message = "Minted a Vertex AI access token.", client_email = %sa.client_email, expires_in_s = token.expires_in, mint_ms = started.elapsed().as_millis() as u64);
        Ok(Minted {
            header,
            refresh_at: started + lifetime - margin,
            expires_at: started + lifetime,
        })
    }
}

async fn read_bounded(mut response: reqwest::Response) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.ok()? {
        if body.len() + chunk.len() > MINT_RESPONSE_MAX {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default = "default_expires_in")]
    expires_in: u64,
}

fn default_expires_in() -> u64 {
    3600
}

#[derive(Deserialize)]
struct TokenError {
    #[serde(default)]
    error: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use tokn_testkit::TestServiceAccount;

    fn account(file: &TestServiceAccount) -> Arc<ServiceAccount> {
        Arc::new(ServiceAccount::parse(&file.json).unwrap())
    }

    #[test]
    fn tokens_are_shared_by_account_and_key_only() {
        let uri = "https://oauth2.googleapis.com/token";
        let a = TestServiceAccount::generate("shared", "proj-a", uri);
        // Another key file naming the same account (same email, key id and endpoint).
        let mut impostor = TestServiceAccount::generate("shared", "proj-a", uri);
        let mut file: serde_json::Value = serde_json::from_str(&impostor.json).unwrap();
        file["private_key_id"] = a.private_key_id.clone().into();
        impostor.json = file.to_string();

        let first = AccessToken::shared(account(&a));
        let again = AccessToken::shared(account(&a));
        assert!(Arc::ptr_eq(&first, &again), "one token per account and key");
        let other = AccessToken::shared(account(&impostor));
        assert!(
            !Arc::ptr_eq(&first, &other),
            "another key never gets this account's token"
        );
        // Dropped holders free the entry: a later pool gets a fresh holder.
        drop((first, again));
        let fresh = AccessToken::shared(account(&a));
        assert!(fresh.current.load().is_none());
    }
}
