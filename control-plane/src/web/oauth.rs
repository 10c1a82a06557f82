//! Sign-in with GitHub (OAuth 2.0) and Google (OpenID Connect), beside the email link.
//!
//! The flow: the sign-in form posts here (with its CSRF token and the role of a new account);
//! we store a flow under a random `state` (its digest), with a PKCE verifier and, for Google, a
//! nonce, put the same `state` in a short-lived cookie, and send the browser to the provider.
//! The provider sends it back to `/signin/{provider}/callback` with a code and the `state`: the
//! callback signs in only if the `state` is the one this browser's cookie holds (a callback
//! forged for another browser does nothing) and its flow is still open (each is taken once).
//! The code is exchanged with the PKCE verifier; GitHub's primary verified email is read from
//! its API, Google's from the ID token, which is verified against Google's published keys (its
//! issuer, audience, expiry, nonce and access-token hash). The email then signs in exactly as
//! a link does: one account per verified address, whichever way, the welcome credit once.
//!
//! The HTTP client follows no redirects (a token endpoint cannot send us elsewhere), and no
//! provider token is kept: the sign-in needs them for one request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AccessTokenHash, AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce,
    OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::session::FLOW_COOKIE;
use super::signin::{local_path, person, signed_in};
use super::{see_other, Visit, WebForm, WebResult};
use crate::api::waitlist::{normalized, Source};
use crate::api::{ApiError, QueryParams};
use crate::store::{Role, SigninFlow, StoreError};
use crate::App;

/// How long a person has at the provider before the flow is gone.
const FLOW_MINUTES: u64 = 10;
/// How long Google's discovery document and keys are trusted before they are read again (and
/// at once when an ID token names a key they lack: keys rotate).
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

type GitHubClient = oauth2::basic::BasicClient<
    oauth2::EndpointSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

/// The providers this control plane signs people in with (none configured: the email link
/// only).
pub struct SignInProviders {
    github: Option<GitHub>,
    google: Option<Google>,
    /// Follows no redirects; short deadlines (a person is waiting).
    http: reqwest::Client,
}

struct GitHub {
    client: GitHubClient,
    api_url: String,
}

struct Google {
    client_id: ClientId,
    client_secret: ClientSecret,
    issuer: IssuerUrl,
    redirect: RedirectUrl,
    /// The discovery document (its keys with it), and when it was read.
    metadata: Mutex<Option<(Instant, CoreProviderMetadata)>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Provider {
    GitHub,
    Google,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Self::GitHub => "GitHub",
            Self::Google => "Google",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Self::GitHub => "github",
            Self::Google => "google",
        }
    }
}

impl SignInProviders {
    /// The configured providers; their callbacks are under `origin`.
    pub fn new(
        web: &tokn_config::control_plane::WebConfig,
        github_secret: Option<&str>,
        google_secret: Option<&str>,
        origin: &str,
    ) -> Result<Self, String> {
        let callback = |slug: &str| {
            RedirectUrl::new(format!("{origin}/signin/{slug}/callback"))
                .map_err(|e| format!("web.public_url: {e}"))
        };
        let github = match (&web.github, github_secret) {
            (Some(g), Some(secret)) => {
                let url = g.url.trim_end_matches('/');
                let client = oauth2::basic::BasicClient::new(ClientId::new(g.client_id.clone()))
                    .set_client_secret(ClientSecret::new(secret.to_owned()))
                    .set_auth_uri(
                        oauth2::AuthUrl::new(format!("{url}/login/oauth/authorize"))
                            .map_err(|e| format!("web.github.url: {e}"))?,
                    )
                    .set_token_uri(
                        oauth2::TokenUrl::new(format!("{url}/login/oauth/access_token"))
                            .map_err(|e| format!("web.github.url: {e}"))?,
                    )
                    // GitHub reads the client's id and secret from the form.
                    .set_auth_type(oauth2::AuthType::RequestBody)
                    .set_redirect_uri(callback("github")?);
                Some(GitHub {
                    client,
                    api_url: g.api_url.trim_end_matches('/').to_owned(),
                })
            }
            _ => None,
        };
        let google = match (&web.google, google_secret) {
            (Some(g), Some(secret)) => Some(Google {
                client_id: ClientId::new(g.client_id.clone()),
                client_secret: ClientSecret::new(secret.to_owned()),
                issuer: IssuerUrl::new(g.issuer.trim_end_matches('/').to_owned())
                    .map_err(|e| format!("web.google.issuer: {e}"))?,
                redirect: callback("google")?,
                metadata: Mutex::new(None),
            }),
            _ => None,
        };
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| format!("sign-in client: {e}"))?;
        Ok(Self {
            github,
            google,
            http,
        })
    }

    /// The providers to offer on the sign-in page: `(slug, name)`.
    pub fn offered(&self) -> Vec<(&'static str, &'static str)> {
        [
            self.github.as_ref().map(|_| Provider::GitHub),
            self.google.as_ref().map(|_| Provider::Google),
        ]
        .into_iter()
        .flatten()
        .map(|p| (p.slug(), p.name()))
        .collect()
    }

    /// Where the sign-in form's redirect may lead (the pages' `form-action`).
    pub fn form_origins(web: &tokn_config::control_plane::WebConfig) -> Vec<String> {
        let github = web.github.as_ref().map(|g| origin_of(&g.url));
        let google = web.google.as_ref().map(|g| origin_of(&g.issuer));
        github.into_iter().chain(google).collect()
    }

    /// The configured provider a path names.
    fn provider(&self, slug: &str) -> Result<Chosen<'_>, ApiError> {
        match (slug, &self.github, &self.google) {
            ("github", Some(g), _) => Ok(Chosen::GitHub(g)),
            ("google", _, Some(g)) => Ok(Chosen::Google(g)),
            _ => Err(ApiError::not_found("sign-in method")),
        }
    }
}

/// A configured provider, with its client.
#[derive(Clone, Copy)]
enum Chosen<'a> {
    GitHub(&'a GitHub),
    Google(&'a Google),
}

impl Chosen<'_> {
    fn kind(self) -> Provider {
        match self {
            Self::GitHub(_) => Provider::GitHub,
            Self::Google(_) => Provider::Google,
        }
    }
}

/// `scheme://host[:port]` of a URL.
pub fn origin_of(url: &str) -> String {
    url.splitn(4, '/').take(3).collect::<Vec<_>>().join("/")
}

impl Google {
    /// The discovery document, read again when older than [`DISCOVERY_TTL`] or when `fresh`.
    async fn metadata(
        &self,
        http: &reqwest::Client,
        fresh: bool,
    ) -> Result<CoreProviderMetadata, ApiError> {
        if let Some((read, m)) = self.metadata.lock().await.as_ref() {
            if !fresh && read.elapsed() < DISCOVERY_TTL {
                return Ok(m.clone());
            }
        }
        // Read without holding the lock: a slow provider delays only the sign-ins that need a
        // fresh copy, never those the cache serves.
        let m = CoreProviderMetadata::discover_async(self.issuer.clone(), http)
            .await
            .map_err(|e| {
                tracing::warn!(message = "Google's discovery document could not be read.", error = %e);
                unreachable_provider(Provider::Google)
            })?;
        *self.metadata.lock().await = Some((Instant::now(), m.clone()));
        Ok(m)
    }

    fn client(
        &self,
        metadata: CoreProviderMetadata,
    ) -> openidconnect::core::CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    > {
        CoreClient::from_provider_metadata(
            metadata,
            self.client_id.clone(),
            Some(self.client_secret.clone()),
        )
        .set_redirect_uri(self.redirect.clone())
    }
}

fn unreachable_provider(p: Provider) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "signin_provider",
        format!(
            "{} did not answer; try again in a minute, or sign in by email link",
            p.name()
        ),
    )
}

/// The provider refused or garbled the sign-in (logged by kind: a provider's answer may carry
/// a token, so never its body).
fn provider_refused(p: Provider, what: &str) -> ApiError {
    tracing::warn!(
        message = "A sign-in was refused by its provider.",
        provider = p.slug(),
        what
    );
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "signin_provider",
        format!(
            "{} did not confirm this sign-in; start again, or sign in by email link",
            p.name()
        ),
    )
}

fn token_error_kind<RE: std::error::Error + 'static, T: oauth2::ErrorResponse + 'static>(
    e: &oauth2::RequestTokenError<RE, T>,
) -> &'static str {
    match e {
        oauth2::RequestTokenError::ServerResponse(_) => "token endpoint refused the code",
        oauth2::RequestTokenError::Request(_) => "token endpoint unreachable",
        // GitHub refuses a code with 200 and an `error` field, which reads as unparsable.
        oauth2::RequestTokenError::Parse(_, body)
            if serde_json::from_slice::<serde_json::Value>(body)
                .is_ok_and(|v| v.get("error").is_some()) =>
        {
            "token endpoint refused the code"
        }
        oauth2::RequestTokenError::Parse(..) => "token endpoint answer unreadable",
        oauth2::RequestTokenError::Other(_) => "token endpoint answer unexpected",
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartSignIn {
    csrf: String,
    role: Role,
    return_to: Option<String>,
    /// The sign-in form's address field (its other button mails a link); not used here.
    #[serde(default, rename = "email")]
    _email: serde::de::IgnoredAny,
}

/// The sign-in form's provider button: a new flow, and off to the provider.
pub async fn start(
    visit: Visit,
    Source(source): Source,
    Path(slug): Path<String>,
    State(app): State<Arc<App>>,
    WebForm(form): WebForm<StartSignIn>,
) -> WebResult<Response> {
    visit.check_csrf(&form.csrf)?;
    let chosen = app.sign_in.provider(&slug)?;
    let provider = chosen.kind();
    // Each start stores a flow: counted per source like sign-in links.
    if let Some(ip) = source {
        if let Some(wait) = app.signin_throttle.refused(ip) {
            return Err(ApiError::rate_limited(wait, "sign-ins").into());
        }
        app.signin_throttle.count(ip);
    }
    let state = crate::ids::secret("st");
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let state_token = state.clone();
    let (url, nonce) = match chosen {
        Chosen::GitHub(g) => {
            let (url, _) = g
                .client
                .authorize_url(move || CsrfToken::new(state_token))
                .add_scope(Scope::new("user:email".to_owned()))
                .set_pkce_challenge(challenge)
                .url();
            (url, String::new())
        }
        Chosen::Google(g) => {
            let nonce = crate::ids::secret("nonce");
            let nonce_token = nonce.clone();
            let client = g.client(g.metadata(&app.sign_in.http, false).await?);
            let (url, _, _) = client
                .authorize_url(
                    CoreAuthenticationFlow::AuthorizationCode,
                    move || CsrfToken::new(state_token),
                    move || Nonce::new(nonce_token),
                )
                .add_scope(Scope::new("email".to_owned()))
                .set_pkce_challenge(challenge)
                .url();
            (url, nonce)
        }
    };
    let flow = SigninFlow {
        provider: provider.slug().to_owned(),
        role: form.role,
        return_to: local_path(form.return_to.as_deref()),
        pkce_verifier: verifier.secret().clone(),
        nonce,
    };
    let ttl_ms = i64::try_from(FLOW_MINUTES * 60_000).unwrap_or(i64::MAX);
    app.store
        .create_signin_flow(&crate::ids::sha256_hex(&state), &flow, ttl_ms)
        .await
        .map_err(ApiError::store("sign-in"))?;
    let mut resp = see_other(&visit, url.as_str());
    set_flow_cookie(&mut resp, &visit, Some(&state));
    Ok(resp)
}

/// The flow's cookie: its `state`, sent back with the provider's redirect (`SameSite=Lax`: a
/// top-level navigation from another site carries it), or cleared.
fn set_flow_cookie(resp: &mut Response, visit: &Visit, state: Option<&str>) {
    let secure = if visit.secure { "; Secure" } else { "" };
    let cookie = match state {
        Some(s) => format!(
            "{FLOW_COOKIE}={s}; Path=/signin; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
            FLOW_MINUTES * 60
        ),
        None => format!("{FLOW_COOKIE}=; Path=/signin; Max-Age=0; HttpOnly; SameSite=Lax{secure}"),
    };
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// What a provider sends back (it may add parameters of its own: `scope`, `authuser`, …).
#[derive(Deserialize)]
pub struct Callback {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
}

pub async fn callback(
    mut visit: Visit,
    Path(slug): Path<String>,
    State(app): State<Arc<App>>,
    QueryParams(q): QueryParams<Callback>,
) -> WebResult<Response> {
    let chosen = app.sign_in.provider(&slug)?;
    let state = q.state.clone().unwrap_or_default();
    // The flow must have started in this browser: a callback made for another is refused here
    // (and leaves this browser's own flow alone).
    if !visit.flow_state_is(&state) {
        return Err(state_mismatch().into());
    }
    // From here the flow ends, however it ends: its cookie goes.
    let mut resp = match finish(&app, &mut visit, chosen, &state, q).await {
        Ok(resp) => resp,
        Err(e) => axum::response::IntoResponse::into_response(super::WebError::from(e)),
    };
    set_flow_cookie(&mut resp, &visit, None);
    Ok(resp)
}

/// Takes the flow, exchanges the code, signs in the verified address.
async fn finish(
    app: &App,
    visit: &mut Visit,
    chosen: Chosen<'_>,
    state: &str,
    q: Callback,
) -> Result<Response, ApiError> {
    let provider = chosen.kind();
    let flow = app
        .store
        .take_signin_flow(&crate::ids::sha256_hex(state))
        .await
        .map_err(|e| match e {
            StoreError::NotFound => state_mismatch(),
            other => ApiError::store("sign-in")(other),
        })?;
    if flow.provider != provider.slug() {
        return Err(state_mismatch());
    }
    if let Some(error) = q.error {
        // The provider's own words stay out of the page: one of two fixed messages.
        let why = if error == "access_denied" {
            "you cancelled it there"
        } else {
            "it refused the request"
        };
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "signin_declined",
            format!("{} did not sign you in: {why}", provider.name()),
        ));
    }
    let Some(code) = q.code.filter(|c| !c.is_empty()) else {
        return Err(provider_refused(provider, "callback without a code"));
    };
    let code = AuthorizationCode::new(code);
    let verifier = PkceCodeVerifier::new(flow.pkce_verifier);
    let http = &app.sign_in.http;
    let email = match chosen {
        Chosen::GitHub(g) => github_email(g, http, code, verifier).await?,
        Chosen::Google(g) => google_email(g, http, code, verifier, flow.nonce).await?,
    };
    let email = normalized(&email)?;
    let account = person(app, &email, flow.role).await?;
    tracing::info!(message = "Signed in.", provider = provider.slug(), account = %account.id);
    signed_in(app, visit, Some(account), &flow.return_to).await
}

fn state_mismatch() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "signin_state",
        "this sign-in did not start in this browser, or it expired or was finished already; start again",
    )
}

#[derive(Deserialize)]
struct GitHubEmail {
    email: String,
    primary: bool,
    verified: bool,
}

/// GitHub: the code for a token, the token for the account's primary address, which GitHub
/// must have verified.
async fn github_email(
    g: &GitHub,
    http: &reqwest::Client,
    code: AuthorizationCode,
    verifier: PkceCodeVerifier,
) -> Result<String, ApiError> {
    let p = Provider::GitHub;
    let token = g
        .client
        .exchange_code(code)
        .set_pkce_verifier(verifier)
        .request_async(http)
        .await
        .map_err(|e| provider_refused(p, token_error_kind(&e)))?;
    let resp = http
        .get(format!("{}/user/emails", g.api_url))
        .bearer_auth(token.access_token().secret())
        .header(header::ACCEPT, "application/vnd.github+json")
        .header("X-GitHub-Api-Version", "2022-11-28")
        .header(header::USER_AGENT, "tokn-control")
        .send()
        .await
        .map_err(|e| {
            tracing::warn!(message = "GitHub's API could not be reached.", error = %e.without_url());
            unreachable_provider(p)
        })?;
    if !resp.status().is_success() {
        return Err(provider_refused(p, "user/emails refused the token"));
    }
    let emails: Vec<GitHubEmail> = resp
        .json()
        .await
        .map_err(|_| provider_refused(p, "user/emails answer unreadable"))?;
    emails
        .into_iter()
        .find(|e| e.primary && e.verified)
        .map(|e| e.email)
        .ok_or_else(|| {
            ApiError::forbidden(
                "your GitHub account's primary email is not verified; verify it at GitHub, or sign in by email link",
            )
        })
}

/// Google: the code for tokens, the ID token verified (signature against Google's keys,
/// issuer, audience, expiry, nonce, access-token hash), and its verified address.
async fn google_email(
    g: &Google,
    http: &reqwest::Client,
    code: AuthorizationCode,
    verifier: PkceCodeVerifier,
    nonce: String,
) -> Result<String, ApiError> {
    let p = Provider::Google;
    let client = g.client(g.metadata(http, false).await?);
    let token = client
        .exchange_code(code)
        .map_err(|_| provider_refused(p, "no token endpoint in the discovery document"))?
        .set_pkce_verifier(verifier)
        .request_async(http)
        .await
        .map_err(|e| provider_refused(p, token_error_kind(&e)))?;
    let id_token = token
        .id_token()
        .ok_or_else(|| provider_refused(p, "no ID token"))?;
    let nonce = Nonce::new(nonce);
    let mut client = client;
    let mut verified = id_token
        .claims(&client.id_token_verifier(), &nonce)
        .cloned();
    if let Err(openidconnect::ClaimsVerificationError::SignatureVerification(_)) = verified {
        // Perhaps a key published since the keys were read: read them once more.
        client = g.client(g.metadata(http, true).await?);
        verified = id_token
            .claims(&client.id_token_verifier(), &nonce)
            .cloned();
    }
    let claims = verified.map_err(|e| provider_refused(p, claims_error_kind(&e)))?;
    if let Some(expected) = claims.access_token_hash() {
        let verifier = client.id_token_verifier();
        let actual = id_token
            .signing_alg()
            .ok()
            .zip(id_token.signing_key(&verifier).ok())
            .and_then(|(alg, key)| {
                AccessTokenHash::from_token(token.access_token(), alg, key).ok()
            });
        if actual.as_ref() != Some(expected) {
            return Err(provider_refused(p, "access token hash mismatch"));
        }
    }
    if claims.email_verified() != Some(true) {
        return Err(ApiError::forbidden(
            "your Google account's email is not verified; sign in by email link instead",
        ));
    }
    claims
        .email()
        .map(|e| e.as_str().to_owned())
        .ok_or_else(|| provider_refused(p, "no email in the ID token"))
}

fn claims_error_kind(e: &openidconnect::ClaimsVerificationError) -> &'static str {
    use openidconnect::ClaimsVerificationError as E;
    match e {
        E::Expired(_) => "ID token expired",
        E::InvalidAudience(_) => "ID token for another client",
        E::InvalidIssuer(_) => "ID token from another issuer",
        E::InvalidNonce(_) => "ID token nonce mismatch",
        E::SignatureVerification(_) => "ID token signature invalid",
        _ => "ID token invalid",
    }
}
