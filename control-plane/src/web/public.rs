//! Pages anyone may read: the landing page (with the savings estimate), the models and their
//! prices from the live catalog, the API docs, and the waitlist.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{csrf_field, email_and_role};
use super::{page, usd, Visit, WebForm, WebResult};
use crate::api::catalog::{entries, CatalogEntry};
use crate::api::waitlist::Source;
use crate::store::Role;
use crate::App;

/// The models buyers can name now: each model's price version in force (the newest that has
/// taken effect), sorted by id.
async fn live_models(app: &App) -> WebResult<Vec<CatalogEntry>> {
    let now = crate::store::now_ms();
    let mut latest: BTreeMap<String, CatalogEntry> = BTreeMap::new();
    for e in entries(app).await? {
        if e.price.effective_at_ms > now {
            continue;
        }
        match latest.get(&e.price.model_id) {
            Some(held) if held.price.version >= e.price.version => {}
            _ => {
                latest.insert(e.price.model_id.clone(), e);
            }
        }
    }
    Ok(latest.into_values().collect())
}

/// Each live model's list prices per 1M tokens (input, output), micro-USD.
pub async fn list_prices(app: &App) -> WebResult<BTreeMap<String, (i64, i64)>> {
    Ok(live_models(app)
        .await?
        .into_iter()
        .map(|m| {
            (
                m.price.model_id,
                (
                    m.price.input_price_micros_per_mtok,
                    m.price.output_price_micros_per_mtok,
                ),
            )
        })
        .collect())
}

/// What buyers pay as a share of list price now, parts per million: the pools first in each
/// model's queue, weighted by the face value they have left. `None` without supply.
fn average_ratio_ppm(models: &[CatalogEntry]) -> Option<i64> {
    let (mut weighted, mut weight) = (0i128, 0i128);
    for s in models.iter().filter_map(|m| m.supply.as_ref()) {
        let w = i128::from(s.face_value_left_micros.max(1));
        weighted += i128::from(s.price_ratio_ppm) * w;
        weight += w;
    }
    (weight > 0).then(|| i64::try_from(weighted / weight).unwrap_or(1_000_000))
}

pub async fn landing(visit: Visit, State(app): State<Arc<App>>) -> WebResult {
    let models = live_models(&app).await?;
    let ratio = average_ratio_ppm(&models);
    let gateway = &app.web.gateway_url;
    let body = html! {
        section.hero {
            h1 { "Every model, one API, less than list price." }
            p.lead {
                "tokn$ is an OpenAI-compatible gateway and a marketplace: buyers call every "
                "provider's models through one base URL and pay less than list price per token; "
                "sellers turn spare provider credits into cash."
            }
            a.button href="/signin" { "Start with free credit" }
            " "
            a href="/waitlist" { "or join the waitlist" }
        }
        div.grid {
            section.card {
                h2 { "For buyers" }
                ul {
                    li { "Prepay credit, get an API key, name the model per request." }
                    li { "OpenAI, Anthropic, Bedrock, Vertex, Gemini and Azure models behind one URL." }
                    li { "Every answer says what it cost and what it would have cost at list price." }
                }
            }
            section.card {
                h2 { "For sellers" }
                ul {
                    li { "List a provider credential's spare credit with a face value and a price." }
                    li { "Pools are consumed first in, first out; every token is metered." }
                    li { "Earnings settle per request; payouts go out weekly." }
                }
            }
        }
        section.card {
            h2 { "Switch with one line" }
            pre { code { "from openai import OpenAI\n\nclient = OpenAI(base_url=\"" (gateway) "\", api_key=\"tok_live_…\")" } }
        }
        (estimator(ratio))
    };
    Ok(page(&visit, "LLM tokens for less", body))
}

/// The monthly-spend slider: what the same tokens cost through tokn$ at today's average ratio.
fn estimator(ratio_ppm: Option<i64>) -> Markup {
    html! {
        section.card #savings {
            h2 { "What would you save?" }
            @if let Some(ratio) = ratio_ppm {
                div data-estimator="" data-ratio-ppm=(ratio) {
                    label for="spend" { "Your monthly spend at list price" }
                    input #spend type="range" min="100" max="100000" step="100" value="5000";
                    p {
                        "At list price " strong data-out="spend" { "$5,000" }
                        "; through tokn$ " strong data-out="tokn" {}
                        " — you keep " strong.good data-out="saving" {} " a month."
                    }
                    p.muted {
                        "Today buyers pay " (ratio / 10_000) "." (format!("{:02}", ratio % 10_000 / 100))
                        "% of list price on average (the pools first in each model's queue, weighted by the credit they hold)."
                    }
                }
            } @else {
                p { "No seller lists credit yet, so there is no price to estimate from." }
            }
        }
    }
}

pub async fn models(visit: Visit, State(app): State<Arc<App>>) -> WebResult {
    let models = live_models(&app).await?;
    let per_m = |v: Option<i64>| v.map_or_else(|| "—".to_owned(), usd);
    let body = html! {
        h1 { "Models and prices" }
        p { "Per 1M tokens. The tokn$ price is list price times the ratio of the pool first in the model's queue; it is what the next request pays." }
        div.table-wrap {
            table {
                caption.muted { "Live catalog" }
                thead { tr {
                    th scope="col" { "Model" } th scope="col" { "Provider" }
                    th.num scope="col" { "List input" } th.num scope="col" { "List output" }
                    th.num scope="col" { "tokn$ input" } th.num scope="col" { "tokn$ output" }
                    th.num scope="col" { "Pools" }
                } }
                tbody {
                    @for m in &models {
                        tr {
                            td { code { (m.price.model_id) } }
                            td { (m.price.provider) }
                            td.num { (usd(m.price.input_price_micros_per_mtok)) }
                            td.num { (usd(m.price.output_price_micros_per_mtok)) }
                            td.num { (per_m(m.buyer_input_price_micros_per_mtok)) }
                            td.num { (per_m(m.buyer_output_price_micros_per_mtok)) }
                            td.num { (m.supply.as_ref().map_or(0, |s| s.live_pools)) }
                        }
                    }
                }
            }
        }
    };
    Ok(page(&visit, "Models", body))
}

pub async fn docs(visit: Visit, State(app): State<Arc<App>>) -> WebResult {
    let base = &app.web.gateway_url;
    let body = html! {
        h1 { "API" }
        section.card {
            h2 { "Base URL and authentication" }
            p { "Base URL: " code { (base) } ". Send your key as " code { "Authorization: Bearer tok_live_…" } " (or " code { "x-api-key" } ")." }
            pre { code { "curl " (base) "/chat/completions \\\n  -H \"Authorization: Bearer $TOKN_KEY\" -H \"Content-Type: application/json\" \\\n  -d '{\"model\": \"mock\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'" } }
            p { "The same URL speaks OpenAI's Chat Completions, Responses and Embeddings APIs and Anthropic's Messages API (" code { "ANTHROPIC_BASE_URL" } " is the URL without " code { "/v1" } ")." }
        }
        section.card {
            h2 { "What a request cost" }
            ul {
                li { code { "x-tokn-cost-micros" } ": what you paid for the answer, in micro-USD (1,000,000 = $1)." }
                li { code { "x-tokn-balance-micros" } ": your wallet's available balance after it." }
                li { "In a stream (with " code { "stream_options: {\"include_usage\": true}" } "), the last chunk's " code { "usage" } " carries " code { "cost_micros" } ", " code { "list_cost_micros" } " (the same tokens at list price) and " code { "balance_micros" } "." }
            }
        }
        section.card {
            h2 { "Errors" }
            p { "Errors are OpenAI error bodies: " code { "{\"error\": {\"message\", \"type\", \"param\", \"code\"}}" } "." }
            div.table-wrap { table {
                thead { tr { th scope="col" { "Status" } th scope="col" { "Meaning" } } }
                tbody {
                    tr { td { "400" } td { "The body is malformed or names an unknown parameter." } }
                    tr { td { "401" } td { "No key, or a key that is not valid." } }
                    tr { td { "402" } td { code { "insufficient_quota" } ": your balance cannot cover the request; nothing was sent upstream." } }
                    tr { td { "404" } td { "Unknown model (or one your key may not use)." } }
                    tr { td { "429" } td { "Your key's rate limit; " code { "retry-after" } " says when." } }
                    tr { td { "503" } td { "No pool can serve the model now; " code { "retry-after" } " says when to try again." } }
                }
            } }
        }
        p { a href="/models" { "Models and prices" } }
    };
    Ok(page(&visit, "API docs", body))
}

fn waitlist_form(visit: &Visit) -> Markup {
    html! {
        form.card method="post" action="/waitlist" {
            (csrf_field(visit))
            (email_and_role("I want to"))
            button type="submit" { "Join the waitlist" }
        }
    }
}

pub async fn waitlist(visit: Visit) -> WebResult {
    let body = html! {
        h1 { "Early access" }
        p { "Leave your address and we will write when your place comes up." }
        (waitlist_form(&visit))
    };
    Ok(page(&visit, "Waitlist", body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinForm {
    csrf: String,
    email: String,
    role: Role,
}

pub async fn join_waitlist(
    visit: Visit,
    Source(source): Source,
    State(app): State<Arc<App>>,
    WebForm(form): WebForm<JoinForm>,
) -> WebResult<Response> {
    visit.check_csrf(&form.csrf)?;
    crate::api::waitlist::sign_up(&app, source, &form.email, form.role).await?;
    let body = html! {
        h1 { "You are on the list" }
        p.notice role="status" { "Thank you. We will write to you when your place comes up." }
    };
    Ok(page(&visit, "Waitlist", body))
}
