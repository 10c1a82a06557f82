//! The frame every page shares (head, navigation, footer), its stylesheet and its script.

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use maud::{html, Markup, DOCTYPE};

use super::Visit;

const CSS: &str = include_str!("static/app.css");
const JS: &str = include_str!("static/app.js");

pub async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        CSS,
    )
}

pub async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        JS,
    )
}

/// The page around `body`. `csrf` is the token the navigation's sign-out form carries.
pub fn shell(visit: Option<&Visit>, csrf: &str, title: &str, body: Markup) -> Markup {
    let signed_in = visit.and_then(|v| v.session.as_ref()).is_some();
    let person = visit.and_then(Visit::account);
    let operator = visit.is_some_and(Visit::operator);
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · tokn$" }
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    nav aria-label="Main" {
                        a.brand href="/" { "tokn$" }
                        a href="/models" { "Models" }
                        a href="/docs" { "Docs" }
                        @if let Some(account) = person {
                            @if account.role.buys() {
                                a href="/app" { "Wallet & keys" }
                                a href="/app/playground" { "Playground" }
                                a href="/app/usage" { "Usage" }
                            }
                            @if account.role.sells() {
                                a href="/sell" { "Selling" }
                            }
                        }
                        @if operator {
                            a href="/operator" { "Operator" }
                        }
                        span.spacer {}
                        @if signed_in {
                            @if let Some(account) = person {
                                span.who { (account.email) }
                            }
                            form.inline method="post" action="/signout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button.link type="submit" { "Sign out" }
                                @if person.is_some() {
                                    button.link type="submit" formaction="/signout/everywhere" { "Sign out everywhere" }
                                }
                            }
                        } @else {
                            a.button href="/signin" { "Sign in" }
                        }
                    }
                }
                main #main { (body) }
                footer {
                    p { "tokn$ — one OpenAI-compatible API for every model, at less than list price." }
                }
            }
        }
    }
}

pub fn error_body(status: StatusCode, message: &str) -> Markup {
    html! {
        section.card {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("Error")) }
            p role="alert" { (message) }
            p { a href="/" { "Back to the start" } }
        }
    }
}

/// A bar chart as SVG (no script): one bar per `(label, value)`, values drawn by `show`; the
/// numbers are also in the bars' titles and in a table for screen readers.
pub fn bar_chart(title: &str, bars: &[(String, i64)], show: fn(i64) -> String) -> Markup {
    const W: i64 = 720;
    const H: i64 = 200;
    const TOP: i64 = 20;
    const BASE: i64 = 170;
    let most = bars.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let n = i64::try_from(bars.len()).unwrap_or(1).max(1);
    let step = W / n;
    let bar_w = (step * 7 / 10).max(2);
    // At most about a dozen labels, the last bar's always among them.
    let every = (n + 11) / 12;
    html! {
        figure.chart-figure {
            svg.chart viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(title) {
                title { (title) }
                line x1="0" y1=(BASE) x2=(W) y2=(BASE) stroke="#8a94a3" {}
                @for (i, (label, value)) in bars.iter().enumerate() {
                    @let i = i64::try_from(i).unwrap_or(0);
                    @let h = (BASE - TOP) * (*value).max(0) / most;
                    @let x = i * step + (step - bar_w) / 2;
                    rect x=(x) y=(BASE - h) width=(bar_w) height=(h) fill="#0b5fff" {
                        title { (label) ": " (show(*value)) }
                    }
                    @if (n - 1 - i) % every == 0 {
                        text x=(x + bar_w / 2) y=(BASE + 16) text-anchor="middle" font-size="11" fill="#4a5361" { (label) }
                    }
                }
                text x="4" y="14" font-size="11" fill="#4a5361" { "max " (show(most)) }
            }
            table.visually-hidden {
                caption { (title) }
                tbody { @for (label, value) in bars { tr { th scope="row" { (label) } td { (show(*value)) } } } }
            }
        }
    }
}

/// A form's email field and its buyer/seller choice (`role_label` names the choice).
pub fn email_and_role(role_label: &str) -> Markup {
    html! {
        label for="email" { "Email" }
        input #email type="email" name="email" required autocomplete="email" maxlength="254";
        label for="role" { (role_label) }
        select #role name="role" {
            option value="buyer" { "buy tokens" }
            option value="seller" { "sell spare provider credit" }
            option value="both" { "both" }
        }
    }
}

/// A hidden CSRF field for a form of this visit.
pub fn csrf_field(visit: &Visit) -> Markup {
    html! { input type="hidden" name="csrf" value=(visit.csrf()); }
}
