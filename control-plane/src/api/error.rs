//! The one error type of the API: every failure becomes `{"error":{"code","message"}}` with the
//! matching status. Messages never carry a secret or a database detail.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent as `retry-after` (seconds).
    pub retry_after_s: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_request`.
    pub code: String,
    /// What went wrong, for people; never carries a secret or a database detail.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// Too many bad tokens from this address: refused until its window ends.
    pub fn throttled(retry_after_s: u64) -> Self {
        Self {
            retry_after_s: Some(retry_after_s),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failed_sign_ins",
                format!("too many invalid tokens from this address; retry in {retry_after_s} s"),
            )
        }
    }
    /// Too many requests of one kind from one source (429 with `retry-after`).
    pub fn rate_limited(retry_after_s: u64, what: &str) -> Self {
        Self {
            retry_after_s: Some(retry_after_s),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many {what} from this address; retry in {retry_after_s} s"),
            )
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
    }
    pub fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than this API accepts",
        )
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// A dependency (Redis) cannot be reached; the caller retries.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the request could not be completed; it changed nothing or was rolled back",
        )
    }
    /// Maps a store failure, naming the missing thing for a 404.
    pub fn store(what: &'static str) -> impl Fn(StoreError) -> Self {
        move |e| match e {
            StoreError::NotFound => Self::not_found(what),
            StoreError::Conflict(m) => Self::conflict(m),
            StoreError::Db(e) => {
                tracing::error!(message = "Store failure.", error = %e);
                Self::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        response
    }
}

/// Serde messages quote the offending value (`invalid type: string "…"`): the value is cut, so
/// a secret sent in the wrong place is never echoed back.
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find('"') {
        out.push_str(&rest[..i]);
        match rest[i + 1..].find('"') {
            Some(j) => {
                out.push_str("(value)");
                rest = &rest[i + 1 + j + 1..];
            }
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let text = without_values(&r.body_text());
        match r {
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON with content-type: application/json",
            ),
            JsonRejection::JsonSyntaxError(_) => {
                Self::new(StatusCode::BAD_REQUEST, "malformed_json", text)
            }
            JsonRejection::JsonDataError(_) => Self::invalid(text),
            JsonRejection::BytesRejection(_) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::too_large()
            }
            _ => Self::new(r.status(), "invalid_request", text),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::invalid(without_values(&r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::invalid(without_values(&r.body_text()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quoted_values_are_cut() {
        assert_eq!(
            super::without_values(r#"invalid type: string "sk-secret", expected u64 at line 1"#),
            "invalid type: string (value), expected u64 at line 1"
        );
        assert_eq!(super::without_values("no quotes"), "no quotes");
        assert_eq!(super::without_values(r#"dangling "abc"#), "dangling ");
    }
}
