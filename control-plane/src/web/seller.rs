//! The seller's pages: connect a provider credential (only the fields that provider needs,
//! with the least access to grant), its verification, the pools listed on it (face value, the
//! price as a share of list and what buyers pay per model, status, place in each model's FIFO
//! queue, consumed and left, expiry), earnings per pool and week, and payouts.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::response::Redirect;
use maud::{html, Markup};
use serde_json::{Map, Value};

use super::layout::{bar_chart, csrf_field};
use super::{page, see_other, usd, FormPairs, Visit, WebResult};
use crate::api::seller::{
    add_credential, check_credential, earnings_of, list_pool, NewCredential, NewPoolRequest,
};
use crate::api::ApiError;
use crate::store::Account;
use crate::units::utc_time;
use crate::units::{date_ms, dollars_to_micros};
use crate::App;

/// A provider a seller can connect: the form's fields and what access to grant.
struct Provider {
    id: &'static str,
    name: &'static str,
    /// (field, label, secret, required)
    fields: &'static [(&'static str, &'static str, bool, bool)],
    access: &'static str,
}

const PROVIDERS: &[Provider] = &[
    Provider {
        id: "openai",
        name: "OpenAI",
        fields: &[
            ("api_key", "API key", true, true),
            ("organization", "Organization id (optional)", false, false),
            ("base_url", "Base URL (optional; another endpoint needs the operator's approval)", false, false),
        ],
        access: "A project key restricted to Model capabilities (write) and Models (read) is enough; it needs no admin, files or fine-tuning access.",
    },
    Provider {
        id: "anthropic",
        name: "Anthropic",
        fields: &[
            ("api_key", "API key", true, true),
            ("base_url", "Base URL (optional)", false, false),
        ],
        access: "A standard API key of a workspace that may use the models you list; never an Admin key (sk-ant-admin…).",
    },
    Provider {
        id: "gemini",
        name: "Google Gemini API",
        fields: &[
            ("api_key", "API key", true, true),
            ("base_url", "Base URL (optional)", false, false),
        ],
        access: "An API key restricted to the Generative Language API.",
    },
    Provider {
        id: "vertex",
        name: "Google Vertex AI",
        fields: &[
            ("service_account_json", "Service account key file (JSON)", true, true),
            ("location", "Location, e.g. us-central1", false, true),
            ("project", "Project id (optional; the key file's when absent)", false, false),
        ],
        access: "A service account with the Vertex AI User role (roles/aiplatform.user) on one project, nothing more.",
    },
    Provider {
        id: "bedrock",
        name: "AWS Bedrock",
        fields: &[
            ("region", "Region, e.g. us-east-1", false, true),
            ("access_key_id", "Access key id (or use a Bedrock API key below)", false, false),
            ("secret_access_key", "Secret access key", true, false),
            ("api_key", "Bedrock API key (instead of access keys)", true, false),
        ],
        access: "An IAM user whose policy allows bedrock:InvokeModel, bedrock:InvokeModelWithResponseStream and bedrock:ListFoundationModels on the models you list.",
    },
    Provider {
        id: "azure",
        name: "Azure OpenAI",
        fields: &[
            ("endpoint", "Resource endpoint, https://….openai.azure.com", false, true),
            ("api_key", "API key", true, true),
            ("deployment", "Deployment (optional; the model's name when absent)", false, false),
        ],
        access: "A key of the resource whose deployments serve the models you list (the Cognitive Services OpenAI User role is all it needs).",
    },
];

fn provider(id: &str) -> Result<&'static Provider, ApiError> {
    PROVIDERS
        .iter()
        .find(|p| p.id == id)
        .ok_or_else(|| ApiError::not_found("provider"))
}

fn seller(visit: &Visit) -> WebResult<&Account> {
    let account = visit.person()?;
    if account.role.sells() {
        Ok(account)
    } else {
        Err(ApiError::forbidden("only seller accounts list credentials and pools").into())
    }
}

pub async fn home(visit: Visit, State(app): State<Arc<App>>) -> WebResult {
    let account = seller(&visit)?;
    let store = |what| ApiError::store(what);
    let earnings = earnings_of(&app, account).await?;
    let credentials = app
        .store
        .credentials(&account.id, app.limits.list_items_max)
        .await
        .map_err(store("credential"))?;
    let pools = app
        .store
        .pools(&account.id, app.limits.list_items_max)
        .await
        .map_err(store("pool"))?;
    let positions = app
        .store
        .fifo_positions(crate::store::now_ms())
        .await
        .map_err(store("pool"))?;
    let list_prices = crate::web::public::list_prices(&app).await?;
    let payouts = app
        .store
        .payouts(Some(&account.id), 20)
        .await
        .map_err(store("payout"))?;
    let connect = match &app.payments {
        Some(_) => app
            .store
            .connect_account(&account.id)
            .await
            .map_err(store("account"))?,
        None => None,
    };
    let weeks = last_weeks(&earnings.weeks, crate::store::now_ms());
    let body = html! {
        h1 { "Selling" }
        div.grid {
            section.card { h2 { "Earned" } p.big #earned { (usd(earnings.earned_micros)) } p.muted { "your share of every sale, all time" } }
            section.card { h2 { "Payable" } p.big { (usd(earnings.payable_micros)) } p.muted { (usd(earnings.held_micros)) " of it within the refund hold" } }
            section.card { h2 { "Paid out" } p.big { (usd(earnings.paid_micros)) } p.muted { (usd(earnings.in_transit_micros)) " on its way" } }
        }
        section.card {
            h2 { "Earnings per week" }
            (bar_chart("Earnings per week, last 12 weeks", &weeks, usd))
        }
        section.card {
            h2 { "Pools" }
            @if pools.is_empty() {
                p { "No pools yet: connect a credential, then list credit on it." }
            } @else {
                div.table-wrap { table #pools {
                    thead { tr {
                        th scope="col" { "Pool" } th scope="col" { "Status" } th.num scope="col" { "Face value" }
                        th.num scope="col" { "Consumed" } th.num scope="col" { "Left" } th.num scope="col" { "Price" }
                        th scope="col" { "Buyers pay per 1M (in / out) and queue place" } th scope="col" { "Expires" }
                    } }
                    tbody { @for p in &pools {
                        tr {
                            td { code { (p.id) } }
                            td { (p.status.as_str()) }
                            td.num { (usd(p.face_value_micros)) }
                            td.num { (usd(p.consumed_micros)) }
                            td.num { (usd((p.face_value_micros - p.consumed_micros).max(0))) }
                            td.num { (p.price_ratio_ppm / 10_000) "% of list" }
                            td { ul { @for m in &p.models {
                                li {
                                    code { (m) } ": "
                                    @if let Some((input, output)) = list_prices.get(m) {
                                        (usd(scaled(*input, p.price_ratio_ppm))) " / " (usd(scaled(*output, p.price_ratio_ppm)))
                                    }
                                    @match positions.get(&p.id).and_then(|q| q.get(m)) {
                                        Some((at, of)) => { " · " (at) " of " (of) " in the queue" }
                                        None => { " · not serving" }
                                    }
                                }
                            } } }
                            td { (p.expires_at_ms.map_or_else(|| "never".to_owned(), utc_time)) }
                        }
                    } }
                } }
            }
            @let usable: Vec<_> = credentials.iter().filter(|c| c.verify_status.as_deref().is_some_and(|s| s == "valid" || s == "unchecked")).collect();
            @if !usable.is_empty() {
                h3 { "List credit" }
                @for c in &usable {
                    p { a href=(format!("/sell/pools/new/{}", c.id)) { "List credit on " (c.label) " (" (c.provider) ")" } }
                }
            }
        }
        section.card {
            h2 { "Credentials" }
            @if !credentials.is_empty() {
                div.table-wrap { table #credentials {
                    thead { tr { th scope="col" { "Label" } th scope="col" { "Provider" } th scope="col" { "Verified" } th scope="col" { "Endpoint" } th scope="col" {} } }
                    tbody { @for c in &credentials {
                        tr {
                            td { (c.label) }
                            td { (c.provider) }
                            td { (c.verify_status.as_deref().unwrap_or("not yet")) @if let Some(t) = c.verified_at_ms { " · " (utc_time(t)) } }
                            td { @if c.custom_endpoint { @if c.approved_at_ms.is_some() { "your own, approved" } @else { "your own, awaiting the operator's approval" } } @else { "the provider's" } }
                            td { form.inline method="post" action=(format!("/sell/credentials/{}/verify", c.id)) {
                                (csrf_field(&visit))
                                button.secondary type="submit" { "Verify again" }
                            } }
                        }
                    } }
                } }
            }
            h3 { "Connect a credential" }
            ul { @for p in PROVIDERS { li { a href=(format!("/sell/connect/{}", p.id)) { (p.name) } } } }
        }
        section.card {
            h2 { "Payouts" }
            @if app.payments.is_none() {
                p { "Payouts are not configured on this marketplace yet." }
            } @else {
                @match &connect {
                    None => p { "Set up payouts with Stripe to be paid weekly." },
                    Some(c) => p { "Stripe account " code { (c.stripe_account) } ": " @if c.payouts_enabled { "payouts enabled" } @else { "onboarding not finished" } },
                }
                form method="post" action="/sell/payouts/onboard" {
                    (csrf_field(&visit))
                    button type="submit" { @if connect.is_some() { "Continue with Stripe" } @else { "Set up payouts" } }
                }
                @if !payouts.is_empty() {
                    div.table-wrap { table {
                        thead { tr { th scope="col" { "Created" } th.num scope="col" { "Amount" } th scope="col" { "State" } } }
                        tbody { @for p in &payouts { tr {
                            td { (utc_time(p.created_at_ms)) } td.num { (usd(p.amount_cents.saturating_mul(10_000))) } td { (p.status) }
                        } } }
                    } }
                }
            }
        }
    };
    Ok(page(&visit, "Selling", body))
}

const DAY_MS: i64 = 86_400_000;
const WEEK_MS: i64 = 7 * DAY_MS;

/// The last 12 weeks (Monday 00:00 UTC starts, oldest first) with what each earned, the weeks
/// without sales at zero.
fn last_weeks(weeks: &[crate::ledger::WeekEarnings], now_ms: i64) -> Vec<(String, i64)> {
    // 1970-01-05 was a Monday.
    let this_week = (now_ms - 4 * DAY_MS).div_euclid(WEEK_MS) * WEEK_MS + 4 * DAY_MS;
    (0..12)
        .rev()
        .map(|back| {
            let start = this_week - back * WEEK_MS;
            let earned = weeks
                .iter()
                .filter(|w| w.week_start_ms == start)
                .map(|w| w.earned_micros)
                .sum();
            (utc_time(start)[5..10].to_owned(), earned)
        })
        .collect()
}

/// `list` × `ratio_ppm`, rounded down.
fn scaled(list: i64, ratio_ppm: i64) -> i64 {
    i64::try_from(i128::from(list) * i128::from(ratio_ppm) / 1_000_000).unwrap_or(i64::MAX)
}

fn field_input(name: &str, label: &str, secret: bool, required: bool) -> Markup {
    let id = format!("f-{name}");
    html! {
        label for=(id) { (label) }
        @if name == "service_account_json" {
            textarea id=(id) name=(name) required[required] autocomplete="off" spellcheck="false" {}
        } @else {
            input id=(id) type=(if secret { "password" } else { "text" }) name=(name) required[required] autocomplete="off";
        }
    }
}

pub async fn connect_form(visit: Visit, Path(id): Path<String>) -> WebResult {
    seller(&visit)?;
    let p = provider(&id)?;
    let body = html! {
        h1 { "Connect " (p.name) }
        p.notice { strong { "Least access: " } (p.access) }
        form.card method="post" action="/sell/credentials" {
            (csrf_field(&visit))
            input type="hidden" name="provider" value=(p.id);
            label for="label" { "Your name for it" }
            input #label type="text" name="label" maxlength="128" required;
            @for (name, label, secret, required) in p.fields { (field_input(name, label, *secret, *required)) }
            p.muted { "Sealed at rest; never shown again, to you or anyone. We check it with one read-only call to the provider." }
            button type="submit" { "Connect and verify" }
        }
    };
    Ok(page(&visit, "Connect a credential", body))
}

pub async fn connect(visit: Visit, State(app): State<Arc<App>>, form: FormPairs) -> WebResult {
    let account = seller(&visit)?;
    visit.check_csrf(form.get("csrf"))?;
    let p = provider(form.get("provider"))?;
    // Only the provider's own fields, blanks left out: the credential's schema refuses others.
    let mut fields = Map::new();
    fields.insert("provider".to_owned(), Value::String(p.id.to_owned()));
    for (name, ..) in p.fields {
        let v = form.get(name).trim();
        if !v.is_empty() {
            fields.insert((*name).to_owned(), Value::String(v.to_owned()));
        }
    }
    let credential = serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::invalid(format!("credential: {e}")))?;
    let cred = add_credential(
        &app,
        account,
        NewCredential {
            label: form.get("label").trim().to_owned(),
            credential,
        },
    )
    .await?;
    check_credential(&app, &account.id, &cred.id).await?;
    Ok(see_other(&visit, "/sell"))
}

pub async fn verify(
    visit: Visit,
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    form: FormPairs,
) -> WebResult {
    let account = seller(&visit)?;
    visit.check_csrf(form.get("csrf"))?;
    check_credential(&app, &account.id, &id).await?;
    Ok(see_other(&visit, "/sell"))
}

pub async fn pool_form(
    visit: Visit,
    State(app): State<Arc<App>>,
    Path(credential_id): Path<String>,
) -> WebResult {
    let account = seller(&visit)?;
    let cred = app
        .store
        .credential(&account.id, &credential_id)
        .await
        .map_err(ApiError::store("credential"))?;
    let list_prices = crate::web::public::list_prices(&app).await?;
    let catalog = app.store.prices().await.map_err(ApiError::store("model"))?;
    let mut models: Vec<&str> = catalog
        .iter()
        .filter(|m| m.provider == cred.provider)
        .map(|m| m.model_id.as_str())
        .collect();
    models.sort_unstable();
    models.dedup();
    let body = html! {
        h1 { "List credit on " (cred.label) }
        form.card method="post" action="/sell/pools" {
            (csrf_field(&visit))
            input type="hidden" name="credential_id" value=(cred.id);
            label for="face" { "Face value in dollars (the list-price value of the credit you sell)" }
            input #face type="number" name="face_value_usd" min="0.01" max="1000000" step="0.01" required;
            label for="ratio" { "Price, as a percentage of list price" }
            input #ratio type="number" name="price_percent" min="1" max="100" step="0.01" value="60" required;
            label for="expires" { "Stop selling on (optional)" }
            input #expires type="date" name="expires_on";
            fieldset {
                legend { "Models" }
                @for m in &models {
                    label.check {
                        input type="checkbox" name="models" value=(m);
                        " " code { (m) }
                        @if let Some((i, o)) = list_prices.get(*m) { span.muted { " list " (usd(*i)) " / " (usd(*o)) " per 1M" } }
                    }
                }
            }
            button type="submit" { "List credit" }
        }
    };
    Ok(page(&visit, "List credit", body))
}

/// Dollars typed in a form as micro-USD.
fn micros(field: &str, text: &str) -> Result<i64, ApiError> {
    dollars_to_micros(text).map_err(|why| ApiError::invalid(format!("{field}: {why}")))
}

pub async fn create_pool(visit: Visit, State(app): State<Arc<App>>, form: FormPairs) -> WebResult {
    let account = seller(&visit)?;
    visit.check_csrf(form.get("csrf"))?;
    let expires = match form.get("expires_on").trim() {
        "" => None,
        day => {
            Some(date_ms(day).ok_or_else(|| ApiError::invalid("expires_on: a date (YYYY-MM-DD)"))?)
        }
    };
    list_pool(
        &app,
        account,
        NewPoolRequest {
            credential_id: form.get("credential_id").to_owned(),
            face_value_micros: micros("face_value_usd", form.get("face_value_usd"))?,
            // Percent with two decimals → parts per million.
            price_ratio_ppm: micros("price_percent", form.get("price_percent"))? / 100,
            models: form.all("models"),
            expires_at_ms: expires,
        },
    )
    .await?;
    Ok(see_other(&visit, "/sell"))
}

pub async fn onboard(visit: Visit, State(app): State<Arc<App>>, form: FormPairs) -> WebResult {
    let account = seller(&visit)?;
    visit.check_csrf(form.get("csrf"))?;
    let onboarding = crate::api::payouts::start_onboarding(&app, account, None).await?;
    Ok(Redirect::to(&onboarding.onboarding_url).into_response())
}

#[cfg(test)]
mod tests {
    use super::last_weeks;
    use crate::ledger::WeekEarnings;

    #[test]
    fn twelve_weeks_end_with_this_one() {
        // Monday 2026-12-07 00:00 UTC, and a Wednesday of that week.
        let monday = 1_796_601_600_000;
        let weeks = [WeekEarnings {
            week_start_ms: monday,
            requests: 3,
            earned_micros: 42,
        }];
        let shown = last_weeks(&weeks, monday + 2 * 86_400_000 + 5);
        assert_eq!(shown.len(), 12);
        assert_eq!(shown[11], ("12-07".to_owned(), 42));
        assert_eq!(shown[10], ("11-30".to_owned(), 0));
        assert_eq!(shown[0].0, "09-21");
    }
}
