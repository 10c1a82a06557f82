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

/// A hidden CSRF field for a form of this visit.
pub fn csrf_field(visit: &Visit) -> Markup {
    html! { input type="hidden" name="csrf" value=(visit.csrf()); }
}
