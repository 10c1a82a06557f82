//! The layout both services agree on in Redis hot state. Only hashes of buyer keys are ever
//! written there; seller credentials never are.

/// Redis string holding the JSON `KeyConfig` (with `key_sha256`, never the key) of a live key.
pub fn key_record(prefix: &str, key_sha256_hex: &str) -> String {
    format!("{prefix}key:{key_sha256_hex}")
}

/// Pub/sub channel on which the control plane announces every key change (creation, limit
/// change, revocation) as the key's SHA-256 hex; proxies drop their cached entry.
pub fn key_channel(prefix: &str) -> String {
    format!("{prefix}keys")
}

/// Counter of a key's requests in one minute window (`unix_minute`).
pub fn rate_counter(prefix: &str, key_id: &str, unix_minute: u64) -> String {
    format!("{prefix}rpm:{key_id}:{unix_minute}")
}

/// Running total of what a key has spent, micro-USD.
pub fn spend_counter(prefix: &str, key_id: &str) -> String {
    format!("{prefix}spend:{key_id}")
}
