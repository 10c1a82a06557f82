//! AWS Signature Version 4 (`AWS4-HMAC-SHA256`) for one HTTP request, with signed headers.
//!
//! The caller describes the request exactly as it will go on the wire (method, host, the
//! already-encoded path, the raw query) plus the headers it wants signed, and gets back the
//! headers to add: `authorization`, `x-amz-date`, `x-amz-security-token` (temporary
//! credentials) and, when asked, `x-amz-content-sha256`.
//!
//! The one trap: for every service but S3 the canonical URI is the wire path normalised and then
//! URI-encoded *again*, segment by segment. A Bedrock model id such as
//! `anthropic.claude-3-5-sonnet-20240620-v1:0` travels as `…-v1%3A0` and is signed as
//! `…-v1%253A0` ([`PathEncoding::Double`]); S3 signs the path as sent ([`PathEncoding::Single`]).
//! Sign exactly the bytes you send: a client that rewrites `%3A` back to `:` after signing gets
//! a signature mismatch.
//!
//! Secrets (secret access key, session token, derived keys) never appear in a `Debug` output or
//! an error; the `authorization` value is redacted in `Debug` too.
//!
//! Its own crate because two services sign: the proxy (Bedrock requests) and the control plane
//! (checking a seller's Bedrock credential).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The algorithm name that opens the string to sign and the `authorization` value.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The payload hash of a request whose body is not signed.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// Headers that intermediaries may add, drop or rewrite: never signed (as botocore does).
const UNSIGNED_HEADERS: &[&str] = &[
    "connection",
    "expect",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "x-amzn-trace-id",
];

/// Headers this module writes itself; a caller passing one is refused rather than overridden.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "host",
    "x-amz-content-sha256",
    "x-amz-date",
    "x-amz-security-token",
];

// === Credentials ===

/// An AWS access key, with the session token of temporary (STS) credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"[redacted]")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

// === Request description ===

/// How the canonical URI is derived from the wire path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathEncoding {
    /// Every service but S3: remove `.`/`..` and empty segments, then URI-encode each segment of
    /// the (already encoded) wire path again, so `%3A` is signed as `%253A`.
    Double,
    /// S3: the wire path is the canonical URI, untouched.
    Single,
}

/// What the payload hash line of the canonical request is made from.
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    /// The body bytes, hashed here.
    Bytes(&'a [u8]),
    /// A SHA-256 of the body already computed, as lowercase hex.
    Sha256Hex(&'a str),
    /// `UNSIGNED-PAYLOAD` (only services that accept it, e.g. S3 over TLS).
    Unsigned,
}

/// One HTTP request as it will be sent.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// `GET`, `POST`, … (upper case, as sent).
    pub method: &'a str,
    /// The `host` header value (with `:port` when it is not the scheme's default).
    pub host: &'a str,
    /// The path exactly as on the request line, already percent-encoded, starting with `/`.
    pub path: &'a str,
    /// The raw query string without the `?` (empty for none).
    pub query: &'a str,
    /// Further headers to sign (e.g. `content-type`), any case; repeated names are joined
    /// with `,` in the given order. Hop-by-hop headers are skipped; reserved ones are refused.
    pub headers: &'a [(&'a str, &'a str)],
    pub payload: Payload<'a>,
}

/// Where and when the request is signed.
#[derive(Clone, Debug)]
pub struct Params<'a> {
    /// `us-east-1`, …
    pub region: &'a str,
    /// The signing name: `bedrock` for Bedrock Runtime (not its endpoint prefix).
    pub service: &'a str,
    pub time: AmzDate,
    pub path_encoding: PathEncoding,
    /// Also send (and sign) `x-amz-content-sha256` with the payload hash.
    pub content_sha256_header: bool,
}

/// A signing time in the `x-amz-date` form `YYYYMMDDTHHMMSSZ` (UTC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmzDate {
    text: String,
}

impl AmzDate {
    /// The `x-amz-date` of a point in time (seconds precision).
    pub fn from_system_time(time: SystemTime) -> Result<Self, SigningError> {
        let seconds = time
            .duration_since(UNIX_EPOCH)
            .map_err(|_| SigningError::InvalidDate)?
            .as_secs();
        let days = i64::try_from(seconds / 86_400).map_err(|_| SigningError::InvalidDate)?;
        let second_of_day = seconds % 86_400;
        let (year, month, day) = civil_from_days(days);
        if !(1970..=9999).contains(&year) {
            return Err(SigningError::InvalidDate);
        }
        Ok(Self {
            text: format!(
                "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
                second_of_day / 3600,
                second_of_day / 60 % 60,
                second_of_day % 60
            ),
        })
    }

    /// Checks the `YYYYMMDDTHHMMSSZ` shape (digits, `T`, `Z`); used for fixed test times.
    pub fn parse(text: &str) -> Result<Self, SigningError> {
        let bytes = text.as_bytes();
        let shaped = bytes.len() == 16
            && bytes.iter().enumerate().all(|(at, byte)| match at {
                8 => *byte == b'T',
                15 => *byte == b'Z',
                _ => byte.is_ascii_digit(),
            });
        if !shaped {
            return Err(SigningError::InvalidDate);
        }
        Ok(Self {
            text: text.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The `YYYYMMDD` of the credential scope.
    pub fn date(&self) -> &str {
        self.text.get(..8).unwrap_or_default()
    }
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (
        year,
        u32::try_from(month).unwrap_or_default(),
        u32::try_from(day).unwrap_or_default(),
    )
}

// === Errors ===

/// Why a request could not be signed. Never carries a secret or a header value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SigningError {
    /// The signing time is before 1970 or after 9999, or not `YYYYMMDDTHHMMSSZ`.
    InvalidDate,
    /// Region or service is empty or contains `/` or whitespace (it would break the scope).
    InvalidScope,
    /// The path does not start with `/`.
    PathNotAbsolute,
    /// A header name is not an HTTP token.
    InvalidHeaderName(String),
    /// A header value contains CR, LF or NUL (the named header's value is not shown).
    InvalidHeaderValue(String),
    /// The caller passed a header this module sets itself.
    ReservedHeader(String),
    /// A `Sha256Hex` payload hash is not 64 lowercase hex digits.
    InvalidPayloadHash,
    /// The HMAC refused its key (cannot happen for HMAC-SHA256, which takes any length).
    Hmac,
}

impl fmt::Display for SigningError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidDate => write!(f, "signing time out of range or malformed"),
            Self::InvalidScope => write!(f, "region or service unusable in a credential scope"),
            Self::PathNotAbsolute => write!(f, "request path does not start with '/'"),
            Self::InvalidHeaderName(name) => write!(f, "invalid header name {name:?}"),
            Self::InvalidHeaderValue(name) => {
                write!(f, "header {name:?} has a value with CR, LF or NUL")
            }
            Self::ReservedHeader(name) => write!(f, "header {name:?} is set by the signer"),
            Self::InvalidPayloadHash => write!(f, "payload hash is not 64 lowercase hex digits"),
            Self::Hmac => write!(f, "HMAC key rejected"),
        }
    }
}

impl std::error::Error for SigningError {}

// === Signing ===

/// The headers to add to the request, and the intermediate texts (for tests and diagnostics;
/// they may contain the session token, so `Debug` leaves them out).
#[derive(Clone)]
pub struct Signed {
    /// The `authorization` header value.
    pub authorization: String,
    /// The `x-amz-date` header value.
    pub amz_date: String,
    /// The `x-amz-content-sha256` header value, when asked for.
    pub content_sha256: Option<String>,
    /// The `x-amz-security-token` header value, for temporary credentials.
    pub security_token: Option<String>,
    signature_hex: String,
    canonical_request: String,
    string_to_sign: String,
}

impl Signed {
    /// `(name, value)` of every header to add, names in lower case.
    pub fn headers(&self) -> Vec<(&'static str, &str)> {
        let mut headers = vec![
            ("authorization", self.authorization.as_str()),
            ("x-amz-date", self.amz_date.as_str()),
        ];
        if let Some(hash) = &self.content_sha256 {
            headers.push(("x-amz-content-sha256", hash.as_str()));
        }
        if let Some(token) = &self.security_token {
            headers.push(("x-amz-security-token", token.as_str()));
        }
        headers
    }

    /// The signature, lowercase hex (also the tail of `authorization`).
    pub fn signature_hex(&self) -> &str {
        &self.signature_hex
    }

    /// The canonical request that was signed. Contains the session token, if any: never log it.
    pub fn canonical_request(&self) -> &str {
        &self.canonical_request
    }

    /// The string to sign (no secret in it).
    pub fn string_to_sign(&self) -> &str {
        &self.string_to_sign
    }
}

impl fmt::Debug for Signed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("authorization", &"[redacted]")
            .field("amz_date", &self.amz_date)
            .field("content_sha256", &self.content_sha256)
            .field(
                "security_token",
                &self.security_token.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

/// Signs `request` with `credentials` for `params.region`/`params.service` at `params.time`.
pub fn sign(
    request: &Request<'_>,
    credentials: &Credentials,
    params: &Params<'_>,
) -> Result<Signed, SigningError> {
    for scope_part in [params.region, params.service] {
        if scope_part.is_empty()
            || scope_part.contains('/')
            || scope_part.contains(char::is_whitespace)
        {
            return Err(SigningError::InvalidScope);
        }
    }
    let payload_hash = match request.payload {
        Payload::Bytes(body) => hex::encode(Sha256::digest(body)),
        Payload::Sha256Hex(hash) => {
            let well_formed = hash.len() == 64
                && hash
                    .bytes()
                    .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
            if !well_formed {
                return Err(SigningError::InvalidPayloadHash);
            }
            hash.to_owned()
        }
        Payload::Unsigned => UNSIGNED_PAYLOAD.to_owned(),
    };

    let amz_date = params.time.as_str().to_owned();
    let content_sha256 = params.content_sha256_header.then(|| payload_hash.clone());
    let security_token = credentials.session_token.clone();

    let mut headers: Vec<(String, String)> = Vec::with_capacity(request.headers.len() + 4);
    for (name, value) in request.headers {
        let name = name.to_ascii_lowercase();
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(SigningError::InvalidHeaderName(name));
        }
        if RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(SigningError::ReservedHeader(name));
        }
        if UNSIGNED_HEADERS.contains(&name.as_str()) {
            continue;
        }
        if value.bytes().any(|byte| matches!(byte, b'\r' | b'\n' | 0)) {
            return Err(SigningError::InvalidHeaderValue(name));
        }
        headers.push((name, normalize_header_value(value)));
    }
    if request
        .host
        .bytes()
        .any(|byte| matches!(byte, b'\r' | b'\n' | 0))
    {
        return Err(SigningError::InvalidHeaderValue("host".to_owned()));
    }
    headers.push(("host".to_owned(), normalize_header_value(request.host)));
    headers.push(("x-amz-date".to_owned(), amz_date.clone()));
    if let Some(hash) = &content_sha256 {
        headers.push(("x-amz-content-sha256".to_owned(), hash.clone()));
    }
    if let Some(token) = &security_token {
        if token.bytes().any(|byte| matches!(byte, b'\r' | b'\n' | 0)) {
            return Err(SigningError::InvalidHeaderValue(
                "x-amz-security-token".to_owned(),
            ));
        }
        headers.push((
            "x-amz-security-token".to_owned(),
            normalize_header_value(token),
        ));
    }
    // Stable: values of a repeated header keep their order.
    headers.sort_by(|left, right| left.0.cmp(&right.0));

    let mut canonical_headers = String::new();
    let mut signed_headers = String::new();
    let mut previous: Option<&str> = None;
    for (name, value) in &headers {
        if previous == Some(name.as_str()) {
            canonical_headers.push(',');
        } else {
            if previous.is_some() {
                canonical_headers.push('\n');
                signed_headers.push(';');
            }
            canonical_headers.push_str(name);
            canonical_headers.push(':');
            signed_headers.push_str(name);
        }
        canonical_headers.push_str(value);
        previous = Some(name.as_str());
    }
    canonical_headers.push('\n');

    let canonical_uri = canonical_uri(request.path, params.path_encoding)?;
    let canonical_query = canonical_query(request.query);
    let canonical_request = format!(
        "{}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
        request.method
    );

    let scope = format!(
        "{}/{}/{}/aws4_request",
        params.time.date(),
        params.region,
        params.service
    );
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );

    let signing_key = signing_key(
        &credentials.secret_access_key,
        params.time.date(),
        params.region,
        params.service,
    )?;
    let signature_hex = hex::encode(hmac_sha256(&signing_key, string_to_sign.as_bytes())?);
    let authorization = format!(
        "{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature_hex}",
        credentials.access_key_id
    );

    Ok(Signed {
        authorization,
        amz_date,
        content_sha256,
        security_token,
        signature_hex,
        canonical_request,
        string_to_sign,
    })
}

/// `kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")`.
fn signing_key(
    secret_access_key: &str,
    date: &str,
    region: &str,
    service: &str,
) -> Result<[u8; 32], SigningError> {
    let mut secret = Vec::with_capacity(4 + secret_access_key.len());
    secret.extend_from_slice(b"AWS4");
    secret.extend_from_slice(secret_access_key.as_bytes());
    let date_key = hmac_sha256(&secret, date.as_bytes())?;
    let region_key = hmac_sha256(&date_key, region.as_bytes())?;
    let service_key = hmac_sha256(&region_key, service.as_bytes())?;
    hmac_sha256(&service_key, b"aws4_request")
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Result<[u8; 32], SigningError> {
    let mut mac = HmacSha256::new_from_slice(key).map_err(|_| SigningError::Hmac)?;
    mac.update(message);
    Ok(mac.finalize().into_bytes().into())
}

/// RFC 7230 `tchar`.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Trimmed, with every run of spaces and tabs inside collapsed to one space.
fn normalize_header_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for word in value.split([' ', '\t']).filter(|word| !word.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

fn canonical_uri(path: &str, encoding: PathEncoding) -> Result<String, SigningError> {
    if path.is_empty() {
        return Ok("/".to_owned());
    }
    if !path.starts_with('/') {
        return Err(SigningError::PathNotAbsolute);
    }
    if encoding == PathEncoding::Single {
        return Ok(path.to_owned());
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut uri = String::with_capacity(path.len() + 8);
    for segment in &segments {
        uri.push('/');
        uri_encode(segment.as_bytes(), &mut uri);
    }
    if segments.is_empty() || path.ends_with('/') {
        uri.push('/');
    }
    Ok(uri)
}

/// Pairs split on `&` and the first `=`, each side percent-decoded then strictly re-encoded
/// (so raw and already-encoded queries sign alike), sorted by key then value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let mut encoded_key = String::with_capacity(key.len());
            uri_encode(&percent_decode(key), &mut encoded_key);
            let mut encoded_value = String::with_capacity(value.len());
            uri_encode(&percent_decode(value), &mut encoded_value);
            (encoded_key, encoded_value)
        })
        .collect();
    pairs.sort();
    let mut out = String::with_capacity(query.len() + 16);
    for (at, (key, value)) in pairs.iter().enumerate() {
        if at > 0 {
            out.push('&');
        }
        out.push_str(key);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// `%XX` → byte; a `%` not followed by two hex digits stays a literal `%`.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        if byte == b'%' {
            let high = bytes.get(at + 1).copied().and_then(hex_value);
            let low = bytes.get(at + 2).copied().and_then(hex_value);
            if let (Some(high), Some(low)) = (high, low) {
                out.push(high << 4 | low);
                at += 3;
                continue;
            }
        }
        out.push(byte);
        at += 1;
    }
    out
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 encoding as SigV4 wants it: everything but `A-Z a-z 0-9 - . _ ~` becomes `%XX`
/// (upper-case hex), `%` itself included.
fn uri_encode(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
    const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const SUITE_SESSION_TOKEN: &str = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";

    /// One case of AWS's Signature Version 4 test suite (region `us-east-1`, service `service`,
    /// 2015-08-30T12:36:00Z, host `example.amazonaws.com`). `post-x-www-form-urlencoded` is
    /// the suite's original form, which does not sign `content-length`.
    struct Vector {
        name: &'static str,
        method: &'static str,
        path: &'static str,
        query: &'static str,
        headers: &'static [(&'static str, &'static str)],
        body: &'static str,
        session_token: bool,
        canonical_request: &'static str,
        string_to_sign: &'static str,
        signature: &'static str,
    }

    const SUITE: &[Vector] = &[
    Vector {
        name: "get-vanilla",
        method: "GET",
        path: "/",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "get-vanilla-query",
        method: "GET",
        path: "/",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "get-vanilla-query-order-key",
        method: "GET",
        path: "/",
        query: "Param1=value2&Param1=Value1",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\nParam1=Value1&Param1=value2\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n704b4cef673542d84cdff252633f065e8daeba5f168b77116f8b1bcaf3d38f89",
        signature: "eedbc4e291e521cf13422ffca22be7d2eb8146eecf653089df300a15b2382bd1",
    },
    Vector {
        name: "get-vanilla-query-order-key-case",
        method: "GET",
        path: "/",
        query: "Param2=value2&Param1=value1",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\nParam1=value1&Param2=value2\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n816cd5b414d056048ba4f7c5386d6e0533120fb1fcfa93762cf0fc39e2cf19e0",
        signature: "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    },
    Vector {
        name: "get-vanilla-query-order-value",
        method: "GET",
        path: "/",
        query: "Param1=value2&Param1=value1",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\nParam1=value1&Param1=value2\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nc968629d70850097a2d8781c9bf7edcb988b04cac14cca9be4acc3595f884606",
        signature: "5772eed61e12b33fae39ee5e7012498b51d56abc0abb7c60486157bd471c4694",
    },
    Vector {
        name: "get-vanilla-empty-query-key",
        method: "GET",
        path: "/",
        query: "Param1=value1",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\nParam1=value1\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n1e24db194ed7d0eec2de28d7369675a243488e08526e8c1c73571282f7c517ab",
        signature: "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb",
    },
    Vector {
        name: "get-vanilla-query-unreserved",
        method: "GET",
        path: "/",
        query: "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nc30d4703d9f799439be92736156d47ccfb2d879ddf56f5befa6d1d6aab979177",
        signature: "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
    },
    Vector {
        name: "get-vanilla-utf8-query",
        method: "GET",
        path: "/",
        query: "ሴ=bar",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n%E1%88%B4=bar\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\neb30c5bed55734080471a834cc727ae56beb50e5f39d1bff6d0d38cb192a7073",
        signature: "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
    },
    Vector {
        name: "get-unreserved",
        method: "GET",
        path: "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n6a968768eefaa713e2a6b16b589a8ea192661f098f37349f4e2c0082757446f9",
        signature: "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
    },
    Vector {
        name: "get-header-key-duplicate",
        method: "GET",
        path: "/",
        query: "",
        headers: &[("My-Header1", "value2"), ("My-Header1", "value2"), ("My-Header1", "value1")],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value2,value2,value1\nx-amz-date:20150830T123600Z\n\nhost;my-header1;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\ndc7f04a3abfde8d472b0ab1a418b741b7c67174dad1551b4117b15527fbe966c",
        signature: "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
    },
    Vector {
        name: "get-header-value-order",
        method: "GET",
        path: "/",
        query: "",
        headers: &[("My-Header1", "value4"), ("My-Header1", "value1"), ("My-Header1", "value3"), ("My-Header1", "value2")],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value4,value1,value3,value2\nx-amz-date:20150830T123600Z\n\nhost;my-header1;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n31ce73cd3f3d9f66977ad3dd957dc47af14df92fcd8509f59b349e9137c58b86",
        signature: "08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01",
    },
    Vector {
        name: "get-header-value-trim",
        method: "GET",
        path: "/",
        query: "",
        headers: &[("My-Header1", "value1"), ("My-Header2", "\"a   b   c\"")],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value1\nmy-header2:\"a b c\"\nx-amz-date:20150830T123600Z\n\nhost;my-header1;my-header2;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\na726db9b0df21c14f559d0a978e563112acb1b9e05476f0a6a1c7d68f28605c7",
        signature: "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
    },
    Vector {
        name: "post-header-key-case",
        method: "POST",
        path: "/",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "POST\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87",
        signature: "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
    },
    Vector {
        name: "post-header-key-sort",
        method: "POST",
        path: "/",
        query: "",
        headers: &[("My-Header1", "value1")],
        body: "",
        session_token: false,
        canonical_request: "POST\n/\n\nhost:example.amazonaws.com\nmy-header1:value1\nx-amz-date:20150830T123600Z\n\nhost;my-header1;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n9368318c2967cf6de74404b30c65a91e8f6253e0a8659d6d5319f1a812f87d65",
        signature: "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c",
    },
    Vector {
        name: "post-header-value-case",
        method: "POST",
        path: "/",
        query: "",
        headers: &[("My-Header1", "VALUE1")],
        body: "",
        session_token: false,
        canonical_request: "POST\n/\n\nhost:example.amazonaws.com\nmy-header1:VALUE1\nx-amz-date:20150830T123600Z\n\nhost;my-header1;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nd51ced243e649e3de6ef63afbbdcbca03131a21a7103a1583706a64618606a93",
        signature: "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
    },
    Vector {
        name: "post-vanilla",
        method: "POST",
        path: "/",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "POST\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87",
        signature: "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
    },
    Vector {
        name: "post-vanilla-query",
        method: "POST",
        path: "/",
        query: "Param1=value1",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "POST\n/\nParam1=value1\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n9d659678c1756bb3113e2ce898845a0a79dbbc57b740555917687f1b3340fbbd",
        signature: "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
    },
    Vector {
        name: "post-vanilla-empty-query-value",
        method: "POST",
        path: "/",
        query: "Param1=value1",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "POST\n/\nParam1=value1\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n9d659678c1756bb3113e2ce898845a0a79dbbc57b740555917687f1b3340fbbd",
        signature: "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
    },
    Vector {
        name: "post-x-www-form-urlencoded",
        method: "POST",
        path: "/",
        query: "",
        headers: &[("Content-Type", "application/x-www-form-urlencoded")],
        body: "Param1=value1",
        session_token: false,
        canonical_request: "POST\n/\n\ncontent-type:application/x-www-form-urlencoded\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\ncontent-type;host;x-amz-date\n9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281",
        signature: "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
    },
    Vector {
        name: "get-relative",
        method: "GET",
        path: "/example/..",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "get-relative-relative",
        method: "GET",
        path: "/example1/example2/../..",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "get-slash",
        method: "GET",
        path: "//",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "get-slash-dot-slash",
        method: "GET",
        path: "/./",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "get-slash-pointless-dot",
        method: "GET",
        path: "/./example",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/example\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n214d50c111a8edc4819da6a636336472c916b5240f51e9a51b5c3305180cf702",
        signature: "ef75d96142cf21edca26f06005da7988e4f8dc83a165a80865db7089db637ec5",
    },
    Vector {
        name: "get-slashes",
        method: "GET",
        path: "//example//",
        query: "",
        headers: &[],
        body: "",
        session_token: false,
        canonical_request: "GET\n/example/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\ncb96b4ac96d501f7c5c15bc6d67b3035061cfced4af6585ad927f7e6c985c015",
        signature: "9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84",
    },
    Vector {
        name: "post-sts-header-before",
        method: "POST",
        path: "/",
        query: "",
        headers: &[],
        body: "",
        session_token: true,
        canonical_request: "POST\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\nx-amz-security-token:AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==\n\nhost;x-amz-date;x-amz-security-token\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        string_to_sign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nc237e1b440d4c63c32ca95b5b99481081cb7b13c7e40434868e71567c1a882f6",
        signature: "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
    },
    ];

    fn credentials(session_token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: ACCESS_KEY_ID.to_owned(),
            secret_access_key: SECRET_ACCESS_KEY.to_owned(),
            session_token: session_token.map(str::to_owned),
        }
    }

    fn suite_params() -> Params<'static> {
        Params {
            region: "us-east-1",
            service: "service",
            time: AmzDate::parse("20150830T123600Z").unwrap(),
            path_encoding: PathEncoding::Double,
            content_sha256_header: false,
        }
    }

    #[test]
    fn aws_test_suite_vectors() {
        assert!(SUITE.len() >= 20);
        for vector in SUITE {
            let request = Request {
                method: vector.method,
                host: "example.amazonaws.com",
                path: vector.path,
                query: vector.query,
                headers: vector.headers,
                payload: Payload::Bytes(vector.body.as_bytes()),
            };
            let token = vector.session_token.then_some(SUITE_SESSION_TOKEN);
            let signed = sign(&request, &credentials(token), &suite_params()).unwrap();
            assert_eq!(
                signed.canonical_request(),
                vector.canonical_request,
                "{}: canonical request",
                vector.name
            );
            assert_eq!(
                signed.string_to_sign(),
                vector.string_to_sign,
                "{}: string to sign",
                vector.name
            );
            assert_eq!(signed.signature_hex(), vector.signature, "{}", vector.name);
            let signed_headers = vector.canonical_request.lines().nth_back(1).unwrap();
            assert_eq!(
                signed.authorization,
                format!(
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders={signed_headers}, Signature={}",
                    vector.signature
                ),
                "{}: authorization",
                vector.name
            );
            assert_eq!(signed.amz_date, "20150830T123600Z");
            assert_eq!(signed.security_token.as_deref(), token);
        }
    }

    const BEDROCK_BODY: &str = r#"{"messages":[{"role":"user","content":[{"text":"Hi"}]}]}"#;
    const BEDROCK_BODY_SHA256: &str =
        "45e583fed2564dc00e823303d7609f8587af7f685b993cb0f998afc0d480b01d";

    fn bedrock_request(path: &str) -> Request<'_> {
        Request {
            method: "POST",
            host: "bedrock-runtime.us-east-1.amazonaws.com",
            path,
            query: "",
            headers: &[("Content-Type", "application/json")],
            payload: Payload::Bytes(BEDROCK_BODY.as_bytes()),
        }
    }

    fn bedrock_params(content_sha256_header: bool) -> Params<'static> {
        Params {
            region: "us-east-1",
            service: "bedrock",
            time: AmzDate::parse("20250611T072336Z").unwrap(),
            path_encoding: PathEncoding::Double,
            content_sha256_header,
        }
    }

    /// The path carries `%3A`; the canonical URI must carry `%253A`. Expected texts written by
    /// hand from the SigV4 rules; the signature computed independently (Python's hmac/hashlib).
    #[test]
    fn bedrock_model_id_with_colon_is_encoded_twice_in_the_canonical_uri() {
        let path = "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream";
        let signed = sign(
            &bedrock_request(path),
            &credentials(Some("FQoGZXIvYXdzEXAMPLESESSIONTOKEN")),
            &bedrock_params(false),
        )
        .unwrap();
        assert_eq!(
            signed.canonical_request(),
            "POST\n\
             /model/anthropic.claude-3-5-sonnet-20240620-v1%253A0/converse-stream\n\
             \n\
             content-type:application/json\n\
             host:bedrock-runtime.us-east-1.amazonaws.com\n\
             x-amz-date:20250611T072336Z\n\
             x-amz-security-token:FQoGZXIvYXdzEXAMPLESESSIONTOKEN\n\
             \n\
             content-type;host;x-amz-date;x-amz-security-token\n\
             45e583fed2564dc00e823303d7609f8587af7f685b993cb0f998afc0d480b01d"
        );
        assert_eq!(
            signed.string_to_sign(),
            "AWS4-HMAC-SHA256\n20250611T072336Z\n20250611/us-east-1/bedrock/aws4_request\n\
             b65f8a2583c632d456dfc619051e1967d39facd5aa234f3fecafb762be0a9206"
        );
        assert_eq!(
            signed.authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250611/us-east-1/bedrock/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, \
             Signature=f82f0823f74839c5ea1cb0229b79f2ce3c419904ada09c655336a5504bd45796"
        );
        assert_eq!(
            signed.headers(),
            vec![
                ("authorization", signed.authorization.as_str()),
                ("x-amz-date", "20250611T072336Z"),
                ("x-amz-security-token", "FQoGZXIvYXdzEXAMPLESESSIONTOKEN"),
            ]
        );

        // Signing the decoded `:` instead gives a different signature: the bug this guards.
        let undecoded = sign(
            &bedrock_request("/model/anthropic.claude-3-5-sonnet-20240620-v1:0/converse-stream"),
            &credentials(Some("FQoGZXIvYXdzEXAMPLESESSIONTOKEN")),
            &bedrock_params(false),
        )
        .unwrap();
        assert!(undecoded
            .canonical_request()
            .contains("/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream\n"));
        assert_ne!(undecoded.signature_hex(), signed.signature_hex());

        // S3 semantics sign the wire path as is.
        let mut single = bedrock_params(false);
        single.path_encoding = PathEncoding::Single;
        let signed_single = sign(&bedrock_request(path), &credentials(None), &single).unwrap();
        assert!(signed_single
            .canonical_request()
            .contains(&format!("\n{path}\n")));
    }

    #[test]
    fn content_sha256_header_is_sent_and_signed_when_asked() {
        let path = "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream";
        let signed = sign(
            &bedrock_request(path),
            &credentials(None),
            &bedrock_params(true),
        )
        .unwrap();
        assert_eq!(signed.content_sha256.as_deref(), Some(BEDROCK_BODY_SHA256));
        assert_eq!(signed.security_token, None);
        assert_eq!(
            signed.string_to_sign(),
            "AWS4-HMAC-SHA256\n20250611T072336Z\n20250611/us-east-1/bedrock/aws4_request\n\
             ea5cf5bf64fd8e546fa30f89281bec4459d8c37a7848796d521c690112dbc370"
        );
        assert_eq!(
            signed.signature_hex(),
            "a4c90a454ae1e86a25e7e9124fa26c8b6ffd1b9c900ad51ca5ab4de5da36f239"
        );
        assert_eq!(
            signed.headers(),
            vec![
                ("authorization", signed.authorization.as_str()),
                ("x-amz-date", "20250611T072336Z"),
                ("x-amz-content-sha256", BEDROCK_BODY_SHA256),
            ]
        );

        // A precomputed hash signs identically to hashing the bytes here.
        let mut request = bedrock_request(path);
        request.payload = Payload::Sha256Hex(BEDROCK_BODY_SHA256);
        let precomputed = sign(&request, &credentials(None), &bedrock_params(true)).unwrap();
        assert_eq!(precomputed.signature_hex(), signed.signature_hex());
    }

    #[test]
    fn unsigned_payload_and_hop_by_hop_headers() {
        let request = Request {
            method: "PUT",
            host: "bucket.s3.amazonaws.com",
            path: "/key%20name",
            query: "",
            headers: &[("Connection", "keep-alive"), ("User-Agent", "x/1")],
            payload: Payload::Unsigned,
        };
        let params = Params {
            region: "us-east-1",
            service: "s3",
            time: AmzDate::parse("20150830T123600Z").unwrap(),
            path_encoding: PathEncoding::Single,
            content_sha256_header: true,
        };
        let signed = sign(&request, &credentials(None), &params).unwrap();
        assert_eq!(
            signed.canonical_request(),
            "PUT\n/key%20name\n\nhost:bucket.s3.amazonaws.com\n\
             x-amz-content-sha256:UNSIGNED-PAYLOAD\nx-amz-date:20150830T123600Z\n\n\
             host;x-amz-content-sha256;x-amz-date\nUNSIGNED-PAYLOAD"
        );
    }

    #[test]
    fn query_is_decoded_then_strictly_reencoded_and_sorted() {
        assert_eq!(canonical_query(""), "");
        assert_eq!(canonical_query("b=2&a=1&&a=0"), "a=0&a=1&b=2");
        assert_eq!(canonical_query("flag"), "flag=");
        assert_eq!(canonical_query("k=a%3Ab"), canonical_query("k=a:b"));
        assert_eq!(canonical_query("k=a:b"), "k=a%3Ab");
        assert_eq!(canonical_query("k=a b+c"), "k=a%20b%2Bc");
        assert_eq!(canonical_query("k=%zz%4"), "k=%25zz%254");
        assert_eq!(canonical_query("k=%2f"), "k=%2F");
    }

    #[test]
    fn paths_are_normalised_then_encoded_segment_by_segment() {
        let double = |path| canonical_uri(path, PathEncoding::Double).unwrap();
        assert_eq!(double(""), "/");
        assert_eq!(double("/"), "/");
        assert_eq!(double("/a/./b/../c/"), "/a/c/");
        assert_eq!(double("/../.."), "/");
        assert_eq!(double("/a%20b/c d"), "/a%2520b/c%20d");
        assert_eq!(
            double("/model/arn%3Aaws%2Fx/converse"),
            "/model/arn%253Aaws%252Fx/converse"
        );
        assert_eq!(
            canonical_uri("relative", PathEncoding::Double),
            Err(SigningError::PathNotAbsolute)
        );
    }

    #[test]
    fn header_values_are_trimmed_and_runs_of_blanks_collapsed() {
        assert_eq!(normalize_header_value("  a \t b   c  "), "a b c");
        assert_eq!(normalize_header_value(""), "");
    }

    #[test]
    fn amz_date_from_system_time() {
        let at = |seconds| {
            AmzDate::from_system_time(UNIX_EPOCH + std::time::Duration::from_secs(seconds)).unwrap()
        };
        assert_eq!(at(0).as_str(), "19700101T000000Z");
        assert_eq!(at(1_440_938_160).as_str(), "20150830T123600Z");
        assert_eq!(at(1_440_938_160).date(), "20150830");
        assert_eq!(at(951_782_400).as_str(), "20000229T000000Z");
        assert_eq!(at(4_107_542_399).as_str(), "21000228T235959Z");
        assert_eq!(at(4_107_542_400).as_str(), "21000301T000000Z");
        assert_eq!(at(253_402_300_799).as_str(), "99991231T235959Z");
        assert_eq!(
            AmzDate::from_system_time(UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_800)),
            Err(SigningError::InvalidDate)
        );
        for bad in [
            "",
            "20150830T123600",
            "20150830 123600Z",
            "2015083aT123600Z",
        ] {
            assert_eq!(AmzDate::parse(bad), Err(SigningError::InvalidDate), "{bad}");
        }
    }

    #[test]
    fn bad_input_is_refused_without_echoing_values() {
        let creds = credentials(Some("SESSION-SECRET"));
        let params = suite_params();
        let refuse = |headers: &'static [(&'static str, &'static str)]| {
            let request = Request {
                method: "GET",
                host: "example.amazonaws.com",
                path: "/",
                query: "",
                headers,
                payload: Payload::Bytes(b""),
            };
            sign(&request, &creds, &params).unwrap_err()
        };
        assert_eq!(
            refuse(&[("Authorization", "Bearer x")]),
            SigningError::ReservedHeader("authorization".into())
        );
        assert_eq!(
            refuse(&[("X-Amz-Date", "20150830T123600Z")]),
            SigningError::ReservedHeader("x-amz-date".into())
        );
        assert_eq!(
            refuse(&[("bad name", "v")]),
            SigningError::InvalidHeaderName("bad name".into())
        );
        let injected = refuse(&[("x-note", "SECRET-VALUE\r\nx-evil: 1")]);
        assert_eq!(injected, SigningError::InvalidHeaderValue("x-note".into()));
        assert!(!injected.to_string().contains("SECRET-VALUE"));
        assert!(!format!("{injected:?}").contains("SECRET-VALUE"));

        let mut bad_scope = suite_params();
        bad_scope.region = "us-east-1/x";
        let request = Request {
            method: "GET",
            host: "example.amazonaws.com",
            path: "/",
            query: "",
            headers: &[],
            payload: Payload::Sha256Hex("not-a-hash"),
        };
        assert_eq!(
            sign(&request, &creds, &bad_scope).unwrap_err(),
            SigningError::InvalidScope
        );
        assert_eq!(
            sign(&request, &creds, &params).unwrap_err(),
            SigningError::InvalidPayloadHash
        );
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let creds = credentials(Some(SUITE_SESSION_TOKEN));
        let shown = format!("{creds:?} {creds:#?}");
        assert!(shown.contains(ACCESS_KEY_ID));
        assert!(!shown.contains(SECRET_ACCESS_KEY));
        assert!(!shown.contains("AQoDYXdzEPT"));

        let request = Request {
            method: "POST",
            host: "example.amazonaws.com",
            path: "/",
            query: "",
            headers: &[],
            payload: Payload::Bytes(b""),
        };
        let signed = sign(&request, &creds, &suite_params()).unwrap();
        let shown = format!("{signed:?} {signed:#?}");
        assert!(!shown.contains(SECRET_ACCESS_KEY));
        assert!(!shown.contains("AQoDYXdzEPT"));
        assert!(!shown.contains(signed.signature_hex()));
    }
}
