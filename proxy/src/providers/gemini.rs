//! Google's `generateContent` API, as the Gemini API (`x-goog-api-key`) and Vertex AI (OAuth
//! bearer token minted from a service account) serve it: same request and response bodies,
//! different paths and credentials.

use std::sync::Arc;

use super::google_token::AccessToken;

/// Where a Google pool's requests go and how they authenticate.
pub struct GoogleTarget {
    /// Everything before the model id: `{base}/v1beta/models/` (Gemini API) or
    /// `{base}/v1/projects/{project}/locations/{location}/publishers/google/models/` (Vertex).
    /// The model id and `:generateContent` / `:streamGenerateContent?alt=sse` follow.
    pub models_path: String,
    /// Vertex: the pool's access token, added by the gateway once minted. `None` for the Gemini
    /// API, whose key is the target's `x-goog-api-key` header.
    pub token: Option<Arc<AccessToken>>,
}

impl GoogleTarget {
    /// A Gemini API pool: `base_path` is the pool's `base_url` path (`…/v1beta` names the same
    /// root as the bare host).
    pub fn gemini(base_path: &str) -> Self {
        let root = base_path.strip_suffix("/v1beta").unwrap_or(base_path);
        Self {
            models_path: format!("{root}/v1beta/models/"),
            token: None,
        }
    }

    /// A Vertex AI pool of `project` in `location`.
    pub fn vertex(base_path: &str, project: &str, location: &str, token: Arc<AccessToken>) -> Self {
        let root = base_path.strip_suffix("/v1").unwrap_or(base_path);
        Self {
            models_path: format!(
                "{root}/v1/projects/{project}/locations/{location}/publishers/google/models/"
            ),
            token: Some(token),
        }
    }

    /// The request path for `upstream_model`.
    pub fn path(&self, upstream_model: &str, stream: bool) -> String {
        let method = if stream {
            ":streamGenerateContent?alt=sse"
        } else {
            ":generateContent"
        };
        format!("{}{upstream_model}{method}", self.models_path)
    }
}
