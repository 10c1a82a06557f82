//! The early-access waitlist: anyone may sign up (an email address and a role), throttled per
//! source address; the operator lists it. A sign-up's answer is the same whether the address
//! was on the list already or not, so the form tells no one who signed up.

use super::{Admin, ApiError, Body, Page, QueryParams};
use crate::store::{Role, WaitlistEntry};
use crate::units::utc_time;
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
pub struct Source(pub Option<IpAddr>);

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
    sign_up(&app, source, &join.email, join.role).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Joined {
            status: "on_the_list",
        }),
    ))
}

/// Puts `email` on the list (the API's and the page's sign-up): throttled per source, the
/// address checked and normalized, one row per address.
pub async fn sign_up(
    app: &App,
    source: Option<IpAddr>,
    email: &str,
    role: Role,
) -> Result<(), ApiError> {
    if let Some(ip) = source {
        if let Some(wait) = app.waitlist_throttle.refused(ip) {
            return Err(ApiError::rate_limited(wait, "sign-ups"));
        }
        app.waitlist_throttle.count(ip);
    }
    let email = normalized(email)?;
    let added = app
        .store
        .join_waitlist(&email, role)
        .await
        .map_err(ApiError::store("waitlist entry"))?;
    // Never the address: it is personal data, and logs travel further than the store.
    tracing::info!(message = "Waitlist sign-up.", role = role.as_str(), added);
    Ok(())
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

/// The whole waitlist as CSV (`email,role,signed_up_at`, UTC times, in sign-up order), to
/// download into a mailing tool.
#[utoipa::path(get, path = "/v1/admin/waitlist/export", tag = "admin", security(("admin" = [])),
    responses((status = 200, description = "CSV (text/csv)", body = String, content_type = "text/csv")))]
pub async fn export(
    _: Admin,
    State(app): State<Arc<App>>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    const PAGE: u32 = 10_000;
    let mut csv = String::from("email,role,signed_up_at\n");
    let mut after: Option<String> = None;
    loop {
        let page = app
            .store
            .waitlist(after.as_deref(), PAGE)
            .await
            .map_err(ApiError::store("waitlist entry"))?;
        for e in &page {
            let at = utc_time(e.created_at_ms);
            csv.push_str(&format!(
                "{},{},{at}\n",
                csv_field(&e.email),
                e.role.as_str()
            ));
        }
        match page.last() {
            Some(last) if page.len() == PAGE as usize => after = Some(last.email.clone()),
            _ => break,
        }
    }
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                axum::http::header::CONTENT_DISPOSITION,
                "attachment; filename=\"waitlist.csv\"",
            ),
        ],
        csv,
    ))
}

/// A CSV field: quoted when it holds a comma or a quote (an address's local part may), and
/// never read as a formula by a spreadsheet.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The address trimmed and lowercased, if it looks like one (`name@domain.tld`, at most 254
/// characters, no spaces or control characters).
pub(crate) fn normalized(email: &str) -> Result<String, ApiError> {
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
    use super::{csv_field, normalized};

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("ana@example.com"), "ana@example.com");
        assert_eq!(csv_field("a,b@example.com"), "\"a,b@example.com\"");
        assert_eq!(csv_field("a\"b@example.com"), "\"a\"\"b@example.com\"");
        assert_eq!(csv_field("=cmd@example.com"), "'=cmd@example.com");
    }

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
