//! Sign-in by one-time email link. A person asks for a link (the answer is the same whether an
//! account exists or not); the link opens a page whose button signs them in (so a mail
//! scanner that fetches links never spends one); the first sign-in of an address makes its
//! account, with the welcome credit for a buyer, once per person. Every sign-in starts a new
//! session id (a session planted before it is worth nothing) and returns only to a local path.
//!
//! Mail: over SMTP when `[web.smtp]` is set; otherwise kept in the outbox (the operator's page)
//! and, on the embedded store, also written to the log, so a newcomer needs no mail server.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use maud::html;
use serde::Deserialize;

use super::layout::{csrf_field, email_and_role};
use super::session::SetSession;
use super::{page, see_other, Visit, WebForm, WebResult};
use crate::api::waitlist::{normalized, Source};
use crate::api::{ApiError, QueryParams};
use crate::store::{Role, Visitor};
use crate::App;

/// Where a sign-in may return: a path on this site, never another host (`//evil`, `/\evil`,
/// `https://…`), at most 512 characters; anything else returns to the dashboard.
pub fn local_path(return_to: Option<&str>) -> String {
    match return_to {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.starts_with("/\\")
                && p.len() <= 512
                && !p.chars().any(|c| c.is_control() || c == '\\') =>
        {
            p.to_owned()
        }
        _ => "/app".to_owned(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReturnTo {
    return_to: Option<String>,
}

pub async fn form(
    visit: Visit,
    State(app): State<Arc<App>>,
    QueryParams(q): QueryParams<ReturnTo>,
) -> WebResult {
    let return_to = local_path(q.return_to.as_deref());
    let providers = app.sign_in.offered();
    let body = html! {
        h1 { "Sign in or sign up" }
        p { "We email you a link that signs you in. New here? The same link makes your account — buyers start with free credit." }
        form.card method="post" action="/signin" {
            (csrf_field(&visit))
            input type="hidden" name="return_to" value=(return_to);
            (email_and_role("New account: I want to"))
            button type="submit" { "Email me a sign-in link" }
            @if !providers.is_empty() {
                p.muted { "Or, with the same choice for a new account (one account per verified email, whichever way you sign in):" }
                @for (slug, name) in &providers {
                    // No address needed: the provider tells us the verified one.
                    button.secondary type="submit" formaction=(format!("/signin/{slug}")) formnovalidate {
                        "Continue with " (name)
                    }
                    " "
                }
            }
        }
    };
    Ok(page(&visit, "Sign in", body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskForLink {
    csrf: String,
    email: String,
    role: Role,
    return_to: Option<String>,
}

pub async fn send_link(
    visit: Visit,
    Source(source): Source,
    State(app): State<Arc<App>>,
    WebForm(ask): WebForm<AskForLink>,
) -> WebResult {
    visit.check_csrf(&ask.csrf)?;
    if let Some(ip) = source {
        if let Some(wait) = app.signin_throttle.refused(ip) {
            return Err(ApiError::rate_limited(wait, "sign-in links").into());
        }
        app.signin_throttle.count(ip);
    }
    let email = normalized(&ask.email)?;
    let visitor = Visitor::Person {
        email: email.clone(),
        role: ask.role,
    };
    let link = make_link(&app, &visitor, &local_path(ask.return_to.as_deref())).await?;
    let body = format!(
        "Sign in to tokn$ with this link (valid for {} minutes, once):\n\n{link}\n\n\
         If you did not ask for it, ignore this message.",
        app.web.signin_link_minutes
    );
    if app
        .mailer
        .send(&app.store, &email, "Your tokn$ sign-in link", &body)
        .await
        .is_err()
    {
        return Err(ApiError::unavailable(
            "the sign-in email could not be sent; try again in a minute",
        )
        .into());
    }
    if app.embedded && !app.mailer.sends() {
        // No mail server on the embedded default: the newcomer reads the link here.
        tracing::info!(message = "Sign-in link (embedded mode: not mailed).", link = %link);
    }
    let body = html! {
        h1 { "Check your email" }
        p.notice role="status" { "If the address can sign in, a link is on its way. It works once, for " (app.web.signin_link_minutes) " minutes." }
    };
    Ok(page(&visit, "Check your email", body))
}

/// A new one-time link for `visitor` (its token stored as a digest only).
pub async fn make_link(app: &App, visitor: &Visitor, return_to: &str) -> Result<String, ApiError> {
    let token = crate::ids::secret("sl");
    let ttl_ms =
        i64::try_from(app.web.signin_link_minutes.saturating_mul(60_000)).unwrap_or(i64::MAX);
    app.store
        .create_signin_link(&crate::ids::sha256_hex(&token), visitor, return_to, ttl_ms)
        .await
        .map_err(ApiError::store("sign-in link"))?;
    Ok(format!("{}/signin/link?token={token}", app.web_origin))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkToken {
    token: String,
}

/// The link's page: one button that signs in (nothing is spent by opening it).
pub async fn confirm(visit: Visit, QueryParams(q): QueryParams<LinkToken>) -> WebResult {
    let body = html! {
        h1 { "Sign in to tokn$" }
        form.card method="post" action="/signin/link" {
            (csrf_field(&visit))
            input type="hidden" name="token" value=(q.token);
            p { "This link signs you in once." }
            button type="submit" { "Sign in" }
        }
    };
    Ok(page(&visit, "Sign in", body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptLink {
    csrf: String,
    token: String,
}

pub async fn accept(
    mut visit: Visit,
    State(app): State<Arc<App>>,
    WebForm(form): WebForm<AcceptLink>,
) -> WebResult<Response> {
    visit.check_csrf(&form.csrf)?;
    let link = app
        .store
        .use_signin_link(&crate::ids::sha256_hex(&form.token))
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => ApiError::invalid(
                "this sign-in link has expired or was used already; ask for a new one",
            ),
            other => ApiError::store("sign-in link")(other),
        })?;
    let account = match &link.visitor {
        Visitor::Operator => None,
        Visitor::Person { email, role } => Some(person(&app, email, *role).await?),
    };
    let to = match &link.visitor {
        Visitor::Operator => "/operator",
        Visitor::Person { .. } => link.return_to.as_str(),
    };
    Ok(signed_in(&app, &mut visit, account, to).await?)
}

/// Signs `account` (`None`: the operator) in on this browser and sends it on to `to`. A new
/// session id for every sign-in: whatever session the browser held ends here, so a session id
/// planted before is worth nothing.
pub(super) async fn signed_in(
    app: &App,
    visit: &mut Visit,
    account: Option<crate::store::Account>,
    to: &str,
) -> Result<Response, ApiError> {
    if let Some(a) = &account {
        if a.status != crate::store::AccountStatus::Active {
            return Err(ApiError::forbidden("this account is suspended"));
        }
    }
    if let Some(old) = visit.session.take() {
        app.store
            .revoke_session(&old.id_sha256)
            .await
            .map_err(ApiError::store("session"))?;
    }
    let id = crate::ids::secret("ses");
    let ttl_s =
        i64::try_from(app.web.session_days.saturating_mul(86_400)).unwrap_or(i64::MAX / 1000);
    app.store
        .create_session(
            &crate::ids::sha256_hex(&id),
            account.as_ref().map(|a| a.id.as_str()),
            &crate::ids::secret("csrf"),
            ttl_s.saturating_mul(1000),
        )
        .await
        .map_err(ApiError::store("session"))?;
    visit.set_session = Some(SetSession::Start {
        id,
        max_age_s: ttl_s,
    });
    Ok(see_other(visit, to))
}

/// The account of `email`, made on its first sign-in (a buyer's welcome credit with it, in the
/// same transaction: once per person, whichever way they sign in).
pub(super) async fn person(
    app: &App,
    email: &str,
    role: Role,
) -> Result<crate::store::Account, ApiError> {
    match app.store.account_by_email(email).await {
        Ok(a) => return Ok(a),
        Err(crate::store::StoreError::NotFound) => {}
        Err(e) => return Err(ApiError::store("account")(e)),
    }
    // The account's API token is never shown: this person uses the web app (and keys).
    let token = crate::ids::account_token();
    match app
        .store
        .create_account(email, role, &crate::ids::sha256_hex(&token))
        .await
    {
        Ok(a) => {
            app.wallets_changed(std::slice::from_ref(&a.id)).await;
            tracing::info!(message = "Account made at first sign-in.", account = %a.id, role = role.as_str());
            Ok(a)
        }
        // Two first sign-ins at once: the other made it.
        Err(crate::store::StoreError::Conflict(_)) => app
            .store
            .account_by_email(email)
            .await
            .map_err(ApiError::store("account")),
        Err(e) => Err(ApiError::store("account")(e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignOut {
    csrf: String,
}

pub async fn sign_out(
    mut visit: Visit,
    State(app): State<Arc<App>>,
    WebForm(form): WebForm<SignOut>,
) -> WebResult<Response> {
    visit.check_csrf(&form.csrf)?;
    if let Some(s) = visit.session.take() {
        app.store
            .revoke_session(&s.id_sha256)
            .await
            .map_err(ApiError::store("session"))?;
    }
    visit.set_session = Some(SetSession::End);
    Ok(see_other(&visit, "/"))
}

/// Ends every session of the signed-in person (a lost laptop, a shared computer), this one too.
pub async fn sign_out_everywhere(
    mut visit: Visit,
    State(app): State<Arc<App>>,
    WebForm(form): WebForm<SignOut>,
) -> WebResult<Response> {
    let account_id = visit.person()?.id.clone();
    visit.check_csrf(&form.csrf)?;
    let ended = app
        .store
        .revoke_sessions_of(&account_id)
        .await
        .map_err(ApiError::store("session"))?;
    tracing::info!(message = "Signed out everywhere.", account = %account_id, sessions = ended);
    visit.session = None;
    visit.set_session = Some(SetSession::End);
    Ok(see_other(&visit, "/"))
}

#[cfg(test)]
mod tests {
    use super::local_path;

    #[test]
    fn sign_in_returns_only_to_local_paths() {
        for ok in ["/app", "/app/playground?model=mock", "/"] {
            assert_eq!(local_path(Some(ok)), ok);
        }
        for bad in [
            "https://evil.example/",
            "//evil.example/x",
            "/\\evil.example",
            "evil.example",
            "/app\\..\\x",
            "/app\n/x",
            "",
        ] {
            assert_eq!(local_path(Some(bad)), "/app", "{bad:?}");
        }
        assert_eq!(local_path(None), "/app");
    }
}
