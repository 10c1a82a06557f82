//! Seller provider credentials, defined once: the control plane's API takes them, its store
//! seals them, its push carries them, and every proxy's pools are configured with them. One
//! validator ([`Credential::problems`]) serves all of them, so a credential the control plane
//! accepts is one every proxy serves.
//!
//! Adding a provider: its struct below (exactly the fields it needs, with its rules in its
//! [`CredentialFields`] impl), one line in the `providers!` list, its adapter file in the proxy
//! and one arm in the proxy's `providers::adapter`.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::google::{is_path_id, ServiceAccount};
use crate::schema::ProviderKind;
use crate::validate::UpstreamUrl;

/// A secret field: serialized as its text (the store seals it; only the authenticated push
/// carries it), never shown by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The secret itself, for the one place that sends or signs with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Which upstream URLs a credential may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlPolicy {
    /// Written by the operator in the proxy's own file: any http(s) URL (a private vLLM, say).
    Operator,
    /// Submitted by a seller (the control plane's API, and pools pushed to proxies): https, or
    /// plain http on loopback only.
    Marketplace,
}

/// One provider's credential: its rules, its secrets and what may be shown of it.
pub trait CredentialFields {
    /// Every problem with the fields, each as `field: why` (never echoing a secret).
    fn problems(&self, urls: UrlPolicy, p: &mut Vec<String>);
    /// The secret fields by name, so a file's `env:NAME` references can be resolved.
    fn secrets_mut(&mut self) -> Vec<(&'static str, &mut Secret)>;
    /// The fields that are not secret, shown when the credential is listed.
    fn public_fields(&self) -> Value;
}

/// Declares the credential enum and its dispatch from one list of providers.
macro_rules! providers {
    ($($variant:ident($fields:ident) = $kind:ident),+ $(,)?) => {
        /// What a seller submits and a pool is configured with, tagged by `provider`.
        #[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
        // Named apart from the control plane's stored `Credential` record, which would
        // otherwise take its place in the API document.
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = ProviderCredential))]
        #[serde(tag = "provider", rename_all = "snake_case")]
        pub enum Credential {
            $($variant($fields)),+
        }

        impl Credential {
            pub fn kind(&self) -> ProviderKind {
                match self {
                    $(Self::$variant(_) => ProviderKind::$kind),+
                }
            }

            fn fields(&self) -> &dyn CredentialFields {
                match self {
                    $(Self::$variant(c) => c),+
                }
            }

            fn fields_mut(&mut self) -> &mut dyn CredentialFields {
                match self {
                    $(Self::$variant(c) => c),+
                }
            }
        }
    };
}

providers! {
    Openai(OpenaiCredential) = Openai,
    Anthropic(ApiKeyCredential) = Anthropic,
    Bedrock(BedrockCredential) = Bedrock,
    Vertex(VertexCredential) = Vertex,
    Gemini(ApiKeyCredential) = Gemini,
    Azure(AzureCredential) = Azure,
    Mock(MockCredential) = Mock,
}

impl Credential {
    /// Every problem with the credential, one message per problem, each naming its field.
    pub fn problems(&self, urls: UrlPolicy) -> Vec<String> {
        let mut p = Vec::new();
        self.fields().problems(urls, &mut p);
        p
    }

    pub fn public_fields(&self) -> Value {
        self.fields().public_fields()
    }

    /// Whether the seller chose where requests go (a base URL of their own rather than the
    /// provider's): such an endpoint reports the usage billed through it, so an operator
    /// approves it before it serves billed traffic.
    pub fn has_custom_endpoint(&self) -> bool {
        match self {
            Self::Openai(c) => c.base_url.is_some(),
            Self::Anthropic(c) | Self::Gemini(c) => c.base_url.is_some(),
            Self::Bedrock(c) => c.base_url.is_some(),
            Self::Vertex(c) => c.base_url.is_some(),
            // A resource endpoint on Microsoft's own domains is Azure's, not the seller's.
            Self::Azure(c) => !UpstreamUrl::parse(&c.endpoint).is_ok_and(|u| {
                u.tls
                    && [".openai.azure.com", ".cognitiveservices.azure.com"]
                        .iter()
                        .any(|d| u.host.ends_with(d))
            }),
            Self::Mock(_) => false,
        }
    }

    /// Replaces secrets written `env:NAME` (in an operator's file) by the variable's value;
    /// unset variables are problems. Never called on a seller's submission, whose secrets are
    /// taken literally.
    pub fn resolve_env(&mut self, resolve: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        let mut p = Vec::new();
        for (name, secret) in self.fields_mut().secrets_mut() {
            let Some(var) = secret.0.strip_prefix("env:") else {
                continue;
            };
            match resolve(var) {
                Some(value) => *secret = Secret(value),
                None => p.push(format!("{name}: environment variable `{var}` is not set")),
            }
        }
        p
    }
}

// === Rules shared by the providers ===

/// API keys and access-key secrets go into headers or signatures: printable ASCII, bounded.
fn check_secret(name: &str, secret: &Secret, p: &mut Vec<String>) {
    let v = secret.expose();
    if v.is_empty() {
        p.push(format!("{name}: required"));
    } else if v.len() > SECRET_BYTES_MAX || !is_visible_ascii(v) {
        p.push(format!(
            "{name}: must be 1 to {SECRET_BYTES_MAX} printable ASCII characters"
        ));
    }
}

fn check_url(name: &str, url: &str, urls: UrlPolicy, p: &mut Vec<String>) {
    match UpstreamUrl::parse(url) {
        Err(why) => p.push(format!("{name}: {why}")),
        Ok(u) if urls == UrlPolicy::Marketplace && !u.tls && !u.is_loopback() => p.push(format!(
            "{name}: must be an https:// URL (http:// on loopback only)"
        )),
        Ok(_) => {}
    }
}

fn check_optional_url(name: &str, url: &Option<String>, urls: UrlPolicy, p: &mut Vec<String>) {
    if let Some(u) = url {
        check_url(name, u, urls, p);
    }
}

/// Names that go into a request path or query (Azure deployments and api-versions).
fn check_path_name(name: &str, value: &str, p: &mut Vec<String>) {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        p.push(format!(
            "{name}: must be 1 to 64 letters, digits, `-`, `_` or `.`"
        ));
    }
}

pub(crate) fn is_visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x21..0x7f).contains(&b))
}

const SECRET_BYTES_MAX: usize = 4096;

// === OpenAI (and every server speaking its API) ===

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OpenaiCredential {
    /// The API key, sent as a bearer token.
    #[serde(default)]
    pub api_key: Secret,
    /// With the version prefix; defaults to [`OpenaiCredential::BASE_URL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Sent as `OpenAI-Organization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
}

impl OpenaiCredential {
    pub const BASE_URL: &'static str = "https://api.openai.com/v1";

    pub fn base_url(&self) -> &str {
        self.base_url.as_deref().unwrap_or(Self::BASE_URL)
    }
}

impl CredentialFields for OpenaiCredential {
    fn problems(&self, urls: UrlPolicy, p: &mut Vec<String>) {
        check_secret("api_key", &self.api_key, p);
        check_optional_url("base_url", &self.base_url, urls, p);
        if let Some(org) = &self.organization {
            if org.is_empty() || org.len() > 256 || !is_visible_ascii(org) {
                p.push("organization: must be 1 to 256 printable ASCII characters".to_owned());
            }
        }
    }

    fn secrets_mut(&mut self) -> Vec<(&'static str, &mut Secret)> {
        vec![("api_key", &mut self.api_key)]
    }

    fn public_fields(&self) -> Value {
        json!({ "base_url": self.base_url(), "organization": self.organization })
    }
}

// === Anthropic and the Gemini API: an API key ===

/// A provider that takes an API key and an optional base URL (Anthropic, the Gemini API). Where
/// the key goes and the default base URL are the adapter's business.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCredential {
    /// The provider's API key.
    #[serde(default)]
    pub api_key: Secret,
    /// The API's root; the provider's public endpoint when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

impl CredentialFields for ApiKeyCredential {
    fn problems(&self, urls: UrlPolicy, p: &mut Vec<String>) {
        check_secret("api_key", &self.api_key, p);
        check_optional_url("base_url", &self.base_url, urls, p);
    }

    fn secrets_mut(&mut self) -> Vec<(&'static str, &mut Secret)> {
        vec![("api_key", &mut self.api_key)]
    }

    fn public_fields(&self) -> Value {
        json!({ "base_url": self.base_url })
    }
}

// === AWS Bedrock ===

/// AWS access keys (with a session token for STS credentials), or a Bedrock API key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BedrockCredential {
    /// The AWS region, e.g. `us-east-1`.
    #[serde(default)]
    pub region: String,
    /// AWS access key id (SigV4), with `secret_access_key`; not with `api_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// AWS secret access key, with `access_key_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(inline))]
    pub secret_access_key: Option<Secret>,
    /// STS session token, for temporary access keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(inline))]
    pub session_token: Option<Secret>,
    /// A Bedrock API key, sent as a bearer token, instead of access keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(inline))]
    pub api_key: Option<Secret>,
    /// Defaults to `https://bedrock-runtime.{region}.amazonaws.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

/// How a Bedrock credential authenticates.
pub enum BedrockAuth<'a> {
    /// SigV4 with these keys.
    AccessKeys {
        access_key_id: &'a str,
        secret_access_key: &'a Secret,
        session_token: Option<&'a Secret>,
    },
    /// A Bedrock API key, sent as a bearer token.
    ApiKey(&'a Secret),
}

impl BedrockCredential {
    pub fn base_url(&self) -> String {
        self.base_url
            .clone()
            .unwrap_or_else(|| format!("https://bedrock-runtime.{}.amazonaws.com", self.region))
    }

    /// The one authentication mode the fields name (`None`: none or both, a problem).
    pub fn auth(&self) -> Option<BedrockAuth<'_>> {
        match (
            &self.access_key_id,
            &self.secret_access_key,
            &self.session_token,
            &self.api_key,
        ) {
            (Some(id), Some(secret), token, None) => Some(BedrockAuth::AccessKeys {
                access_key_id: id,
                secret_access_key: secret,
                session_token: token.as_ref(),
            }),
            (None, None, None, Some(key)) => Some(BedrockAuth::ApiKey(key)),
            _ => None,
        }
    }
}

impl CredentialFields for BedrockCredential {
    fn problems(&self, urls: UrlPolicy, p: &mut Vec<String>) {
        // The region goes into a host name and the SigV4 scope.
        let region_ok = !self.region.is_empty()
            && self.region.len() <= 32
            && self
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !region_ok {
            p.push("region: required, an AWS region such as `us-east-1`".to_owned());
        }
        match self.auth() {
            Some(BedrockAuth::AccessKeys {
                access_key_id,
                secret_access_key,
                session_token,
            }) => {
                // The key id is written into the SigV4 scope, whose parts `/` separates.
                let id_ok = !access_key_id.is_empty()
                    && access_key_id.len() <= 128
                    && access_key_id.bytes().all(|b| b.is_ascii_alphanumeric());
                if !id_ok {
                    p.push("access_key_id: must be 1 to 128 letters and digits".to_owned());
                }
                check_secret("secret_access_key", secret_access_key, p);
                if let Some(token) = session_token {
                    check_secret("session_token", token, p);
                }
            }
            Some(BedrockAuth::ApiKey(key)) => check_secret("api_key", key, p),
            None => p.push(
                "give access_key_id with secret_access_key (and optionally session_token), \
                 or api_key alone (a Bedrock API key)"
                    .to_owned(),
            ),
        }
        check_optional_url("base_url", &self.base_url, urls, p);
    }

    fn secrets_mut(&mut self) -> Vec<(&'static str, &mut Secret)> {
        let mut out = Vec::new();
        if let Some(s) = &mut self.secret_access_key {
            out.push(("secret_access_key", s));
        }
        if let Some(s) = &mut self.session_token {
            out.push(("session_token", s));
        }
        if let Some(s) = &mut self.api_key {
            out.push(("api_key", s));
        }
        out
    }

    fn public_fields(&self) -> Value {
        let auth = if self.api_key.is_some() {
            "bedrock_api_key"
        } else {
            "aws_access_key"
        };
        json!({ "region": self.region, "auth": auth, "base_url": self.base_url })
    }
}

// === Google Vertex AI ===

/// A service-account key file (its JSON text); access tokens are minted from it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VertexCredential {
    /// The service-account key file, its JSON text.
    #[serde(default)]
    pub service_account_json: Secret,
    /// `global`, a region (`us-central1`) or a multi-region (`us`, `eu`).
    #[serde(default)]
    pub location: String,
    /// The project billed; the key file's `project_id` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Defaults to the location's endpoint (see [`VertexCredential::base_url`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

impl VertexCredential {
    pub fn service_account(&self) -> Result<ServiceAccount, String> {
        ServiceAccount::parse(self.service_account_json.expose())
    }

    /// The project billed, given the parsed key file.
    pub fn project<'a>(&'a self, account: &'a ServiceAccount) -> &'a str {
        self.project.as_deref().unwrap_or(&account.project_id)
    }

    pub fn base_url(&self) -> String {
        if let Some(u) = &self.base_url {
            return u.clone();
        }
        match self.location.as_str() {
            "global" => "https://aiplatform.googleapis.com".to_owned(),
            // The multi-region endpoints.
            "us" | "eu" => format!("https://aiplatform.{}.rep.googleapis.com", self.location),
            region => format!("https://{region}-aiplatform.googleapis.com"),
        }
    }
}

impl CredentialFields for VertexCredential {
    fn problems(&self, urls: UrlPolicy, p: &mut Vec<String>) {
        if !is_path_id(&self.location) {
            p.push(
                "location: required, a Vertex location such as `us-central1` or `global`"
                    .to_owned(),
            );
        }
        match self.service_account() {
            Err(why) => p.push(format!("service_account_json: {why}")),
            Ok(account) if !is_path_id(self.project(&account)) => p.push(
                "project: must be a project id (lowercase letters, digits, `-`); required when \
                 the key file names none"
                    .to_owned(),
            ),
            Ok(_) => {}
        }
        check_optional_url("base_url", &self.base_url, urls, p);
    }

    fn secrets_mut(&mut self) -> Vec<(&'static str, &mut Secret)> {
        vec![("service_account_json", &mut self.service_account_json)]
    }

    fn public_fields(&self) -> Value {
        let account = self.service_account().ok();
        json!({
            "location": self.location,
            "project_id": account.as_ref().map(|a| self.project(a).to_owned()),
            "client_email": account.as_ref().map(|a| a.client_email.clone()),
            "base_url": self.base_url,
        })
    }
}

// === Azure OpenAI ===

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AzureCredential {
    /// The resource endpoint, `https://{resource}.openai.azure.com`.
    #[serde(default)]
    pub endpoint: String,
    /// Sent as `api-key`.
    #[serde(default)]
    pub api_key: Secret,
    /// The deployment requests go to; the model's upstream name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The deployments surface's `api-version` (default `2024-10-21`), or `v1` for the
    /// `/openai/v1/` surface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
}

impl AzureCredential {
    pub const API_VERSION_DEFAULT: &'static str = "2024-10-21";

    pub fn api_version(&self) -> &str {
        self.api_version
            .as_deref()
            .unwrap_or(Self::API_VERSION_DEFAULT)
    }
}

impl CredentialFields for AzureCredential {
    fn problems(&self, urls: UrlPolicy, p: &mut Vec<String>) {
        if self.endpoint.is_empty() {
            p.push("endpoint: required, `https://{resource}.openai.azure.com`".to_owned());
        } else {
            check_url("endpoint", &self.endpoint, urls, p);
        }
        check_secret("api_key", &self.api_key, p);
        if let Some(d) = &self.deployment {
            check_path_name("deployment", d, p);
        }
        if let Some(v) = &self.api_version {
            check_path_name("api_version", v, p);
        }
    }

    fn secrets_mut(&mut self) -> Vec<(&'static str, &mut Secret)> {
        vec![("api_key", &mut self.api_key)]
    }

    fn public_fields(&self) -> Value {
        json!({
            "endpoint": self.endpoint,
            "deployment": self.deployment,
            "api_version": self.api_version,
        })
    }
}

// === The built-in mock ===

/// The built-in mock provider (demos, tests): no secret at all.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MockCredential {}

impl CredentialFields for MockCredential {
    fn problems(&self, _urls: UrlPolicy, _p: &mut Vec<String>) {}

    fn secrets_mut(&mut self) -> Vec<(&'static str, &mut Secret)> {
        Vec::new()
    }

    fn public_fields(&self) -> Value {
        json!({})
    }
}
