//! Identifiers and bearer secrets the control plane issues.

use rand::Rng;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn base62(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| BASE62[rng.random_range(0..62)] as char)
        .collect()
}

/// `{prefix}_` + 20 random base62 characters (~119 bits): unguessable, so an id leaked in a log
/// reveals nothing and cannot be enumerated.
pub fn new(prefix: &str) -> String {
    format!("{prefix}_{}", base62(20))
}

/// A browser secret (session, sign-in link, form token): `{prefix}_` + 43 random base62
/// characters (~256 bits).
pub fn secret(prefix: &str) -> String {
    format!("{prefix}_{}", base62(43))
}

/// An account's API token: shown once, stored as its SHA-256.
pub fn account_token() -> String {
    format!("tok_acct_{}", base62(40))
}

/// A new buyer key in the checksummed `tok_live_` format.
pub fn buyer_key() -> String {
    let mut random = [0u8; 32];
    rand::rng().fill(&mut random);
    tokn_config::keys::format_key(&random)
}

/// Lowercase hex SHA-256: how tokens and keys are stored and looked up.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(tokn_config::hash_key(secret))
}
