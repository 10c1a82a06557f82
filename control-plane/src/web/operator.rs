//! The operator's page (an operator session, from a link the admin token mints): accounts, the
//! waitlist, the ledger check, the usage drain, payouts (with a run on demand) and, on a build
//! without mail, the outbox.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use maud::html;

use super::{page, see_other, usd, FormPairs, Visit, WebResult};
use crate::api::ApiError;
use crate::units::utc_time;
use crate::App;

/// Rows of each list on the page.
const ROWS: u32 = 100;

/// The operator's pages are not there for anyone else: as if they did not exist.
fn operator(visit: &Visit) -> WebResult<()> {
    if visit.operator() {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such page").into())
    }
}

pub async fn home(visit: Visit, State(app): State<Arc<App>>) -> WebResult {
    operator(&visit)?;
    let store = |what| ApiError::store(what);
    let awaiting = app
        .store
        .awaiting_approval(ROWS)
        .await
        .map_err(store("credential"))?;
    let accounts = app
        .store
        .accounts(None, ROWS)
        .await
        .map_err(store("account"))?;
    let waitlist = app
        .store
        .waitlist(None, ROWS)
        .await
        .map_err(store("waitlist"))?;
    let outbox = app.store.outbox(20).await.map_err(store("outbox"))?;
    let imbalance = app
        .store
        .ledger_imbalance()
        .await
        .map_err(store("ledger"))?;
    let drain = *crate::lock(&app.drain);
    let payouts = match &app.payments {
        Some(_) => Some(
            app.store
                .payouts(None, ROWS)
                .await
                .map_err(store("payout"))?,
        ),
        None => None,
    };
    let body = html! {
        h1 { "Operator" }
        div.grid {
            section.card {
                h2 { "Ledger" }
                @if imbalance == 0 {
                    p.good { "Balanced: every transaction's postings sum to zero." }
                } @else {
                    p.bad role="alert" { "Out of balance by " (usd(imbalance)) "." }
                }
            }
            section.card {
                h2 { "Usage drain" }
                p { (drain.applied) " records applied, " (drain.duplicates) " redeliveries skipped since start." }
                p { "Last batch lag: " (drain.last_batch_lag_ms) " ms" }
            }
        }
        section.card #approvals {
            h2 { "Endpoints awaiting approval" }
            p.muted { "A credential whose endpoint its seller chose serves only once approved: its answers decide what buyers are billed." }
            @if awaiting.is_empty() { p { "None." } }
            @for c in &awaiting {
                article.card {
                    p { strong { (c.label) } " · " (c.provider) " · seller " code { (c.account_id) } }
                    pre { (serde_json::to_string_pretty(&c.public).unwrap_or_default()) }
                    form.inline method="post" action=(format!("/operator/credentials/{}/approve", c.id)) {
                        (super::layout::csrf_field(&visit))
                        button type="submit" { "Approve " (c.label) }
                    }
                }
            }
        }
        section.card #payouts {
            h2 { "Payouts" }
            @match &payouts {
                None => { p.muted { "Payments are off (no [stripe] in the configuration)." } }
                Some(list) => {
                    p.muted { "Sellers are paid weekly what they earned before the hold; a run pays now what is payable, once per name." }
                    form.inline method="post" action="/operator/payouts/run" {
                        (super::layout::csrf_field(&visit))
                        button type="submit" { "Run payouts now" }
                    }
                    @if list.is_empty() { p { "None yet." } } @else {
                        div.table-wrap { table {
                            thead { tr { th scope="col" { "Seller" } th scope="col" { "Amount" } th scope="col" { "Status" } th scope="col" { "Run" } th scope="col" { "Made" } } }
                            tbody { @for p in list { tr {
                                td { code { (p.account_id) } }
                                td { (format!("${}.{:02}", p.amount_cents / 100, p.amount_cents % 100)) }
                                td { (p.status) @if let Some(e) = &p.last_error { " — " (e) } }
                                td { (p.run) }
                                td { (utc_time(p.created_at_ms)) }
                            } } }
                        } }
                    }
                }
            }
        }
        section.card {
            h2 { "Accounts" }
            div.table-wrap { table {
                thead { tr { th scope="col" { "Email" } th scope="col" { "Role" } th scope="col" { "Status" } th scope="col" { "Since" } } }
                tbody { @for a in &accounts { tr {
                    td { (a.email) } td { (a.role.as_str()) } td { (a.status.as_str()) } td { (utc_time(a.created_at_ms)) }
                } } }
            } }
        }
        section.card {
            h2 { "Waitlist" }
            p { a href="/v1/admin/waitlist/export" { "Export as CSV" } " (with the admin token)" }
            div.table-wrap { table {
                thead { tr { th scope="col" { "Email" } th scope="col" { "Role" } th scope="col" { "Signed up" } } }
                tbody { @for w in &waitlist { tr {
                    td { (w.email) } td { (w.role.as_str()) } td { (utc_time(w.created_at_ms)) }
                } } }
            } }
        }
        section.card #outbox {
            h2 { "Outbox" }
            p.muted { "Mail this build keeps instead of sending (sign-in links): newest first." }
            @for m in &outbox {
                article.card {
                    p { strong { (m.subject) } " to " (m.recipient) " · " (utc_time(m.created_at_ms)) }
                    pre { (m.body) }
                }
            }
        }
    };
    Ok(page(&visit, "Operator", body))
}

pub async fn approve(
    visit: Visit,
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    form: FormPairs,
) -> WebResult {
    operator(&visit)?;
    visit.check_csrf(form.get("csrf"))?;
    crate::api::admin::approve(&app, &id).await?;
    Ok(see_other(&visit, "/operator"))
}

/// Runs payouts now, as the weekly schedule does (what is payable, past the hold), and shows
/// what the run did.
pub async fn run_payouts(visit: Visit, State(app): State<Arc<App>>, form: FormPairs) -> WebResult {
    operator(&visit)?;
    visit.check_csrf(form.get("csrf"))?;
    let report = crate::api::payouts::run_now(&app, None).await?;
    let body = html! {
        h1 { "Payouts run" }
        section.card role="status" {
            p { "Run " strong { (report.run.as_deref().unwrap_or("")) } ": " (report.created) " made, " (report.sent) " sent, "
                (report.paid) " paid, " (report.waiting) " waiting, " (report.failed) " failed." }
            p { a href="/operator#payouts" { "Back to the operator's page" } }
        }
    };
    Ok(page(&visit, "Payouts run", body))
}
