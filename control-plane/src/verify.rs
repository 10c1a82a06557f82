//! Credential verification: one cheap authenticated read per provider (its model list), so a
//! seller learns at once whether the credential works. Nothing about the credential is logged.

use std::time::Duration;

use tokn_config::control_plane::VerifyConfig;

use crate::credential::ProviderCredential;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Valid,
    /// The provider refused it (401/403).
    Invalid,
    /// No answer, or an answer that says nothing about the credential (5xx, 429).
    Unreachable,
    /// No verification call for this provider yet (Bedrock needs SigV4, Vertex an OAuth
    /// token: their adapters bring them).
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
            ProviderCredential::Mock {} => return Outcome::Valid,
            ProviderCredential::Bedrock { .. } | ProviderCredential::Vertex { .. } => {
                return Outcome::Unchecked
            }
        };
        match request.send().await {
            Ok(r) if r.status().is_success() => Outcome::Valid,
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => Outcome::Invalid,
            Ok(_) | Err(_) => Outcome::Unreachable,
        }
    }
}
