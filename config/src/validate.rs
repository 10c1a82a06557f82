//! Semantic validation: every problem in the file, each with its field path.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use crate::google::{is_path_id, ServiceAccount};
use crate::schema::{GatewayConfig, KeyConfig, PoolConfig, ProviderKind, PushedConfig, SecretRef};

/// Everything wrong with a configuration, one line per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblems(pub Vec<String>);

impl ConfigProblems {
    pub fn single(problem: String) -> Self {
        Self(vec![problem])
    }
    pub fn from_list(problems: Vec<String>) -> Self {
        Self(problems)
    }
}

impl fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration problem(s):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigProblems {}

/// A parsed upstream base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash, e.g. `/v1`.
    pub base_path: String,
}

impl UpstreamUrl {
    /// This host itself (where plain `http://` is acceptable).
    pub fn is_loopback(&self) -> bool {
        matches!(self.host.as_str(), "127.0.0.1" | "localhost" | "::1")
    }

    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err("must start with http:// or https://".to_owned());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err("must not carry credentials".to_owned());
        }
        if path.contains(['?', '#']) {
            return Err("must not carry a query or fragment".to_owned());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p.parse::<u16>().map_err(|_| format!("bad port `{p}`"))?;
                (h, port)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err("needs a host and a non-zero port".to_owned());
        }
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
        {
            return Err(format!("bad host `{host}`"));
        }
        Ok(Self {
            tls,
            host: host.to_ascii_lowercase(),
            port,
            base_path: path.trim_end_matches('/').to_owned(),
        })
    }
}

/// A configuration that passed validation, with secrets resolved.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub config: GatewayConfig,
    /// Per pool (same order as `config.pools`): the upstream and the resolved credential.
    pub pool_upstreams: Vec<Option<(UpstreamUrl, String)>>,
    /// Per pool: the AWS region and SigV4 keys of a Bedrock pool that signs its requests
    /// (`None` for other pools and for Bedrock pools with an API key, which is in
    /// `pool_upstreams`).
    pub pool_aws: Vec<Option<ValidAws>>,
    /// Per pool: a Vertex AI pool's service account, location and project (`None` for others).
    pub pool_vertex: Vec<Option<ValidVertex>>,
    /// Per key (same order as `config.keys`): the SHA-256 of the key.
    pub key_hashes: Vec<[u8; 32]>,
    /// Per pool: the price ratio in parts per million.
    pub pool_price_ratio_ppm: Vec<u64>,
    /// The control plane feeding this proxy, with its secrets resolved.
    pub control: Option<ValidControl>,
    /// Redis hot state, resolved; `None` keeps hot state in process.
    pub redis_url: Option<String>,
    /// Version of the pushed configuration the catalog, pools and keys came from (0: the file).
    pub version: u64,
    /// Whether buyer keys are looked up in Redis instead of being listed in `config.keys`.
    pub keys_in_hot_state: bool,
}

/// `[control]` with its secrets resolved.
#[derive(Clone)]
pub struct ValidControl {
    pub url: String,
    pub token: String,
    pub snapshot_key: [u8; 32],
}

impl fmt::Debug for ValidControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ValidControl({}, <redacted>)", self.url)
    }
}

impl ValidConfig {
    /// This proxy's configuration with the catalog, pools and keys the control plane pushed,
    /// and the ids of the pools left out.
    pub fn with_pushed(
        &self,
        pushed: PushedConfig,
    ) -> Result<(ValidConfig, Vec<String>), ConfigProblems> {
        // One seller's pool must not stop the fleet's configuration: a pool pushed without its
        // credential (a control plane older than this build's adapters) or with fields this
        // build refuses is left out, the rest applies.
        let (pools, skipped): (Vec<_>, Vec<_>) =
            pushed.pools.into_iter().enumerate().partition(|(i, p)| {
                let has_credential = match p.provider {
                    ProviderKind::Anthropic | ProviderKind::Gemini => p.api_key.is_some(),
                    ProviderKind::Vertex => p.vertex_service_account.is_some(),
                    _ => true,
                };
                has_credential && pool_problems(*i, p).is_empty()
            });
        let pools = pools.into_iter().map(|(_, p)| p).collect();
        let skipped = skipped.into_iter().map(|(_, p)| p);
        let keys_in_hot_state = pushed.keys.is_none();
        if keys_in_hot_state && self.redis_url.is_none() {
            return Err(ConfigProblems::single(
                "the control plane keeps keys in Redis, but hot_state.redis_url is not set"
                    .to_owned(),
            ));
        }
        let config = GatewayConfig {
            models: pushed.models,
            pools,
            keys: pushed.keys.unwrap_or_default(),
            control: None,
            ..self.config.clone()
        };
        // Pushed secrets are literals; nothing is read from this proxy's environment.
        let mut valid = validate(config, &|_| None)?;
        valid.control = self.control.clone();
        valid.redis_url = self.redis_url.clone();
        valid.version = pushed.version;
        valid.keys_in_hot_state = keys_in_hot_state;
        Ok((valid, skipped.map(|p| p.id).collect()))
    }
}

/// What is wrong with one pushed pool on its own (pushed secrets are literals).
fn pool_problems(i: usize, pool: &PoolConfig) -> Vec<String> {
    let mut p = Vec::new();
    let no_env = |_: &str| None;
    validate_pool_upstream(i, pool, &no_env, &mut p);
    validate_pool_aws(i, pool, &no_env, &mut p);
    validate_pool_vertex(i, pool, &no_env, &mut p);
    p
}

/// A Bedrock pool's region and, when it signs with SigV4, its AWS keys.
#[derive(Clone, PartialEq, Eq)]
pub struct ValidAws {
    pub region: String,
    /// `None`: the pool's `api_key` is a Bedrock API key (bearer).
    pub keys: Option<AwsKeys>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct AwsKeys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for ValidAws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidAws")
            .field("region", &self.region)
            .field(
                "keys",
                &self.keys.as_ref().map(|k| k.access_key_id.as_str()),
            )
            .finish_non_exhaustive()
    }
}

/// A Vertex AI pool's service account (parsed once, at load) and where its calls go.
#[derive(Debug, Clone)]
pub struct ValidVertex {
    pub service_account: Arc<ServiceAccount>,
    pub location: String,
    pub project: String,
}

/// Hashes a buyer key the way the whole gateway does: SHA-256 of its bytes. Keys are long
/// random strings, so a fast hash is enough; no key is kept in plaintext after load.
pub fn hash_key(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

pub(crate) fn validate(
    config: GatewayConfig,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
) -> Result<ValidConfig, ConfigProblems> {
    let mut p = Vec::new();
    let s = &config.server;
    if s.listen.is_empty() && s.tls_listen.is_empty() {
        p.push("server.listen: at least one listen address is needed".to_owned());
    }
    for (field, addrs) in [("listen", &s.listen), ("tls_listen", &s.tls_listen)] {
        for (i, a) in addrs.iter().enumerate() {
            if a.parse::<std::net::SocketAddr>().is_err() {
                p.push(format!(
                    "server.{field}[{i}]: `{a}` is not an ip:port address"
                ));
            }
        }
    }
    if let Some(a) = &s.metrics_listen {
        if a.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!(
                "server.metrics_listen: `{a}` is not an ip:port address"
            ));
        }
    }
    if !s.tls_listen.is_empty() && (s.tls_cert_path.is_none() || s.tls_key_path.is_none()) {
        p.push("server.tls_listen: needs tls_cert_path and tls_key_path".to_owned());
    }
    if s.threads == 0 || s.threads > 256 {
        p.push("server.threads: must be between 1 and 256".to_owned());
    }
    let l = &config.limits;
    for (name, v) in [
        ("request_body_bytes_max", l.request_body_bytes_max as u64),
        ("response_body_bytes_max", l.response_body_bytes_max as u64),
        ("request_body_timeout_ms", l.request_body_timeout_ms),
        ("upstream_connect_timeout_ms", l.upstream_connect_timeout_ms),
        ("upstream_tls_timeout_ms", l.upstream_tls_timeout_ms),
        ("upstream_header_timeout_ms", l.upstream_header_timeout_ms),
        (
            "upstream_idle_read_timeout_ms",
            l.upstream_idle_read_timeout_ms,
        ),
        ("request_total_timeout_ms", l.request_total_timeout_ms),
        ("failover_attempts_max", l.failover_attempts_max as u64),
        ("upstream_h2_streams_max", l.upstream_h2_streams_max as u64),
    ] {
        if v == 0 {
            p.push(format!("limits.{name}: must be greater than zero"));
        }
    }
    if config.usage.path.is_empty() {
        p.push("usage.path: must not be empty".to_owned());
    }
    let control = config
        .control
        .as_ref()
        .and_then(|c| validate_control(c, &config, resolve_secret, &mut p));
    let h = &config.hot_state;
    let redis_url = resolve_url(
        "hot_state.redis_url",
        h.redis_url.as_ref(),
        &["redis://", "rediss://"],
        resolve_secret,
        &mut p,
    );
    if h.key_cache_entries_max == 0 {
        p.push("hot_state.key_cache_entries_max: must be greater than zero".to_owned());
    }

    let mut model_ids = HashSet::new();
    for (i, m) in config.models.iter().enumerate() {
        if m.id.is_empty() || m.id.len() > 256 {
            p.push(format!("models[{i}].id: must be 1 to 256 characters"));
        }
        if !model_ids.insert(m.id.as_str()) {
            p.push(format!("models[{i}].id: `{}` is listed twice", m.id));
        }
    }

    let mut pool_ids = HashSet::new();
    let mut pool_upstreams = Vec::with_capacity(config.pools.len());
    let mut pool_aws = Vec::with_capacity(config.pools.len());
    let mut pool_vertex = Vec::with_capacity(config.pools.len());
    let mut pool_price_ratio_ppm = Vec::with_capacity(config.pools.len());
    for (i, pool) in config.pools.iter().enumerate() {
        if !pool_ids.insert(pool.id.as_str()) {
            p.push(format!("pools[{i}].id: `{}` is listed twice", pool.id));
        }
        pool_upstreams.push(validate_pool_upstream(i, pool, resolve_secret, &mut p));
        pool_aws.push(validate_pool_aws(i, pool, resolve_secret, &mut p));
        pool_vertex.push(validate_pool_vertex(i, pool, resolve_secret, &mut p));
        if !(pool.price_ratio > 0.0 && pool.price_ratio <= 1.0) {
            p.push(format!("pools[{i}].price_ratio: must be in (0, 1]"));
        }
        // The ratio is a rate, not money: rounded once to parts per million here.
        pool_price_ratio_ppm.push((pool.price_ratio * 1_000_000.0).round() as u64);
        if pool.models.is_empty() {
            p.push(format!("pools[{i}].models: must name at least one model"));
        }
        for m in &pool.models {
            match config.models.iter().find(|c| &c.id == m) {
                None => p.push(format!("pools[{i}].models: `{m}` is not in the catalog")),
                Some(c) if c.provider != pool.provider => p.push(format!(
                    "pools[{i}].models: `{m}` is a {} model, the pool is {}",
                    c.provider.as_str(),
                    pool.provider.as_str()
                )),
                Some(_) => {}
            }
        }
    }

    let mut key_ids = HashSet::new();
    let mut key_hashes = Vec::with_capacity(config.keys.len());
    let mut seen_hashes = HashSet::new();
    for (i, key) in config.keys.iter().enumerate() {
        if !key_ids.insert(key.id.as_str()) {
            p.push(format!("keys[{i}].id: `{}` is listed twice", key.id));
        }
        if key.account.is_empty() {
            p.push(format!("keys[{i}].account: must not be empty"));
        }
        let hash = key_hash(i, key, resolve_secret, &mut p);
        if !seen_hashes.insert(hash) && hash != [0; 32] {
            p.push(format!("keys[{i}]: the same key is listed twice"));
        }
        key_hashes.push(hash);
        for m in key.allowed_models.iter().flatten() {
            if !model_ids.contains(m.as_str()) {
                p.push(format!(
                    "keys[{i}].allowed_models: `{m}` is not in the catalog"
                ));
            }
        }
    }

    if p.is_empty() {
        Ok(ValidConfig {
            config,
            pool_upstreams,
            pool_aws,
            pool_vertex,
            key_hashes,
            pool_price_ratio_ppm,
            control,
            redis_url,
            version: 0,
            keys_in_hot_state: false,
        })
    } else {
        Err(ConfigProblems(p))
    }
}

/// Resolves an optional URL secret and checks its scheme; problems are pushed, named by `field`.
pub(crate) fn resolve_url(
    field: &str,
    secret: Option<&SecretRef>,
    schemes: &[&str],
    resolve_secret: &dyn Fn(&str) -> Option<String>,
    p: &mut Vec<String>,
) -> Option<String> {
    match resolve(secret?, resolve_secret) {
        Ok(url) if schemes.iter().any(|s| url.starts_with(s)) => Some(url),
        Ok(_) => {
            p.push(format!("{field}: must start with {}", schemes.join(" or ")));
            None
        }
        Err(why) => {
            p.push(format!("{field}: {why}"));
            None
        }
    }
}

pub(crate) fn resolve(
    secret: &SecretRef,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    match secret {
        SecretRef::Literal(v) => Ok(v.clone()),
        SecretRef::Env(name) => {
            resolve_secret(name).ok_or_else(|| format!("environment variable `{name}` is not set"))
        }
    }
}

fn validate_control(
    c: &crate::schema::ControlConfig,
    config: &GatewayConfig,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
    p: &mut Vec<String>,
) -> Option<ValidControl> {
    let before = p.len();
    if !config.models.is_empty() || !config.pools.is_empty() || !config.keys.is_empty() {
        p.push(
            "control: models, pools and keys come from the control plane; remove them from the file"
                .to_owned(),
        );
    }
    if let Err(why) = UpstreamUrl::parse(&c.url) {
        p.push(format!("control.url: {why}"));
    }
    let token = match resolve(&c.token, resolve_secret) {
        Ok(t) if !t.is_empty() && is_header_safe(&t) => t,
        Ok(_) => {
            p.push("control.token: must be non-empty printable ASCII".to_owned());
            String::new()
        }
        Err(why) => {
            p.push(format!("control.token: {why}"));
            String::new()
        }
    };
    let snapshot_key = match resolve(&c.snapshot_key, resolve_secret).map(|k| decode_hex32(&k)) {
        Ok(Some(k)) => k,
        Ok(None) => {
            p.push("control.snapshot_key: must be 64 hex digits".to_owned());
            [0; 32]
        }
        Err(why) => {
            p.push(format!("control.snapshot_key: {why}"));
            [0; 32]
        }
    };
    if c.snapshot_path.is_empty() {
        p.push("control.snapshot_path: must not be empty".to_owned());
    }
    if c.watch_timeout_s == 0 || c.watch_timeout_s > 300 {
        p.push("control.watch_timeout_s: must be between 1 and 300".to_owned());
    }
    (p.len() == before).then(|| ValidControl {
        url: c.url.trim_end_matches('/').to_owned(),
        token,
        snapshot_key,
    })
}

/// Checks a Bedrock pool's region and auth mode (exactly one of SigV4 keys and an API key);
/// fields of other pools must be absent.
fn validate_pool_aws(
    i: usize,
    pool: &PoolConfig,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
    p: &mut Vec<String>,
) -> Option<ValidAws> {
    let has_keys = pool.aws_access_key_id.is_some()
        || pool.aws_secret_access_key.is_some()
        || pool.aws_session_token.is_some();
    if pool.provider != ProviderKind::Bedrock {
        if has_keys || pool.aws_region.is_some() {
            p.push(format!(
                "pools[{i}]: aws_* fields are for bedrock pools only"
            ));
        }
        return None;
    }
    let before = p.len();
    let region = pool.aws_region.clone().unwrap_or_default();
    let region_ok = !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !region_ok {
        p.push(format!(
            "pools[{i}].aws_region: required for bedrock (e.g. `us-east-1`)"
        ));
    }
    let keys = match (
        &pool.aws_access_key_id,
        &pool.aws_secret_access_key,
        &pool.api_key,
    ) {
        (Some(id), Some(secret), None) => {
            let mut field = |name: &str, s: &SecretRef| match resolve(s, resolve_secret) {
                Ok(v) if !v.is_empty() && is_header_safe(&v) => v,
                Ok(_) => {
                    p.push(format!(
                        "pools[{i}].{name}: must be non-empty printable ASCII"
                    ));
                    String::new()
                }
                Err(why) => {
                    p.push(format!("pools[{i}].{name}: {why}"));
                    String::new()
                }
            };
            let secret_access_key = field("aws_secret_access_key", secret);
            let session_token = pool
                .aws_session_token
                .as_ref()
                .map(|t| field("aws_session_token", t));
            if id.is_empty() || !is_header_safe(id) || id.contains('/') {
                p.push(format!(
                    "pools[{i}].aws_access_key_id: must be non-empty printable ASCII"
                ));
            }
            Some(AwsKeys {
                access_key_id: id.clone(),
                secret_access_key,
                session_token,
            })
        }
        (None, None, Some(_)) if pool.aws_session_token.is_none() => None,
        _ => {
            p.push(format!(
                "pools[{i}]: a bedrock pool takes aws_access_key_id with aws_secret_access_key \
                 (and optionally aws_session_token), or api_key alone (a Bedrock API key)"
            ));
            None
        }
    };
    (p.len() == before).then_some(ValidAws { region, keys })
}

/// Checks a Vertex AI pool's service account, location and project; fields of other pools must
/// be absent.
fn validate_pool_vertex(
    i: usize,
    pool: &PoolConfig,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
    p: &mut Vec<String>,
) -> Option<ValidVertex> {
    if pool.provider != ProviderKind::Vertex {
        if pool.vertex_service_account.is_some()
            || pool.vertex_location.is_some()
            || pool.vertex_project.is_some()
        {
            p.push(format!(
                "pools[{i}]: vertex_* fields are for vertex pools only"
            ));
        }
        return None;
    }
    let before = p.len();
    if pool.api_key.is_some() {
        p.push(format!(
            "pools[{i}].api_key: vertex pools authenticate with vertex_service_account"
        ));
    }
    let location = pool.vertex_location.clone().unwrap_or_default();
    if !is_path_id(&location) {
        p.push(format!(
            "pools[{i}].vertex_location: required for vertex (e.g. `us-central1` or `global`)"
        ));
    }
    let service_account = match pool
        .vertex_service_account
        .as_ref()
        .map(|s| resolve(s, resolve_secret))
    {
        None => {
            p.push(format!(
                "pools[{i}].vertex_service_account: required for vertex (the key file's JSON)"
            ));
            None
        }
        Some(Err(why)) => {
            p.push(format!("pools[{i}].vertex_service_account: {why}"));
            None
        }
        Some(Ok(text)) => match ServiceAccount::parse(&text) {
            Ok(sa) => Some(sa),
            Err(why) => {
                p.push(format!("pools[{i}].vertex_service_account: {why}"));
                None
            }
        },
    }?;
    let project = pool
        .vertex_project
        .clone()
        .unwrap_or_else(|| service_account.project_id.clone());
    if !is_path_id(&project) {
        p.push(format!(
            "pools[{i}].vertex_project: required when the key file names no project_id \
             (letters, digits, `-`)"
        ));
    }
    (p.len() == before).then(|| ValidVertex {
        service_account: Arc::new(service_account),
        location,
        project,
    })
}

/// Where a Vertex pool without a `base_url` goes.
fn vertex_base_url(location: &str) -> String {
    match location {
        "global" => "https://aiplatform.googleapis.com".to_owned(),
        // The multi-region endpoints.
        "us" | "eu" => format!("https://aiplatform.{location}.rep.googleapis.com"),
        region => format!("https://{region}-aiplatform.googleapis.com"),
    }
}

/// Azure fields belong to Azure pools; a deployment name and an api-version go into the request
/// path and query, so they are limited to the characters Azure allows there.
fn validate_pool_azure(i: usize, pool: &PoolConfig, p: &mut Vec<String>) {
    let fields = [
        ("azure_deployment", pool.azure_deployment.as_deref()),
        ("azure_api_version", pool.azure_api_version.as_deref()),
    ];
    for (name, value) in fields {
        let Some(v) = value else { continue };
        if pool.provider != ProviderKind::Azure {
            p.push(format!("pools[{i}].{name}: only for azure pools"));
        } else if v.is_empty()
            || v.len() > 64
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            p.push(format!(
                "pools[{i}].{name}: must be 1 to 64 letters, digits, `-`, `_` or `.`"
            ));
        }
    }
}

/// Where an Anthropic pool without a `base_url` goes.
const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

/// Where a Gemini API pool without a `base_url` goes.
const GEMINI_BASE_URL: &str = "https://generativelanguage.googleapis.com";

fn validate_pool_upstream(
    i: usize,
    pool: &PoolConfig,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
    p: &mut Vec<String>,
) -> Option<(UpstreamUrl, String)> {
    validate_pool_azure(i, pool, p);
    match pool.provider {
        ProviderKind::Mock => {
            if pool.base_url.is_some() || pool.api_key.is_some() {
                p.push(format!(
                    "pools[{i}]: a mock pool takes neither base_url nor api_key"
                ));
            }
            None
        }
        ProviderKind::Vertex => {
            let location = pool.vertex_location.as_deref().unwrap_or("invalid");
            let url = pool
                .base_url
                .clone()
                .unwrap_or_else(|| vertex_base_url(location));
            match UpstreamUrl::parse(&url) {
                // The bearer token is minted at run time from the pool's service account.
                Ok(u) => Some((u, String::new())),
                Err(why) => {
                    p.push(format!("pools[{i}].base_url: {why}"));
                    None
                }
            }
        }
        ProviderKind::Openai
        | ProviderKind::Anthropic
        | ProviderKind::Azure
        | ProviderKind::Gemini => {
            let default_url = match pool.provider {
                ProviderKind::Anthropic => Some(ANTHROPIC_BASE_URL),
                ProviderKind::Gemini => Some(GEMINI_BASE_URL),
                _ => None,
            };
            let url = match pool
                .base_url
                .as_deref()
                .or(default_url)
                .map(UpstreamUrl::parse)
            {
                None => {
                    p.push(format!(
                        "pools[{i}].base_url: required for {}",
                        pool.provider.as_str()
                    ));
                    None
                }
                Some(Err(why)) => {
                    p.push(format!("pools[{i}].base_url: {why}"));
                    None
                }
                Some(Ok(u)) => Some(u),
            };
            let key = match pool.api_key.as_ref().map(|s| resolve(s, resolve_secret)) {
                None => {
                    p.push(format!(
                        "pools[{i}].api_key: required for {}",
                        pool.provider.as_str()
                    ));
                    None
                }
                Some(Err(why)) => {
                    p.push(format!("pools[{i}].api_key: {why}"));
                    None
                }
                Some(Ok(k)) if !is_header_safe(&k) || k.is_empty() => {
                    p.push(format!(
                        "pools[{i}].api_key: must be non-empty printable ASCII"
                    ));
                    None
                }
                Some(Ok(k)) => Some(k),
            };
            url.zip(key)
        }
        ProviderKind::Bedrock => {
            let url = match &pool.base_url {
                Some(u) => UpstreamUrl::parse(u),
                None => UpstreamUrl::parse(&format!(
                    "https://bedrock-runtime.{}.amazonaws.com",
                    pool.aws_region.as_deref().unwrap_or("invalid")
                )),
            };
            let url = match url {
                Ok(u) => u,
                Err(why) => {
                    p.push(format!("pools[{i}].base_url: {why}"));
                    return None;
                }
            };
            // SigV4 pools carry no bearer key: their keys are in `pool_aws`.
            let key = match pool.api_key.as_ref().map(|s| resolve(s, resolve_secret)) {
                None => String::new(),
                Some(Ok(k)) if !k.is_empty() && is_header_safe(&k) => k,
                Some(Ok(_)) => {
                    p.push(format!(
                        "pools[{i}].api_key: must be non-empty printable ASCII"
                    ));
                    return None;
                }
                Some(Err(why)) => {
                    p.push(format!("pools[{i}].api_key: {why}"));
                    return None;
                }
            };
            Some((url, key))
        }
    }
}

fn key_hash(
    i: usize,
    key: &KeyConfig,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
    p: &mut Vec<String>,
) -> [u8; 32] {
    match (&key.key, &key.key_sha256) {
        (Some(secret), None) => match resolve(secret, resolve_secret) {
            Ok(k) if k.len() >= 16 && is_header_safe(&k) => hash_key(&k),
            Ok(_) => {
                p.push(format!(
                    "keys[{i}].key: must be at least 16 printable ASCII characters"
                ));
                [0; 32]
            }
            Err(why) => {
                p.push(format!("keys[{i}].key: {why}"));
                [0; 32]
            }
        },
        (None, Some(hex)) => match decode_hex32(hex) {
            Some(h) => h,
            None => {
                p.push(format!("keys[{i}].key_sha256: must be 64 hex digits"));
                [0; 32]
            }
        },
        _ => {
            p.push(format!("keys[{i}]: give exactly one of key and key_sha256"));
            [0; 32]
        }
    }
}

fn is_header_safe(s: &str) -> bool {
    s.bytes().all(|b| (0x21..0x7f).contains(&b))
}

pub fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}
