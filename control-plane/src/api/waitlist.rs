//! The early-access waitlist: anyone may sign up (an email address and a role), throttled per
//! source address; the operator lists it. A sign-up's answer is the same whether the address
//! was on the list already or not, so the form tells no one who signed up.

use super::{Admin, ApiError, Body, Page, QueryParams};
use crate::store::{Role, WaitlistEntry};
use crate::App;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::sync::Arc;
use utoipa::ToSchema;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinWaitlist {
    /// At most 254 characters; compared without regard to case.
    pub email: String,
    /// Buying, selling, or both.
    pub role: Role,
}

#[derive(Serialize, ToSchema)]
pub struct Joined {
    /// Always `on_the_list`.
    pub status: &'static str,
}

/// The client's address, when the server knows it.
pub struct Source(Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(super::source(parts)))
    }
}

/// Signs up for early access.
#[utoipa::path(post, path = "/v1/waitlist", tag = "waitlist", request_body = JoinWaitlist,
    responses((status = 202, description = "On the list (also when it was already)", body = Joined),
        (status = 400, description = "Invalid input (JSON error)", body = super::error::ErrorBody),
        (status = 429, description = "Too many sign-ups from this address", body = super::error::ErrorBody)))]
pub async fn join(
    Source(source): Source,
    State(app): State<Arc<App>>,
    Body(join): Body<JoinWaitlist>,
) -> Result<(StatusCode, Json<Joined>), ApiError> {
    if let Some(ip) = source {
        if let Some(wait) = app.waitlist_throttle.refused(ip) {
            return Err(ApiError::rate_limited(wait, "sign-ups"));
        }
        app.waitlist_throttle.count(ip);
    }
    let email = normalized(&join.email)?;
    let added = app
        .store
        .join_waitlist(&email, join.role)
        .await
        .map_err(ApiError::store("waitlist entry"))?;
    // Never the address: it is personal data, and logs travel further than the store.
    tracing::info!(
        message = "Waitlist sign-up.",
        role = join.role.as_str(),
        added
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(Joined {
            status: "on_the_list",
        }),
    ))
}

/// The waitlist in sign-up order (`after`: the email address of the last entry of a page).
#[utoipa::path(get, path = "/v1/admin/waitlist", tag = "admin", security(("admin" = [])),
    params(Page), responses((status = 200, description = "OK", body = Vec<WaitlistEntry>)))]
pub async fn list(
    _: Admin,
    State(app): State<Arc<App>>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Vec<WaitlistEntry>>, ApiError> {
    let list = app
        .store
        .waitlist(page.after.as_deref(), page.limit(&app))
        .await
        .map_err(ApiError::store("waitlist entry"))?;
    Ok(Json(list))
}

/// The address trimmed and lowercased, if it looks like one (`name@domain.tld`, at most 254
/// characters, no spaces or control characters).
fn normalized(email: &str) -> Result<String, ApiError> {
    let email = email.trim();
    let bad = || {
        ApiError::invalid("email: not an email address (name@domain.tld, at most 254 characters)")
    };
    if email.is_empty() || email.len() > 254 {
        return Err(bad());
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(bad)?;
    let domain_ok = domain.contains('.')
        && domain
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63);
    if local.is_empty() || local.len() > 64 || local.contains('@') || !domain_ok {
        return Err(bad());
    }
    Ok(email.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::normalized;

    #[test]
    fn addresses_are_trimmed_lowercased_and_checked() {
        assert_eq!(normalized("  Ana@Example.COM ").unwrap(), "ana@example.com");
        for bad in [
            "",
            "ana",
            "ana@",
            "@example.com",
            "ana@example",
            "ana@@example.com",
            "a b@example.com",
            "ana@example..com",
            "ana@.example.com",
            "ana@example.com.",
            "ana\u{0}@example.com",
        ] {
            assert!(normalized(bad).is_err(), "{bad:?}");
        }
        assert!(normalized(&format!("{}@example.com", "a".repeat(65))).is_err());
        assert!(normalized(&format!("a@{}.com", "b".repeat(250))).is_err());
    }
}
