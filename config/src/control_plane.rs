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
    /// HTTPS for the API and the proxies' watch. Required unless `listen` is a loopback address
    /// (plain HTTP is served to this machine only).
    #[serde(default)]
    pub tls: Option<ControlTls>,
    /// Stripe: credit packs, seller onboarding and payouts. Without it those features are off
    /// and their endpoints say so.
    #[serde(default)]
    pub stripe: Option<StripeConfig>,
    /// The web app (sign-in, dashboards, playground, public pages), served beside the API.
    #[serde(default)]
    pub web: WebConfig,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the web app's pages (under `/`, beside the API's `/v1/…`).
    pub enabled: bool,
    /// Where people reach the web app; sign-in links point here. `http://{listen}` when absent
    /// (`https://` with `[tls]`).
    pub public_url: Option<String>,
    /// The gateway's OpenAI base URL (`…/v1`): the docs show it and the playground calls it.
    pub gateway_url: String,
    /// Mark cookies `Secure` (browsers keep them on `http://localhost` and `127.0.0.1` too).
    pub secure_cookies: bool,
    /// Minutes a sign-in link stays valid.
    pub signin_link_minutes: u64,
    /// Days a session lasts.
    pub session_days: u64,
    /// Where sign-in mail goes out. Without it, mail is kept in the outbox (the operator's
    /// page) and, on the embedded store, written to the log.
    pub smtp: Option<SmtpConfig>,
    /// Sign-in with GitHub: an OAuth app whose callback URL is
    /// `{public_url}/signin/github/callback`.
    pub github: Option<GitHubSignIn>,
    /// Sign-in with Google (OpenID Connect): an OAuth client whose redirect URI is
    /// `{public_url}/signin/google/callback`.
    pub google: Option<GoogleSignIn>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubSignIn {
    pub client_id: String,
    /// Usually `env:NAME`.
    pub client_secret: SecretRef,
    /// Where people approve and codes are exchanged (`/login/oauth/…`): `https://github.com`,
    /// or a GitHub Enterprise server.
    #[serde(default = "default_github_url")]
    pub url: String,
    /// The REST API (`/user/emails`).
    #[serde(default = "default_github_api_url")]
    pub api_url: String,
}

fn default_github_url() -> String {
    "https://github.com".to_owned()
}

fn default_github_api_url() -> String {
    "https://api.github.com".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleSignIn {
    pub client_id: String,
    /// Usually `env:NAME`.
    pub client_secret: SecretRef,
    /// The OpenID provider: its discovery document is `{issuer}/.well-known/openid-configuration`
    /// and its ID tokens must name it.
    #[serde(default = "default_google_issuer")]
    pub issuer: String,
}

fn default_google_issuer() -> String {
    "https://accounts.google.com".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// The submission server.
    pub host: String,
    /// 587 by default (STARTTLS); 465 with `tls = "tls"`.
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// `starttls` (required), `tls` (implicit TLS) or `none` (plain: a loopback server only).
    #[serde(default)]
    pub tls: SmtpTls,
    #[serde(default)]
    pub username: Option<String>,
    /// Usually `env:NAME`.
    #[serde(default)]
    pub password: Option<SecretRef>,
    /// The sender, e.g. `tokn$ <no-reply@example.com>`.
    pub from: String,
}

fn default_smtp_port() -> u16 {
    587
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    #[default]
    Starttls,
    Tls,
    None,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            public_url: None,
            gateway_url: "http://127.0.0.1:8080/v1".to_owned(),
            secure_cookies: true,
            signin_link_minutes: 15,
            session_days: 30,
            smtp: None,
            github: None,
            google: None,
        }
    }
}

impl ControlPlaneConfig {
    /// The web app's origin, without a trailing slash.
    pub fn web_origin(&self) -> String {
        match &self.web.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None if self.tls.is_some() => format!("https://{}", self.listen),
            None => format!("http://{}", self.listen),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlTls {
    /// PEM certificate chain and private key the API presents.
    pub cert_file: String,
    pub key_file: String,
    /// PEM CA certificates: when set, every client (proxies, operators) must present a
    /// certificate one of them signed.
    #[serde(default)]
    pub client_ca_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    /// The platform's secret (or restricted) API key, `sk_test_…` first. Usually `env:NAME`.
    pub secret_key: SecretRef,
    /// Signing secrets (`whsec_…`) of the account webhook endpoint: more than one while a
    /// secret is being rolled.
    pub webhook_secrets: Vec<SecretRef>,
    /// Signing secrets of the Connect webhook endpoint (`account.updated`).
    #[serde(default)]
    pub connect_webhook_secrets: Vec<SecretRef>,
    /// `https://api.stripe.com`; tests point it at a fake on loopback.
    #[serde(default = "default_stripe_base")]
    pub base_url: String,
    /// The `Stripe-Version` every request pins (and the webhook endpoints must be created with).
    #[serde(default = "default_stripe_version")]
    pub api_version: String,
    /// Where Checkout sends a buyer after paying (`{CHECKOUT_SESSION_ID}` is filled in by
    /// Stripe) and after giving up.
    pub success_url: String,
    pub cancel_url: String,
    /// Where Connect onboarding returns a seller, and where it sends an expired link.
    pub onboarding_return_url: String,
    pub onboarding_refresh_url: String,
    /// How old a webhook's signed timestamp may be.
    #[serde(default = "default_tolerance")]
    pub webhook_tolerance_s: u64,
    /// One Stripe call's deadline, and how many times a call is retried (network errors, 429,
    /// 5xx) with a backoff starting at `retry_base_ms`, doubling, at most 5 s.
    #[serde(default = "default_stripe_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_stripe_retries")]
    pub retries_max: u32,
    #[serde(default = "default_retry_base")]
    pub retry_base_ms: u64,
    #[serde(default)]
    pub payouts: PayoutConfig,
}

fn default_stripe_base() -> String {
    "https://api.stripe.com".to_owned()
}

fn default_stripe_version() -> String {
    "2026-06-24.dahlia".to_owned()
}

fn default_tolerance() -> u64 {
    300
}

fn default_stripe_timeout() -> u64 {
    30_000
}

fn default_stripe_retries() -> u32 {
    3
}

fn default_retry_base() -> u64 {
    500
}

/// When sellers are paid, and what.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PayoutConfig {
    /// Whether the weekly run happens by itself (off: only the operator's
    /// `POST /v1/admin/payouts/run` starts one; sending and confirming still go on).
    pub automatic: bool,
    /// The day of the weekly run (`mon` … `sun`) and its hour, UTC.
    pub weekday: String,
    pub hour_utc: u32,
    /// A payout smaller than this (cents) waits for the next run.
    pub minimum_cents: i64,
    /// Earnings younger than this are held (the window in which buyers' refunds and disputes
    /// arrive).
    pub hold_days: u32,
    /// How often the payout worker looks for work (the weekly run, payouts waiting on the
    /// platform's balance, sent payouts to confirm).
    pub tick_s: u64,
}

impl Default for PayoutConfig {
    fn default() -> Self {
        Self {
            automatic: true,
            weekday: "mon".to_owned(),
            hour_utc: 6,
            minimum_cents: 1_000,
            hold_days: 7,
            tick_s: 60,
        }
    }
}

/// The days of the week as the payout schedule names them, Monday first.
pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Stripe's settings with their secrets resolved.
#[derive(Clone)]
pub struct ValidStripe {
    pub config: StripeConfig,
    pub secret_key: String,
    pub webhook_secrets: Vec<String>,
    pub connect_webhook_secrets: Vec<String>,
    /// A live key (`sk_live_`, `rk_live_`): events must say `livemode: true`, and the reverse.
    pub livemode: bool,
    /// Index of `payouts.weekday` in [`WEEKDAYS`].
    pub payout_weekday: u32,
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
    pub stripe: Option<ValidStripe>,
    /// `[web.smtp]`'s password, resolved.
    pub smtp_password: Option<String>,
    /// `[web.github]`'s and `[web.google]`'s client secrets, resolved.
    pub github_client_secret: Option<String>,
    pub google_client_secret: Option<String>,
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
    match config.listen.parse::<std::net::SocketAddr>() {
        Err(_) => p.push(format!(
            "listen: `{}` is not an ip:port address",
            config.listen
        )),
        Ok(addr) if !addr.ip().is_loopback() && config.tls.is_none() => p.push(format!(
            "listen: `{}` is not a loopback address: plain HTTP is served to this machine only; \
             configure [tls] (cert_file, key_file) to listen there",
            config.listen
        )),
        Ok(_) => {}
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
    let w = &config.web;
    if let Some(url) = &w.public_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            p.push("web.public_url: must start with http:// or https://".to_owned());
        }
    }
    if !(w.gateway_url.starts_with("http://") || w.gateway_url.starts_with("https://")) {
        p.push("web.gateway_url: must start with http:// or https://".to_owned());
    }
    if w.signin_link_minutes == 0 || w.session_days == 0 {
        p.push("web: signin_link_minutes and session_days must be greater than zero".to_owned());
    }
    let mut smtp_password = None;
    if let Some(m) = &w.smtp {
        let loopback = matches!(m.host.as_str(), "localhost" | "127.0.0.1" | "::1");
        if m.tls == SmtpTls::None && !loopback {
            p.push(format!(
                "web.smtp.tls: `none` sends sign-in links in the clear; only to a server on this \
                 machine (`{}` is not)",
                m.host
            ));
        }
        if m.host.is_empty() || !m.from.contains('@') {
            p.push("web.smtp: host and from (an address) are needed".to_owned());
        }
        if let Some(secret) = &m.password {
            match resolve(secret, resolve_secret) {
                Ok(v) => smtp_password = Some(v),
                Err(why) => p.push(format!("web.smtp.password: {why}")),
            }
        }
    }
    let mut client_secret = |name: &str, url_fields: &[(&str, &str)], secret: &SecretRef| {
        for (field, url) in url_fields {
            if !https_or_loopback(url) {
                p.push(format!(
                    "web.{name}.{field}: must be https:// (plain http only to a loopback address)"
                ));
            }
        }
        match resolve(secret, resolve_secret) {
            Ok(v) => Some(v),
            Err(why) => {
                p.push(format!("web.{name}.client_secret: {why}"));
                None
            }
        }
    };
    let github_client_secret = w.github.as_ref().and_then(|g| {
        client_secret(
            "github",
            &[("url", &g.url), ("api_url", &g.api_url)],
            &g.client_secret,
        )
    });
    let google_client_secret = w
        .google
        .as_ref()
        .and_then(|g| client_secret("google", &[("issuer", &g.issuer)], &g.client_secret));
    let stripe = config
        .stripe
        .as_ref()
        .and_then(|s| validate_stripe(s, resolve_secret, &mut p));
    if p.is_empty() {
        Ok(ValidControlPlane {
            config,
            database_url,
            admin_token,
            proxy_token,
            keks,
            redis_url,
            stripe,
            smtp_password,
            github_client_secret,
            google_client_secret,
        })
    } else {
        Err(ConfigProblems::from_list(p))
    }
}

fn validate_stripe(
    s: &StripeConfig,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
    p: &mut Vec<String>,
) -> Option<ValidStripe> {
    let start = p.len();
    let secret_key = match resolve(&s.secret_key, resolve_secret) {
        Ok(k) if ["sk_", "rk_"].iter().any(|pre| k.starts_with(pre)) && k.len() >= 16 => k,
        Ok(_) => {
            p.push(
                "stripe.secret_key: must be a Stripe secret or restricted key (sk_… or rk_…)"
                    .to_owned(),
            );
            String::new()
        }
        Err(why) => {
            p.push(format!("stripe.secret_key: {why}"));
            String::new()
        }
    };
    let mut secrets = |field: &str, list: &[SecretRef]| -> Vec<String> {
        let mut out = Vec::with_capacity(list.len());
        for (i, r) in list.iter().enumerate() {
            match resolve(r, resolve_secret) {
                Ok(v) if v.starts_with("whsec_") && v.len() >= 16 => out.push(v),
                Ok(_) => p.push(format!(
                    "stripe.{field}[{i}]: must be a webhook signing secret (whsec_…)"
                )),
                Err(why) => p.push(format!("stripe.{field}[{i}]: {why}")),
            }
        }
        out
    };
    let webhook_secrets = secrets("webhook_secrets", &s.webhook_secrets);
    let connect_webhook_secrets = secrets("connect_webhook_secrets", &s.connect_webhook_secrets);
    if s.webhook_secrets.is_empty() {
        p.push("stripe.webhook_secrets: at least one signing secret is needed".to_owned());
    }
    if !https_or_loopback(&s.base_url) {
        p.push(
            "stripe.base_url: must be https:// (plain http only to a loopback address)".to_owned(),
        );
    }
    for (field, url) in [
        ("success_url", &s.success_url),
        ("cancel_url", &s.cancel_url),
        ("onboarding_return_url", &s.onboarding_return_url),
        ("onboarding_refresh_url", &s.onboarding_refresh_url),
    ] {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            p.push(format!("stripe.{field}: must be an http(s) URL"));
        }
    }
    if s.api_version.is_empty() || s.timeout_ms == 0 || s.retry_base_ms == 0 {
        p.push("stripe: api_version, timeout_ms and retry_base_ms must be set".to_owned());
    }
    let pay = &s.payouts;
    let payout_weekday = WEEKDAYS.iter().position(|d| *d == pay.weekday);
    if payout_weekday.is_none() {
        p.push(format!(
            "stripe.payouts.weekday: one of {}",
            WEEKDAYS.join(", ")
        ));
    }
    if pay.hour_utc > 23 || pay.minimum_cents < 1 || pay.tick_s == 0 {
        p.push(
            "stripe.payouts: hour_utc 0 to 23, minimum_cents at least 1, tick_s at least 1"
                .to_owned(),
        );
    }
    if p.len() > start {
        return None;
    }
    let livemode = secret_key.starts_with("sk_live_") || secret_key.starts_with("rk_live_");
    Some(ValidStripe {
        config: s.clone(),
        secret_key,
        webhook_secrets,
        connect_webhook_secrets,
        livemode,
        payout_weekday: payout_weekday
            .and_then(|d| u32::try_from(d).ok())
            .unwrap_or(0),
    })
}

/// Stripe is reached over HTTPS; plain HTTP only to this machine (a fake in tests).
/// An https URL, or plain http to this machine (a test's fake).
fn https_or_loopback(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

#[cfg(test)]
mod tests {
    use super::load_control_plane;

    const BASE: &str =
        "admin_token = \"admin-token-0123456789\"\nproxy_token = \"proxy-token-0123456789\"\n";
    const KEK: &str = "[[kek]]\nversion = 1\nkey = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";

    #[test]
    fn sign_in_providers_need_their_secret_and_https() {
        let env = |name: &str| (name == "GH_SECRET").then(|| "gh-secret".to_owned());
        let good = format!(
            "{BASE}{KEK}[web.github]\nclient_id = \"Iv1.x\"\nclient_secret = \"env:GH_SECRET\"\n\
             [web.google]\nclient_id = \"x.apps.googleusercontent.com\"\nclient_secret = \"g\"\n"
        );
        let valid = load_control_plane(&good, &env).unwrap();
        assert_eq!(valid.github_client_secret.as_deref(), Some("gh-secret"));
        assert_eq!(valid.google_client_secret.as_deref(), Some("g"));
        let g = valid.config.web.github.unwrap();
        assert_eq!(
            (g.url.as_str(), g.api_url.as_str()),
            ("https://github.com", "https://api.github.com")
        );
        assert_eq!(
            valid.config.web.google.unwrap().issuer,
            "https://accounts.google.com"
        );
        assert!(!format!("{:?}", load_control_plane(&good, &env)).contains("gh-secret"));

        let bad = format!(
            "{BASE}{KEK}[web.github]\nclient_id = \"Iv1.x\"\nclient_secret = \"env:NOPE\"\n\
             url = \"http://github.example\"\n\
             [web.google]\nclient_id = \"x\"\nclient_secret = \"g\"\nissuer = \"http://10.0.0.1\"\n"
        );
        let problems = load_control_plane(&bad, &env)
            .err()
            .map(|p| p.to_string())
            .unwrap_or_default();
        for want in [
            "web.github.client_secret",
            "web.github.url: must be https://",
            "web.google.issuer: must be https://",
        ] {
            assert!(problems.contains(want), "{want}: {problems}");
        }
        let fake = format!(
            "{BASE}{KEK}[web.google]\nclient_id = \"x\"\nclient_secret = \"g\"\nissuer = \"http://127.0.0.1:9\"\n"
        );
        assert!(
            load_control_plane(&fake, &env).is_ok(),
            "a fake on loopback"
        );
    }

    #[test]
    fn plain_http_is_served_on_loopback_only() {
        let none = |_: &str| None;
        for listen in ["127.0.0.1:7070", "[::1]:7070"] {
            let text = format!("listen = \"{listen}\"\n{BASE}{KEK}");
            assert!(load_control_plane(&text, &none).is_ok(), "{listen}");
        }
        for listen in ["0.0.0.0:7070", "10.0.0.5:7070", "[::]:7070"] {
            let text = format!("listen = \"{listen}\"\n{BASE}{KEK}");
            let problems = load_control_plane(&text, &none)
                .err()
                .map(|p| p.to_string())
                .unwrap_or_default();
            assert!(
                problems.contains("plain HTTP is served to this machine only"),
                "{listen}: {problems}"
            );
            let with_tls = format!("{text}[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n");
            assert!(
                load_control_plane(&with_tls, &none).is_ok(),
                "{listen} with [tls]"
            );
        }
    }
}
