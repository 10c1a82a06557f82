//! The configuration schema shared by the tokn$ services.
//!
//! Typed, validated at load, and free of I/O: the caller reads the file and the environment and
//! hands the text and the variables in. Every problem found is reported at once, each with the
//! path of the field it concerns, so an operator fixes a file in one pass.

pub mod addr;
pub mod control_plane;
pub mod credential;
mod fields;
pub mod google;
pub mod hot;
pub mod keys;
mod overrides;
mod schema;
mod validate;

pub use credential::{Credential, Secret, UrlPolicy};
pub use overrides::apply_env_overrides;
pub use schema::{
    BalancePolicy, ConfigDelta, ControlConfig, GatewayConfig, HotStateConfig, KeyConfig,
    LimitsConfig, ModelConfig, PoolChange, PoolConfig, PoolStatus, ProviderKind, PushedConfig,
    PushedPool, ScheduledPrice, SecretRef, ServerConfig, SpoolFullPolicy, UsageConfig,
    CONFIG_KIND_HEADER,
};
pub use validate::{
    decode_hex32, hash_key, ConfigProblems, SkippedPool, UpstreamUrl, ValidConfig, ValidControl,
    ValidKey, ValidPool,
};

/// The embedded default: one `mock` model served by an in-process provider, one demo key.
/// `tokn-proxy` runs on it when no configuration file is given.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../default.toml");

/// The default model catalog: widely used models of the five providers with list prices.
pub const DEFAULT_CATALOG_TOML: &str = include_str!("../catalog.toml");

/// The buyer key of the embedded default. It only opens the built-in `mock` model.
pub const DEMO_KEY: &str = "tok_demo_0123456789abcdef";

/// Environment variables whose name starts with this prefix override configuration fields.
pub const ENV_PREFIX: &str = "TOKN__";

/// Parses, applies environment overrides and validates a configuration in one step.
///
/// `env` is the process environment (or a test's stand-in); `resolve_secret` reads the variable
/// an `env:NAME` secret reference names.
pub fn load(
    toml_text: &str,
    env: impl IntoIterator<Item = (String, String)>,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
) -> Result<ValidConfig, ConfigProblems> {
    let mut table: toml::Table = toml_text
        .parse()
        .map_err(|e: toml::de::Error| ConfigProblems::single(format!("syntax: {e}")))?;
    apply_env_overrides(&mut table, env)?;
    let (config, mut problems) = fields::deserialize_all::<GatewayConfig>(table);
    let Some(config) = config else {
        return Err(ConfigProblems::from_list(problems));
    };
    // Validation adds its problems to the fields' (on what the rest of the file says).
    let valid = match validate::validate(config, resolve_secret) {
        Ok(valid) if problems.is_empty() => valid,
        Ok(_) => return Err(ConfigProblems::from_list(problems)),
        Err(more) => {
            problems.extend(more.0);
            return Err(ConfigProblems::from_list(problems));
        }
    };
    // With a control plane the spool holds every billed record; without one, the audit log is
    // the only usage record. (Checked here, on the file: a pushed configuration names no
    // control plane.)
    if valid.config.usage.path.is_empty() && valid.control.is_none() {
        return Err(ConfigProblems::single(
            "usage.path: must not be empty without a control plane".to_owned(),
        ));
    }
    Ok(valid)
}

#[cfg(test)]
mod tests;
