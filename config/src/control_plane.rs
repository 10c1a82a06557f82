//! The control plane's configuration file (`tokn-control --config`). Everything the service
//! owns at runtime (accounts, keys, pools, catalog, settings) lives in its store, not here.

use serde::Deserialize;

use crate::validate::{decode_hex32, resolve, resolve_url};
use crate::{ConfigProblems, SecretRef};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// HTTP listen address of the API.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `postgres://…` for fleets; without it an embedded SQLite file is used.
    #[serde(default)]
    pub database_url: Option<SecretRef>,
    /// The SQLite file used when `database_url` is absent.
    #[serde(default = "default_sqlite_path")]
    pub sqlite_path: String,
    /// Bearer token of the operator (admin endpoints). Usually `env:NAME`.
    pub admin_token: SecretRef,
    /// Bearer token proxies present to watch the configuration. Usually `env:NAME`.
    pub proxy_token: SecretRef,
    /// Key-encryption keys for seller credentials; the highest version seals new records,
    /// older ones still open records until `tokn-control rewrap` has moved them.
    pub kek: Vec<KekConfig>,
    /// Redis hot state shared with the proxies; without it keys travel in the pushed snapshot.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Catalog loaded as the first price version when the store has none; the embedded
    /// default catalog when absent.
    #[serde(default)]
    pub catalog_path: Option<String>,
    #[serde(default)]
    pub limits: ControlLimits,
    /// Where credential verification calls each provider; tests point these at fakes.
    #[serde(default)]
    pub verify: VerifyConfig,
}

fn default_listen() -> String {
    "127.0.0.1:7070".to_owned()
}

fn default_sqlite_path() -> String {
    "tokn-control.db".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekConfig {
    pub version: u32,
    /// 64 hex digits. Usually `env:NAME`.
    pub key: SecretRef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: SecretRef,
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    "tokn:".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlLimits {
    /// Largest JSON request body accepted by the API.
    pub request_body_bytes_max: usize,
    /// Longest a proxy's watch request may wait for a change.
    pub watch_wait_s_max: u64,
    /// How often a replica checks the store for changes made by other replicas.
    pub version_poll_ms: u64,
    /// How long a credential verification call may take.
    pub verify_timeout_ms: u64,
    /// Items returned by one list call.
    pub list_items_max: u32,
}

impl Default for ControlLimits {
    fn default() -> Self {
        Self {
            request_body_bytes_max: 256 * 1024,
            watch_wait_s_max: 60,
            version_poll_ms: 200,
            verify_timeout_ms: 10_000,
            list_items_max: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    pub openai_base_url: String,
    pub anthropic_base_url: String,
    pub gemini_base_url: String,
    /// Bedrock's control endpoint (its model list); `https://bedrock.{region}.amazonaws.com`
    /// for the credential's region when absent.
    pub bedrock_base_url: Option<String>,
    /// Checks may reach internal addresses (loopback, private ranges, link-local, …) after
    /// resolution. Off by default: a seller names its own endpoint (and a Vertex key file its
    /// token URI), and a check must not become a probe of the operator's network.
    pub allow_internal_endpoints: bool,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            openai_base_url: "https://api.openai.com/v1".to_owned(),
            anthropic_base_url: "https://api.anthropic.com".to_owned(),
            gemini_base_url: "https://generativelanguage.googleapis.com".to_owned(),
            bedrock_base_url: None,
            allow_internal_endpoints: false,
        }
    }
}

/// The control plane's configuration with its secrets resolved.
#[derive(Clone)]
pub struct ValidControlPlane {
    pub config: ControlPlaneConfig,
    /// `None`: embedded SQLite at `config.sqlite_path`.
    pub database_url: Option<String>,
    pub admin_token: String,
    pub proxy_token: String,
    pub keks: Vec<(u32, [u8; 32])>,
    pub redis_url: Option<String>,
}

impl std::fmt::Debug for ValidControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ValidControlPlane({:?}, <secrets redacted>)",
            self.config.listen
        )
    }
}

/// The embedded default for one machine: SQLite, no Redis. Its tokens and key-encryption key
/// come from the environment (`TOKN_ADMIN_TOKEN`, `TOKN_PROXY_TOKEN`, `TOKN_KEK_1`).
pub const DEFAULT_CONTROL_PLANE_TOML: &str = r#"
admin_token = "env:TOKN_ADMIN_TOKEN"
proxy_token = "env:TOKN_PROXY_TOKEN"
[[kek]]
version = 1
key = "env:TOKN_KEK_1"
"#;

pub fn load_control_plane(
    text: &str,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
) -> Result<ValidControlPlane, ConfigProblems> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigProblems::single(format!("syntax: {e}")))?;
    let (config, mut p) = crate::fields::deserialize_all::<ControlPlaneConfig>(table);
    let Some(config) = config else {
        return Err(ConfigProblems::from_list(p));
    };
    if config.listen.parse::<std::net::SocketAddr>().is_err() {
        p.push(format!(
            "listen: `{}` is not an ip:port address",
            config.listen
        ));
    }
    let mut token = |field: &str, s: &SecretRef| match resolve(s, resolve_secret) {
        Ok(t) if t.len() >= 16 && t.bytes().all(|b| (0x21..0x7f).contains(&b)) => t,
        Ok(_) => {
            p.push(format!(
                "{field}: must be at least 16 printable ASCII characters"
            ));
            String::new()
        }
        Err(why) => {
            p.push(format!("{field}: {why}"));
            String::new()
        }
    };
    let admin_token = token("admin_token", &config.admin_token);
    let proxy_token = token("proxy_token", &config.proxy_token);
    if !admin_token.is_empty() && admin_token == proxy_token {
        p.push("proxy_token: must differ from admin_token".to_owned());
    }
    let database_url = resolve_url(
        "database_url",
        config.database_url.as_ref(),
        &["postgres://", "postgresql://"],
        resolve_secret,
        &mut p,
    );
    let redis_url = resolve_url(
        "redis.url",
        config.redis.as_ref().map(|r| &r.url),
        &["redis://", "rediss://"],
        resolve_secret,
        &mut p,
    );
    if config.kek.is_empty() {
        p.push("kek: at least one key-encryption key is needed".to_owned());
    }
    let mut keks = Vec::with_capacity(config.kek.len());
    for (i, k) in config.kek.iter().enumerate() {
        match resolve(&k.key, resolve_secret).map(|hex| decode_hex32(&hex)) {
            Ok(Some(key)) => keks.push((k.version, key)),
            Ok(None) => p.push(format!("kek[{i}].key: must be 64 hex digits")),
            Err(why) => p.push(format!("kek[{i}].key: {why}")),
        }
        if config.kek[..i].iter().any(|o| o.version == k.version) {
            p.push(format!("kek[{i}].version: {} is listed twice", k.version));
        }
    }
    let l = &config.limits;
    if l.request_body_bytes_max == 0 || l.watch_wait_s_max == 0 || l.version_poll_ms == 0 {
        p.push("limits: every limit must be greater than zero".to_owned());
    }
    if l.list_items_max == 0 || l.verify_timeout_ms == 0 {
        p.push("limits: every limit must be greater than zero".to_owned());
    }
    if p.is_empty() {
        Ok(ValidControlPlane {
            config,
            database_url,
            admin_token,
            proxy_token,
            keks,
            redis_url,
        })
    } else {
        Err(ConfigProblems::from_list(p))
    }
}
