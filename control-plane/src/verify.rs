//! Credential verification: one cheap authenticated read per provider (its model list), so a
//! seller learns at once whether the credential works. Nothing about the credential is logged.

use std::time::Duration;

use tokn_config::control_plane::VerifyConfig;
use tokn_config::google::{ServiceAccount, CLOUD_PLATFORM_SCOPE};

use crate::credential::ProviderCredential;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Valid,
    /// The provider refused it (401/403).
    Invalid,
    /// No answer, or an answer that says nothing about the credential (5xx, 429).
    Unreachable,
    /// No verification call for this provider (Bedrock: a SigV4-signed read would need the
    /// proxy's signer here; the first request through a pool tells instead).
    Unchecked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Invalid => "invalid",
            Self::Unreachable => "unreachable",
            Self::Unchecked => "unchecked",
        }
    }
}

pub struct Verifier {
    http: reqwest::Client,
    config: VerifyConfig,
}

impl Verifier {
    pub fn new(config: VerifyConfig, timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Self { http, config })
    }

    pub async fn verify(&self, credential: &ProviderCredential) -> Outcome {
        let trim = |s: &str| s.trim_end_matches('/').to_owned();
        let request = match credential {
            ProviderCredential::Openai {
                api_key, base_url, ..
            } => {
                let base = trim(base_url.as_deref().unwrap_or(&self.config.openai_base_url));
                self.http.get(format!("{base}/models")).bearer_auth(api_key)
            }
            ProviderCredential::Anthropic { api_key, base_url } => {
                let base = trim(
                    base_url
                        .as_deref()
                        .unwrap_or(&self.config.anthropic_base_url),
                );
                self.http
                    .get(format!("{base}/v1/models"))
                    .header("x-api-key", api_key)
                    .header("anthropic-version", "2023-06-01")
            }
            ProviderCredential::Gemini { api_key, base_url } => {
                let base = trim(base_url.as_deref().unwrap_or(&self.config.gemini_base_url));
                self.http
                    .get(format!("{base}/v1beta/models"))
                    .header("x-goog-api-key", api_key)
            }
            ProviderCredential::Azure {
                endpoint,
                api_key,
                api_version,
                ..
            } => self
                .http
                .get(format!("{}/openai/models", trim(endpoint)))
                .query(&[(
                    "api-version",
                    api_version.as_deref().unwrap_or("2024-10-21"),
                )])
                .header("api-key", api_key),
            ProviderCredential::Vertex {
                service_account_json,
                ..
            } => match self.vertex_token_request(service_account_json) {
                Some(r) => r,
                None => return Outcome::Invalid,
            },
            ProviderCredential::Mock {} => return Outcome::Valid,
            ProviderCredential::Bedrock { .. } => return Outcome::Unchecked,
        };
        let response = match request.send().await {
            Ok(r) => r,
            Err(_) => return Outcome::Unreachable,
        };
        match response.status().as_u16() {
            200..=299 => Outcome::Valid,
            401 | 403 => Outcome::Invalid,
            // Gemini refuses a bad key with 400 `API_KEY_INVALID`; Google's token endpoint a
            // bad service account with 400 `invalid_grant`.
            400 => {
                let body = read_bounded(response).await;
                let text = String::from_utf8_lossy(&body);
                if text.contains("API_KEY_INVALID") || text.contains("invalid_grant") {
                    Outcome::Invalid
                } else {
                    Outcome::Unreachable
                }
            }
            _ => Outcome::Unreachable,
        }
    }

    /// The token request a Vertex service account is verified with: the JWT assertion the
    /// proxies send, posted to the key file's `token_uri`. `None`: the key cannot sign.
    fn vertex_token_request(&self, key_file: &str) -> Option<reqwest::RequestBuilder> {
        let sa = ServiceAccount::parse(key_file).ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let body = sa.token_request_body(CLOUD_PLATFORM_SCOPE, now).ok()?;
        Some(
            self.http
                .post(&sa.token_uri)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body),
        )
    }
}

/// The start of an error body (the URL is the seller's: its answer is not read whole).
async fn read_bounded(mut response: reqwest::Response) -> Vec<u8> {
    const MAX: usize = 64 * 1024;
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX {
            break;
        }
    }
    body
}
