//! The playground: chat with any model through the real gateway, paid from the buyer's wallet,
//! streamed token by token with each answer's cost, its list-price cost and the balance left.
//!
//! The page never holds a key. The control plane keeps one key per account for the
//! playground (sealed like a seller credential; listed and revocable like any key — a revoked
//! one is replaced) and relays the gateway's stream to the page unchanged.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use super::{page, usd, Visit, WebResult};
use crate::api::buyer::{issue_key, NewKey};
use crate::api::{ApiError, Body as JsonBody};
use crate::store::Account;
use crate::App;

/// Longest prompt the playground sends, in characters.
const PROMPT_CHARS_MAX: usize = 20_000;

pub async fn show(visit: Visit, State(app): State<Arc<App>>) -> WebResult {
    let (visit, app) = (&visit, &*app);
    let account = visit.person()?;
    let balance = app
        .store
        .balance(&account.id)
        .await
        .map_err(ApiError::store("wallet"))?;
    let models = crate::api::catalog::entries(app).await?;
    let mut ids: Vec<&str> = models
        .iter()
        .filter(|m| m.supply.is_some())
        .map(|m| m.price.model_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let body = html! {
        h1 { "Playground" }
        p { "Balance: " strong #balance { (usd(balance)) } }
        form.card #playground method="post" action="/app/playground/chat" data-csrf=(visit.csrf()) {
            label for="model" { "Model" }
            select #model name="model" {
                @for id in &ids { option value=(id) { (id) } }
            }
            label for="prompt" { "Message" }
            textarea #prompt name="prompt" required maxlength=(PROMPT_CHARS_MAX) { "Hello! What can you do?" }
            button type="submit" { "Send" }
        }
        section.card aria-live="polite" {
            h2 { "Answer" }
            div #answer {}
            p #bill {}
        }
    };
    Ok(page(visit, "Playground", body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ask {
    model: String,
    prompt: String,
}

/// Sends one message to the gateway as this buyer and relays the answer's stream.
pub async fn chat(
    visit: Visit,
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    JsonBody(ask): JsonBody<Ask>,
) -> Result<Response, ApiError> {
    let Some(account) = visit.account() else {
        return Err(ApiError::unauthorized());
    };
    let token = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if visit.check_csrf(token).is_err() {
        return Err(ApiError::forbidden(
            "the page's form token is missing or stale; reload the page",
        ));
    }
    if ask.prompt.trim().is_empty() || ask.prompt.chars().count() > PROMPT_CHARS_MAX {
        return Err(ApiError::invalid(format!(
            "prompt: 1 to {PROMPT_CHARS_MAX} characters"
        )));
    }
    let (key, new) = playground_key(&app, account).await?;
    let body = serde_json::json!({
        "model": ask.model,
        "messages": [{"role": "user", "content": ask.prompt}],
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let url = format!(
        "{}/chat/completions",
        app.web.gateway_url.trim_end_matches('/')
    );
    // A key just made reaches the proxies with the next configuration push (milliseconds):
    // until then they answer 401, so a new key is retried for up to two seconds.
    let mut tries = if new { 20 } else { 1 };
    let resp = loop {
        tries -= 1;
        let resp = app
            .web_client
            .post(&url)
            .bearer_auth(key.as_str())
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(message = "Playground: the gateway did not answer.", error = %e.without_url());
                ApiError::unavailable("the gateway did not answer; try again")
            })?;
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED || tries == 0 {
            break resp;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if !status.is_success() {
        // The gateway's own error (402 insufficient_quota, 404 unknown model, …) as it said it.
        let text = resp.text().await.unwrap_or_default();
        return Ok((status, [(header::CONTENT_TYPE, "application/json")], text).into_response());
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(resp.bytes_stream()),
    )
        .into_response())
}

/// The account's playground key, made (and sealed) on first use or when the last one was
/// revoked or no longer opens; `true` when it was made now.
async fn playground_key(
    app: &App,
    account: &Account,
) -> Result<(zeroize::Zeroizing<String>, bool), ApiError> {
    if let Some((key_id, sealed)) = app
        .store
        .playground_key(&account.id)
        .await
        .map_err(ApiError::store("key"))?
    {
        if let Ok(plain) = app.keyring.open(&key_id, &sealed) {
            if let Ok(secret) = String::from_utf8(plain.to_vec()) {
                return Ok((zeroize::Zeroizing::new(secret), false));
            }
        }
    }
    let created = issue_key(
        app,
        account,
        NewKey {
            name: "playground".to_owned(),
            allowed_models: None,
            spend_cap_micros: None,
            requests_per_minute: None,
        },
    )
    .await?;
    let sealed = app
        .keyring
        .seal(&created.key.id, created.secret.as_bytes())
        .map_err(|_| ApiError::internal())?;
    app.store
        .set_playground_key(&account.id, &created.key.id, &sealed)
        .await
        .map_err(ApiError::store("key"))?;
    Ok((zeroize::Zeroizing::new(created.secret), true))
}
