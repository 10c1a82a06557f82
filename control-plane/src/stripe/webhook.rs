//! Webhook signatures, exactly as Stripe documents them: `Stripe-Signature: t=…,v1=…[,v1=…]`,
//! each `v1` the hex HMAC-SHA256 of `{t}.{raw body}` under an endpoint secret (the whole
//! `whsec_…` string). Any `v1` matching any of the endpoint's current secrets passes (secrets
//! roll with an overlap); other schemes (`v0`) are ignored; the comparison is constant-time; a
//! timestamp further than the tolerance from now is refused, so a captured delivery cannot be
//! replayed later.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a delivery was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No `Stripe-Signature` header, or no timestamp in it.
    Missing,
    /// The header carries no `v1` signature.
    NoV1,
    /// The signed timestamp is outside the tolerance window.
    Stale,
    /// No signature matches.
    Mismatch,
}

impl SignatureError {
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => "Stripe-Signature: no timestamp and signatures found",
            Self::NoV1 => "Stripe-Signature: no signatures found with the expected scheme (v1)",
            Self::Stale => "Stripe-Signature: the timestamp is outside the tolerance window",
            Self::Mismatch => "Stripe-Signature: no signature matches the payload",
        }
    }
}

/// Most items a header may carry (a few secrets rolling at once need a handful).
const ITEMS_MAX: usize = 16;

/// Checks `header` against the raw `body`; `now_s` and `tolerance_s` in Unix seconds.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[String],
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp: Option<&str> = None;
    let mut signatures = Vec::new();
    for item in header.split(',').take(ITEMS_MAX) {
        let Some((k, v)) = item.trim().split_once('=') else {
            continue;
        };
        match k {
            "t" => timestamp = Some(v),
            "v1" => signatures.push(v),
            _ => {}
        }
    }
    let t_text = timestamp.ok_or(SignatureError::Missing)?;
    let t: i64 = t_text.parse().map_err(|_| SignatureError::Missing)?;
    if signatures.is_empty() {
        return Err(SignatureError::NoV1);
    }
    let matched = secrets.iter().any(|secret| {
        signatures.iter().any(|sig| {
            let Ok(sig) = hex::decode(sig) else {
                return false;
            };
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
                return false;
            };
            mac.update(t_text.as_bytes());
            mac.update(b".");
            mac.update(body);
            // `verify_slice` compares in constant time.
            mac.verify_slice(&sig).is_ok()
        })
    });
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    if now_s.abs_diff(t) > tolerance_s.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    Ok(())
}

/// The header Stripe would send for `body` at `t` (the fake Stripe and tests sign with it).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        // HMAC takes a key of any length.
        Err(_) => return String::new(),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::{sign, verify, SignatureError};

    const SECRET: &str = "whsec_test_secret";
    const PAYLOAD: &[u8] =
        br#"{"id":"evt_test_1","object":"event","type":"checkout.session.completed"}"#;

    fn secrets() -> Vec<String> {
        vec![SECRET.to_owned()]
    }

    #[test]
    fn the_reference_vector_verifies() {
        let header =
            "t=1700000000,v1=ca796b857b81e24d595a4c37abf88d2fafb533a32ede6ce4cfc9b0e892a35b08";
        assert_eq!(sign(SECRET, 1_700_000_000, PAYLOAD), header);
        assert_eq!(
            verify(Some(header), PAYLOAD, &secrets(), 1_700_000_100, 300),
            Ok(())
        );
    }

    #[test]
    fn any_v1_under_any_secret_passes_and_v0_is_ignored() {
        let good = sign(SECRET, 1_700_000_000, PAYLOAD);
        let v1 = good.split_once(",v1=").map(|(_, s)| s).unwrap_or_default();
        let rolled = vec!["whsec_old_one_here".to_owned(), SECRET.to_owned()];
        for header in [
            format!("{good},v1=bad_signature"),
            format!("t=1700000000,v1=00ff,v1={v1}"),
            format!("t=1700000000, v0=deadbeef, v1={v1}"),
        ] {
            assert_eq!(
                verify(Some(&header), PAYLOAD, &rolled, 1_700_000_000, 300),
                Ok(()),
                "{header}"
            );
        }
        let only_v0 = format!("t=1700000000,v0={v1}");
        assert_eq!(
            verify(Some(&only_v0), PAYLOAD, &secrets(), 1_700_000_000, 300),
            Err(SignatureError::NoV1)
        );
    }

    #[test]
    fn tampering_staleness_and_garbage_are_refused() {
        let good = sign(SECRET, 1_700_000_000, PAYLOAD);
        let now = 1_700_000_000;
        let cases: [(Option<&str>, &[u8], i64, SignatureError); 7] = [
            (None, PAYLOAD, now, SignatureError::Missing),
            (Some("v1=abc"), PAYLOAD, now, SignatureError::Missing),
            (Some("t=soon,v1=abc"), PAYLOAD, now, SignatureError::Missing),
            (
                Some(&good),
                b"{\"id\":\"evt_other\"}",
                now,
                SignatureError::Mismatch,
            ),
            (Some(&good), PAYLOAD, now + 301, SignatureError::Stale),
            (Some(&good), PAYLOAD, now - 301, SignatureError::Stale),
            (
                Some("t=1700000000,v1=zz"),
                PAYLOAD,
                now,
                SignatureError::Mismatch,
            ),
        ];
        for (header, body, at, want) in cases {
            assert_eq!(
                verify(header, body, &secrets(), at, 300),
                Err(want),
                "{header:?}"
            );
        }
        let other_secret = vec!["whsec_someone_else".to_owned()];
        assert_eq!(
            verify(Some(&good), PAYLOAD, &other_secret, now, 300),
            Err(SignatureError::Mismatch)
        );
    }
}
