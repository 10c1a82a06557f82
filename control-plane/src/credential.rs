//! Seller provider credentials: the fields each provider needs, split into what is secret
//! (sealed at rest, decrypted only for the push to proxies) and what is not (shown in lists).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokn_config::google::{is_path_id, ServiceAccount};
use utoipa::ToSchema;

/// What a seller submits. Every variant names exactly the fields its provider needs.
#[derive(Clone, Deserialize, Serialize, ToSchema)]
#[serde(tag = "provider", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProviderCredential {
    Openai {
        api_key: String,
        /// Defaults to `https://api.openai.com/v1`.
        #[serde(default)]
        base_url: Option<String>,
        #[serde(default)]
        organization: Option<String>,
    },
    Anthropic {
        api_key: String,
        #[serde(default)]
        base_url: Option<String>,
    },
    /// AWS access keys (with an optional session token), or a Bedrock API key.
    Bedrock {
        region: String,
        #[serde(default)]
        access_key_id: Option<String>,
        #[serde(default)]
        secret_access_key: Option<String>,
        #[serde(default)]
        session_token: Option<String>,
        #[serde(default)]
        api_key: Option<String>,
        /// Defaults to `https://bedrock-runtime.{region}.amazonaws.com`.
        #[serde(default)]
        base_url: Option<String>,
    },
    /// Google Vertex AI with a service-account key (the JSON file's text).
    Vertex {
        service_account_json: String,
        location: String,
        /// The project billed; the key file's `project_id` when absent.
        #[serde(default)]
        project: Option<String>,
        /// Defaults to `https://{location}-aiplatform.googleapis.com`.
        #[serde(default)]
        base_url: Option<String>,
    },
    /// Google Gemini API key.
    Gemini {
        api_key: String,
        #[serde(default)]
        base_url: Option<String>,
    },
    Azure {
        /// `https://{resource}.openai.azure.com`
        endpoint: String,
        api_key: String,
        #[serde(default)]
        deployment: Option<String>,
        #[serde(default)]
        api_version: Option<String>,
    },
    /// The built-in mock provider (demos, tests): no secret at all.
    Mock {},
}

impl std::fmt::Debug for ProviderCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProviderCredential({}, <redacted>)", self.provider())
    }
}

const OPENAI_BASE: &str = "https://api.openai.com/v1";
const ANTHROPIC_BASE: &str = "https://api.anthropic.com";

impl ProviderCredential {
    pub fn provider(&self) -> &'static str {
        match self {
            Self::Openai { .. } => "openai",
            Self::Anthropic { .. } => "anthropic",
            Self::Bedrock { .. } => "bedrock",
            Self::Vertex { .. } => "vertex",
            Self::Gemini { .. } => "gemini",
            Self::Azure { .. } => "azure",
            Self::Mock {} => "mock",
        }
    }

    /// Every problem with the fields, one message per problem (never echoing a secret).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut secret = |name: &str, v: &str| {
            if v.is_empty() || v.len() > 4096 || !v.bytes().all(|b| (0x21..0x7f).contains(&b)) {
                p.push(format!(
                    "{name}: must be 1 to 4096 printable ASCII characters"
                ));
            }
        };
        match self {
            Self::Openai { api_key, .. }
            | Self::Anthropic { api_key, .. }
            | Self::Gemini { api_key, .. } => secret("api_key", api_key),
            Self::Azure { api_key, .. } => secret("api_key", api_key),
            Self::Bedrock {
                access_key_id,
                secret_access_key,
                session_token,
                api_key,
                ..
            } => match (access_key_id, secret_access_key, api_key) {
                (Some(id), Some(s), None) => {
                    secret("access_key_id", id);
                    secret("secret_access_key", s);
                    if let Some(t) = session_token {
                        secret("session_token", t);
                    }
                }
                (None, None, Some(k)) if session_token.is_none() => secret("api_key", k),
                _ => p.push(
                    "give access_key_id and secret_access_key (and optionally session_token), \
                     or api_key alone"
                        .to_owned(),
                ),
            },
            Self::Vertex {
                service_account_json,
                project,
                ..
            } => match ServiceAccount::parse(service_account_json) {
                // The proxies check key files, projects and locations with the same code: a
                // pool accepted here is one they serve (one they refused would stop the push).
                Ok(sa) => {
                    let effective = project.as_deref().unwrap_or(&sa.project_id);
                    if !is_path_id(effective) {
                        p.push(
                            "project: must be a project id (lowercase letters, digits, `-`); \
                             required when the key file names none"
                                .to_owned(),
                        );
                    }
                }
                Err(why) => p.push(format!("service_account_json: {why}")),
            },
            Self::Mock {} => {}
        }
        for (name, url) in self.urls() {
            let allowed =
                tokn_config::UpstreamUrl::parse(url).is_ok_and(|u| u.tls || u.is_loopback());
            if !allowed {
                p.push(format!(
                    "{name}: must be an https:// URL (http:// on loopback only)"
                ));
            }
        }
        let plain = |name: &str, v: &str, p: &mut Vec<String>| {
            if v.is_empty()
                || v.len() > 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                p.push(format!(
                    "{name}: must be 1 to 64 letters, digits, `-`, `_` or `.`"
                ));
            }
        };
        match self {
            Self::Bedrock { region, .. } => {
                // Proxies take the region into a host name and the SigV4 scope.
                let region_ok = region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !region_ok || region.is_empty() || region.len() > 32 {
                    p.push("region: must be an AWS region such as us-east-1".to_owned());
                }
            }
            Self::Vertex { location, .. } if !is_path_id(location) => p.push(
                "location: must be a Vertex location such as us-central1 or global".to_owned(),
            ),
            Self::Azure {
                deployment,
                api_version,
                ..
            } => {
                if let Some(d) = deployment {
                    plain("deployment", d, &mut p);
                }
                if let Some(v) = api_version {
                    plain("api_version", v, &mut p);
                }
            }
            _ => {}
        }
        p
    }

    fn urls(&self) -> Vec<(&'static str, &str)> {
        match self {
            Self::Openai {
                base_url: Some(u), ..
            }
            | Self::Anthropic {
                base_url: Some(u), ..
            }
            | Self::Gemini {
                base_url: Some(u), ..
            }
            | Self::Vertex {
                base_url: Some(u), ..
            }
            | Self::Bedrock {
                base_url: Some(u), ..
            } => vec![("base_url", u)],
            Self::Azure { endpoint, .. } => vec![("endpoint", endpoint)],
            _ => Vec::new(),
        }
    }

    /// The fields that are not secret, shown when the credential is listed.
    pub fn public_fields(&self) -> Value {
        match self {
            Self::Openai {
                base_url,
                organization,
                ..
            } => json!({
                "base_url": base_url.as_deref().unwrap_or(OPENAI_BASE),
                "organization": organization,
            }),
            Self::Anthropic { base_url, .. } | Self::Gemini { base_url, .. } => {
                json!({ "base_url": base_url })
            }
            Self::Bedrock {
                region,
                api_key,
                base_url,
                ..
            } => json!({
                "region": region,
                "auth": if api_key.is_some() { "bedrock_api_key" } else { "aws_access_key" },
                "base_url": base_url,
            }),
            Self::Vertex {
                service_account_json,
                location,
                project,
                base_url,
            } => {
                let sa = ServiceAccount::parse(service_account_json).ok();
                json!({
                    "location": location,
                    "project_id": project.clone().or_else(|| sa.as_ref().map(|s| s.project_id.clone())),
                    "client_email": sa.map(|s| s.client_email),
                    "base_url": base_url,
                })
            }
            Self::Azure {
                endpoint,
                deployment,
                api_version,
                ..
            } => json!({
                "endpoint": endpoint,
                "deployment": deployment,
                "api_version": api_version,
            }),
            Self::Mock {} => json!({}),
        }
    }

    /// An Azure credential's deployment and api-version, as the pool's `azure_deployment` and
    /// `azure_api_version` (both `None` for other providers).
    pub fn azure_fields(&self) -> (Option<String>, Option<String>) {
        match self {
            Self::Azure {
                deployment,
                api_version,
                ..
            } => (deployment.clone(), api_version.clone()),
            _ => (None, None),
        }
    }

    /// What a proxy's pool needs to reach the provider: base URL (`None`: the proxy's default
    /// for the provider) and key (`None`: the pool authenticates with its provider's own fields).
    pub fn proxy_upstream(&self) -> (Option<String>, Option<String>) {
        match self {
            // The resource endpoint; the pool's Azure fields name deployment and api-version.
            Self::Azure {
                endpoint, api_key, ..
            } => (Some(endpoint.clone()), Some(api_key.clone())),
            Self::Openai {
                api_key, base_url, ..
            } => (
                Some(base_url.clone().unwrap_or_else(|| OPENAI_BASE.to_owned())),
                Some(api_key.clone()),
            ),
            Self::Anthropic { api_key, base_url } => (
                Some(
                    base_url
                        .clone()
                        .unwrap_or_else(|| ANTHROPIC_BASE.to_owned()),
                ),
                Some(api_key.clone()),
            ),
            Self::Bedrock {
                api_key, base_url, ..
            } => (base_url.clone(), api_key.clone()),
            // Proxies default the Gemini endpoint; Vertex pools carry their service account in
            // `vertex_fields` instead of a key.
            Self::Gemini { api_key, base_url } => (base_url.clone(), Some(api_key.clone())),
            Self::Vertex { base_url, .. } => (base_url.clone(), None),
            Self::Mock {} => (None, None),
        }
    }

    /// The AWS fields of a Bedrock pool as proxies take them (all `None` for other providers).
    pub fn aws_fields(&self) -> AwsFields {
        match self {
            Self::Bedrock {
                region,
                access_key_id,
                secret_access_key,
                session_token,
                ..
            } => AwsFields {
                region: Some(region.clone()),
                access_key_id: access_key_id.clone(),
                secret_access_key: secret_access_key.clone(),
                session_token: session_token.clone(),
            },
            _ => AwsFields::default(),
        }
    }

    /// The Vertex fields of a pool as proxies take them (all `None` for other providers).
    pub fn vertex_fields(&self) -> VertexFields {
        match self {
            Self::Vertex {
                service_account_json,
                location,
                project,
                ..
            } => VertexFields {
                service_account_json: Some(service_account_json.clone()),
                location: Some(location.clone()),
                project: project.clone(),
            },
            _ => VertexFields::default(),
        }
    }
}

/// A Vertex credential's key file, location and project, for the proxy's pool configuration.
#[derive(Default)]
pub struct VertexFields {
    pub service_account_json: Option<String>,
    pub location: Option<String>,
    pub project: Option<String>,
}

/// A Bedrock credential's region and AWS keys, for the proxy's pool configuration.
#[derive(Default)]
pub struct AwsFields {
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
}
