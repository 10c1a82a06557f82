//! Google service-account keys: the JSON key file a Vertex AI seller lists, checked when the
//! configuration loads, and the signed JWT assertion that trades it for an OAuth access token
//! (RFC 7523, as google-auth does it). Signing is computation, not I/O: posting the assertion
//! to `token_uri` is the caller's business.

use std::fmt;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::UpstreamUrl;

/// The scope Vertex AI calls need.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The audience google-auth signs for, whatever `token_uri` the key file names; Google's token
/// endpoint expects it.
pub const GOOGLE_TOKEN_AUDIENCE: &str = "https://oauth2.googleapis.com/token";

/// Assertions ask for the longest lifetime Google grants.
const ASSERTION_LIFETIME_S: u64 = 3600;

/// A parsed service-account key. `Debug` shows the account, never the key.
pub struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    pub private_key_id: String,
    /// Where assertions are posted (`https://oauth2.googleapis.com/token` in real key files).
    pub token_uri: String,
    key: RsaKeyPair,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("project_id", &self.project_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    project_id: String,
    client_email: String,
    #[serde(default)]
    private_key_id: String,
    private_key: String,
    #[serde(default)]
    token_uri: Option<String>,
}

impl ServiceAccount {
    /// Parses a key file's text. Errors name what is wrong, never a value from the file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: KeyFile = serde_json::from_str(text).map_err(|_| {
            "is not a service-account key file (JSON with type, client_email and private_key)"
                .to_owned()
        })?;
        if file.kind != "service_account" {
            return Err("type must be `service_account`".to_owned());
        }
        if file.client_email.is_empty() || file.client_email.len() > 256 {
            return Err("client_email must be 1 to 256 characters".to_owned());
        }
        let der = pem_pkcs8(&file.private_key)
            .ok_or_else(|| "private_key must be a PKCS#8 PEM block (`PRIVATE KEY`)".to_owned())?;
        let key = RsaKeyPair::from_pkcs8(&der)
            .map_err(|_| "private_key is not an RSA key of 2048 bits or more".to_owned())?;
        let token_uri = file
            .token_uri
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| GOOGLE_TOKEN_AUDIENCE.to_owned());
        // Assertions are posted there: https, or plain http to this host only (tests,
        // self-hosted endpoints); no user info, no query.
        let url = UpstreamUrl::parse(&token_uri)
            .map_err(|_| "token_uri must be an https:// URL".to_owned())?;
        if !(url.tls || url.is_loopback()) {
            return Err("token_uri must be an https:// URL (http:// on loopback only)".to_owned());
        }
        Ok(Self {
            project_id: file.project_id,
            client_email: file.client_email,
            private_key_id: file.private_key_id,
            token_uri,
            key,
        })
    }

    /// The SHA-256 of the public key: which key this is, without revealing it.
    pub fn key_fingerprint(&self) -> [u8; 32] {
        Sha256::digest(self.key.public().as_ref()).into()
    }

    /// A signed JWT asking for `scope`, valid from `now_unix_s` for an hour.
    pub fn assertion(&self, scope: &str, now_unix_s: u64) -> Result<String, String> {
        let header = serde_json::json!({
            "alg": "RS256",
            "typ": "JWT",
            "kid": self.private_key_id,
        });
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": GOOGLE_TOKEN_AUDIENCE,
            "iat": now_unix_s,
            "exp": now_unix_s + ASSERTION_LIFETIME_S,
        });
        let mut jwt = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                jwt.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "signing the assertion failed".to_owned())?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(jwt)
    }
}

impl ServiceAccount {
    /// The `application/x-www-form-urlencoded` body that trades a fresh assertion for an access
    /// token at `token_uri` (the JWT is base64url and dots: nothing to escape).
    pub fn token_request_body(&self, scope: &str, now_unix_s: u64) -> Result<String, String> {
        Ok(format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={}",
            self.assertion(scope, now_unix_s)?
        ))
    }
}

/// A Vertex project or location id as it goes into request paths: 1 to 64 lowercase letters,
/// digits and `-`. The control plane and the proxies hold pools to the same rule, so no pool
/// one accepts is refused by the other.
pub fn is_path_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The label of a PKCS#8 PEM block (its armour lines are built from it, so no key-shaped text
/// sits in the sources).
const PKCS8_LABEL: &str = "PRIVATE KEY";

/// The DER bytes of a PKCS#8 PEM block (key files escape its newlines in JSON; serde has
/// already turned them back into line breaks).
fn pem_pkcs8(pem: &str) -> Option<Vec<u8>> {
    let body = pem
        .trim()
        .strip_prefix(&format!("-----BEGIN {PKCS8_LABEL}-----"))?
        .strip_suffix(&format!("-----END {PKCS8_LABEL}-----"))?;
    let b64: String = body.split_whitespace().collect();
    STANDARD.decode(b64).ok()
}
