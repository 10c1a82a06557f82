//! The buyer's pages: the wallet (balance and statement) and API keys (made, shown once,
//! revoked). Every id in a URL is looked up within the signed-in account: another account's
//! id is a 404, like one that does not exist.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use maud::html;
use serde::Deserialize;

use super::layout::csrf_field;
use super::{page, see_other, usd, Visit, WebForm, WebResult};
use crate::api::buyer::{issue_key, withdraw_key, NewKey};
use crate::api::ApiError;
use crate::units::{dollars_to_micros, utc_time};
use crate::App;

/// Statement lines shown on the dashboard.
const STATEMENT_LINES: u32 = 25;

pub async fn home(visit: Visit, State(app): State<Arc<App>>) -> WebResult {
    let account = visit.person()?;
    if !account.role.buys() {
        return Ok(see_other(&visit, "/sell"));
    }
    let balance = app
        .store
        .balance(&account.id)
        .await
        .map_err(ApiError::store("wallet"))?;
    let entries = app
        .store
        .wallet_entries(&account.id, STATEMENT_LINES)
        .await
        .map_err(ApiError::store("wallet"))?;
    let keys = app
        .store
        .keys(&account.id, app.limits.list_items_max)
        .await
        .map_err(ApiError::store("key"))?;
    let packs = match &app.payments {
        Some(_) => app
            .store
            .packs(false)
            .await
            .map_err(ApiError::store("pack"))?,
        None => Vec::new(),
    };
    let body = html! {
        h1 { "Wallet & keys" }
        div.grid {
            section.card aria-labelledby="balance-h" {
                h2 #balance-h { "Balance" }
                p.big #balance data-balance-micros=(balance) { (usd(balance)) }
                p { a href="/app/playground" { "Try a model in the playground" } }
            }
            section.card aria-labelledby="newkey-h" {
                h2 #newkey-h { "New API key" }
                form method="post" action="/app/keys" {
                    (csrf_field(&visit))
                    label for="key-name" { "Name" }
                    input #key-name type="text" name="name" maxlength="128" placeholder="e.g. laptop";
                    label for="key-rpm" { "Requests a minute (optional)" }
                    input #key-rpm type="number" name="requests_per_minute" min="1" max="1000000";
                    label for="key-cap" { "Spend cap in dollars (optional)" }
                    input #key-cap type="number" name="spend_cap_usd" min="0" step="0.01";
                    button type="submit" { "Create key" }
                }
            }
        }
        @if !packs.is_empty() {
            section.card aria-labelledby="packs-h" {
                h2 #packs-h { "Buy credit" }
                div.grid { @for p in &packs {
                    form method="post" action=(format!("/app/packs/{}", p.id)) {
                        (csrf_field(&visit))
                        p { strong { (p.name) } br; (usd(p.credit_micros)) " of credit for " (cents(p.price_cents)) " " (p.currency.to_uppercase()) }
                        button type="submit" aria-label=(format!("Buy {}", p.name)) { "Buy" }
                    }
                } }
                p.muted { "Payment by Stripe Checkout; the credit arrives when Stripe confirms the payment. " a href="/app/purchases" { "Your purchases" } }
            }
        }
        section.card aria-labelledby="keys-h" {
            h2 #keys-h { "API keys" }
            @if keys.is_empty() {
                p { "No keys yet." }
            } @else {
                div.table-wrap { table {
                    thead { tr {
                        th scope="col" { "Name" } th scope="col" { "Key" } th scope="col" { "Limits" }
                        th scope="col" { "Created" } th scope="col" { "State" }
                    } }
                    tbody {
                        @for k in &keys {
                            tr {
                                td { (k.name) }
                                td { code { (k.lookup_prefix) "…" } }
                                td {
                                    @if let Some(r) = k.requests_per_minute { (r) "/min " }
                                    @if let Some(c) = k.spend_cap_micros { "cap " (usd(c)) }
                                }
                                td { (utc_time(k.created_at_ms)) }
                                td {
                                    @if k.revoked_at_ms.is_some() {
                                        span.muted { "revoked" }
                                    } @else {
                                        form.inline method="post" action=(format!("/app/keys/{}/revoke", k.id)) {
                                            (csrf_field(&visit))
                                            button.danger type="submit" aria-label=(format!("Revoke key {}", k.name)) { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                } }
            }
        }
        section.card aria-labelledby="statement-h" {
            h2 #statement-h { "Statement" }
            div.table-wrap { table {
                thead { tr {
                    th scope="col" { "When (UTC)" } th scope="col" { "What" }
                    th scope="col" { "Detail" } th.num scope="col" { "Amount" }
                } }
                tbody {
                    @for e in &entries {
                        tr {
                            td { (utc_time(e.created_at_ms)) }
                            td { (e.kind.replace('_', " ")) }
                            td { (e.memo) }
                            td.num.good[e.amount_micros > 0] { (usd(e.amount_micros)) }
                        }
                    }
                }
            } }
        }
    };
    Ok(page(&visit, "Wallet & keys", body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyForm {
    csrf: String,
    #[serde(default)]
    name: String,
    /// Empty when the field was left blank.
    #[serde(default)]
    requests_per_minute: String,
    #[serde(default)]
    spend_cap_usd: String,
}

/// A blank field is absent; anything else is read by `parse`.
fn optional<T>(
    field: &str,
    text: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ApiError> {
    match text.trim() {
        "" => Ok(None),
        t => parse(t)
            .map(Some)
            .map_err(|why| ApiError::invalid(format!("{field}: {why}"))),
    }
}

pub async fn create_key(
    visit: Visit,
    State(app): State<Arc<App>>,
    WebForm(form): WebForm<KeyForm>,
) -> WebResult {
    let account = visit.person()?;
    visit.check_csrf(&form.csrf)?;
    let rpm = optional("requests_per_minute", &form.requests_per_minute, |t| {
        t.parse::<i64>().map_err(|_| "a whole number".to_owned())
    })?;
    let cap = optional("spend_cap_usd", &form.spend_cap_usd, dollars_to_micros)?;
    let created = issue_key(
        &app,
        account,
        NewKey {
            name: form.name,
            allowed_models: None,
            spend_cap_micros: cap,
            requests_per_minute: rpm,
        },
    )
    .await?;
    let base = &app.web.gateway_url;
    let body = html! {
        h1 { "Your new key" }
        section.card {
            p role="status" { strong { "Copy it now: it is shown this once." } " We keep only its hash." }
            p.secret #secret { (created.secret) }
            h2 { "Use it" }
            pre { code { "from openai import OpenAI\n\nclient = OpenAI(base_url=\"" (base) "\", api_key=\"" (created.secret) "\")\nprint(client.chat.completions.create(model=\"mock\", messages=[{\"role\": \"user\", \"content\": \"Hi\"}]).choices[0].message.content)" } }
            p { a href="/app" { "Back to your keys" } }
        }
    };
    Ok(page(&visit, "New key", body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsrfOnly {
    csrf: String,
}

pub async fn revoke_key(
    visit: Visit,
    State(app): State<Arc<App>>,
    Path(key_id): Path<String>,
    WebForm(form): WebForm<CsrfOnly>,
) -> WebResult {
    let account = visit.person()?;
    visit.check_csrf(&form.csrf)?;
    withdraw_key(&app, &account.id, &key_id).await?;
    Ok(see_other(&visit, "/app"))
}

/// Cents as `12.34`.
fn cents(c: i64) -> String {
    format!("{}.{:02}", c / 100, c.rem_euclid(100))
}

pub async fn buy_pack(
    visit: Visit,
    State(app): State<Arc<App>>,
    Path(pack_id): Path<String>,
    WebForm(form): WebForm<CsrfOnly>,
) -> WebResult {
    let account = visit.person()?;
    visit.check_csrf(&form.csrf)?;
    let started = crate::api::payments::start_purchase(&app, account, &pack_id).await?;
    // Off to Stripe's page; it sends the buyer back to the purchases page.
    Ok(axum::response::Redirect::to(&started.checkout_url).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Returned {
    /// Stripe's Checkout Session id, when Stripe sent the buyer back.
    session: Option<String>,
}

/// The account's purchases; the one Stripe just sent the buyer back from first.
pub async fn purchases(
    visit: Visit,
    State(app): State<Arc<App>>,
    crate::api::QueryParams(back): crate::api::QueryParams<Returned>,
) -> WebResult {
    let account = visit.person()?;
    let list = app
        .store
        .purchases(&account.id, 50)
        .await
        .map_err(ApiError::store("purchase"))?;
    let returned = back.session.as_deref().and_then(|id| {
        list.iter()
            .find(|p| p.stripe_session_id.as_deref() == Some(id))
    });
    let body = html! {
        h1 { "Purchases" }
        @if let Some(p) = returned {
            @if p.status == "paid" {
                p.notice role="status" #purchase-status { "Paid: " (usd(p.credit_micros)) " of credit is in your wallet." }
            } @else {
                p.notice role="status" #purchase-status { "Stripe has not confirmed the payment yet (" (p.status) "); the credit arrives when it does. Reload to see." }
            }
        }
        div.table-wrap { table {
            thead { tr { th scope="col" { "When (UTC)" } th.num scope="col" { "Paid" } th.num scope="col" { "Credit" } th scope="col" { "State" } } }
            tbody { @for p in &list { tr {
                td { (utc_time(p.created_at_ms)) } td.num { (cents(p.price_cents)) " " (p.currency.to_uppercase()) }
                td.num { (usd(p.credit_micros)) } td { (p.status) }
            } } }
        } }
        p { a href="/app" { "Back to the wallet" } }
    };
    Ok(page(&visit, "Purchases", body))
}

/// Days the usage page shows.
const USAGE_DAYS: i64 = 30;

/// Usage by day, model and key over the last 30 days, from the daily roll-up (never a scan of
/// the usage journal): cost and tokens per day as charts, then tables per model and per key.
pub async fn usage(visit: Visit, State(app): State<Arc<App>>) -> WebResult {
    const DAY: i64 = 86_400_000;
    let account = visit.person()?;
    let today = crate::store::now_ms().div_euclid(DAY) * DAY;
    let since = today - (USAGE_DAYS - 1) * DAY;
    let rows = app
        .store
        .daily_usage(&account.id, since)
        .await
        .map_err(ApiError::store("usage"))?;
    let keys = app
        .store
        .keys(&account.id, app.limits.list_items_max)
        .await
        .map_err(ApiError::store("key"))?;
    let mut cost_per_day = vec![0i64; USAGE_DAYS as usize];
    let mut tokens_per_day = vec![0i64; USAGE_DAYS as usize];
    // name → [requests, input, output, cost]
    let mut by_model: std::collections::BTreeMap<&str, [i64; 4]> = Default::default();
    let mut by_key: std::collections::BTreeMap<&str, [i64; 4]> = Default::default();
    for r in &rows {
        let i = usize::try_from((r.day_ms - since) / DAY)
            .unwrap_or(0)
            .min(cost_per_day.len() - 1);
        cost_per_day[i] += r.cost_micros;
        tokens_per_day[i] += r.input_tokens + r.output_tokens;
        for sums in [
            by_model.entry(&r.model).or_default(),
            by_key.entry(&r.key_id).or_default(),
        ] {
            sums[0] += r.requests;
            sums[1] += r.input_tokens;
            sums[2] += r.output_tokens;
            sums[3] += r.cost_micros;
        }
    }
    let label = |i: usize| utc_time(since + i as i64 * DAY)[5..10].to_owned();
    let cost_bars: Vec<(String, i64)> = cost_per_day
        .iter()
        .enumerate()
        .map(|(i, v)| (label(i), *v))
        .collect();
    let token_bars: Vec<(String, i64)> = tokens_per_day
        .iter()
        .enumerate()
        .map(|(i, v)| (label(i), *v))
        .collect();
    let key_name = |id: &str| {
        keys.iter().find(|k| k.id == id).map_or_else(
            || id.to_owned(),
            |k| format!("{} ({}…)", k.name, k.lookup_prefix),
        )
    };
    let table = |rows: &std::collections::BTreeMap<&str, [i64; 4]>,
                 what: &str,
                 name: &dyn Fn(&str) -> String| {
        html! {
            div.table-wrap { table {
                thead { tr {
                    th scope="col" { (what) } th.num scope="col" { "Requests" } th.num scope="col" { "Input tokens" }
                    th.num scope="col" { "Output tokens" } th.num scope="col" { "Cost" }
                } }
                tbody { @for (k, v) in rows { tr {
                    td { (name(k)) } td.num { (v[0]) } td.num { (v[1]) } td.num { (v[2]) } td.num { (usd(v[3])) }
                } } }
            } }
        }
    };
    let body = html! {
        h1 { "Usage, last 30 days" }
        section.card { h2 { "Cost per day" } (super::layout::bar_chart("Cost per day, last 30 days", &cost_bars, usd)) }
        section.card { h2 { "Tokens per day" } (super::layout::bar_chart("Tokens per day, last 30 days", &token_bars, |t| t.to_string())) }
        section.card #by-model { h2 { "By model" } (table(&by_model, "Model", &|m: &str| m.to_owned())) }
        section.card #by-key { h2 { "By key" } (table(&by_key, "Key", &key_name)) }
    };
    Ok(page(&visit, "Usage", body))
}
