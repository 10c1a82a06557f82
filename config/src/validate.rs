//! Semantic validation: every problem in the file, each with its field path.

use std::collections::HashSet;
use std::fmt;

use crate::credential::UrlPolicy;
use crate::schema::{
    GatewayConfig, KeyConfig, ModelConfig, PoolConfig, PushedConfig, PushedPool, SecretRef,
};

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

    /// The `Host` header for this URL: the port only when it is not the scheme's default,
    /// IPv6 addresses in brackets.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
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
    /// The file's sections; its `pools` and `keys` are moved, validated, into the fields below.
    pub config: GatewayConfig,
    /// FIFO: configuration order.
    pub pools: Vec<ValidPool>,
    pub keys: Vec<ValidKey>,
    /// The control plane feeding this proxy, with its secrets resolved.
    pub control: Option<ValidControl>,
    /// Redis hot state, resolved; `None` keeps hot state in process.
    pub redis_url: Option<String>,
    /// Version of the pushed configuration the catalog, pools and keys came from (0: the file).
    pub version: u64,
    /// Whether buyer keys are looked up in Redis instead of being listed in `keys`.
    pub keys_in_hot_state: bool,
}

/// A pool that passed validation: its credential's `env:` secrets resolved, its price ratio in
/// parts per million.
#[derive(Debug, Clone)]
pub struct ValidPool {
    pub config: PoolConfig,
    pub price_ratio_ppm: u64,
    /// A seller's pool pushed by the control plane (held to the marketplace's rules), not one
    /// of this proxy's own file.
    pub marketplace: bool,
}

impl ValidPool {
    /// A seller's pool as the control plane pushed it (whole or in a delta; `i`: its place,
    /// for the problems' wording), held to the marketplace's URL rule exactly as the control
    /// plane's API holds it, against the catalog `models`.
    pub fn pushed(i: usize, pool: PoolConfig, models: &[ModelConfig]) -> Result<Self, SkippedPool> {
        let id = pool.id.clone();
        validate_pool(i, pool, models, UrlPolicy::Marketplace, None)
            .map_err(|problems| SkippedPool { id, problems })
    }
}

/// A key that passed validation, with the SHA-256 it is looked up by.
#[derive(Debug, Clone)]
pub struct ValidKey {
    pub config: KeyConfig,
    pub hash: [u8; 32],
}

/// A pushed pool a proxy left out, and why (the reasons never carry a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedPool {
    pub id: String,
    pub problems: Vec<String>,
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
    /// and the pools left out.
    pub fn with_pushed(
        &self,
        pushed: PushedConfig,
    ) -> Result<(ValidConfig, Vec<SkippedPool>), ConfigProblems> {
        let keys_in_hot_state = pushed.keys.is_none();
        if keys_in_hot_state && self.redis_url.is_none() {
            return Err(ConfigProblems::single(
                "the control plane keeps keys in Redis, but hot_state.redis_url is not set"
                    .to_owned(),
            ));
        }
        let config = GatewayConfig {
            models: pushed.models,
            pools: Vec::new(),
            keys: pushed.keys.unwrap_or_default(),
            control: None,
            ..self.config.clone()
        };
        // Pushed secrets are literals; nothing is read from this proxy's environment.
        let mut valid = validate(config, &|_| None)?;
        // One seller's pool must not stop the fleet's configuration: a pool this build refuses
        // (a control plane with other rules) is left out, the rest applies. Sellers' pools are
        // held to the marketplace's URL rule, exactly as the control plane's API holds them.
        let mut skipped = Vec::new();
        for (i, pool) in pushed.pools.into_iter().enumerate() {
            let pool = match pool {
                PushedPool::Read(pool) => *pool,
                PushedPool::Unreadable { id, problem } => {
                    let problems = vec![format!("pools[{i}]: {problem}")];
                    skipped.push(SkippedPool { id, problems });
                    continue;
                }
            };
            match ValidPool::pushed(i, pool, &valid.config.models) {
                Ok(pool) => valid.pools.push(pool),
                Err(skip) => skipped.push(skip),
            }
        }
        valid.control = self.control.clone();
        valid.redis_url = self.redis_url.clone();
        valid.version = pushed.version;
        valid.keys_in_hot_state = keys_in_hot_state;
        Ok((valid, skipped))
    }
}

/// Hashes a buyer key the way the whole gateway does: SHA-256 of its bytes. Keys are long
/// random strings, so a fast hash is enough; no key is kept in plaintext after load.
pub fn hash_key(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

pub(crate) fn validate(
    mut config: GatewayConfig,
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
    let u = &config.usage;
    if u.spool_dir.is_empty() {
        p.push("usage.spool_dir: must not be empty".to_owned());
    }
    for (name, v) in [
        ("spool_bytes_max", u.spool_bytes_max),
        ("spool_segment_bytes_max", u.spool_segment_bytes_max),
        ("spool_fsync_interval_ms", u.spool_fsync_interval_ms),
        ("ship_interval_ms", u.ship_interval_ms),
    ] {
        if v == 0 {
            p.push(format!("usage.{name}: must be greater than zero"));
        }
    }
    if !(1..=5_000).contains(&u.ship_batch_records_max) {
        p.push("usage.ship_batch_records_max: must be between 1 and 5000".to_owned());
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
    // An alias is one more name in the same space: never a model id, never listed twice.
    let mut names = model_ids.clone();
    for (i, m) in config.models.iter().enumerate() {
        for a in &m.aliases {
            if a.is_empty() || a.len() > 256 {
                p.push(format!("models[{i}].aliases: must be 1 to 256 characters"));
            } else if !names.insert(a.as_str()) {
                p.push(format!(
                    "models[{i}].aliases: `{a}` is already a model id or an alias"
                ));
            }
        }
    }

    let mut pool_ids = HashSet::new();
    let mut pools = Vec::with_capacity(config.pools.len());
    for (i, pool) in std::mem::take(&mut config.pools).into_iter().enumerate() {
        if !pool_ids.insert(pool.id.clone()) {
            p.push(format!("pools[{i}].id: `{}` is listed twice", pool.id));
        }
        // The operator wrote this file: private upstreams are theirs to name.
        match validate_pool(
            i,
            pool,
            &config.models,
            UrlPolicy::Operator,
            Some(resolve_secret),
        ) {
            Ok(pool) => pools.push(pool),
            Err(problems) => p.extend(problems),
        }
    }

    let mut key_ids = HashSet::new();
    let mut keys = Vec::with_capacity(config.keys.len());
    let mut seen_hashes = HashSet::new();
    for (i, key) in std::mem::take(&mut config.keys).into_iter().enumerate() {
        if !key_ids.insert(key.id.clone()) {
            p.push(format!("keys[{i}].id: `{}` is listed twice", key.id));
        }
        if key.account.is_empty() {
            p.push(format!("keys[{i}].account: must not be empty"));
        }
        let hash = key_hash(i, &key, resolve_secret, &mut p);
        if !seen_hashes.insert(hash) && hash != [0; 32] {
            p.push(format!("keys[{i}]: the same key is listed twice"));
        }
        for m in key.allowed_models.iter().flatten() {
            if !model_ids.contains(m.as_str()) {
                p.push(format!(
                    "keys[{i}].allowed_models: `{m}` is not in the catalog"
                ));
            }
        }
        keys.push(ValidKey { config: key, hash });
    }

    if p.is_empty() {
        Ok(ValidConfig {
            config,
            pools,
            keys,
            control,
            redis_url,
            version: 0,
            keys_in_hot_state: false,
        })
    } else {
        Err(ConfigProblems(p))
    }
}

/// Reads the environment variable an `env:NAME` secret names.
type SecretResolver<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// Checks one pool on its own: its credential (one validator for files, pushes and the control
/// plane's API), its price ratio and its models. `resolve_secret`: for an operator's file, whose
/// secrets may be `env:NAME`; `None` for pushed pools, whose secrets are literals.
fn validate_pool(
    i: usize,
    mut pool: PoolConfig,
    models: &[ModelConfig],
    urls: UrlPolicy,
    resolve_secret: Option<&SecretResolver<'_>>,
) -> Result<ValidPool, Vec<String>> {
    let mut p = Vec::new();
    if pool.id.is_empty() {
        p.push("id: must not be empty".to_owned());
    }
    if let Some(resolve) = resolve_secret {
        p.extend(pool.credential.resolve_env(resolve));
    }
    p.extend(pool.credential.problems(urls));
    let price_ratio_ppm = match (pool.price_ratio, pool.price_ratio_ppm) {
        // The ratio is a rate, not money: rounded once to parts per million here.
        (Some(r), None) if r > 0.0 && r <= 1.0 => (r * 1_000_000.0).round() as u64,
        (None, Some(ppm)) if (1..=1_000_000).contains(&ppm) => ppm,
        (Some(_), None) => {
            p.push("price_ratio: must be in (0, 1]".to_owned());
            0
        }
        (None, Some(_)) => {
            p.push("price_ratio_ppm: must be in 1..=1000000".to_owned());
            0
        }
        _ => {
            p.push("price_ratio: give exactly one of price_ratio and price_ratio_ppm".to_owned());
            0
        }
    };
    if pool.models.is_empty() {
        p.push("models: must name at least one model".to_owned());
    }
    let provider = pool.provider();
    for m in &pool.models {
        match models.iter().find(|c| &c.id == m) {
            None => p.push(format!("models: `{m}` is not in the catalog")),
            Some(c) if c.provider != provider => p.push(format!(
                "models: `{m}` is a {} model, the pool is {}",
                c.provider.as_str(),
                provider.as_str()
            )),
            Some(_) => {}
        }
    }
    if p.is_empty() {
        Ok(ValidPool {
            config: pool,
            price_ratio_ppm,
            marketplace: urls == UrlPolicy::Marketplace,
        })
    } else {
        Err(p
            .into_iter()
            .map(|why| format!("pools[{i}].{why}"))
            .collect())
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
    match UpstreamUrl::parse(&c.url) {
        Err(why) => p.push(format!("control.url: {why}")),
        // The watch carries seller credentials: in the clear only to this host.
        Ok(u) if !u.tls && !u.is_loopback() => p.push(format!(
            "control.url: plain http:// only to this host (127.0.0.1, localhost, ::1), not `{}`: \
             the configuration it carries holds seller credentials; use https://",
            u.host
        )),
        Ok(_) => {}
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
    crate::credential::is_visible_ascii(s)
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
