//! A fake Google upstream for the proxy's Gemini and Vertex AI adapter: the Gemini API
//! (`POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`), Vertex AI
//! (`POST /v1/projects/{project}/locations/{location}/publishers/google/models/{model}:…`, also
//! `v1beta1`) and the OAuth token endpoint a service account's `token_uri` names (`POST /token`),
//! all on one port.
//!
//! Authentication is checked the way Google does. Gemini API keys come in `x-goog-api-key` (or
//! `?key=`); an unknown key is a **400** `INVALID_ARGUMENT` with reason `API_KEY_INVALID`, not a
//! 401, and a missing one is Google's 403 for unregistered callers. Vertex wants `Authorization:
//! Bearer` with an access token this fake minted, unexpired (401 `UNAUTHENTICATED` otherwise,
//! `ACCESS_TOKEN_EXPIRED` when it was), for the project its service account belongs to (403
//! `PERMISSION_DENIED`). The token endpoint takes the JWT-bearer grant as a form and verifies the
//! assertion fully, with a verifier written here from RFC 7515/7523 (not the proxy's signer, so a
//! signing bug fails a test): three unpadded base64url parts, header `RS256`/`JWT` with the
//! account's `kid`, the RS256 signature against the account's public key, `iss` a registered
//! account, `aud` Google's token URL or the `token_uri`, a `cloud-platform` scope, `iat` within five
//! minutes and a lifetime of at most an hour. Errors are Google's OAuth JSON (`invalid_grant`,
//! `invalid_scope`, …). Service accounts are made at run time ([`FakeGoogle::service_account`]):
//! a fresh RSA key and a key file shaped like Google's, so no key text lives in the sources.
//!
//! Bodies are validated against `GenerateContentRequest`: known camelCase fields only (top level,
//! `generationConfig`, parts, `toolConfig`; Google's "Unknown name" message), non-empty
//! `contents` of `user`/`model` turns with non-empty `parts`, each part one of `text`,
//! `inlineData` (real base64), `fileData`, `functionCall`, `functionResponse` (object response),
//! `functionCall` only from the model right after a user turn and answered, name for name, by
//! the `functionResponse`s of the next user turn, a text-only `systemInstruction`, ranges of the
//! generation parameters, function names and `functionCallingConfig`. Streams must ask for
//! `alt=sse`. A refusal is Google's error JSON, so a translation bug fails a test instead of
//! passing silently.
//!
//! What it answers follows the request and the per-credential [`GoogleBehavior`] (credential: the
//! API key, or the service account's `client_email`): `functionCall` parts without ids and with
//! `finishReason: STOP` when tools are offered and the behavior names calls, a summary of the
//! function responses when the last turn carries them, a JSON object when `responseMimeType` is
//! JSON, and otherwise words (after a note of any inline data received) cut at `maxOutputTokens`
//! (`MAX_TOKENS`). Streams are `data: <GenerateContentResponse>` events ended by `\r\n\r\n` as
//! Google sends them, no `[DONE]`, usage a cumulative snapshot on every chunk (complete on the
//! last), the finish reason on the last chunk only.
//!
//! Claude on Vertex too (`publishers/anthropic/models/{model}:rawPredict` and
//! `:streamRawPredict`), and Claude's token counting,
//! `POST /v1/projects/{project}/locations/{location}/publishers/anthropic/models/count-tokens:rawPredict`:
//! Anthropic's `count_tokens` body with `anthropic_version: "vertex-2023-10-16"` and the Claude
//! model in the body (the path names none), answered `{"input_tokens": N}` with N
//! [`crate::fake_anthropic::ANTHROPIC_INPUT_TOKENS`], as the fake Anthropic counts; refusals in
//! Anthropic's error shape.
//!
//! Embeddings too: the Gemini API's `POST /v1beta/models/{model}:batchEmbedContents`
//! ([`validate_batch_embed_body`]; answered `{"embeddings":[{"values"}]}`, no usage, as Google
//! does) and Vertex's `POST /v1/projects/{project}/locations/{location}/publishers/google/models/
//! {model}:predict` ([`validate_vertex_embed_body`]; answered with `predictions[].embeddings`
//! carrying `statistics.token_count` and `metadata.billableCharacterCount`), with the same
//! authentication as `generateContent`. Vectors are [`crate::fake_embedding`]s (3072 dimensions
//! on the Gemini API, 768 on Vertex, unless `outputDimensionality` says otherwise), token counts
//! [`crate::word_count`]s.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::Response;
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::sha2::Sha256;
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{json, Value};

use crate::fake::Received;
use crate::fake_embeddings::{fake_embedding, word_count};
use crate::serve::{
    fake_server, json_response, lock, paced_stream, refuse, Body, FakeLog, FakeServer, Pace,
    ReadRequest,
};

/// The text reply, one output word per token.
pub const GOOGLE_REPLY: &str = "Hello from the fake Gemini model.";

/// The reply when `responseMimeType` is `application/json`.
pub const GOOGLE_JSON_REPLY: &str = r#"{"answer":"hi","confidence":1}"#;

/// The scope Vertex AI needs.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The audience google-auth signs assertions for, whatever the key file's `token_uri`.
pub const GOOGLE_TOKEN_AUDIENCE: &str = "https://oauth2.googleapis.com/token";

/// The OAuth grant type of a service-account assertion (RFC 7523).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// `expires_in` of minted access tokens unless a test sets another.
pub const DEFAULT_TOKEN_LIFETIME_S: u64 = 3599;

/// How far an assertion's `iat` may be from the fake's clock.
const CLOCK_SKEW_MAX_S: u64 = 300;

/// The longest assertion Google accepts (`exp - iat`).
const ASSERTION_LIFETIME_MAX_S: u64 = 3600;

/// Usage the fake reports, in Gemini's terms (`totalTokenCount` is the sum of the three counts;
/// `cachedContentTokenCount` is part of `promptTokenCount`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoogleUsage {
    pub prompt_token_count: u64,
    pub candidates_token_count: u64,
    pub thoughts_token_count: u64,
    pub cached_content_token_count: u64,
}

/// What the fake does for a request.
#[derive(Debug, Clone)]
pub struct GoogleBehavior {
    /// Non-2xx answers with Google's error JSON, status name from the code (400
    /// INVALID_ARGUMENT, 403 PERMISSION_DENIED, 429 RESOURCE_EXHAUSTED, 500 INTERNAL, 503
    /// UNAVAILABLE, …).
    pub status: u16,
    /// The error message (defaults follow the status).
    pub error_message: Option<String>,
    /// A `RetryInfo` detail (`retryDelay`) on error answers; like Google, no `retry-after` header.
    pub retry_after_s: Option<u64>,
    /// Function calls `(name, args)` made when the request declares functions by those names.
    pub tool_calls: Vec<(String, Value)>,
    pub usage: GoogleUsage,
    /// Streams send Google's error JSON (500 INTERNAL, not `data:`-prefixed) after the first
    /// text chunk and end.
    pub stream_error: bool,
    /// The prompt is blocked: `promptFeedback.blockReason: SAFETY` and no candidates.
    pub prompt_blocked: bool,
    /// Put this `thoughtSignature` on the first `functionCall` part, and refuse requests whose
    /// current turn replays a function call without it (as Gemini 3 models do).
    pub thought_signature: Option<String>,
    /// Delay before a stream's first content chunk (its time to first token).
    pub ttft: Duration,
    /// Pause before each later content chunk.
    pub chunk_interval: Duration,
}

impl Default for GoogleBehavior {
    fn default() -> Self {
        Self {
            status: 200,
            error_message: None,
            retry_after_s: None,
            tool_calls: Vec::new(),
            usage: GoogleUsage {
                prompt_token_count: 23,
                candidates_token_count: 7,
                thoughts_token_count: 5,
                cached_content_token_count: 8,
            },
            stream_error: false,
            prompt_blocked: false,
            thought_signature: None,
            ttft: Duration::ZERO,
            chunk_interval: Duration::ZERO,
        }
    }
}

/// A registered service account: what the token endpoint checks assertions against.
struct Account {
    project: String,
    private_key_id: String,
    public_key: RsaPublicKey,
}

/// An access token the fake minted.
struct Issued {
    client_email: String,
    expires_at: Instant,
}

#[derive(Default)]
/// What the fake keeps between requests, its log among it.
pub struct GoogleState {
    port: u16,
    default: GoogleBehavior,
    api_keys: HashSet<String>,
    by_credential: HashMap<String, GoogleBehavior>,
    accounts: HashMap<String, Account>,
    tokens: HashMap<String, Issued>,
    token_lifetime_s: u64,
    tokens_minted: usize,
    log: FakeLog,
    next_id: u64,
}

/// A service account made for a test: its key file text and what a test needs to sign with it.
#[derive(Clone)]
pub struct TestServiceAccount {
    /// The key file, exactly as Google's JSON (with the PKCS#8 PEM `private_key`).
    pub json: String,
    pub project_id: String,
    pub client_email: String,
    pub private_key_id: String,
    /// The fake's token endpoint (the key file's `token_uri`).
    pub token_uri: String,
    key: RsaPrivateKey,
}

impl std::fmt::Debug for TestServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .finish_non_exhaustive()
    }
}

impl TestServiceAccount {
    /// A key file for `name@project` with a fresh RSA key, posting its assertions to
    /// `token_uri` (no fake knows it: register it with [`FakeGoogle::service_account`]).
    pub fn generate(name: &str, project: &str, token_uri: &str) -> Self {
        let key = generate_rsa_key();
        let pem = match key.to_pkcs8_pem(LineEnding::LF) {
            Ok(pem) => pem.to_string(),
            Err(e) => panic!("PKCS#8 encoding failed: {e}"),
        };
        let private_key_id = hex::encode(rand::random::<[u8; 20]>());
        let client_id = format!("1{:020}", rand::random::<u64>());
        let client_email = format!("{name}@{project}.iam.gserviceaccount.com");
        let json = json!({
            "type": "service_account",
            "project_id": project,
            "private_key_id": private_key_id,
            "private_key": pem,
            "client_email": client_email,
            "client_id": client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!(
                "https://www.googleapis.com/robot/v1/metadata/x509/{name}%40{project}.iam.gserviceaccount.com"
            ),
            "universe_domain": "googleapis.com",
        });
        Self {
            json: json.to_string(),
            project_id: project.to_owned(),
            client_email,
            private_key_id,
            token_uri: token_uri.to_owned(),
            key,
        }
    }

    /// The claims google-auth sends: `iss`, the cloud-platform `scope`, Google's audience, `iat`
    /// now and `exp` an hour later.
    pub fn standard_claims(&self) -> Value {
        let now = unix_now();
        json!({"iss": self.client_email, "scope": CLOUD_PLATFORM_SCOPE,
            "aud": GOOGLE_TOKEN_AUDIENCE, "iat": now, "exp": now + 3600})
    }

    /// An RS256 assertion over `claims`, with this account's `kid`.
    pub fn sign_assertion(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.private_key_id});
        sign_jwt(&self.key, &header, claims)
    }
}

/// A compact JWS: base64url (unpadded) header and claims, RS256 (PKCS#1 v1.5, SHA-256) signature.
pub fn sign_jwt(key: &RsaPrivateKey, header: &Value, claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = SigningKey::<Sha256>::new(key.clone()).sign(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    )
}

/// A fresh 2048-bit RSA key (made at run time: no key text is ever committed).
pub fn generate_rsa_key() -> RsaPrivateKey {
    match RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048) {
        Ok(key) => key,
        Err(e) => panic!("RSA key generation failed: {e}"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fake_server!(
    /// A running fake; stops when dropped.
    FakeGoogle = GoogleState
);

impl FakeServer<GoogleState> {
    /// Starts on `127.0.0.1:0`; `default` applies to allowed keys and accounts without their own.
    pub async fn start(default: GoogleBehavior) -> std::io::Result<Self> {
        Self::serve(
            |addr| GoogleState {
                port: addr.port(),
                default,
                token_lifetime_s: DEFAULT_TOKEN_LIFETIME_S,
                ..GoogleState::default()
            },
            handle,
        )
        .await
    }

    /// The token endpoint service accounts made here name as `token_uri`.
    pub fn token_uri(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Accepts this Gemini API key (with the default behavior unless it has its own).
    pub fn allow_key(&self, key: &str) {
        self.state().api_keys.insert(key.to_owned());
    }

    /// Requests by `credential` get `behavior`: a Gemini API key (which this also allows) or a
    /// service account's `client_email` (an `@` in it tells which).
    pub fn set_behavior(&self, credential: &str, behavior: GoogleBehavior) {
        let mut st = self.state();
        if !credential.contains('@') {
            st.api_keys.insert(credential.to_owned());
        }
        st.by_credential.insert(credential.to_owned(), behavior);
    }

    pub fn set_default(&self, behavior: GoogleBehavior) {
        self.state().default = behavior;
    }

    /// `expires_in` (and the real lifetime) of tokens minted from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state().token_lifetime_s = lifetime.as_secs();
    }

    /// Invalidates every access token minted so far (as a revoked or rotated credential would).
    pub fn revoke_tokens(&self) {
        self.state().tokens.clear();
    }

    /// Access tokens minted so far.
    pub fn tokens_minted(&self) -> usize {
        self.state().tokens_minted
    }

    /// Makes a service account of `project` with a fresh RSA key, registers its public key and
    /// returns its key file (`token_uri` pointing at this fake).
    pub fn service_account(&self, project: &str) -> TestServiceAccount {
        let mut st = self.state();
        let name = format!("tokn-test-{}", st.accounts.len() + 1);
        let token_uri = format!("http://127.0.0.1:{}/token", st.port);
        let sa = TestServiceAccount::generate(&name, project, &token_uri);
        st.accounts.insert(
            sa.client_email.clone(),
            Account {
                project: project.to_owned(),
                private_key_id: sa.private_key_id.clone(),
                public_key: sa.key.to_public_key(),
            },
        );
        sa
    }
}

// === Errors ===

fn status_name(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "NOT_IMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

fn error_json(status: u16, message: &str, details: Vec<Value>) -> Value {
    let mut error = json!({"code": status, "message": message, "status": status_name(status)});
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    json!({ "error": error })
}

fn error_info(reason: &str, service: &str) -> Value {
    json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
        "domain": "googleapis.com", "metadata": {"service": service}})
}

/// Google's error body: `{"error":{"code","message","status"}}`.
pub fn google_error(status: u16, message: &str) -> Response<Body> {
    json_response(status, &error_json(status, message, Vec::new()))
}

fn api_key_invalid() -> Response<Body> {
    json_response(
        400,
        &error_json(
            400,
            "API key not valid. Please pass a valid API key.",
            vec![error_info(
                "API_KEY_INVALID",
                "generativelanguage.googleapis.com",
            )],
        ),
    )
}

fn unauthenticated(message: &str, reason: &str) -> Response<Body> {
    let mut resp = json_response(
        401,
        &error_json(
            401,
            message,
            vec![error_info(reason, "aiplatform.googleapis.com")],
        ),
    );
    resp.headers_mut().insert(
        "www-authenticate",
        http::HeaderValue::from_static(
            "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"",
        ),
    );
    resp
}

fn behavior_error(b: &GoogleBehavior) -> Response<Body> {
    let message = b.error_message.clone().unwrap_or_else(|| {
        match b.status {
            400 => "Request contains an invalid argument.",
            403 => "Permission denied: Consumer has been suspended.",
            404 => "models/unknown is not found for API version v1beta.",
            429 => "You exceeded your current quota, please check your plan and billing details.",
            503 => "The model is overloaded. Please try again later.",
            _ => "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
        }
        .to_owned()
    });
    let mut details = Vec::new();
    if let Some(s) = b.retry_after_s {
        details.push(
            json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{s}s")}),
        );
    }
    // Google names the delay in the body only (no `retry-after` header).
    json_response(b.status, &error_json(b.status, &message, details))
}

// === OAuth token endpoint ===

/// Decodes an `application/x-www-form-urlencoded` body (`+` is a space, `%XX` a byte).
fn parse_form(text: &str) -> Option<HashMap<String, String>> {
    let decode = |s: &str| -> Option<String> {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = s.get(i + 1..i + 3)?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).ok()
    };
    let mut form = HashMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        form.insert(decode(k)?, decode(v)?);
    }
    Some(form)
}

/// Verifies a JWT-bearer assertion; the account's `client_email`, or Google's `(error,
/// error_description)`.
fn verify_assertion(st: &GoogleState, jwt: &str) -> Result<String, (&'static str, String)> {
    let grant = |why: &str| ("invalid_grant", why.to_owned());
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header_b64, claims_b64, signature_b64] = parts[..] else {
        return Err(grant("Invalid JWT: not three dot-separated parts."));
    };
    // JWS uses unpadded base64url; a padded or standard-alphabet part is malformed.
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).ok();
    let json = |part: &str| decode(part).and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let (Some(header), Some(claims), Some(signature)) =
        (json(header_b64), json(claims_b64), decode(signature_b64))
    else {
        return Err(grant("Invalid JWT: parts must be unpadded base64url JSON."));
    };
    if header["alg"] != "RS256" || header["typ"] != "JWT" {
        return Err(grant("Invalid JWT header: alg must be RS256 and typ JWT."));
    }
    let iss = claims["iss"].as_str().unwrap_or_default();
    let Some(account) = st.accounts.get(iss) else {
        return Err(grant("Invalid grant: account not found"));
    };
    if header["kid"].as_str() != Some(account.private_key_id.as_str()) {
        return Err(grant(
            "Invalid JWT Signature. (kid does not name the account's key)",
        ));
    }
    let verified = Signature::try_from(signature.as_slice()).is_ok_and(|sig| {
        VerifyingKey::<Sha256>::new(account.public_key.clone())
            .verify(format!("{header_b64}.{claims_b64}").as_bytes(), &sig)
            .is_ok()
    });
    if !verified {
        return Err(grant("Invalid JWT Signature."));
    }
    let token_uri = format!("http://127.0.0.1:{}/token", st.port);
    let aud = claims["aud"].as_str().unwrap_or_default();
    if aud != GOOGLE_TOKEN_AUDIENCE && aud != token_uri {
        return Err(grant("Invalid JWT: Failed audience check."));
    }
    let now = unix_now();
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err(grant("Invalid JWT: iat and exp are required integers."));
    };
    if iat.abs_diff(now) > CLOCK_SKEW_MAX_S
        || exp <= now
        || exp <= iat
        || exp - iat > ASSERTION_LIFETIME_MAX_S
    {
        return Err(grant("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim."));
    }
    let scopes = claims["scope"].as_str().unwrap_or_default();
    if !scopes.split(' ').any(|s| s == CLOUD_PLATFORM_SCOPE) {
        return Err((
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.".to_owned(),
        ));
    }
    Ok(iss.to_owned())
}

fn token_endpoint(
    state: &Mutex<GoogleState>,
    headers: &HashMap<String, String>,
    body: &[u8],
) -> Response<Body> {
    let mut st = lock(state);
    match check_token_request(&st, headers, body) {
        Ok(client_email) => {
            let token = format!(
                "ya29.c.{}",
                URL_SAFE_NO_PAD.encode(rand::random::<[u8; 48]>())
            );
            let lifetime = st.token_lifetime_s;
            st.tokens.insert(
                token.clone(),
                Issued {
                    client_email,
                    expires_at: Instant::now() + Duration::from_secs(lifetime),
                },
            );
            st.tokens_minted += 1;
            json_response(
                200,
                &json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}),
            )
        }
        Err((error, description)) => {
            st.log
                .rejected
                .push(format!("token: {error}: {description}"));
            json_response(
                400,
                &json!({"error": error, "error_description": description}),
            )
        }
    }
}

/// Checks a token request (form, grant type, assertion); the account's `client_email`.
fn check_token_request(
    st: &GoogleState,
    headers: &HashMap<String, String>,
    body: &[u8],
) -> Result<String, (&'static str, String)> {
    let form_type = headers
        .get("content-type")
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return Err((
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded".into(),
        ));
    }
    let Some(form) = std::str::from_utf8(body).ok().and_then(parse_form) else {
        return Err(("invalid_request", "Malformed form body".into()));
    };
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant_type != JWT_BEARER_GRANT {
        return Err((
            "unsupported_grant_type",
            format!("Invalid grant_type: {grant_type}"),
        ));
    }
    let Some(assertion) = form.get("assertion").filter(|a| !a.is_empty()) else {
        return Err((
            "invalid_request",
            "Missing required parameter: assertion".into(),
        ));
    };
    verify_assertion(st, assertion)
}

// === Routes ===

enum Api {
    Gemini,
    Vertex { project: String, location: String },
}

struct Route {
    api: Api,
    model: String,
    stream: bool,
    /// Claude on Vertex (`publishers/anthropic`, `:rawPredict` / `:streamRawPredict`).
    claude: bool,
    /// Embeddings: `:batchEmbedContents` on the Gemini API, `:predict` on Vertex.
    embed: bool,
}

fn parse_route(path: &str) -> Option<Route> {
    let (api, rest) = if let Some(rest) = path.strip_prefix("/v1beta/models/") {
        (Api::Gemini, rest)
    } else {
        let rest = path
            .strip_prefix("/v1/projects/")
            .or_else(|| path.strip_prefix("/v1beta1/projects/"))?;
        let (project, rest) = rest.split_once("/locations/")?;
        let (location, rest) = rest
            .split_once("/publishers/google/models/")
            .or_else(|| rest.split_once("/publishers/anthropic/models/"))?;
        if project.is_empty() || project.contains('/') || location.contains('/') {
            return None;
        }
        let api = Api::Vertex {
            project: project.to_owned(),
            location: location.to_owned(),
        };
        (api, rest)
    };
    let (model, method) = rest.rsplit_once(':')?;
    if model.is_empty() || model.contains('/') {
        return None;
    }
    let claude = path.contains("/publishers/anthropic/models/");
    let vertex = matches!(api, Api::Vertex { .. });
    // Token counting has no streaming form.
    if claude && model == CLAUDE_COUNT_TOKENS_MODEL && method != "rawPredict" {
        return None;
    }
    let (stream, embed) = match (method, claude, vertex) {
        ("generateContent", false, _) | ("rawPredict", true, true) => (false, false),
        ("streamGenerateContent", false, _) | ("streamRawPredict", true, true) => (true, false),
        ("batchEmbedContents", false, false) | ("predict", false, true) => (false, true),
        _ => return None,
    };
    Some(Route {
        api,
        model: model.to_owned(),
        stream,
        claude,
        embed,
    })
}

/// `global` or a region name such as `us-central1` / `europe-west4`.
fn valid_location(location: &str) -> bool {
    if location == "global" {
        return true;
    }
    let mut pieces = location.split('-');
    let (Some(area), Some(region), None) = (pieces.next(), pieces.next(), pieces.next()) else {
        return false;
    };
    let digits = region.trim_start_matches(|c: char| c.is_ascii_lowercase());
    !area.is_empty()
        && area.bytes().all(|b| b.is_ascii_lowercase())
        && digits.len() < region.len()
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
}

// === GenerateContentRequest validation ===

const TOP_LEVEL: &[&str] = &[
    "contents",
    "systemInstruction",
    "generationConfig",
    "tools",
    "toolConfig",
    "safetySettings",
    "cachedContent",
    "labels",
];

const GENERATION_CONFIG: &[&str] = &[
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "stopSequences",
    "candidateCount",
    "seed",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "presencePenalty",
    "frequencyPenalty",
    "thinkingConfig",
    "responseLogprobs",
    "logprobs",
    "responseModalities",
    "mediaResolution",
];

/// The members a part may carry; exactly one of the first group (the `data` oneof).
const PART_DATA: &[&str] = &[
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
];
const PART_META: &[&str] = &["thought", "thoughtSignature", "videoMetadata"];

fn unknown_field(
    obj: &serde_json::Map<String, Value>,
    known: &[&str],
    at: &str,
) -> Result<(), String> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) if at.is_empty() => Err(format!(
            "Invalid JSON payload received. Unknown name \"{k}\": Cannot find field."
        )),
        Some(k) => Err(format!(
            "Invalid JSON payload received. Unknown name \"{k}\" at '{at}': Cannot find field."
        )),
        None => Ok(()),
    }
}

fn valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// A non-empty string.
fn has_text(value: Option<&Value>) -> bool {
    value.and_then(Value::as_str).is_some_and(|s| !s.is_empty())
}

fn decode_base64(data: &str) -> Option<Vec<u8>> {
    // Proto `bytes` in JSON accept both alphabets.
    STANDARD
        .decode(data)
        .or_else(|_| URL_SAFE.decode(data))
        .ok()
}

/// Checks one part; its data member's name.
fn validate_part(part: &Value, at: &str) -> Result<&'static str, String> {
    let obj = part
        .as_object()
        .ok_or(format!("{at}: a part must be an object"))?;
    let mut known = PART_DATA.to_vec();
    known.extend_from_slice(PART_META);
    unknown_field(obj, &known, at)?;
    let mut data = PART_DATA.iter().filter(|k| obj.contains_key(**k));
    let kind = match (data.next(), data.next()) {
        (Some(kind), None) => *kind,
        (Some(_), Some(second)) => {
            return Err(format!(
                "Invalid value at '{at}' (oneof), oneof field 'data' is already set. Cannot set '{second}'"
            ))
        }
        (None, _) => return Err(format!("{at}: required oneof field 'data' must have one initialized field")),
    };
    if obj.get("thought").is_some_and(|t| !t.is_boolean()) {
        return Err(format!("{at}.thought: must be a boolean"));
    }
    if let Some(sig) = obj.get("thoughtSignature") {
        if sig.as_str().and_then(decode_base64).is_none() {
            return Err(format!("{at}.thoughtSignature: must be base64 bytes"));
        }
    }
    let value = &obj[kind];
    match kind {
        "text" => {
            let text = value
                .as_str()
                .ok_or(format!("{at}.text: must be a string"))?;
            // Gemini 3 replays signature-only parts with empty text; anything else is a bug.
            if text.is_empty() && !obj.contains_key("thoughtSignature") {
                return Err(format!("Unable to submit request because it has an empty text parameter ({at}). Add a value to the parameter and try again."));
            }
        }
        "inlineData" => {
            let d = value
                .as_object()
                .ok_or(format!("{at}.inlineData: must be an object"))?;
            unknown_field(
                d,
                &["mimeType", "data", "displayName"],
                &format!("{at}.inline_data"),
            )?;
            if !d
                .get("mimeType")
                .and_then(Value::as_str)
                .is_some_and(|m| m.contains('/'))
            {
                return Err(format!("{at}.inlineData.mimeType: a MIME type is required"));
            }
            let bytes = d
                .get("data")
                .and_then(Value::as_str)
                .and_then(decode_base64);
            if bytes.is_none_or(|b| b.is_empty()) {
                return Err(format!(
                    "Invalid value at '{at}.inline_data.data' (TYPE_BYTES), Base64 decoding failed"
                ));
            }
        }
        "fileData" => {
            let d = value
                .as_object()
                .ok_or(format!("{at}.fileData: must be an object"))?;
            unknown_field(
                d,
                &["mimeType", "fileUri", "displayName"],
                &format!("{at}.file_data"),
            )?;
            if !has_text(d.get("fileUri")) {
                return Err(format!("{at}.fileData.fileUri: required"));
            }
        }
        "functionCall" => {
            let d = value
                .as_object()
                .ok_or(format!("{at}.functionCall: must be an object"))?;
            unknown_field(d, &["name", "args", "id"], &format!("{at}.function_call"))?;
            if !has_text(d.get("name")) {
                return Err(format!("{at}.functionCall.name: required"));
            }
            if d.get("args").is_some_and(|a| !a.is_object()) {
                return Err(format!("Invalid value at '{at}.function_call.args' (type.googleapis.com/google.protobuf.Struct): must be an object"));
            }
        }
        "functionResponse" => {
            let d = value
                .as_object()
                .ok_or(format!("{at}.functionResponse: must be an object"))?;
            unknown_field(
                d,
                &[
                    "name",
                    "response",
                    "id",
                    "parts",
                    "willContinue",
                    "scheduling",
                ],
                &format!("{at}.function_response"),
            )?;
            if !has_text(d.get("name")) {
                return Err(format!("{at}.functionResponse.name: required"));
            }
            if !d.get("response").is_some_and(Value::is_object) {
                return Err(format!("Invalid value at '{at}.function_response.response' (type.googleapis.com/google.protobuf.Struct): must be an object"));
            }
        }
        _ => {}
    }
    Ok(kind)
}

fn names_of<'a>(parts: &'a [Value], kind: &str) -> Vec<&'a str> {
    let mut names: Vec<&str> = parts
        .iter()
        .filter_map(|p| p.get(kind)?["name"].as_str())
        .collect();
    names.sort_unstable();
    names
}

fn validate_contents(contents: &[Value]) -> Result<(), String> {
    let mut previous: Option<(&str, Vec<&str>)> = None;
    for (i, content) in contents.iter().enumerate() {
        let at = format!("contents[{i}]");
        let obj = content
            .as_object()
            .ok_or(format!("{at}: must be an object"))?;
        unknown_field(obj, &["role", "parts"], &at)?;
        let role = obj.get("role").and_then(Value::as_str).unwrap_or_default();
        if role != "user" && role != "model" {
            return Err(format!(
                "Please use a valid role: user, model. ({at}.role: {role:?})"
            ));
        }
        let parts = obj
            .get("parts")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or(format!(
                "* GenerateContentRequest.{at}.parts: contents.parts must not be empty."
            ))?;
        for (j, part) in parts.iter().enumerate() {
            let at = format!("{at}.parts[{j}]");
            match (validate_part(part, &at)?, role) {
                ("functionCall", "user") => {
                    return Err(format!(
                        "{at}: a functionCall part is only valid in a model turn"
                    ))
                }
                ("functionResponse", "model") => {
                    return Err(format!(
                        "{at}: a functionResponse part is only valid in a user turn"
                    ))
                }
                _ => {}
            }
        }
        let calls = names_of(parts, "functionCall");
        let responses = names_of(parts, "functionResponse");
        let after_calls = previous.as_ref().filter(|(_, c)| !c.is_empty());
        if !calls.is_empty() && previous.as_ref().is_none_or(|(r, _)| *r != "user") {
            return Err(format!("Please ensure that function call turn comes immediately after a user turn or after a function response turn. ({at})"));
        }
        match after_calls {
            Some((_, expected)) if role != "user" || responses != *expected => {
                return Err(format!("Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn, with the same names. ({at})"));
            }
            None if !responses.is_empty() => {
                return Err(format!("Please ensure that function response turn comes immediately after a function call turn. ({at})"));
            }
            _ => {}
        }
        previous = Some((role, calls));
    }
    if previous.is_some_and(|(_, calls)| !calls.is_empty()) {
        return Err("Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn: the last turn's function calls are unanswered.".into());
    }
    Ok(())
}

fn validate_generation_config(config: &Value) -> Result<(), String> {
    let obj = config
        .as_object()
        .ok_or("generationConfig: must be an object")?;
    unknown_field(obj, GENERATION_CONFIG, "generation_config")?;
    for (k, v) in obj {
        let ok = match k.as_str() {
            "maxOutputTokens" => v.as_u64().is_some_and(|n| n >= 1),
            "temperature" => v.as_f64().is_some_and(|t| (0.0..=2.0).contains(&t)),
            "topP" => v.as_f64().is_some_and(|t| (0.0..=1.0).contains(&t)),
            "topK" => v.as_f64().is_some_and(|t| t >= 1.0),
            "candidateCount" => v.as_u64().is_some_and(|n| (1..=8).contains(&n)),
            "seed" | "logprobs" => v.is_i64() || v.is_u64(),
            "presencePenalty" | "frequencyPenalty" => v.is_number(),
            "responseLogprobs" => v.is_boolean(),
            "stopSequences" => v
                .as_array()
                .is_some_and(|a| a.len() <= 5 && a.iter().all(Value::is_string)),
            "responseMimeType" => v
                .as_str()
                .is_some_and(|m| m == "text/plain" || m == "application/json"),
            "responseSchema" | "responseJsonSchema" => v.is_object(),
            "responseModalities" => v.as_array().is_some_and(|a| {
                a.iter()
                    .all(|m| matches!(m.as_str(), Some("TEXT" | "IMAGE" | "AUDIO")))
            }),
            "mediaResolution" => v.is_string(),
            "thinkingConfig" => {
                let t = v
                    .as_object()
                    .ok_or("generationConfig.thinkingConfig: must be an object")?;
                unknown_field(
                    t,
                    &["thinkingBudget", "includeThoughts", "thinkingLevel"],
                    "generation_config.thinking_config",
                )?;
                if t.contains_key("thinkingBudget") && t.contains_key("thinkingLevel") {
                    return Err("thinkingBudget and thinkingLevel cannot both be set".into());
                }
                t.get("thinkingBudget")
                    .is_none_or(|b| b.as_i64().is_some_and(|b| b >= -1))
                    && t.get("includeThoughts").is_none_or(Value::is_boolean)
                    && t.get("thinkingLevel").is_none_or(|l| {
                        matches!(l.as_str(), Some("MINIMAL" | "LOW" | "MEDIUM" | "HIGH"))
                    })
            }
            _ => true,
        };
        if !ok {
            return Err(format!("Invalid value at 'generation_config.{k}': {v}"));
        }
    }
    if obj.contains_key("responseSchema") && obj.contains_key("responseJsonSchema") {
        return Err("responseSchema and responseJsonSchema cannot both be set".into());
    }
    let schema = obj.contains_key("responseSchema") || obj.contains_key("responseJsonSchema");
    if schema && obj.get("responseMimeType") != Some(&json!("application/json")) {
        return Err(
            "response schema is only supported with responseMimeType application/json".into(),
        );
    }
    Ok(())
}

/// The declared function names, in order.
fn validate_tools(tools: &Value) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for (i, tool) in tools
        .as_array()
        .ok_or("tools: must be an array")?
        .iter()
        .enumerate()
    {
        let at = format!("tools[{i}]");
        let obj = tool.as_object().ok_or(format!("{at}: must be an object"))?;
        unknown_field(obj, &["functionDeclarations"], &at)?;
        let declarations = obj
            .get("functionDeclarations")
            .and_then(Value::as_array)
            .ok_or(format!("{at}.functionDeclarations: must be an array"))?;
        for (j, decl) in declarations.iter().enumerate() {
            let at = format!("{at}.function_declarations[{j}]");
            let d = decl.as_object().ok_or(format!("{at}: must be an object"))?;
            unknown_field(
                d,
                &[
                    "name",
                    "description",
                    "parameters",
                    "parametersJsonSchema",
                    "response",
                    "responseJsonSchema",
                    "behavior",
                ],
                &at,
            )?;
            let name = d.get("name").and_then(Value::as_str).unwrap_or_default();
            if !valid_function_name(name) {
                return Err(format!("* GenerateContentRequest.{at}.name: Invalid function name. Must start with a letter or an underscore. Must be alphameric (a-z, A-Z, 0-9), underscores (_), dots (.), colons (:), or dashes (-), with a maximum length of 64."));
            }
            if names.iter().any(|n| n == name) {
                return Err(format!("Duplicate function declaration found: {name}"));
            }
            if d.get("description").is_some_and(|x| !x.is_string()) {
                return Err(format!("{at}.description: must be a string"));
            }
            if d.contains_key("parameters") && d.contains_key("parametersJsonSchema") {
                return Err(format!(
                    "{at}: parameters and parametersJsonSchema cannot both be set"
                ));
            }
            for schema in ["parameters", "parametersJsonSchema"] {
                if d.get(schema).is_some_and(|s| !s.is_object()) {
                    return Err(format!("{at}.{schema}: must be an object"));
                }
            }
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

fn validate_tool_config(config: &Value, declared: &[String]) -> Result<(), String> {
    let obj = config.as_object().ok_or("toolConfig: must be an object")?;
    unknown_field(obj, &["functionCallingConfig"], "tool_config")?;
    let Some(fcc) = obj.get("functionCallingConfig") else {
        return Ok(());
    };
    let fcc = fcc
        .as_object()
        .ok_or("toolConfig.functionCallingConfig: must be an object")?;
    unknown_field(
        fcc,
        &["mode", "allowedFunctionNames"],
        "tool_config.function_calling_config",
    )?;
    let mode = fcc.get("mode").and_then(Value::as_str).unwrap_or("AUTO");
    if !matches!(mode, "AUTO" | "ANY" | "NONE" | "VALIDATED") {
        return Err(format!(
            "Invalid value at 'tool_config.function_calling_config.mode': {mode}"
        ));
    }
    if let Some(allowed) = fcc.get("allowedFunctionNames") {
        if !matches!(mode, "ANY" | "VALIDATED") {
            return Err("Function calling config: allowed_function_names should only be set when mode is ANY.".into());
        }
        for name in allowed
            .as_array()
            .ok_or("allowedFunctionNames: must be an array")?
        {
            let name = name.as_str().unwrap_or_default();
            if !declared.iter().any(|d| d == name) {
                return Err(format!("Function calling config: allowed function name {name:?} is not declared in tools"));
            }
        }
    }
    Ok(())
}

/// Checks a `GenerateContentRequest` body; the first problem found. `labels` is Vertex-only.
pub fn validate_generate_body(body: &Value, vertex: bool) -> Result<(), String> {
    let obj = body
        .as_object()
        .ok_or("Invalid JSON payload received: the body must be an object.")?;
    unknown_field(obj, TOP_LEVEL, "")?;
    if !vertex && obj.contains_key("labels") {
        return Err("labels parameter is not supported in Gemini API.".into());
    }
    let contents = obj
        .get("contents")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or("* GenerateContentRequest.contents: contents is not specified")?;
    validate_contents(contents)?;
    if let Some(system) = obj.get("systemInstruction") {
        let s = system
            .as_object()
            .ok_or("systemInstruction: must be a Content object")?;
        unknown_field(s, &["role", "parts"], "system_instruction")?;
        // The role of a system instruction is ignored; anything but these would be a bug.
        if !s.get("role").is_none_or(|r| r == "user" || r == "system") {
            return Err("systemInstruction.role: must be absent, user or system".into());
        }
        let parts = s
            .get("parts")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or("systemInstruction.parts: must not be empty")?;
        for (j, part) in parts.iter().enumerate() {
            let at = format!("system_instruction.parts[{j}]");
            if validate_part(part, &at)? != "text" {
                return Err(format!("{at}: a system instruction takes text parts only"));
            }
        }
    }
    if let Some(config) = obj.get("generationConfig") {
        validate_generation_config(config)?;
    }
    let declared = match obj.get("tools") {
        Some(tools) => validate_tools(tools)?,
        None => Vec::new(),
    };
    if let Some(config) = obj.get("toolConfig") {
        validate_tool_config(config, &declared)?;
    }
    if let Some(settings) = obj.get("safetySettings") {
        for s in settings
            .as_array()
            .ok_or("safetySettings: must be an array")?
        {
            let s = s.as_object().ok_or("safetySettings: must hold objects")?;
            unknown_field(s, &["category", "threshold", "method"], "safety_settings")?;
            if !s.get("category").is_some_and(Value::is_string)
                || !s.get("threshold").is_some_and(Value::is_string)
            {
                return Err("safetySettings: category and threshold are required".into());
            }
        }
    }
    if obj.get("cachedContent").is_some_and(|c| !c.is_string()) {
        return Err("cachedContent: must be a string".into());
    }
    if let Some(labels) = obj.get("labels") {
        if !labels
            .as_object()
            .is_some_and(|l| l.values().all(Value::is_string))
        {
            return Err("labels: must map strings to strings".into());
        }
    }
    Ok(())
}

/// With a behavior's `thought_signature`: every step of the current turn (the contents after the
/// last user turn that is not only function responses) must replay it on its first function call.
fn check_thought_signatures(body: &Value, signature: &str) -> Result<(), String> {
    let contents = body["contents"].as_array().cloned().unwrap_or_default();
    let start = contents
        .iter()
        .rposition(|c| {
            c["role"] == "user"
                && c["parts"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p.get("functionResponse").is_none()))
        })
        .unwrap_or(0);
    for (i, content) in contents.iter().enumerate().skip(start) {
        let parts = content["parts"].as_array().cloned().unwrap_or_default();
        if let Some((j, first)) = parts
            .iter()
            .enumerate()
            .find(|(_, p)| p.get("functionCall").is_some())
        {
            if first["thoughtSignature"] != signature {
                let name = first["functionCall"]["name"].as_str().unwrap_or_default();
                return Err(format!("Function call is missing a thought_signature in functionCall parts. This is required for tools to work correctly. Additional data, function call `default_api:{name}` , position {}. (contents[{i}].parts[{j}])", i + 1));
            }
        }
    }
    Ok(())
}

// === Embeddings ===

/// Gemini API embedding dimensions when a request names none (gemini-embedding-001's).
pub const GEMINI_EMBEDDING_DIMENSIONS: usize = 3072;

/// Vertex embedding dimensions when a request names none (text-embedding-005's).
pub const VERTEX_EMBEDDING_DIMENSIONS: usize = 768;

/// The most dimensions an embeddings request may ask for.
const EMBEDDING_DIMENSIONS_MAX: u64 = 3072;

/// The most requests one `batchEmbedContents` may carry.
const BATCH_EMBED_REQUESTS_MAX: usize = 100;

/// The most instances one Vertex `predict` may carry.
const VERTEX_EMBED_INSTANCES_MAX: usize = 250;

/// Google's `TaskType` values.
const TASK_TYPES: &[&str] = &[
    "TASK_TYPE_UNSPECIFIED",
    "RETRIEVAL_QUERY",
    "RETRIEVAL_DOCUMENT",
    "SEMANTIC_SIMILARITY",
    "CLASSIFICATION",
    "CLUSTERING",
    "QUESTION_ANSWERING",
    "FACT_VERIFICATION",
    "CODE_RETRIEVAL_QUERY",
];

fn check_task_type(value: Option<&Value>, at: &str) -> Result<(), String> {
    match value {
        None => Ok(()),
        Some(v) if v.as_str().is_some_and(|t| TASK_TYPES.contains(&t)) => Ok(()),
        Some(v) => Err(format!(
            "Invalid value at '{at}' (type.googleapis.com/google.ai.generativelanguage.v1beta.TaskType), {v}"
        )),
    }
}

fn check_dimensionality(value: Option<&Value>, at: &str) -> Result<(), String> {
    match value {
        None => Ok(()),
        Some(v) if v.as_u64().is_some_and(|d| (1..=EMBEDDING_DIMENSIONS_MAX).contains(&d)) => {
            Ok(())
        }
        Some(v) => Err(format!(
            "Invalid value at '{at}': output_dimensionality must be an integer between 1 and {EMBEDDING_DIMENSIONS_MAX}, got {v}"
        )),
    }
}

/// Checks a Gemini API `batchEmbedContents` body for `model` (the path's): only `requests`, 1 to
/// 100 of them, each only `model` (`models/{model}`), `content` (exactly one part, a non-empty
/// `text`), `taskType` (Google's enum), `title` (a string) and `outputDimensionality` (1 to
/// 3072); the first problem found.
pub fn validate_batch_embed_body(body: &Value, model: &str) -> Result<(), String> {
    let obj = body
        .as_object()
        .ok_or("Invalid JSON payload received: the body must be an object.")?;
    unknown_field(obj, &["requests"], "")?;
    let requests = obj
        .get("requests")
        .and_then(Value::as_array)
        .filter(|r| !r.is_empty())
        .ok_or("* BatchEmbedContentsRequest.requests: requests must not be empty.")?;
    if requests.len() > BATCH_EMBED_REQUESTS_MAX {
        return Err(format!(
            "* BatchEmbedContentsRequest.requests: at most {BATCH_EMBED_REQUESTS_MAX} requests can be in one batch, got {}.",
            requests.len()
        ));
    }
    let expected = format!("models/{model}");
    for (i, request) in requests.iter().enumerate() {
        let at = format!("requests[{i}]");
        let r = request
            .as_object()
            .ok_or(format!("Invalid value at '{at}': must be an object"))?;
        unknown_field(
            r,
            &[
                "model",
                "content",
                "taskType",
                "title",
                "outputDimensionality",
            ],
            &at,
        )?;
        if r.get("model").and_then(Value::as_str) != Some(expected.as_str()) {
            return Err(format!(
                "* BatchEmbedContentsRequest.{at}.model: the model of every request must be the batch's, {expected}"
            ));
        }
        let content = r.get("content").and_then(Value::as_object).ok_or(format!(
            "* BatchEmbedContentsRequest.{at}.content: content is not specified"
        ))?;
        unknown_field(content, &["parts", "role"], &format!("{at}.content"))?;
        let parts = content
            .get("parts")
            .and_then(Value::as_array)
            .ok_or(format!(
                "* BatchEmbedContentsRequest.{at}.content.parts: parts must not be empty"
            ))?;
        let [part] = parts.as_slice() else {
            return Err(format!(
                "* BatchEmbedContentsRequest.{at}.content.parts: exactly one text part is expected, got {}",
                parts.len()
            ));
        };
        let part_at = format!("{at}.content.parts[0]");
        let part = part
            .as_object()
            .ok_or(format!("{part_at}: a part must be an object"))?;
        unknown_field(part, &["text"], &part_at)?;
        if !has_text(part.get("text")) {
            return Err(format!("Unable to submit request because it has an empty text parameter ({part_at}). Add a value to the parameter and try again."));
        }
        check_task_type(r.get("taskType"), &format!("{at}.task_type"))?;
        if r.get("title").is_some_and(|t| !t.is_string()) {
            return Err(format!("Invalid value at '{at}.title' (TYPE_STRING)"));
        }
        check_dimensionality(
            r.get("outputDimensionality"),
            &format!("{at}.output_dimensionality"),
        )?;
    }
    Ok(())
}

/// Checks a Vertex embeddings `predict` body: only `instances` (1 to 250, each only `content` —
/// a non-empty string —, `task_type` and `title`) and `parameters` (only
/// `outputDimensionality`, 1 to 3072, and `autoTruncate`, a boolean); the first problem found.
pub fn validate_vertex_embed_body(body: &Value) -> Result<(), String> {
    let obj = body
        .as_object()
        .ok_or("Invalid JSON payload received: the body must be an object.")?;
    unknown_field(obj, &["instances", "parameters"], "")?;
    let instances = obj
        .get("instances")
        .and_then(Value::as_array)
        .filter(|i| !i.is_empty())
        .ok_or("instances: must be a non-empty list")?;
    if instances.len() > VERTEX_EMBED_INSTANCES_MAX {
        return Err(format!(
            "The number of instances ({}) exceeds the maximum of {VERTEX_EMBED_INSTANCES_MAX} for this model.",
            instances.len()
        ));
    }
    for (i, instance) in instances.iter().enumerate() {
        let at = format!("instances[{i}]");
        let inst = instance
            .as_object()
            .ok_or(format!("{at}: must be an object"))?;
        unknown_field(inst, &["content", "task_type", "title"], &at)?;
        if !has_text(inst.get("content")) {
            return Err(format!("{at}.content: a non-empty string is required"));
        }
        check_task_type(inst.get("task_type"), &format!("{at}.task_type"))?;
        if inst.get("title").is_some_and(|t| !t.is_string()) {
            return Err(format!("{at}.title: must be a string"));
        }
    }
    if let Some(parameters) = obj.get("parameters") {
        let p = parameters
            .as_object()
            .ok_or("parameters: must be an object")?;
        unknown_field(p, &["outputDimensionality", "autoTruncate"], "parameters")?;
        check_dimensionality(
            p.get("outputDimensionality"),
            "parameters.outputDimensionality",
        )?;
        if p.get("autoTruncate").is_some_and(|a| !a.is_boolean()) {
            return Err("parameters.autoTruncate: must be a boolean".into());
        }
    }
    Ok(())
}

/// The answer to a valid embeddings body: the Gemini API's `{"embeddings":[{"values"}]}` or
/// Vertex's predictions and metadata.
fn embed_answer(req: &Value, vertex: bool) -> Value {
    let dims = |d: &Value, default: usize| d.as_u64().map_or(default, |d| d as usize);
    if !vertex {
        let embeddings: Vec<Value> = req["requests"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(|r| {
                let text = r["content"]["parts"][0]["text"]
                    .as_str()
                    .unwrap_or_default();
                let d = dims(&r["outputDimensionality"], GEMINI_EMBEDDING_DIMENSIONS);
                json!({ "values": fake_embedding(text, d) })
            })
            .collect();
        return json!({ "embeddings": embeddings });
    }
    let d = dims(
        &req["parameters"]["outputDimensionality"],
        VERTEX_EMBEDDING_DIMENSIONS,
    );
    let texts: Vec<&str> = req["instances"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|i| i["content"].as_str().unwrap_or_default())
        .collect();
    let predictions: Vec<Value> = texts
        .iter()
        .map(|t| {
            json!({"embeddings": {"values": fake_embedding(t, d),
                "statistics": {"token_count": word_count(t), "truncated": false}}})
        })
        .collect();
    let characters: usize = texts.iter().map(|t| t.chars().count()).sum();
    json!({"predictions": predictions, "metadata": {"billableCharacterCount": characters}})
}

// === Handler ===

fn query_param(query: &str, name: &str) -> Option<String> {
    parse_form(query)?.remove(name)
}

async fn handle(
    req: ReadRequest,
    state: Arc<Mutex<GoogleState>>,
) -> Result<Response<Body>, Infallible> {
    let query = req.query.clone();
    let (method, path, version, headers, body) = req.parts();
    let (query, body) = (query.unwrap_or_default(), body.unwrap_or_default());
    let record = |why: String| lock(&state).log.rejected.push(why);
    let reject = |status: u16, why: String| refuse(&state, &why, google_error(status, &why));
    // The model list, as a credential check reads it.
    if method == http::Method::GET && path == "/v1beta/models" {
        let key = headers
            .get("x-goog-api-key")
            .cloned()
            .or_else(|| query_param(&query, "key"));
        if !key.is_some_and(|k| lock(&state).api_keys.contains(&k)) {
            record("models.list: API key not valid (API_KEY_INVALID)".into());
            return Ok(api_key_invalid());
        }
        return Ok(json_response(
            200,
            &json!({"models": [{"name": "models/gemini-2.5-flash", "displayName": "Gemini 2.5 Flash",
                "supportedGenerationMethods": ["generateContent", "countTokens"]}]}),
        ));
    }
    if method != http::Method::POST {
        return reject(404, format!("Not found: {method} {path}"));
    }
    if path == "/token" {
        return Ok(token_endpoint(&state, &headers, &body));
    }
    let Some(route) = parse_route(&path) else {
        return reject(404, format!("Not found: {method} {path}"));
    };
    let vertex = matches!(route.api, Api::Vertex { .. });
    let credential = match &route.api {
        Api::Gemini => {
            let key = headers
                .get("x-goog-api-key")
                .cloned()
                .or_else(|| query_param(&query, "key"))
                .filter(|k| !k.is_empty());
            let Some(key) = key else {
                return reject(403, "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.".into());
            };
            if !lock(&state).api_keys.contains(&key) {
                record("API key not valid (API_KEY_INVALID)".into());
                return Ok(api_key_invalid());
            }
            key
        }
        Api::Vertex { project, location } => {
            let auth = headers
                .get("authorization")
                .map(String::as_str)
                .unwrap_or_default();
            let Some(token) = auth.strip_prefix("Bearer ").filter(|t| !t.is_empty()) else {
                record("Vertex: no bearer token (CREDENTIALS_MISSING)".into());
                return Ok(unauthenticated("Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.", "CREDENTIALS_MISSING"));
            };
            let found = {
                let st = lock(&state);
                st.tokens.get(token).map(|t| {
                    let account_project =
                        st.accounts.get(&t.client_email).map(|a| a.project.clone());
                    (t.client_email.clone(), t.expires_at, account_project)
                })
            };
            let invalid = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
            let Some((client_email, expires_at, account_project)) = found else {
                record("Vertex: unknown access token".into());
                return Ok(unauthenticated(invalid, "ACCESS_TOKEN_TYPE_UNSUPPORTED"));
            };
            if Instant::now() >= expires_at {
                record("Vertex: access token expired (ACCESS_TOKEN_EXPIRED)".into());
                return Ok(unauthenticated(invalid, "ACCESS_TOKEN_EXPIRED"));
            }
            if account_project.as_deref() != Some(project.as_str()) {
                let why = format!("Permission 'aiplatform.endpoints.predict' denied on resource '//aiplatform.googleapis.com/projects/{project}/locations/{location}/publishers/google/models/{}' (or it may not exist).", route.model);
                record(why.clone());
                return Ok(json_response(
                    403,
                    &error_json(
                        403,
                        &why,
                        vec![error_info(
                            "IAM_PERMISSION_DENIED",
                            "aiplatform.googleapis.com",
                        )],
                    ),
                ));
            }
            if !valid_location(location) {
                return reject(400, format!("Unsupported location: {location}"));
            }
            client_email
        }
    };
    if route.claude {
        let request = Received {
            version,
            path,
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        };
        if route.model == CLAUDE_COUNT_TOKENS_MODEL {
            return Ok(claude_count_tokens(&state, request));
        }
        return Ok(claude_on_vertex(&state, &route, request));
    }
    if route.stream && query_param(&query, "alt").as_deref() != Some("sse") {
        return reject(400, "streamGenerateContent without alt=sse answers a JSON array, not SSE: the adapter must ask for alt=sse".into());
    }
    if !headers
        .get("content-type")
        .is_some_and(|t| t.starts_with("application/json"))
    {
        return reject(400, "content-type must be application/json".into());
    }
    let Ok(parsed) = serde_json::from_slice::<Value>(&body) else {
        return reject(400, "Invalid JSON payload received.".into());
    };
    let valid = match (route.embed, vertex) {
        (true, false) => validate_batch_embed_body(&parsed, &route.model),
        (true, true) => validate_vertex_embed_body(&parsed),
        (false, _) => validate_generate_body(&parsed, vertex),
    };
    if let Err(why) = valid {
        return reject(400, why);
    }
    let behavior = {
        let st = lock(&state);
        st.by_credential
            .get(&credential)
            .cloned()
            .unwrap_or_else(|| st.default.clone())
    };
    if let Some(signature) = behavior.thought_signature.as_ref().filter(|_| !route.embed) {
        if let Err(why) = check_thought_signatures(&parsed, signature) {
            return reject(400, why);
        }
    }
    let id = {
        let mut st = lock(&state);
        let wire_path = if query.is_empty() {
            path
        } else {
            format!("{path}?{query}")
        };
        st.log.received.push(Received {
            version,
            path: wire_path,
            headers,
            body: parsed.clone(),
        });
        st.next_id += 1;
        format!("fakeGoogleResponse{:04}", st.next_id)
    };
    if behavior.status != 200 {
        return Ok(behavior_error(&behavior));
    }
    if route.embed {
        return Ok(json_response(200, &embed_answer(&parsed, vertex)));
    }
    let reply = Reply {
        id,
        model: route.model,
        candidates: parsed["generationConfig"]["candidateCount"]
            .as_u64()
            .unwrap_or(1),
    };
    if behavior.prompt_blocked {
        let blocked = json!({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": true}]},
            "usageMetadata": early_usage(&behavior.usage),
            "modelVersion": reply.model, "responseId": reply.id});
        if route.stream {
            return Ok(sse_response(vec![(false, sse_event(&blocked))], &behavior));
        }
        return Ok(json_response(200, &blocked));
    }
    let answer = answer(&parsed, &behavior);
    if route.stream {
        return Ok(sse_response(
            stream_events(&reply, &answer, &behavior),
            &behavior,
        ));
    }
    let mut parts = Vec::new();
    if !answer.text.is_empty() {
        parts.push(json!({ "text": answer.text }));
    }
    parts.extend(call_parts(&answer, &behavior));
    let usage = usage_json(&behavior.usage, answer.candidates_tokens);
    Ok(json_response(
        200,
        &reply.response(parts, Some(answer.finish_reason), usage),
    ))
}

/// `anthropic_version` Vertex takes for Claude.
pub const ANTHROPIC_VERTEX_VERSION: &str = "vertex-2023-10-16";

/// Claude on Vertex (`rawPredict`, `streamRawPredict`): Anthropic's Messages body with
/// `anthropic_version: "vertex-2023-10-16"`, the model in the path (not the body), betas in the
/// `anthropic-beta` header; Anthropic's answers and errors.
fn claude_on_vertex(
    state: &Mutex<GoogleState>,
    route: &Route,
    request: Received,
) -> Response<Body> {
    use crate::fake_anthropic::{anthropic_error, message_events, message_json, AnthropicBehavior};
    let body = &request.body;
    let betas = request
        .headers
        .get("anthropic-beta")
        .cloned()
        .unwrap_or_default();
    let checked = if body["anthropic_version"] != ANTHROPIC_VERTEX_VERSION {
        Err(format!(
            "anthropic_version: must be {ANTHROPIC_VERTEX_VERSION}"
        ))
    } else if body.get("model").is_some() {
        Err("model: Extra inputs are not permitted".to_owned())
    } else if body.get("context_management").is_some() && !betas.contains("context-management-") {
        Err("context_management: Extra inputs are not permitted".to_owned())
    } else if route.stream != (body["stream"] == true) {
        Err("stream: must be true exactly for streamRawPredict".to_owned())
    } else {
        let mut messages = body.clone();
        if let Some(m) = messages.as_object_mut() {
            m.remove("anthropic_version");
            m.insert("model".into(), json!(route.model));
        }
        crate::fake_anthropic::validate_messages_body(&messages)
    };
    let mut st = lock(state);
    if let Err(why) = checked {
        st.log.rejected.push(why.clone());
        return anthropic_error(400, &why);
    }
    let mut messages_req = body.clone();
    if let Some(m) = messages_req.as_object_mut() {
        m.insert("model".into(), json!(route.model));
    }
    st.log.received.push(request);
    st.next_id += 1;
    let id = format!("msg_vrtx_fake{:04}", st.next_id);
    // Claude calls the tools the fake is programmed with, as Gemini does.
    let claude = AnthropicBehavior {
        tool_calls: st.default.tool_calls.clone(),
        ..AnthropicBehavior::default()
    };
    drop(st);
    if !route.stream {
        return json_response(200, &message_json(&messages_req, &claude, &id));
    }
    let events = message_events(&messages_req, &claude, &id)
        .into_iter()
        .map(|(name, data)| {
            (
                name == "content_block_delta",
                Bytes::from(format!("event: {name}\ndata: {data}\n\n")),
            )
        })
        .collect();
    crate::serve::paced_stream(events, crate::serve::Pace::default(), "text/event-stream")
}

/// What Claude's token counting has where a path names the model
/// (`…/publishers/anthropic/models/count-tokens:rawPredict`).
pub const CLAUDE_COUNT_TOKENS_MODEL: &str = "count-tokens";

/// Claude's token counting on Vertex (`publishers/anthropic/models/count-tokens:rawPredict`):
/// Anthropic's `count_tokens` body ([`crate::fake_anthropic::validate_count_tokens_body`]: no
/// `max_tokens`, `stream` or other generation parameters) with `anthropic_version:
/// "vertex-2023-10-16"` and the Claude model (`claude-…`) in the body, since the path names
/// none; betas in the `anthropic-beta` header. Answers `{"input_tokens": N}` as the fake
/// Anthropic does, refusals in Anthropic's error shape.
fn claude_count_tokens(state: &Mutex<GoogleState>, request: Received) -> Response<Body> {
    use crate::fake_anthropic::{anthropic_error, validate_count_tokens_body};
    let body = &request.body;
    let betas = request
        .headers
        .get("anthropic-beta")
        .map_or("", String::as_str);
    let checked = match body.as_object() {
        None => Err((400, "body: not a JSON object".to_owned())),
        Some(_) if body["anthropic_version"] != ANTHROPIC_VERTEX_VERSION => Err((
            400,
            format!("anthropic_version: must be {ANTHROPIC_VERTEX_VERSION}"),
        )),
        Some(obj) => match obj.get("model").map(Value::as_str) {
            None => Err((400, "model: Field required".to_owned())),
            Some(None) => Err((400, "model: Input should be a valid string".to_owned())),
            Some(Some(model)) if !model.starts_with("claude-") => {
                Err((404, format!("model: {model}")))
            }
            Some(Some(_))
                if obj.contains_key("context_management")
                    && !betas.contains("context-management-") =>
            {
                Err((
                    400,
                    "context_management: Extra inputs are not permitted".to_owned(),
                ))
            }
            Some(Some(_)) => {
                let mut counted = obj.clone();
                counted.remove("anthropic_version");
                validate_count_tokens_body(&Value::Object(counted)).map_err(|why| (400, why))
            }
        },
    };
    let mut st = lock(state);
    if let Err((status, why)) = checked {
        st.log.rejected.push(why.clone());
        return anthropic_error(status, &why);
    }
    st.log.received.push(request);
    drop(st);
    json_response(
        200,
        &json!({ "input_tokens": crate::fake_anthropic::ANTHROPIC_INPUT_TOKENS }),
    )
}

/// What every chunk of one answer shares.
struct Reply {
    id: String,
    model: String,
    candidates: u64,
}

impl Reply {
    fn response(&self, parts: Vec<Value>, finish: Option<&str>, usage: Value) -> Value {
        let candidates: Vec<Value> = (0..self.candidates)
            .map(|index| {
                let mut c = json!({"content": {"role": "model", "parts": parts}, "index": index});
                if let Some(f) = finish {
                    c["finishReason"] = json!(f);
                }
                c
            })
            .collect();
        json!({"candidates": candidates, "usageMetadata": usage,
            "modelVersion": self.model, "responseId": self.id})
    }
}

struct Answer {
    text: String,
    calls: Vec<(String, Value)>,
    finish_reason: &'static str,
    candidates_tokens: u64,
}

fn answer(req: &Value, b: &GoogleBehavior) -> Answer {
    let contents = req["contents"].as_array().cloned().unwrap_or_default();
    let last = contents.last().cloned().unwrap_or(Value::Null);
    let last_parts = last["parts"].as_array().cloned().unwrap_or_default();
    let done = |text: String| Answer {
        text,
        calls: Vec::new(),
        finish_reason: "STOP",
        candidates_tokens: b.usage.candidates_token_count,
    };
    let results: Vec<String> = last_parts
        .iter()
        .filter_map(|p| p.get("functionResponse"))
        .map(|r| {
            format!(
                "{}={}",
                r["name"].as_str().unwrap_or_default(),
                r["response"]
            )
        })
        .collect();
    if !results.is_empty() {
        return done(format!("Function results: {}.", results.join("; ")));
    }
    let declared: Vec<&str> = req["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["functionDeclarations"].as_array())
        .flatten()
        .filter_map(|d| d["name"].as_str())
        .collect();
    let fcc = &req["toolConfig"]["functionCallingConfig"];
    let mode = fcc["mode"].as_str().unwrap_or("AUTO");
    if !declared.is_empty() && mode != "NONE" {
        let allowed: Vec<&str> = match fcc["allowedFunctionNames"].as_array() {
            Some(names) => names.iter().filter_map(Value::as_str).collect(),
            None => declared,
        };
        let mut calls: Vec<(String, Value)> = b
            .tool_calls
            .iter()
            .filter(|(name, _)| allowed.contains(&name.as_str()))
            .cloned()
            .collect();
        // ANY forces a call even when the behavior names none.
        if calls.is_empty() && mode == "ANY" {
            if let Some(first) = allowed.first() {
                calls.push(((*first).to_owned(), json!({})));
            }
        }
        if !calls.is_empty() {
            return Answer {
                text: String::new(),
                calls,
                finish_reason: "STOP",
                candidates_tokens: b.usage.candidates_token_count,
            };
        }
    }
    if req["generationConfig"]["responseMimeType"] == "application/json" {
        return done(GOOGLE_JSON_REPLY.into());
    }
    let mut text = String::new();
    for data in last_parts.iter().filter_map(|p| p.get("inlineData")) {
        let bytes = data["data"]
            .as_str()
            .and_then(decode_base64)
            .map_or(0, |d| d.len());
        let mime = data["mimeType"].as_str().unwrap_or_default();
        text.push_str(&format!("Received {mime} ({bytes} bytes). "));
    }
    text.push_str(GOOGLE_REPLY);
    let mut stopped = false;
    for stop in req["generationConfig"]["stopSequences"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(at) = stop
            .as_str()
            .filter(|s| !s.is_empty())
            .and_then(|s| text.find(s))
        {
            text.truncate(at);
            stopped = true;
        }
    }
    let words: Vec<&str> = text.split(' ').filter(|w| !w.is_empty()).collect();
    let limit = req["generationConfig"]["maxOutputTokens"]
        .as_u64()
        .map_or(usize::MAX, |n| n as usize);
    if limit < words.len() {
        return Answer {
            text: words[..limit].join(" "),
            calls: Vec::new(),
            finish_reason: "MAX_TOKENS",
            candidates_tokens: limit as u64,
        };
    }
    let mut a = done(words.join(" "));
    if stopped {
        a.candidates_tokens = a.candidates_tokens.min(words.len() as u64);
    }
    a
}

/// The `functionCall` parts (no `id`, as Gemini sends them), the signature on the first.
fn call_parts(a: &Answer, b: &GoogleBehavior) -> Vec<Value> {
    a.calls
        .iter()
        .enumerate()
        .map(|(i, (name, args))| {
            let mut part = json!({"functionCall": {"name": name, "args": args}});
            if let (0, Some(sig)) = (i, &b.thought_signature) {
                part["thoughtSignature"] = json!(sig);
            }
            part
        })
        .collect()
}

/// The complete usage; zero counts are left out, as proto3 JSON does.
fn usage_json(u: &GoogleUsage, candidates: u64) -> Value {
    let mut usage = early_usage(u);
    let total = u.prompt_token_count + candidates + u.thoughts_token_count;
    usage["totalTokenCount"] = json!(total);
    if candidates > 0 {
        usage["candidatesTokenCount"] = json!(candidates);
    }
    if u.thoughts_token_count > 0 {
        usage["thoughtsTokenCount"] = json!(u.thoughts_token_count);
    }
    if u.cached_content_token_count > 0 {
        usage["cachedContentTokenCount"] = json!(u.cached_content_token_count);
        usage["cacheTokensDetails"] =
            json!([{"modality": "TEXT", "tokenCount": u.cached_content_token_count}]);
    }
    usage
}

/// The snapshot early stream chunks carry: the prompt only.
fn early_usage(u: &GoogleUsage) -> Value {
    json!({"promptTokenCount": u.prompt_token_count, "totalTokenCount": u.prompt_token_count,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": u.prompt_token_count}]})
}

fn sse_event(data: &Value) -> Bytes {
    // Google ends each event with CRLF CRLF.
    Bytes::from(format!("data: {data}\r\n\r\n"))
}

/// The stream's events, each marked when it carries content (and so is paced).
fn stream_events(r: &Reply, a: &Answer, b: &GoogleBehavior) -> Vec<(bool, Bytes)> {
    let mut out = Vec::new();
    let full = usage_json(&b.usage, a.candidates_tokens);
    if !a.calls.is_empty() {
        // Newer models: the calls whole in one chunk, then STOP with empty text and the usage.
        out.push((
            true,
            sse_event(&r.response(call_parts(a, b), None, early_usage(&b.usage))),
        ));
        out.push((
            false,
            sse_event(&r.response(vec![json!({"text": ""})], Some(a.finish_reason), full)),
        ));
        return out;
    }
    let words: Vec<&str> = a.text.split(' ').collect();
    for (i, word) in words.iter().enumerate() {
        let text = if i == 0 {
            (*word).to_owned()
        } else {
            format!(" {word}")
        };
        let last = i + 1 == words.len();
        let (finish, usage) = if last {
            (Some(a.finish_reason), full.clone())
        } else {
            (None, early_usage(&b.usage))
        };
        out.push((
            true,
            sse_event(&r.response(vec![json!({ "text": text })], finish, usage)),
        ));
        if b.stream_error && !last {
            // Google's mid-stream error: a bare (pretty-printed) JSON object, no `data:`.
            let error = error_json(500, "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting", Vec::new());
            let text = serde_json::to_string_pretty(&error).unwrap_or_default();
            out.push((false, Bytes::from(format!("{text}\n"))));
            return out;
        }
    }
    out
}

fn sse_response(events: Vec<(bool, Bytes)>, b: &GoogleBehavior) -> Response<Body> {
    let pace = Pace {
        ttft: b.ttft,
        interval: b.chunk_interval,
    };
    paced_stream(events, pace, "text/event-stream")
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]

    use super::*;
    use rsa::pkcs8::DecodePrivateKey;

    const MODEL: &str = "gemini-2.5-flash";

    fn text_body(text: &str) -> Value {
        json!({"contents": [{"role": "user", "parts": [{"text": text}]}]})
    }

    fn vertex_url(fake: &FakeGoogle, project: &str, method: &str) -> String {
        format!(
            "{}/v1/projects/{project}/locations/us-central1/publishers/google/models/{MODEL}:{method}",
            fake.base_url()
        )
    }

    fn gemini_url(fake: &FakeGoogle, method: &str) -> String {
        format!("{}/v1beta/models/{MODEL}:{method}", fake.base_url())
    }

    async fn mint(fake: &FakeGoogle, assertion: &str) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .post(fake.token_uri())
            .form(&[("grant_type", JWT_BEARER_GRANT), ("assertion", assertion)])
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn post(url: &str, auth: (&str, &str), body: &Value) -> (u16, String) {
        let resp = reqwest::Client::new()
            .post(url)
            .header(auth.0, auth.1)
            .json(body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    async fn gemini(fake: &FakeGoogle, method: &str, body: &Value) -> (u16, String) {
        post(
            &gemini_url(fake, method),
            ("x-goog-api-key", "gkey-test"),
            body,
        )
        .await
    }

    async fn started() -> FakeGoogle {
        let fake = FakeGoogle::start(GoogleBehavior::default()).await.unwrap();
        fake.allow_key("gkey-test");
        fake
    }

    /// The `data:` payloads of an SSE body, checking Google's framing on the way.
    fn sse_chunks(body: &str) -> Vec<Value> {
        assert!(
            body.ends_with("\r\n\r\n"),
            "events end with CRLF CRLF: {body:?}"
        );
        assert!(!body.contains("[DONE]"));
        body.split_terminator("\r\n\r\n")
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn keygen_is_fast_enough() {
        let fake = started().await;
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let _ = fake.service_account("timing");
            times.push(t.elapsed());
        }
        eprintln!("RSA-2048 key generation per service account: {times:?}");
        assert!(
            times.iter().all(|t| *t < Duration::from_secs(5)),
            "{times:?}"
        );
    }

    #[tokio::test]
    async fn a_key_file_mints_a_token_that_vertex_accepts() {
        let fake = started().await;
        let sa = fake.service_account("proj-a");
        // Sign from the key file's text, as an adapter does.
        let file: Value = serde_json::from_str(&sa.json).unwrap();
        assert_eq!(file["type"], "service_account");
        assert_eq!(file["token_uri"], fake.token_uri());
        assert_eq!(file["private_key_id"].as_str().unwrap().len(), 40);
        assert!(file["client_email"]
            .as_str()
            .unwrap()
            .ends_with("@proj-a.iam.gserviceaccount.com"));
        let pem = file["private_key"].as_str().unwrap();
        // PKCS#8 ("PRIVATE KEY"), not PKCS#1 ("RSA PRIVATE KEY"), as Google's key files are.
        let label = format!("-----BEGIN {} KEY-----\n", "PRIVATE");
        assert!(pem.starts_with(&label));
        let key = RsaPrivateKey::from_pkcs8_pem(pem).unwrap();
        let now = unix_now();
        for aud in [GOOGLE_TOKEN_AUDIENCE, file["token_uri"].as_str().unwrap()] {
            let jwt = sign_jwt(
                &key,
                &json!({"alg": "RS256", "typ": "JWT", "kid": file["private_key_id"]}),
                &json!({"iss": file["client_email"], "aud": aud, "iat": now, "exp": now + 3600,
                    "scope": format!("openid {CLOUD_PLATFORM_SCOPE}")}),
            );
            let (status, token) = mint(&fake, &jwt).await;
            assert_eq!(status, 200, "{token}");
            assert!(token["access_token"].as_str().unwrap().starts_with("ya29."));
            assert_eq!(token["expires_in"], DEFAULT_TOKEN_LIFETIME_S);
            assert_eq!(token["token_type"], "Bearer");
        }
        assert_eq!(fake.tokens_minted(), 2);

        let (_, token) = mint(&fake, &sa.sign_assertion(&sa.standard_claims())).await;
        let bearer = format!("Bearer {}", token["access_token"].as_str().unwrap());
        let url = vertex_url(&fake, "proj-a", "generateContent");
        let (status, body) = post(&url, ("authorization", &bearer), &text_body("hi")).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["candidates"][0]["content"]["parts"][0]["text"],
            GOOGLE_REPLY
        );
        assert_eq!(v["candidates"][0]["finishReason"], "STOP");
        assert_eq!(v["usageMetadata"]["totalTokenCount"], 23 + 7 + 5);
        assert_eq!(v["usageMetadata"]["cachedContentTokenCount"], 8);
        assert_eq!(v["modelVersion"], MODEL);
        assert_eq!(fake.received().len(), 1);

        // The token's account belongs to proj-a only.
        let other = vertex_url(&fake, "proj-b", "generateContent");
        let (status, body) = post(&other, ("authorization", &bearer), &text_body("hi")).await;
        assert_eq!(status, 403);
        assert!(body.contains("PERMISSION_DENIED"));
        let (status, body) = post(
            &url,
            ("authorization", "Bearer ya29.forged"),
            &text_body("hi"),
        )
        .await;
        assert_eq!(status, 401);
        assert!(body.contains("UNAUTHENTICATED"));
    }

    #[tokio::test]
    async fn bad_assertions_are_refused_like_google() {
        let fake = started().await;
        let sa = fake.service_account("proj-a");
        let impostor = fake.service_account("proj-a");
        let now = unix_now();
        let claims = sa.standard_claims();
        let with = |k: &str, v: Value| {
            let mut c = claims.clone();
            c[k] = v;
            c
        };
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": sa.private_key_id});
        let good = sa.sign_assertion(&claims);
        let (head, rest) = good.split_once('.').unwrap();
        let cases = [
            // Another key's signature over this account's claims.
            (
                sign_jwt(&impostor.key, &header, &claims),
                "invalid_grant",
                "Signature",
            ),
            (
                format!("{head}.{}", rest.replace('.', ".A")),
                "invalid_grant",
                "",
            ),
            (format!("{good}="), "invalid_grant", "base64url"),
            (
                impostor.sign_assertion(&with("iss", json!(sa.client_email))),
                "invalid_grant",
                "kid",
            ),
            (
                sa.sign_assertion(&with("aud", json!("https://example.com/token"))),
                "invalid_grant",
                "audience",
            ),
            (
                sa.sign_assertion(&with("iat", json!(now - 7200)).clone()),
                "invalid_grant",
                "short-lived",
            ),
            (
                sa.sign_assertion(
                    &json!({"iss": sa.client_email, "scope": CLOUD_PLATFORM_SCOPE,
                    "aud": GOOGLE_TOKEN_AUDIENCE, "iat": now - 3700, "exp": now - 100}),
                ),
                "invalid_grant",
                "short-lived",
            ),
            (
                sa.sign_assertion(&with("exp", json!(now + 7200))),
                "invalid_grant",
                "short-lived",
            ),
            (
                sa.sign_assertion(&with(
                    "scope",
                    json!("https://www.googleapis.com/auth/drive"),
                )),
                "invalid_scope",
                "",
            ),
            (
                sa.sign_assertion(&with("iss", json!("nobody@proj-a.iam.gserviceaccount.com"))),
                "invalid_grant",
                "account",
            ),
            (
                sign_jwt(
                    &sa.key,
                    &json!({"alg": "HS256", "typ": "JWT", "kid": sa.private_key_id}),
                    &claims,
                ),
                "invalid_grant",
                "RS256",
            ),
        ];
        for (jwt, error, mention) in cases {
            let (status, body) = mint(&fake, &jwt).await;
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["error"], error, "{body}");
            assert!(
                body["error_description"]
                    .as_str()
                    .unwrap()
                    .contains(mention),
                "{body}"
            );
        }
        // The grant type and the form encoding are checked too.
        let resp = reqwest::Client::new()
            .post(fake.token_uri())
            .json(&json!({"grant_type": JWT_BEARER_GRANT, "assertion": good}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let resp = reqwest::Client::new()
            .post(fake.token_uri())
            .form(&[
                ("grant_type", "client_credentials"),
                ("assertion", good.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.json::<Value>().await.unwrap()["error"],
            "unsupported_grant_type"
        );
        assert_eq!(fake.tokens_minted(), 0);
        assert_eq!(fake.rejected().len(), 13);
        assert_eq!(mint(&fake, &good).await.0, 200);
    }

    #[tokio::test]
    async fn tokens_expire_when_they_say() {
        let fake = started().await;
        fake.set_token_lifetime(Duration::from_secs(1));
        let sa = fake.service_account("proj-a");
        let (_, token) = mint(&fake, &sa.sign_assertion(&sa.standard_claims())).await;
        assert_eq!(token["expires_in"], 1);
        let bearer = format!("Bearer {}", token["access_token"].as_str().unwrap());
        let url = vertex_url(&fake, "proj-a", "generateContent");
        assert_eq!(
            post(&url, ("authorization", &bearer), &text_body("hi"))
                .await
                .0,
            200
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (status, body) = post(&url, ("authorization", &bearer), &text_body("hi")).await;
        assert_eq!(status, 401);
        assert!(body.contains("ACCESS_TOKEN_EXPIRED"), "{body}");
        let (_, token) = mint(&fake, &sa.sign_assertion(&sa.standard_claims())).await;
        let bearer = format!("Bearer {}", token["access_token"].as_str().unwrap());
        assert_eq!(
            post(&url, ("authorization", &bearer), &text_body("hi"))
                .await
                .0,
            200
        );
        fake.revoke_tokens();
        assert_eq!(
            post(&url, ("authorization", &bearer), &text_body("hi"))
                .await
                .0,
            401
        );
        assert_eq!(fake.tokens_minted(), 2);
    }

    #[tokio::test]
    async fn gemini_keys_are_checked_like_google() {
        let fake = started().await;
        let (status, body) = post(
            &gemini_url(&fake, "generateContent"),
            ("x-goog-api-key", "gkey-revoked"),
            &text_body("hi"),
        )
        .await;
        assert_eq!(status, 400);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
        assert_eq!(v["error"]["details"][0]["reason"], "API_KEY_INVALID");
        assert_eq!(
            v["error"]["message"],
            "API key not valid. Please pass a valid API key."
        );
        let url = format!("{}?key=gkey-test", gemini_url(&fake, "generateContent"));
        assert_eq!(post(&url, ("x-test", "1"), &text_body("hi")).await.0, 200);
        let url = gemini_url(&fake, "generateContent");
        assert_eq!(post(&url, ("x-test", "1"), &text_body("hi")).await.0, 403);
    }

    #[tokio::test]
    async fn invalid_bodies_are_refused() {
        let fake = started().await;
        let bad = [
            json!({"contents": [{"role": "assistant", "parts": [{"text": "hi"}]}]}),
            json!({"contents": []}),
            json!({"contents": [{"role": "user", "parts": []}]}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "model": MODEL}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                "generationConfig": {"max_tokens": 5}}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                "generationConfig": {"temperature": 2.5}}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi", "inlineData":
                {"mimeType": "image/png", "data": "AAAA"}}]}]}),
            json!({"contents": [{"role": "user", "parts": [{"inlineData":
                {"mimeType": "image/png", "data": "not base64!"}}]}]}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                {"role": "user", "parts": [{"text": "no answer"}]}]}),
            json!({"contents": [{"role": "user", "parts": [{"functionResponse":
                {"name": "f", "response": {"r": 1}}}]}]}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": "18C"}}]}]}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                "tools": [{"functionDeclarations": [{"name": "9lives"}]}]}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                "tools": [{"functionDeclarations": [{"name": "f"}]}],
                "toolConfig": {"functionCallingConfig": {"mode": "AUTO", "allowedFunctionNames": ["f"]}}}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                "tools": [{"functionDeclarations": [{"name": "f"}]}],
                "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["g"]}}}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                "systemInstruction": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}}),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "labels": {"a": "b"}}),
            json!({"contents": [
                {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}]}),
        ];
        for body in &bad {
            let (status, text) = gemini(&fake, "generateContent", body).await;
            assert_eq!(status, 400, "accepted {body}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
        }
        assert_eq!(fake.rejected().len(), bad.len());
        assert!(fake.rejected()[0].contains("Please use a valid role"));
        assert!(fake.received().is_empty());

        let good = json!({
            "systemInstruction": {"parts": [{"text": "Be terse."}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Weather?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]},
                {"role": "model", "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"name": "get_time", "args": {}}}]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get_time", "response": {"result": "noon"}}},
                    {"functionResponse": {"name": "get_weather", "response": {"result": "18C"}}}]}],
            "generationConfig": {"maxOutputTokens": 64, "temperature": 0.2, "topP": 0.9,
                "topK": 40, "stopSequences": ["END"], "seed": 7,
                "thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": false}},
            "tools": [{"functionDeclarations": [
                {"name": "get_weather", "parameters": {"type": "object"}},
                {"name": "get_time", "parametersJsonSchema": {"type": "object"}}]}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY",
                "allowedFunctionNames": ["get_weather"]}}});
        let (status, text) = gemini(&fake, "generateContent", &good).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let reply = v["candidates"][0]["content"]["parts"][0]["text"]
            .as_str()
            .unwrap();
        assert!(
            reply.contains("get_weather={\"result\":\"18C\"}"),
            "{reply}"
        );
        assert!(reply.contains("get_time"), "{reply}");
    }

    #[tokio::test]
    async fn streams_are_framed_like_google() {
        let fake = started().await;
        let (status, body) = gemini(&fake, "streamGenerateContent?alt=sse", &text_body("hi")).await;
        assert_eq!(status, 200);
        let chunks = sse_chunks(&body);
        assert_eq!(chunks.len(), GOOGLE_REPLY.split(' ').count());
        let (last, early) = chunks.split_last().unwrap();
        for c in early {
            assert!(c["candidates"][0].get("finishReason").is_none());
            assert_eq!(c["usageMetadata"]["promptTokenCount"], 23);
            assert!(c["usageMetadata"].get("candidatesTokenCount").is_none());
        }
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        assert_eq!(last["usageMetadata"]["candidatesTokenCount"], 7);
        assert_eq!(last["usageMetadata"]["thoughtsTokenCount"], 5);
        assert_eq!(last["usageMetadata"]["totalTokenCount"], 35);
        let text: String = chunks
            .iter()
            .map(|c| {
                c["candidates"][0]["content"]["parts"][0]["text"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(text, GOOGLE_REPLY);
        // The adapter must always ask for SSE.
        assert_eq!(
            gemini(&fake, "streamGenerateContent", &text_body("hi"))
                .await
                .0,
            400
        );
        assert!(fake.received()[0]
            .path
            .ends_with(":streamGenerateContent?alt=sse"));
    }

    #[tokio::test]
    async fn function_calls_come_without_ids_and_stop() {
        let fake = started().await;
        fake.set_behavior(
            "gkey-tools",
            GoogleBehavior {
                tool_calls: vec![("get_weather".into(), json!({"city": "Paris"}))],
                thought_signature: Some("c2lnbmF0dXJl".into()),
                ..GoogleBehavior::default()
            },
        );
        let body = json!({"contents": [{"role": "user", "parts": [{"text": "Weather?"}]}],
            "tools": [{"functionDeclarations": [{"name": "get_weather"}]}]});
        let url = format!("{}?alt=sse", gemini_url(&fake, "streamGenerateContent"));
        let (status, text) = post(&url, ("x-goog-api-key", "gkey-tools"), &body).await;
        assert_eq!(status, 200);
        let chunks = sse_chunks(&text);
        assert_eq!(chunks.len(), 2);
        let call = &chunks[0]["candidates"][0]["content"]["parts"][0];
        assert_eq!(
            call["functionCall"],
            json!({"name": "get_weather", "args": {"city": "Paris"}})
        );
        assert_eq!(call["thoughtSignature"], "c2lnbmF0dXJl");
        assert!(chunks[0]["candidates"][0].get("finishReason").is_none());
        assert_eq!(chunks[1]["candidates"][0]["finishReason"], "STOP");
        assert_eq!(
            chunks[1]["candidates"][0]["content"]["parts"][0]["text"],
            ""
        );
        assert_eq!(chunks[1]["usageMetadata"]["totalTokenCount"], 35);

        // Replaying the call without its signature is refused; with it, the results come back.
        let mut turn = json!({"contents": [
            {"role": "user", "parts": [{"text": "Weather?"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"t": 18}}}]}],
            "tools": [{"functionDeclarations": [{"name": "get_weather"}]}]});
        let url = gemini_url(&fake, "generateContent");
        assert_eq!(
            post(&url, ("x-goog-api-key", "gkey-tools"), &turn).await.0,
            400
        );
        turn["contents"][1]["parts"][0]["thoughtSignature"] = json!("c2lnbmF0dXJl");
        let (status, text) = post(&url, ("x-goog-api-key", "gkey-tools"), &turn).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("get_weather={\\\"t\\\":18}"), "{text}");
    }

    #[tokio::test]
    async fn answers_follow_the_request_and_the_behavior() {
        let fake = started().await;
        let body = json!({"contents": [{"role": "user", "parts": [{"text": "Look"},
            {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]}],
            "generationConfig": {"maxOutputTokens": 3}});
        let (_, text) = gemini(&fake, "generateContent", &body).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["candidates"][0]["content"]["parts"][0]["text"],
            "Received image/png (8"
        );
        assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
        assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 3);

        let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "generationConfig": {"responseMimeType": "application/json"}});
        let (_, text) = gemini(&fake, "generateContent", &body).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["candidates"][0]["content"]["parts"][0]["text"],
            GOOGLE_JSON_REPLY
        );

        fake.set_behavior(
            "gkey-busy",
            GoogleBehavior {
                status: 429,
                retry_after_s: Some(7),
                ..GoogleBehavior::default()
            },
        );
        let url = gemini_url(&fake, "generateContent");
        let resp = reqwest::Client::new()
            .post(&url)
            .header("x-goog-api-key", "gkey-busy")
            .json(&text_body("hi"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        assert!(resp.headers().get("retry-after").is_none());
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(v["error"]["details"][0]["retryDelay"], "7s");

        fake.set_behavior(
            "gkey-broken",
            GoogleBehavior {
                stream_error: true,
                ..GoogleBehavior::default()
            },
        );
        let url = format!("{}?alt=sse", gemini_url(&fake, "streamGenerateContent"));
        let (status, text) = post(&url, ("x-goog-api-key", "gkey-broken"), &text_body("hi")).await;
        assert_eq!(status, 200);
        let (first, rest) = text.split_once("\r\n\r\n").unwrap();
        assert!(first.starts_with("data: "));
        let error: Value = serde_json::from_str(rest).unwrap();
        assert_eq!(error["error"]["code"], 500);

        fake.set_behavior(
            "gkey-blocked",
            GoogleBehavior {
                prompt_blocked: true,
                ..GoogleBehavior::default()
            },
        );
        let url = gemini_url(&fake, "generateContent");
        let (status, text) = post(&url, ("x-goog-api-key", "gkey-blocked"), &text_body("hi")).await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["promptFeedback"]["blockReason"], "SAFETY");
        assert!(v.get("candidates").is_none());
    }

    #[tokio::test]
    async fn streams_are_paced() {
        let fake = started().await;
        fake.set_default(GoogleBehavior {
            ttft: Duration::from_millis(150),
            chunk_interval: Duration::from_millis(20),
            ..GoogleBehavior::default()
        });
        let t = Instant::now();
        let (status, _) = gemini(&fake, "streamGenerateContent?alt=sse", &text_body("hi")).await;
        assert_eq!(status, 200);
        assert!(t.elapsed() >= Duration::from_millis(150 + 20 * 5));
    }

    fn embed_request(text: &str) -> Value {
        json!({"model": format!("models/{MODEL}"), "content": {"parts": [{"text": text}]}})
    }

    #[tokio::test]
    async fn gemini_batch_embeddings_answer_one_vector_per_request_in_order() {
        let fake = started().await;
        let mut second = embed_request("two words");
        second["outputDimensionality"] = json!(4);
        second["taskType"] = json!("RETRIEVAL_DOCUMENT");
        second["title"] = json!("A title");
        let body = json!({"requests": [embed_request("héllo"), second]});
        let (status, text) = gemini(&fake, "batchEmbedContents", &body).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let embeddings = v["embeddings"].as_array().unwrap();
        assert_eq!(embeddings.len(), 2);
        let first: Vec<f32> = serde_json::from_value(embeddings[0]["values"].clone()).unwrap();
        assert_eq!(first.len(), GEMINI_EMBEDDING_DIMENSIONS);
        assert_eq!(
            first,
            crate::fake_embedding("héllo", GEMINI_EMBEDDING_DIMENSIONS)
        );
        assert_eq!(
            embeddings[1]["values"],
            json!(crate::fake_embedding("two words", 4))
        );
        assert!(v.get("usageMetadata").is_none() && v.get("usage").is_none());
        let received = fake.received();
        assert_eq!(received.len(), 1);
        assert_eq!(
            received[0].path,
            format!("/v1beta/models/{MODEL}:batchEmbedContents")
        );
        assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    }

    #[tokio::test]
    async fn gemini_batch_embeddings_refuse_what_google_refuses() {
        let fake = started().await;
        let with = |k: &str, v: Value| {
            let mut r = embed_request("hi");
            r[k] = v;
            json!({ "requests": [r] })
        };
        let cases = [
            (json!({"requests": []}), "requests must not be empty"),
            (
                json!({"requests": vec![embed_request("hi"); 101]}),
                "at most 100",
            ),
            (
                json!({"requests": [embed_request("hi")], "model": "x"}),
                "Unknown name \"model\"",
            ),
            (with("model", json!("models/other")), "must be the batch's"),
            (
                with("stray", json!(1)),
                "Unknown name \"stray\" at 'requests[0]'",
            ),
            (
                with("content", json!({"parts": [{"text": "a"}, {"text": "b"}]})),
                "exactly one text part",
            ),
            (
                with("content", json!({"parts": []})),
                "exactly one text part",
            ),
            (
                with("content", json!({"parts": [{"text": ""}]})),
                "empty text parameter",
            ),
            (
                with(
                    "content",
                    json!({"parts": [{"inlineData": {"mimeType": "image/png", "data": "AA=="}}]}),
                ),
                "Unknown name \"inlineData\"",
            ),
            (with("content", json!("hi")), "content is not specified"),
            (
                with("outputDimensionality", json!(0)),
                "output_dimensionality",
            ),
            (
                with("outputDimensionality", json!("8")),
                "output_dimensionality",
            ),
            (with("taskType", json!("retrieval_query")), "TaskType"),
            (with("title", json!(3)), "title"),
            (json!([embed_request("hi")]), "must be an object"),
        ];
        for (body, expected) in &cases {
            let (status, text) = gemini(&fake, "batchEmbedContents", body).await;
            assert_eq!(status, 400, "{body}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["status"], "INVALID_ARGUMENT", "{text}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains(expected),
                "{body}: {text}"
            );
        }
        assert_eq!(fake.rejected().len(), cases.len());
        assert!(fake.received().is_empty());
        // The key is checked as for generateContent.
        let url = gemini_url(&fake, "batchEmbedContents");
        let body = json!({"requests": [embed_request("hi")]});
        let (status, text) = post(&url, ("x-goog-api-key", "gkey-wrong"), &body).await;
        assert_eq!(status, 400);
        assert!(text.contains("API_KEY_INVALID"), "{text}");
        let (status, _) = post(&url, ("x-goog-user", "none"), &body).await;
        assert_eq!(status, 403);
        // Vertex's embeddings method is not the Gemini API's.
        let (status, _) = gemini(&fake, "predict", &body).await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn vertex_predict_embeds_instances_with_statistics() {
        let fake = started().await;
        let sa = fake.service_account("proj-e");
        let (_, token) = mint(&fake, &sa.sign_assertion(&sa.standard_claims())).await;
        let bearer = format!("Bearer {}", token["access_token"].as_str().unwrap());
        let url = vertex_url(&fake, "proj-e", "predict");
        let body = json!({"instances": [
            {"content": "the quick brown fox", "task_type": "RETRIEVAL_QUERY"},
            {"content": "héllo", "title": "greeting"}]});
        let (status, text) = post(&url, ("authorization", &bearer), &body).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let predictions = v["predictions"].as_array().unwrap();
        assert_eq!(predictions.len(), 2);
        let e = &predictions[0]["embeddings"];
        assert_eq!(
            e["values"],
            json!(crate::fake_embedding(
                "the quick brown fox",
                VERTEX_EMBEDDING_DIMENSIONS
            ))
        );
        assert_eq!(e["statistics"]["token_count"], 4);
        assert_eq!(e["statistics"]["truncated"], false);
        assert_eq!(predictions[1]["embeddings"]["statistics"]["token_count"], 1);
        assert_eq!(v["metadata"]["billableCharacterCount"], 19 + 5);

        let body = json!({"instances": [{"content": "abc"}],
            "parameters": {"outputDimensionality": 3, "autoTruncate": false}});
        let (status, text) = post(&url, ("authorization", &bearer), &body).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["predictions"][0]["embeddings"]["values"],
            json!([0.3f32, 0.4f32, 0.5f32])
        );
        assert_eq!(fake.received().len(), 2);

        let many: Vec<Value> = (0..251).map(|_| json!({"content": "x"})).collect();
        let cases = [
            (json!({"instances": []}), "non-empty"),
            (json!({"instances": many}), "exceeds the maximum of 250"),
            (json!({"instances": [{"content": ""}]}), "non-empty string"),
            (json!({"instances": [{"content": 5}]}), "non-empty string"),
            (
                json!({"instances": [{"content": "x", "taskType": "CLUSTERING"}]}),
                "Unknown name \"taskType\"",
            ),
            (
                json!({"instances": [{"content": "x", "task_type": "NOPE"}]}),
                "TaskType",
            ),
            (
                json!({"instances": [{"content": "x"}], "parameters": {"dimensions": 3}}),
                "Unknown name \"dimensions\"",
            ),
            (
                json!({"instances": [{"content": "x"}], "parameters": {"outputDimensionality": -1}}),
                "outputDimensionality",
            ),
            (
                json!({"instances": [{"content": "x"}], "parameters": {"autoTruncate": "yes"}}),
                "autoTruncate",
            ),
            (
                json!({"instances": [{"content": "x"}], "extra": {}}),
                "Unknown name \"extra\"",
            ),
        ];
        for (body, expected) in &cases {
            let (status, text) = post(&url, ("authorization", &bearer), body).await;
            assert_eq!(status, 400, "{body}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
            assert!(
                v["error"]["message"].as_str().unwrap().contains(expected),
                "{body}: {text}"
            );
        }
        assert_eq!(fake.received().len(), 2);
        // The bearer token and its project are checked as for generateContent.
        let body = json!({"instances": [{"content": "x"}]});
        let (status, _) = post(&url, ("authorization", "Bearer ya29.forged"), &body).await;
        assert_eq!(status, 401);
        let other = vertex_url(&fake, "proj-other", "predict");
        let (status, _) = post(&other, ("authorization", &bearer), &body).await;
        assert_eq!(status, 403);
        // The Gemini API's embeddings method is not Vertex's.
        let batch = vertex_url(&fake, "proj-e", "batchEmbedContents");
        let (status, _) = post(&batch, ("authorization", &bearer), &body).await;
        assert_eq!(status, 404);
    }

    fn claude_url(fake: &FakeGoogle, project: &str, model_and_method: &str) -> String {
        format!(
            "{}/v1/projects/{project}/locations/us-east5/publishers/anthropic/models/{model_and_method}",
            fake.base_url()
        )
    }

    /// A bearer token for a service account of `project`.
    async fn vertex_bearer(fake: &FakeGoogle, project: &str) -> String {
        let sa = fake.service_account(project);
        let (_, token) = mint(fake, &sa.sign_assertion(&sa.standard_claims())).await;
        format!("Bearer {}", token["access_token"].as_str().unwrap())
    }

    fn count_tokens_body() -> Value {
        json!({"anthropic_version": ANTHROPIC_VERTEX_VERSION,
            "model": "claude-sonnet-4-5@20250929",
            "messages": [{"role": "user", "content": "Hello, Claude"}]})
    }

    #[tokio::test]
    async fn claude_counts_tokens_on_vertex_like_the_anthropic_fake() {
        let fake = started().await;
        let bearer = vertex_bearer(&fake, "proj-c").await;
        let url = claude_url(&fake, "proj-c", "count-tokens:rawPredict");
        let (status, body) = post(&url, ("authorization", &bearer), &count_tokens_body()).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({ "input_tokens": crate::fake_anthropic::ANTHROPIC_INPUT_TOKENS })
        );
        // System, tools, tool choice and thinking count too; betas come as a header.
        let full = json!({"anthropic_version": ANTHROPIC_VERTEX_VERSION,
            "model": "claude-opus-4-1@20250805",
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "context_management": {"edits": []},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather?"}]}]});
        let resp = reqwest::Client::new()
            .post(&url)
            .header("authorization", &bearer)
            .header("anthropic-beta", "context-management-2025-06-27")
            .json(&full)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.json::<Value>().await.unwrap(), v);
        let received = fake.received();
        assert_eq!(received.len(), 2);
        assert_eq!(
            received[0].path,
            "/v1/projects/proj-c/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict"
        );
        assert_eq!(received[0].body, count_tokens_body());
        assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());

        // The same count as the fake Anthropic's `count_tokens` for the same body.
        let anthropic = crate::FakeAnthropic::start(crate::AnthropicBehavior::default())
            .await
            .unwrap();
        let mut direct = count_tokens_body();
        direct.as_object_mut().unwrap().remove("anthropic_version");
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/messages/count_tokens", anthropic.base_url()))
            .header("x-api-key", "sk-ant-test")
            .header(
                "anthropic-version",
                crate::fake_anthropic::ANTHROPIC_VERSION,
            )
            .json(&direct)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.json::<Value>().await.unwrap(), v);
    }

    #[tokio::test]
    async fn claude_token_counting_on_vertex_refuses_what_anthropic_refuses() {
        let fake = started().await;
        let bearer = vertex_bearer(&fake, "proj-c").await;
        let url = claude_url(&fake, "proj-c", "count-tokens:rawPredict");
        let with = |field: &str, value: Value| {
            let mut b = count_tokens_body();
            b[field] = value;
            b
        };
        let without = |field: &str| {
            let mut b = count_tokens_body();
            b.as_object_mut().unwrap().remove(field);
            b
        };
        let invalid = [
            json!([]),
            json!("x"),
            without("anthropic_version"),
            with("anthropic_version", json!("bedrock-2023-05-31")),
            without("model"),
            with("model", json!(7)),
            without("messages"),
            with("messages", json!([])),
            with("messages", json!([{"role": "assistant", "content": "hi"}])),
            with("max_tokens", json!(1024)),
            with("stream", json!(false)),
            with("temperature", json!(0.5)),
            with("stop_sequences", json!(["x"])),
            with("context_management", json!({"edits": []})),
            with("tool_choice", json!({"type": "auto"})),
            with("thinking", json!({"type": "enabled", "budget_tokens": 10})),
            with("anthropic_beta", json!(["context-management-2025-06-27"])),
            with("unknown", json!(1)),
        ];
        for body in &invalid {
            let (status, text) = post(&url, ("authorization", &bearer), body).await;
            assert_eq!(status, 400, "{body}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        }
        // A model that is no Claude model is not found.
        let (status, text) = post(
            &url,
            ("authorization", &bearer),
            &with("model", json!("gemini-2.5-flash")),
        )
        .await;
        assert_eq!(status, 404, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "not_found_error", "{v}");
        assert!(fake.received().is_empty(), "{:?}", fake.received());
        assert_eq!(fake.rejected().len(), invalid.len() + 1);
        // Counting has no streaming form.
        let stream = claude_url(&fake, "proj-c", "count-tokens:streamRawPredict");
        let (status, _) = post(&stream, ("authorization", &bearer), &count_tokens_body()).await;
        assert_eq!(status, 404);
        // The bearer token and its project are checked as for rawPredict.
        let good = count_tokens_body();
        let (status, text) = post(&url, ("authorization", "Bearer ya29.forged"), &good).await;
        assert_eq!(status, 401, "{text}");
        let other = claude_url(&fake, "proj-other", "count-tokens:rawPredict");
        let (status, text) = post(&other, ("authorization", &bearer), &good).await;
        assert_eq!(status, 403, "{text}");
        let resp = reqwest::Client::new()
            .post(&url)
            .json(&good)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        // rawPredict refuses a body that is no object without failing.
        let raw = claude_url(&fake, "proj-c", "claude-sonnet-4-5@20250929:rawPredict");
        let (status, text) = post(&raw, ("authorization", &bearer), &json!([1])).await;
        assert_eq!(status, 400, "{text}");
        assert!(fake.received().is_empty(), "{:?}", fake.received());
    }

    #[test]
    fn forms_and_locations_decode() {
        let form = parse_form("grant_type=urn%3Aietf%3Aparams&assertion=a.b-c_d&x=1+2").unwrap();
        assert_eq!(form["grant_type"], "urn:ietf:params");
        assert_eq!(form["assertion"], "a.b-c_d");
        assert_eq!(form["x"], "1 2");
        assert!(parse_form("a=%zz").is_none());
        for ok in ["global", "us-central1", "europe-west4", "asia-northeast1"] {
            assert!(valid_location(ok), "{ok}");
        }
        for bad in ["", "us", "us-central", "US-central1", "us-central1-a"] {
            assert!(!valid_location(bad), "{bad}");
        }
    }
}
