//! Who is visiting: the session cookie (a random id, stored as its digest), or an anonymous
//! cookie that carries the CSRF token of forms shown before sign-in. Forms are checked twice:
//! the token must match (double submit for visitors, the session's own token once signed in),
//! and a browser's `Origin`/`Sec-Fetch-Site` must not name another site.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;

use super::WebError;
use crate::api::ApiError;
use crate::store::{Account, Session};
use crate::App;

pub const SESSION_COOKIE: &str = "tokn_session";
pub const ANON_COOKIE: &str = "tokn_anon";
/// A GitHub or Google sign-in under way: its `state` (see `oauth`).
pub const FLOW_COOKIE: &str = "tokn_signin";

/// The visitor of one request.
pub struct Visit {
    pub session: Option<Session>,
    /// The anonymous cookie's value (a form token before sign-in).
    anon: String,
    /// The anonymous cookie is new: the response sets it.
    new_anon: bool,
    /// The `state` of a GitHub or Google sign-in this browser started.
    flow_state: Option<String>,
    /// Cookies are marked `Secure`.
    pub(super) secure: bool,
    /// Set by sign-in and sign-out: the session cookie the response carries.
    pub(super) set_session: Option<SetSession>,
    /// The request's path and query (where a sign-in returns to).
    pub path: String,
    /// The pages' content security policy.
    pub csp: Arc<str>,
}

pub(super) enum SetSession {
    Start { id: String, max_age_s: i64 },
    End,
}

impl Visit {
    /// The token forms of this page carry.
    pub fn csrf(&self) -> &str {
        self.session.as_ref().map_or(&self.anon, |s| &s.csrf)
    }

    pub fn account(&self) -> Option<&Account> {
        self.session.as_ref()?.account.as_ref()
    }

    pub fn operator(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.account.is_none())
    }

    /// A provider's callback carries the `state` of the sign-in this browser started.
    pub fn flow_state_is(&self, state: &str) -> bool {
        self.flow_state
            .as_deref()
            .is_some_and(|mine| !state.is_empty() && same_secret(mine, state))
    }

    /// A form's token is this visit's.
    pub fn check_csrf(&self, token: &str) -> Result<(), WebError> {
        let want = self.csrf();
        if !want.is_empty() && same_secret(want, token) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "this form has expired or did not come from this site; reload the page and try again",
            )
            .into())
        }
    }

    /// The signed-in person, or a redirect to sign in and come back; a suspended account's
    /// sessions open nothing.
    pub fn person(&self) -> Result<&Account, WebError> {
        let account = self.account().ok_or_else(|| WebError::SignIn {
            return_to: self.path.clone(),
        })?;
        if account.status != crate::store::AccountStatus::Active {
            return Err(ApiError::forbidden("this account is suspended").into());
        }
        Ok(account)
    }

    /// The cookies this response sets.
    pub fn set_cookies(&self, resp: &mut Response) {
        let secure = if self.secure { "; Secure" } else { "" };
        let mut set = |value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
        };
        if self.new_anon {
            set(format!(
                "{ANON_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}",
                self.anon
            ));
        }
        match &self.set_session {
            Some(SetSession::Start { id, max_age_s }) => set(format!(
                "{SESSION_COOKIE}={id}; Path=/; Max-Age={max_age_s}; HttpOnly; SameSite=Lax{secure}"
            )),
            Some(SetSession::End) => set(format!(
                "{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}"
            )),
            None => {}
        }
    }
}

/// Two secrets are equal, compared without an early exit.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A cookie's value from the request's `Cookie` headers.
fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

impl FromRequestParts<Arc<App>> for Visit {
    type Rejection = WebError;
    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, WebError> {
        if parts.method != Method::GET && parts.method != Method::HEAD {
            cross_site_refused(parts)?;
        }
        let session = match cookie(parts, SESSION_COOKIE) {
            Some(id) => app
                .store
                .session(&crate::ids::sha256_hex(id))
                .await
                .map_err(ApiError::store("session"))?,
            None => None,
        };
        let (anon, new_anon) = match cookie(parts, ANON_COOKIE) {
            Some(v) => (v.to_owned(), false),
            None => (crate::ids::secret("anon"), true),
        };
        Ok(Self {
            session,
            anon,
            new_anon,
            flow_state: cookie(parts, FLOW_COOKIE).map(str::to_owned),
            secure: app.web.secure_cookies,
            set_session: None,
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            csp: app.web_csp.clone(),
        })
    }
}

/// A form posted from another site is refused before anything is read: browsers say where a
/// request comes from (`Sec-Fetch-Site`, else `Origin`, whose host must be this one); the CSRF
/// token is the second check (and the only one for clients that send neither).
fn cross_site_refused(parts: &Parts) -> Result<(), WebError> {
    let get = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let same_site = match (get("sec-fetch-site"), get("origin")) {
        (Some(site), _) => matches!(site, "same-origin" | "none"),
        (None, Some(origin)) => {
            let host = origin.split_once("://").map(|(_, h)| h);
            host.is_some() && host == get(header::HOST.as_str())
        }
        (None, None) => true,
    };
    if same_site {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf",
            "a form from another site cannot act here",
        )
        .into())
    }
}
