//! Fakes of the two sign-in providers, speaking their documented wire formats and checking
//! what they receive:
//!
//! - [`FakeGitHub`]: a GitHub OAuth app. `GET /login/oauth/authorize` (the page a person
//!   approves on), `POST /login/oauth/access_token` (the code for a token; PKCE `S256` checked;
//!   errors answered with 200 and an `error` field, as GitHub does), and the REST API's
//!   `GET /user/emails` (a `User-Agent` and the token required).
//! - [`FakeOidc`]: Google's OpenID Connect provider. Its discovery document, its keys (JWKS, a
//!   fresh RSA key per run), `GET /o/oauth2/v2/auth` (the account chooser), and `POST /token`
//!   (client authentication by HTTP Basic or the form; an RS256 ID token with `nonce`, `aud`,
//!   `email`, `email_verified` and `at_hash`).
//!
//! On either authorize page the person types the address they sign in as (a real provider knows
//! it from its own session); tests may post the same form directly. Codes are single-use and
//! live ten minutes; every refused request is logged with its reason.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{Method, Response};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::fake_google::{generate_rsa_key, sign_jwt};
use crate::serve::{
    fake_server, full_body, html_page, json_response, lock, Body, FakeLog, FakeServer, ReadRequest,
};

/// The OAuth client a fake knows: its id and secret, and the one callback it may send people
/// back to.
#[derive(Debug, Clone)]
pub struct RegisteredClient {
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uri: String,
}

/// What an approved authorization carries to the token endpoint.
#[derive(Debug, Clone)]
struct Grant {
    redirect_uri: String,
    code_challenge: String,
    email: String,
    nonce: Option<String>,
    made: Instant,
}

/// A way the fake Google's ID token can be wrong, for tests that it is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IdTokenFault {
    #[default]
    None,
    /// Signed by a key that is not in the published JWKS.
    ForeignKey,
    /// A nonce other than the one the client sent.
    WrongNonce,
    /// Issued to another client (`aud`).
    WrongAudience,
    /// Expired an hour ago.
    Expired,
    /// `email_verified: false`.
    UnverifiedEmail,
    /// Names another issuer.
    WrongIssuer,
    /// Its `at_hash` is another access token's.
    BadAtHash,
    /// HS256, keyed with the client's own secret (a confidential client must not take it).
    HmacWithSecret,
}

const CODE_LIFETIME: Duration = Duration::from_secs(600);

/// The state both fakes share in shape: the client, open codes and issued tokens.
#[derive(Debug)]
pub struct SigninState {
    base: String,
    client: RegisteredClient,
    codes: HashMap<String, Grant>,
    /// Access token → the address it was issued for.
    tokens: HashMap<String, String>,
    /// Addresses whose GitHub email is not verified.
    unverified: HashSet<String>,
    /// Google's signing key and its `kid`; another key for [`IdTokenFault::ForeignKey`].
    key: Option<(RsaPrivateKey, String)>,
    foreign_key: Option<RsaPrivateKey>,
    fault: IdTokenFault,
    /// Codes exchanged for tokens (a test reads how many sign-ins completed).
    pub exchanged: usize,
    log: FakeLog,
}

fake_server!(
    /// A GitHub OAuth app's endpoints and `GET /user/emails`; stops when dropped.
    FakeGitHub = SigninState
);

/// Google's OpenID Connect endpoints, one per fake (its own types, its own handler).
pub struct FakeOidc(FakeServer<SigninState>);

impl FakeGitHub {
    pub async fn start(client: RegisteredClient) -> std::io::Result<Self> {
        Self::serve(|addr| SigninState::new(addr, client, None), github).await
    }

    /// This address's email is not verified at GitHub.
    pub fn mark_unverified(&self, email: &str) {
        self.with(|s| {
            s.unverified.insert(email.to_owned());
        });
    }

    pub fn exchanged(&self) -> usize {
        self.with(|s| s.exchanged)
    }
}

impl FakeOidc {
    pub async fn start(client: RegisteredClient) -> std::io::Result<Self> {
        let key = (
            generate_rsa_key(),
            format!("{:016x}", rand::random::<u64>()),
        );
        let server =
            FakeServer::serve(|addr| SigninState::new(addr, client, Some(key)), google).await?;
        Ok(Self(server))
    }

    /// The issuer (its discovery document is under `/.well-known/openid-configuration`).
    pub fn issuer(&self) -> String {
        self.0.base_url()
    }

    /// The next ID tokens are wrong in this way ([`IdTokenFault::None`] to stop).
    pub fn set_fault(&self, fault: IdTokenFault) {
        self.0.with(|s| {
            if fault == IdTokenFault::ForeignKey && s.foreign_key.is_none() {
                s.foreign_key = Some(generate_rsa_key());
            }
            s.fault = fault;
        });
    }

    pub fn exchanged(&self) -> usize {
        self.0.with(|s| s.exchanged)
    }

    pub fn rejected(&self) -> Vec<String> {
        self.0.with(|s| s.log.rejected.clone())
    }
}

impl SigninState {
    fn new(
        addr: std::net::SocketAddr,
        client: RegisteredClient,
        key: Option<(RsaPrivateKey, String)>,
    ) -> Self {
        Self {
            base: format!("http://{addr}"),
            client,
            codes: HashMap::new(),
            tokens: HashMap::new(),
            unverified: HashSet::new(),
            key,
            foreign_key: None,
            fault: IdTokenFault::None,
            exchanged: 0,
            log: FakeLog::default(),
        }
    }

    /// Checks an authorization request's parameters; what the approval form carries on.
    fn check_authorize(
        &self,
        q: &HashMap<String, String>,
        scopes: &[&str],
        oidc: bool,
    ) -> Result<(), String> {
        let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
        if get("client_id") != self.client.client_id {
            return Err(format!("unknown client_id {:?}", get("client_id")));
        }
        if get("redirect_uri") != self.client.redirect_uri {
            return Err(format!(
                "redirect_uri {:?} is not the registered callback",
                get("redirect_uri")
            ));
        }
        if oidc && get("response_type") != "code" {
            return Err("response_type must be code".into());
        }
        if get("state").len() < 16 {
            return Err("state missing or too short to be unguessable".into());
        }
        if get("code_challenge_method") != "S256" || get("code_challenge").len() != 43 {
            return Err("PKCE: an S256 code_challenge is required".into());
        }
        if oidc && get("nonce").len() < 16 {
            return Err("nonce missing or too short".into());
        }
        let asked: Vec<&str> = get("scope").split(' ').collect();
        if let Some(missing) = scopes.iter().find(|s| !asked.contains(s)) {
            return Err(format!("scope {missing:?} not requested"));
        }
        Ok(())
    }

    /// The approval: a new code for `email`, and where the browser goes with it.
    fn approve(&mut self, form: &HashMap<String, String>) -> String {
        let get = |k: &str| form.get(k).cloned().unwrap_or_default();
        let code = random_token(20);
        self.codes.insert(
            code.clone(),
            Grant {
                redirect_uri: get("redirect_uri"),
                code_challenge: get("code_challenge"),
                email: get("login").trim().to_lowercase(),
                nonce: form.get("nonce").cloned(),
                made: Instant::now(),
            },
        );
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("code", &code)
            .append_pair("state", &get("state"))
            .finish();
        format!("{}?{query}", self.client.redirect_uri)
    }

    /// Checks a code exchange (client, code, redirect, PKCE verifier); the grant it spends.
    fn exchange(
        &mut self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<Grant, (&'static str, String)> {
        let get = |k: &str| form.get(k).cloned().unwrap_or_default();
        let (id, secret) = basic.unwrap_or_else(|| (get("client_id"), get("client_secret")));
        if id != self.client.client_id || secret != self.client.client_secret {
            return Err((
                "invalid_client",
                "The client_id and/or client_secret passed are incorrect.".into(),
            ));
        }
        let Some(grant) = self.codes.remove(&get("code")) else {
            return Err((
                "bad_verification_code",
                "The code passed is incorrect or expired.".into(),
            ));
        };
        if grant.made.elapsed() > CODE_LIFETIME {
            return Err((
                "bad_verification_code",
                "The code passed is incorrect or expired.".into(),
            ));
        }
        if get("redirect_uri") != grant.redirect_uri {
            return Err((
                "redirect_uri_mismatch",
                "The redirect_uri MUST match the registered callback URL for this application."
                    .into(),
            ));
        }
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(get("code_verifier").as_bytes()));
        if challenge != grant.code_challenge {
            return Err((
                "invalid_grant",
                "code_verifier does not match the code_challenge".into(),
            ));
        }
        self.exchanged += 1;
        Ok(grant)
    }
}

impl FakeServer<SigninState> {
    fn with<T>(&self, f: impl FnOnce(&mut SigninState) -> T) -> T {
        f(&mut self.state())
    }
}

fn random_token(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(raw)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn form_of(text: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(text).into_owned().collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The page a person approves on: the request's parameters carried in hidden fields, the
/// address to sign in as, and Approve / Cancel.
fn approval_page(title: &str, action: &str, q: &HashMap<String, String>) -> Response<Body> {
    let hidden: String = q
        .iter()
        .map(|(k, v)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                escape(k),
                escape(v)
            )
        })
        .collect();
    html_page(
        200,
        &format!(
            "<!DOCTYPE html><html lang=\"en\"><head><title>{title} (fake)</title></head><body>\
             <h1>{title}</h1><form method=\"post\" action=\"{action}\">{hidden}\
             <label>Email <input name=\"login\" type=\"email\" required></label>\
             <button name=\"decision\" value=\"approve\">Authorize tokn$</button>\
             <button name=\"decision\" value=\"cancel\" formnovalidate>Cancel</button>\
             </form></body></html>"
        ),
    )
}

fn redirect(to: &str) -> Response<Body> {
    let mut resp = Response::new(full_body(""));
    *resp.status_mut() = http::StatusCode::FOUND;
    if let Ok(v) = http::HeaderValue::from_str(to) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

/// Refuses an authorization request as the providers do: a page, never a redirect to an
/// unchecked `redirect_uri`.
fn refuse_page(st: &mut SigninState, why: String) -> Response<Body> {
    let page = format!("<h1>Bad request</h1><p>{}</p>", escape(&why));
    st.log.rejected.push(format!("authorize: {why}"));
    html_page(400, &page)
}

/// The scopes a sign-in must ask for: the address, and for OpenID Connect `openid`.
fn scopes(oidc: bool) -> &'static [&'static str] {
    if oidc {
        &["openid", "email"]
    } else {
        &["user:email"]
    }
}

/// The authorize endpoint: on GET its page (the request checked first), on POST the person's
/// decision.
fn authorize(st: &mut SigninState, req: &ReadRequest, oidc: bool, title: &str) -> Response<Body> {
    if req.method == Method::POST {
        return decide(st, &form_of(req.body.as_deref().unwrap_or_default()), oidc);
    }
    let q = query_of(req);
    match st.check_authorize(&q, scopes(oidc), oidc) {
        Ok(()) => approval_page(title, &req.path, &q),
        Err(why) => refuse_page(st, why),
    }
}

/// The approval form's answer: the code (or `access_denied`) back at the client's callback.
fn decide(st: &mut SigninState, form: &HashMap<String, String>, oidc: bool) -> Response<Body> {
    if let Err(why) = st.check_authorize(form, scopes(oidc), oidc) {
        return refuse_page(st, why);
    }
    if form.get("decision").map(String::as_str) != Some("approve") {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("error", "access_denied")
            .append_pair(
                "error_description",
                "The user has denied your application access.",
            )
            .append_pair("state", form.get("state").map_or("", String::as_str))
            .finish();
        return redirect(&format!("{}?{query}", st.client.redirect_uri));
    }
    if !form.get("login").is_some_and(|l| l.contains('@')) {
        return refuse_page(st, "an email address to sign in as is needed".into());
    }
    redirect(&st.approve(form))
}

fn query_of(req: &ReadRequest) -> HashMap<String, String> {
    form_of(req.query.as_deref().unwrap_or("").as_bytes())
}

async fn github(
    req: ReadRequest,
    state: std::sync::Arc<Mutex<SigninState>>,
) -> Result<Response<Body>, Infallible> {
    let mut st = lock(&state);
    let resp = match (&req.method, req.path.as_str()) {
        (_, "/login/oauth/authorize") => authorize(&mut st, &req, false, "Sign in to GitHub"),
        (&Method::POST, "/login/oauth/access_token") => github_token(&mut st, &req),
        (&Method::GET, "/user/emails") => github_emails(&mut st, &req),
        _ => json_response(404, &json!({"message": "Not Found"})),
    };
    Ok(resp)
}

/// GitHub answers a token request with 200 either way; JSON when asked (`Accept`).
fn github_token(st: &mut SigninState, req: &ReadRequest) -> Response<Body> {
    if req.headers.get("accept").map(String::as_str) != Some("application/json") {
        st.log
            .rejected
            .push("token: Accept is not application/json".into());
        return html_page(406, "ask for application/json");
    }
    let form = form_of(req.body.as_deref().unwrap_or_default());
    match st.exchange(&form, None) {
        Ok(grant) => {
            let token = format!("gho_{}", random_token(18));
            st.tokens.insert(token.clone(), grant.email);
            json_response(
                200,
                &json!({"access_token": token, "token_type": "bearer", "scope": "read:user,user:email"}),
            )
        }
        Err((error, description)) => {
            st.log
                .rejected
                .push(format!("token: {error}: {description}"));
            json_response(
                200,
                &json!({"error": error, "error_description": description,
                    "error_uri": "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors"}),
            )
        }
    }
}

fn github_emails(st: &mut SigninState, req: &ReadRequest) -> Response<Body> {
    if req.headers.get("user-agent").is_none_or(String::is_empty) {
        st.log.rejected.push("user/emails: no User-Agent".into());
        return json_response(
            403,
            &json!({"message": "Request forbidden by administrative rules. Please make sure your request has a User-Agent header"}),
        );
    }
    let auth = req
        .headers
        .get("authorization")
        .map(String::as_str)
        .unwrap_or("");
    let token = auth
        .strip_prefix("Bearer ")
        .or_else(|| auth.strip_prefix("token "))
        .unwrap_or("");
    let Some(email) = st.tokens.get(token).cloned() else {
        st.log.rejected.push("user/emails: bad credentials".into());
        return json_response(401, &json!({"message": "Bad credentials", "status": "401"}));
    };
    let verified = !st.unverified.contains(&email);
    json_response(
        200,
        &json!([
            {"email": format!("noreply-{}@users.noreply.github.com", &hex::encode(Sha256::digest(&email))[..8]),
             "primary": false, "verified": true, "visibility": null},
            {"email": email, "primary": true, "verified": verified, "visibility": "private"},
        ]),
    )
}

async fn google(
    req: ReadRequest,
    state: std::sync::Arc<Mutex<SigninState>>,
) -> Result<Response<Body>, Infallible> {
    let mut st = lock(&state);
    let resp = match (&req.method, req.path.as_str()) {
        (&Method::GET, "/.well-known/openid-configuration") => discovery(&st),
        (&Method::GET, "/oauth2/v3/certs") => jwks(&st),
        (_, "/o/oauth2/v2/auth") => authorize(&mut st, &req, true, "Choose an account"),
        (&Method::POST, "/token") => google_token(&mut st, &req),
        _ => json_response(404, &json!({"error": "not_found"})),
    };
    Ok(resp)
}

fn discovery(st: &SigninState) -> Response<Body> {
    let b = &st.base;
    json_response(
        200,
        &json!({
            "issuer": b,
            "authorization_endpoint": format!("{b}/o/oauth2/v2/auth"),
            "token_endpoint": format!("{b}/token"),
            "userinfo_endpoint": format!("{b}/v1/userinfo"),
            "jwks_uri": format!("{b}/oauth2/v3/certs"),
            "response_types_supported": ["code", "token", "id_token", "code token", "code id_token", "token id_token", "code token id_token", "none"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "email", "profile"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "claims_supported": ["aud", "email", "email_verified", "exp", "iat", "iss", "name", "sub"],
            "code_challenge_methods_supported": ["plain", "S256"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
        }),
    )
}

fn jwks(st: &SigninState) -> Response<Body> {
    let keys: Vec<Value> = st
        .key
        .iter()
        .map(|(key, kid)| {
            json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be())})
        })
        .collect();
    json_response(200, &json!({ "keys": keys }))
}

/// HTTP Basic client credentials (`client_secret_basic`: each part form-encoded first).
fn basic_credentials(req: &ReadRequest) -> Option<(String, String)> {
    let b64 = req.headers.get("authorization")?.strip_prefix("Basic ")?;
    let raw =
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).ok()?).ok()?;
    let (id, secret) = raw.split_once(':')?;
    let decode = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((decode(id)?, decode(secret)?))
}

fn google_token(st: &mut SigninState, req: &ReadRequest) -> Response<Body> {
    let form = form_of(req.body.as_deref().unwrap_or_default());
    if form.get("grant_type").map(String::as_str) != Some("authorization_code") {
        st.log.rejected.push("token: grant_type".into());
        return json_response(400, &json!({"error": "unsupported_grant_type"}));
    }
    let grant = match st.exchange(&form, basic_credentials(req)) {
        Ok(g) => g,
        Err((error, description)) => {
            st.log
                .rejected
                .push(format!("token: {error}: {description}"));
            let error = if error == "bad_verification_code" {
                "invalid_grant"
            } else {
                error
            };
            return json_response(
                400,
                &json!({"error": error, "error_description": description}),
            );
        }
    };
    let access_token = format!("ya29.a0{}", random_token(24));
    let digest = Sha256::digest(access_token.as_bytes());
    let now = unix_now();
    let fault = st.fault;
    let at_hash = if fault == IdTokenFault::BadAtHash {
        URL_SAFE_NO_PAD.encode(&Sha256::digest(b"another access token")[..16])
    } else {
        URL_SAFE_NO_PAD.encode(&digest[..16])
    };
    let iss = if fault == IdTokenFault::WrongIssuer {
        "https://accounts.example.invalid".to_owned()
    } else {
        st.base.clone()
    };
    let mut claims = json!({
        "iss": iss,
        "azp": st.client.client_id,
        "aud": if fault == IdTokenFault::WrongAudience { "another-client.apps.googleusercontent.com".to_owned() } else { st.client.client_id.clone() },
        "sub": format!("1{}", &hex::encode(Sha256::digest(&grant.email))[..20]),
        "email": grant.email,
        "email_verified": fault != IdTokenFault::UnverifiedEmail,
        "at_hash": at_hash,
        "iat": now,
        "exp": now + 3600,
    });
    if let Some(nonce) = &grant.nonce {
        claims["nonce"] = json!(if fault == IdTokenFault::WrongNonce {
            "not-the-nonce-sent-0000"
        } else {
            nonce.as_str()
        });
    }
    if fault == IdTokenFault::Expired {
        claims["iat"] = json!(now - 7200);
        claims["exp"] = json!(now - 3600);
    }
    let Some((key, kid)) = &st.key else {
        return json_response(500, &json!({"error": "server_error"}));
    };
    let id_token = match (&st.foreign_key, fault) {
        (_, IdTokenFault::HmacWithSecret) => hs256(
            &st.client.client_secret,
            &json!({"alg": "HS256", "kid": kid, "typ": "JWT"}),
            &claims,
        ),
        (Some(foreign), IdTokenFault::ForeignKey) => sign_jwt(
            foreign,
            &json!({"alg": "RS256", "kid": kid, "typ": "JWT"}),
            &claims,
        ),
        _ => sign_jwt(
            key,
            &json!({"alg": "RS256", "kid": kid, "typ": "JWT"}),
            &claims,
        ),
    };
    json_response(
        200,
        &json!({"access_token": access_token, "expires_in": 3599, "scope": "openid https://www.googleapis.com/auth/userinfo.email",
            "token_type": "Bearer", "id_token": id_token}),
    )
}

/// A compact JWS signed with HMAC-SHA256 under `secret`.
fn hs256(secret: &str, header: &Value, claims: &Value) -> String {
    use hmac::{Hmac, Mac};
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        panic!("HMAC takes any key");
    };
    mac.update(input.as_bytes());
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}
