//! The buyer key format, shared by the service that issues keys and the proxy that checks them:
//! `tok_live_` + 32 base62 characters of randomness + a 6-character base62 CRC-32 of them.
//!
//! The checksum lets anyone (a secret scanner, the proxy before any lookup) recognise a real
//! key, or reject a mistyped one, offline; it adds no secrecy. Keys are stored only as hashes
//! (`hash_key`) with a short lookup prefix.

/// Every key issued by tokn$ starts with this.
pub const KEY_PREFIX: &str = "tok_live_";
const BODY_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// Length of a well-formed key.
pub const KEY_LEN: usize = KEY_PREFIX.len() + BODY_LEN + CHECKSUM_LEN;
/// Characters of a key kept in clear as its lookup prefix (the format prefix + 6).
pub const LOOKUP_PREFIX_LEN: usize = KEY_PREFIX.len() + 6;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Builds a key from 32 random bytes (the caller owns the randomness: this crate does no I/O).
/// Each byte picks a base62 character; the slight modulo bias leaves ~190 bits of entropy.
pub fn format_key(random: &[u8; BODY_LEN]) -> String {
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(KEY_PREFIX);
    for b in random {
        key.push(BASE62[(*b as usize) % 62] as char);
    }
    let checksum = checksum(&key.as_bytes()[KEY_PREFIX.len()..]);
    key.push_str(&checksum);
    key
}

/// Whether `key` has the issued format and a correct checksum.
pub fn is_well_formed(key: &str) -> bool {
    let Some(rest) = key.strip_prefix(KEY_PREFIX) else {
        return false;
    };
    if rest.len() != BODY_LEN + CHECKSUM_LEN || !rest.bytes().all(|b| BASE62.contains(&b)) {
        return false;
    }
    let (body, sum) = rest.split_at(BODY_LEN);
    checksum(body.as_bytes()) == sum
}

/// The part of a key kept in clear to find its record (never enough to use it).
pub fn lookup_prefix(key: &str) -> Option<&str> {
    key.get(..LOOKUP_PREFIX_LEN)
}

fn checksum(body: &[u8]) -> String {
    let mut n = crc32(body);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out.iter().map(|&b| b as char).collect()
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn issued_keys_are_recognised_and_any_typo_is_not() {
        let key = format_key(&[7u8; 32]);
        assert_eq!(key.len(), KEY_LEN);
        assert!(key.starts_with("tok_live_"));
        assert!(is_well_formed(&key));
        assert_eq!(lookup_prefix(&key).map(str::len), Some(LOOKUP_PREFIX_LEN));
        for i in KEY_PREFIX.len()..key.len() {
            let mut typo = key.clone().into_bytes();
            typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(typo).unwrap();
            assert!(!is_well_formed(&typo), "typo at {i} accepted: {typo}");
        }
        let distinct: std::collections::HashSet<String> =
            (0..62u8).map(|b| format_key(&[b; 32])).collect();
        assert_eq!(distinct.len(), 62);
    }

    #[test]
    fn other_strings_are_not_keys() {
        for s in [
            "",
            "tok_live_",
            "tok_demo_0123456789abcdef",
            "sk-abc",
            &"x".repeat(47),
        ] {
            assert!(!is_well_formed(s), "{s}");
        }
        assert!(!is_well_formed(&format!(
            "{}!",
            &format_key(&[1; 32])[..KEY_LEN - 1]
        )));
    }
}
