//! A fake Stripe: the v1 endpoints tokn$ calls, with Stripe's wire rules enforced on what it
//! receives — a bearer secret key, a pinned `Stripe-Version`, form-encoded POST bodies parsed
//! strictly (an unknown or malformed parameter is a 400 with Stripe's error body), an
//! `Idempotency-Key` on every POST honoured as Stripe does (the same key and body replay the
//! first answer; the same key with another body is a 400 `idempotency_error`). It keeps
//! Checkout Sessions, connected accounts, transfers and the platform's balance, emits events
//! and delivers them to webhook URLs signed exactly as Stripe signs (`t=…,v1=HMAC-SHA256`), and
//! fails on demand (429, 500, an answer that never comes after the work was done,
//! `balance_insufficient`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use http::Response;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::fake::Received;
use crate::serve::{
    fake_server, full_body, html_page, json_response, lock, Body, FakeLog, FakeServer, ReadRequest,
};

/// A failure the next matching call meets.
#[derive(Debug, Clone)]
pub enum StripeFailure {
    /// Answer this status with Stripe's error body (429 `rate_limit`, 500 `api_error`).
    Status(u16),
    /// A 400 `invalid_request_error` with this code (e.g. `account_invalid`): a refusal that
    /// trying again will not change.
    Refused(&'static str),
    /// Do the work (and remember the answer under the idempotency key), then hold the answer
    /// this long before sending it: the caller cannot tell whether the call took effect.
    AnswerLate(Duration),
}

/// What the fake keeps.
pub struct StripeState {
    pub secret_key: String,
    pub api_version: String,
    pub webhook_secret: String,
    pub connect_webhook_secret: String,
    /// Where events are delivered (account endpoint, Connect endpoint).
    pub webhook_url: Option<String>,
    pub connect_webhook_url: Option<String>,
    base: String,
    log: FakeLog,
    next: u64,
    pub sessions: BTreeMap<String, Value>,
    pub accounts: BTreeMap<String, Value>,
    pub transfers: BTreeMap<String, Value>,
    pub events: Vec<Value>,
    /// The platform's available balance, cents.
    pub available_cents: i64,
    /// Calls that created a transfer (replays are not counted).
    pub transfers_made: u64,
    idempotency: HashMap<String, Remembered>,
    /// Failures for calls whose `METHOD path` starts with the key, in order.
    failures: Vec<(String, VecDeque<StripeFailure>)>,
}

struct Remembered {
    request: String,
    status: u16,
    body: Value,
}

fake_server!(
    /// A running fake Stripe; stops when dropped.
    FakeStripe = StripeState
);

/// The fake's pinned API version (what the control plane is configured to send).
pub const FAKE_STRIPE_VERSION: &str = "2026-06-24.dahlia";

impl FakeServer<StripeState> {
    /// Starts on `127.0.0.1:0` with a platform key and two webhook signing secrets.
    pub async fn start(
        secret_key: &str,
        webhook_secret: &str,
        connect_webhook_secret: &str,
    ) -> std::io::Result<Self> {
        let (key, ws, cws) = (
            secret_key.to_owned(),
            webhook_secret.to_owned(),
            connect_webhook_secret.to_owned(),
        );
        Self::serve(
            move |addr| StripeState {
                secret_key: key,
                api_version: FAKE_STRIPE_VERSION.to_owned(),
                webhook_secret: ws,
                connect_webhook_secret: cws,
                webhook_url: None,
                connect_webhook_url: None,
                base: format!("http://{addr}"),
                log: FakeLog::default(),
                next: 0,
                sessions: BTreeMap::new(),
                accounts: BTreeMap::new(),
                transfers: BTreeMap::new(),
                events: Vec::new(),
                available_cents: 0,
                transfers_made: 0,
                idempotency: HashMap::new(),
                failures: Vec::new(),
            },
            handle,
        )
        .await
    }

    /// Where events go (`{control plane}/v1/stripe/webhook` and `…/connect-webhook`).
    pub fn deliver_to(&self, webhook_url: &str, connect_webhook_url: &str) {
        let mut s = self.state();
        s.webhook_url = Some(webhook_url.to_owned());
        s.connect_webhook_url = Some(connect_webhook_url.to_owned());
    }

    /// The next call to `METHOD path…` (e.g. `POST /v1/transfers`) meets `failure`.
    pub fn fail_next(&self, call: &str, failure: StripeFailure) {
        let mut s = self.state();
        match s.failures.iter_mut().find(|(c, _)| c == call) {
            Some((_, queue)) => queue.push_back(failure),
            None => s
                .failures
                .push((call.to_owned(), VecDeque::from([failure]))),
        }
    }

    /// Calls to `METHOD path…` meet no more injected failures.
    pub fn stop_failing(&self, call: &str) {
        self.state().failures.retain(|(c, _)| c != call);
    }

    pub fn set_available_cents(&self, cents: i64) {
        self.state().available_cents = cents;
    }

    pub fn available_cents(&self) -> i64 {
        self.state().available_cents
    }

    /// Transfers made (a replayed call makes none).
    pub fn transfers_made(&self) -> u64 {
        self.state().transfers_made
    }

    pub fn session(&self, id: &str) -> Option<Value> {
        self.state().sessions.get(id).cloned()
    }

    /// The buyer pays session `id` (by card: paid at once). Returns the event and the status
    /// the webhook answered.
    pub async fn pay(&self, id: &str) -> (Value, u16) {
        self.complete(id, "paid").await
    }

    /// The buyer pays session `id` by a delayed method (a bank debit): `completed`, unpaid;
    /// [`Self::settle`] settles it later.
    pub async fn pay_later(&self, id: &str) -> (Value, u16) {
        self.complete(id, "unpaid").await
    }

    async fn complete(&self, id: &str, payment_status: &str) -> (Value, u16) {
        complete(self.shared(), id, payment_status).await
    }

    /// A delayed payment of session `id` settles.
    pub async fn settle(&self, id: &str) -> (Value, u16) {
        let event = {
            let mut s = self.state();
            let Some(session) = s.sessions.get_mut(id) else {
                panic!("no session {id}");
            };
            session["payment_status"] = json!("paid");
            let object = session.clone();
            s.event("checkout.session.async_payment_succeeded", object, None)
        };
        let status = self.deliver(&event).await;
        (event, status)
    }

    /// Refunds `cents` more of session `id`'s payment (`charge.refunded`, cumulative amount).
    pub async fn refund(&self, id: &str, cents: i64) -> (Value, u16) {
        let event = {
            let mut s = self.state();
            let session = s
                .sessions
                .get(id)
                .cloned()
                .unwrap_or_else(|| panic!("no session {id}"));
            let amount = session["amount_total"].as_i64().unwrap_or(0);
            let before = session["fake_refunded"].as_i64().unwrap_or(0);
            let refunded = (before + cents).min(amount);
            if let Some(s) = s.sessions.get_mut(id) {
                s["fake_refunded"] = json!(refunded);
            }
            let charge = json!({
                "id": format!("ch_for_{}", session["payment_intent"].as_str().unwrap_or_default()),
                "object": "charge", "amount": amount, "amount_refunded": refunded,
                "currency": session["currency"], "payment_intent": session["payment_intent"],
                "refunded": refunded == amount, "livemode": false,
            });
            s.event("charge.refunded", charge, None)
        };
        let status = self.deliver(&event).await;
        (event, status)
    }

    /// The buyer disputes `cents` of session `id`'s payment (`charge.dispute.created`).
    pub async fn dispute(&self, id: &str, cents: i64) -> (Value, u16) {
        let event = {
            let mut s = self.state();
            let session = s
                .sessions
                .get(id)
                .cloned()
                .unwrap_or_else(|| panic!("no session {id}"));
            let dispute_id = s.id("dp");
            let dispute = json!({
                "id": dispute_id, "object": "dispute", "amount": cents,
                "currency": session["currency"], "charge": format!("ch_for_{}", session["payment_intent"].as_str().unwrap_or_default()),
                "payment_intent": session["payment_intent"], "status": "needs_response",
                "reason": "fraudulent", "livemode": false,
            });
            s.event("charge.dispute.created", dispute, None)
        };
        let status = self.deliver(&event).await;
        (event, status)
    }

    /// The seller behind connected account `id` finishes onboarding: transfers active, payouts
    /// on (`account.updated` to the Connect endpoint).
    pub async fn onboard(&self, id: &str) -> (Value, u16) {
        let event = {
            let mut s = self.state();
            let Some(account) = s.accounts.get_mut(id) else {
                panic!("no account {id}");
            };
            account["capabilities"]["transfers"] = json!("active");
            account["payouts_enabled"] = json!(true);
            account["charges_enabled"] = json!(false);
            account["details_submitted"] = json!(true);
            account["requirements"]["currently_due"] = json!([]);
            account["requirements"]["disabled_reason"] = Value::Null;
            let object = account.clone();
            s.event("account.updated", object, Some(id.to_owned()))
        };
        let status = self.deliver(&event).await;
        (event, status)
    }

    /// Records an event of `kind` about `object` without delivering it (a delivery that never
    /// arrived): only `GET /v1/events` has it.
    pub fn emit_undelivered(&self, kind: &str, object: Value) -> Value {
        self.state().event(kind, object, None)
    }

    /// The platform reverses `cents` of transfer `id` (from the dashboard, say): the money
    /// comes back to the platform's balance.
    pub fn reverse(&self, id: &str, cents: i64) {
        let mut s = self.state();
        let Some(t) = s.transfers.get_mut(id) else {
            panic!("no transfer {id}");
        };
        let reversed = t["amount_reversed"].as_i64().unwrap_or(0) + cents;
        t["amount_reversed"] = json!(reversed);
        t["reversed"] = json!(reversed >= t["amount"].as_i64().unwrap_or(0));
        s.available_cents += cents;
    }

    /// Delivers `event` as Stripe would (signed now), to its endpoint; the answer's status.
    pub async fn deliver(&self, event: &Value) -> u16 {
        deliver(self.shared(), event).await
    }
}

/// Session `id` completed (`paid`, or `unpaid` for a delayed method), its event delivered.
async fn complete(state: &Mutex<StripeState>, id: &str, payment_status: &str) -> (Value, u16) {
    let event = {
        let mut s = lock(state);
        let intent = s.id("pi");
        let Some(session) = s.sessions.get_mut(id) else {
            panic!("no session {id}");
        };
        session["status"] = json!("complete");
        session["payment_status"] = json!(payment_status);
        session["payment_intent"] = json!(intent);
        session["url"] = Value::Null;
        let object = session.clone();
        s.event("checkout.session.completed", object, None)
    };
    let status = deliver(state, &event).await;
    (event, status)
}

/// Delivers `event` (signed now) to its endpoint; the answer's status.
async fn deliver(state: &Mutex<StripeState>, event: &Value) -> u16 {
    let (url, secret) = {
        let s = lock(state);
        if event.get("account").is_some_and(|a| !a.is_null()) {
            (
                s.connect_webhook_url.clone(),
                s.connect_webhook_secret.clone(),
            )
        } else {
            (s.webhook_url.clone(), s.webhook_secret.clone())
        }
    };
    let Some(url) = url else {
        panic!("the fake Stripe has no webhook URL");
    };
    let body = event.to_string();
    let header = stripe_signature(&secret, StripeState::now(), body.as_bytes());
    post_raw(&url, &body, Some(&header)).await
}

/// Checkout's hosted page, as a buyer's browser meets it: `GET /pay/{id}` shows the amount
/// with a Pay and a Cancel button; `POST /pay/{id}` pays (by card: paid at once, the webhook
/// delivered before the browser is sent on) or gives up, and redirects to the session's
/// `success_url` (its `{CHECKOUT_SESSION_ID}` filled in) or `cancel_url`.
async fn hosted_checkout(
    req: &ReadRequest,
    state: &Mutex<StripeState>,
    id: &str,
) -> Response<Body> {
    let Some(session) = lock(state).sessions.get(id).cloned() else {
        return html_page(404, "<h1>No such checkout</h1>");
    };
    if req.method == http::Method::GET {
        if session["status"] != "open" {
            return html_page(410, "<h1>This checkout is over</h1>");
        }
        let cents = session["amount_total"].as_i64().unwrap_or(0);
        return html_page(
            200,
            &format!(
                "<!DOCTYPE html><html lang=\"en\"><head><title>Pay · Stripe (fake)</title></head><body>\
                 <h1>Pay {}.{:02} {}</h1><form method=\"post\"><button name=\"action\" value=\"pay\">Pay</button>\
                 <button name=\"action\" value=\"cancel\">Cancel</button></form></body></html>",
                cents / 100,
                cents % 100,
                session["currency"].as_str().unwrap_or("").to_uppercase()
            ),
        );
    }
    let body = req.body.clone().unwrap_or_default();
    let pay = form_urlencoded::parse(&body).any(|(k, v)| k == "action" && v == "pay");
    let to = if pay {
        complete(state, id, "paid").await;
        session["success_url"]
            .as_str()
            .unwrap_or("")
            .replace("{CHECKOUT_SESSION_ID}", id)
    } else {
        session["cancel_url"].as_str().unwrap_or("").to_owned()
    };
    let mut resp = Response::new(full_body(""));
    *resp.status_mut() = http::StatusCode::SEE_OTHER;
    if let Ok(v) = http::HeaderValue::from_str(&to) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

/// The `Stripe-Signature` header Stripe sends: `t={t},v1={hex HMAC-SHA256(secret, "{t}.{body}")}`.
pub fn stripe_signature(secret: &str, t: i64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        panic!("HMAC takes any key");
    };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// POSTs `body` as JSON with an optional `Stripe-Signature`; the answer's status (0: none).
pub async fn post_raw(url: &str, body: &str, signature: Option<&str>) -> u16 {
    let client = reqwest::Client::new();
    let mut req = client
        .post(url)
        .header("content-type", "application/json; charset=utf-8")
        .header(
            "user-agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        )
        .timeout(Duration::from_secs(30))
        .body(body.to_owned());
    if let Some(sig) = signature {
        req = req.header("stripe-signature", sig);
    }
    req.send().await.map_or(0, |r| r.status().as_u16())
}

impl StripeState {
    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!(
            "{prefix}_test_{:06}{:08x}",
            self.next,
            rand::random::<u32>()
        )
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    /// Records an event (for `GET /v1/events`) and returns it.
    fn event(&mut self, kind: &str, object: Value, account: Option<String>) -> Value {
        let id = self.id("evt");
        let mut event = json!({
            "id": id, "object": "event", "type": kind, "api_version": self.api_version,
            "created": Self::now(), "livemode": false, "pending_webhooks": 1,
            "request": {"id": null, "idempotency_key": null},
            "data": {"object": object},
        });
        if let Some(a) = account {
            event["account"] = json!(a);
        }
        self.events.push(event.clone());
        event
    }
}

/// Stripe's error answer.
fn stripe_error(
    status: u16,
    kind: &str,
    code: Option<&str>,
    message: &str,
    param: Option<&str>,
) -> Response<Body> {
    let mut error = json!({"type": kind, "message": message});
    if let Some(c) = code {
        error["code"] = json!(c);
        error["doc_url"] = json!(format!("https://docs.stripe.com/error-codes/{c}"));
    }
    if let Some(p) = param {
        error["param"] = json!(p);
    }
    let mut resp = json_response(status, &json!({"error": error}));
    resp.headers_mut()
        .insert("request-id", http::HeaderValue::from_static("req_fake"));
    resp
}

fn invalid(code: &str, message: &str, param: Option<&str>) -> Response<Body> {
    stripe_error(400, "invalid_request_error", Some(code), message, param)
}

/// A parameter's key with list indexes as `[N]` and metadata keys as `[*]`, to match against
/// what an endpoint takes.
fn shape(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut rest = key;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find(']') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let inner = &rest[open + 1..open + close];
        if !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str("[N]");
        } else if out.ends_with("metadata") || out.ends_with("[metadata]") {
            out.push_str("[*]");
        } else {
            out.push('[');
            out.push_str(inner);
            out.push(']');
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// The parameters each POST takes (shapes), and the ones it requires.
fn allowed(path: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    Some(match path {
        "/v1/checkout/sessions" => (
            &[
                "mode",
                "line_items[N][price_data][currency]",
                "line_items[N][price_data][unit_amount]",
                "line_items[N][price_data][product_data][name]",
                "line_items[N][quantity]",
                "success_url",
                "cancel_url",
                "client_reference_id",
                "customer_email",
                "metadata[*]",
                "payment_intent_data[metadata][*]",
                "expires_at",
                "payment_method_types[N]",
            ][..],
            &[
                "mode",
                "line_items[N][price_data][currency]",
                "line_items[N][price_data][unit_amount]",
                "line_items[N][price_data][product_data][name]",
                "line_items[N][quantity]",
                "success_url",
            ][..],
        ),
        "/v1/accounts" => (
            &[
                "country",
                "email",
                "controller[stripe_dashboard][type]",
                "controller[requirement_collection]",
                "controller[fees][payer]",
                "controller[losses][payments]",
                "capabilities[transfers][requested]",
                "business_type",
                "metadata[*]",
                "tos_acceptance[service_agreement]",
            ][..],
            &[][..],
        ),
        "/v1/account_links" => (
            &[
                "account",
                "type",
                "refresh_url",
                "return_url",
                "collection_options[fields]",
            ][..],
            &["account", "type", "refresh_url", "return_url"][..],
        ),
        "/v1/transfers" => (
            &[
                "amount",
                "currency",
                "destination",
                "transfer_group",
                "description",
                "metadata[*]",
            ][..],
            &["amount", "currency", "destination"][..],
        ),
        _ if path.starts_with("/v1/transfers/") && path.ends_with("/reversals") => (
            &[
                "amount",
                "description",
                "metadata[*]",
                "refund_application_fee",
            ][..],
            &[][..],
        ),
        _ => return None,
    })
}

async fn handle(
    req: ReadRequest,
    state: Arc<Mutex<StripeState>>,
) -> Result<Response<Body>, Infallible> {
    if let Some(id) = req.path.strip_prefix("/pay/") {
        // The hosted page is the buyer's, not an API call: no key.
        return Ok(hosted_checkout(&req, &state, id).await);
    }
    let call = format!("{} {}", req.method, req.path);
    let (secret, version) = {
        let s = lock(&state);
        (s.secret_key.clone(), s.api_version.clone())
    };
    let refuse = |why: String, resp: Response<Body>| {
        lock(&state).log.rejected.push(why);
        Ok(resp)
    };
    if req.headers.get("authorization") != Some(&format!("Bearer {secret}")) {
        return refuse(
            format!("{call}: bad authorization"),
            stripe_error(
                401,
                "invalid_request_error",
                None,
                "Invalid API Key provided.",
                None,
            ),
        );
    }
    if req.headers.get("stripe-version") != Some(&version) {
        return refuse(
            format!(
                "{call}: Stripe-Version {:?}",
                req.headers.get("stripe-version")
            ),
            invalid(
                "invalid_version",
                "the Stripe-Version header must pin the API version",
                None,
            ),
        );
    }
    let failure = {
        let mut s = lock(&state);
        s.failures
            .iter_mut()
            .find(|(c, q)| call.starts_with(c.as_str()) && !q.is_empty())
            .and_then(|(_, q)| q.pop_front())
    };
    if let Some(StripeFailure::Refused(code)) = failure {
        return Ok(stripe_error(
            400,
            "invalid_request_error",
            Some(code),
            "injected refusal",
            None,
        ));
    }
    if let Some(StripeFailure::Status(status)) = failure {
        let (kind, code) = if status == 429 {
            ("invalid_request_error", Some("rate_limit"))
        } else {
            ("api_error", None)
        };
        let mut resp = stripe_error(status, kind, code, "injected failure", None);
        if status >= 500 {
            // What Stripe says of its 5xx: the idempotency layer would replay it.
            resp.headers_mut().insert(
                "stripe-should-retry",
                http::HeaderValue::from_static("true"),
            );
        }
        return Ok(resp);
    }
    let body = req.body.clone().unwrap_or_default();
    let text = String::from_utf8_lossy(&body).into_owned();
    let (status, answer, replayed) = if req.method == http::Method::POST {
        if req.headers.get("content-type").map(String::as_str)
            != Some("application/x-www-form-urlencoded")
        {
            return refuse(
                format!("{call}: content-type"),
                invalid("parameter_invalid", "POST bodies are form-encoded", None),
            );
        }
        let Some(key) = req.headers.get("idempotency-key").cloned() else {
            return refuse(
                format!("{call}: no Idempotency-Key"),
                invalid(
                    "parameter_missing",
                    "tokn$ sends an Idempotency-Key on every POST",
                    None,
                ),
            );
        };
        if key.is_empty() || key.len() > 255 {
            return refuse(
                format!("{call}: idempotency key length"),
                invalid(
                    "parameter_invalid",
                    "Idempotency-Key: 1 to 255 characters",
                    None,
                ),
            );
        }
        let fingerprint = format!("{call}\n{text}");
        let remembered = lock(&state)
            .idempotency
            .get(&key)
            .map(|r| (r.request.clone(), r.status, r.body.clone()));
        match remembered {
            Some((request, status, answer)) if request == fingerprint => (status, answer, true),
            Some(_) => {
                return refuse(
                    format!("{call}: idempotency key reused with other parameters"),
                    stripe_error(400, "idempotency_error", None,
                        "Keys for idempotent requests can only be used with the same parameters they were first used with.", None),
                );
            }
            None => {
                let pairs: Vec<(String, String)> =
                    form_urlencoded::parse(&body).into_owned().collect();
                let (status, answer) = match post(&state, &req.path, &pairs) {
                    Ok(v) => (200, v),
                    Err((status, error)) => (status, error),
                };
                // Stripe remembers every answer once execution began (a 400 from validation
                // is not remembered).
                if !(status == 400 && answer["error"]["code"] == "parameter_unknown") {
                    lock(&state).idempotency.insert(
                        key,
                        Remembered {
                            request: fingerprint,
                            status,
                            body: answer.clone(),
                        },
                    );
                }
                (status, answer, false)
            }
        }
    } else if req.method == http::Method::GET {
        let query: Vec<(String, String)> =
            form_urlencoded::parse(req.query.as_deref().unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        match get(&state, &req.path, &query) {
            Ok(v) => (200, v, false),
            Err((status, error)) => (status, error, false),
        }
    } else {
        return refuse(
            format!("{call}: method"),
            invalid("parameter_invalid", "unsupported method", None),
        );
    };
    lock(&state).log.received.push(Received {
        path: req.path.clone(),
        headers: req.headers.clone(),
        body: Value::String(text),
        version: req.version.clone(),
    });
    if let Some(StripeFailure::AnswerLate(delay)) = failure {
        tokio::time::sleep(delay.min(Duration::from_secs(120))).await;
    }
    let mut resp = json_response(status, &answer);
    resp.headers_mut()
        .insert("request-id", http::HeaderValue::from_static("req_fake"));
    if replayed {
        resp.headers_mut().insert(
            "idempotent-replayed",
            http::HeaderValue::from_static("true"),
        );
    }
    Ok(resp)
}

type Answer = Result<Value, (u16, Value)>;

fn error_value(
    status: u16,
    kind: &str,
    code: &str,
    message: &str,
    param: Option<&str>,
) -> (u16, Value) {
    let mut error = json!({"type": kind, "code": code, "message": message});
    if let Some(p) = param {
        error["param"] = json!(p);
    }
    (status, json!({"error": error}))
}

fn bad(code: &str, message: &str, param: &str) -> (u16, Value) {
    error_value(400, "invalid_request_error", code, message, Some(param))
}

/// A POST's parameters checked against what the endpoint takes, then acted on.
fn post(state: &Mutex<StripeState>, path: &str, pairs: &[(String, String)]) -> Answer {
    let Some((takes, requires)) = allowed(path) else {
        return Err(error_value(
            404,
            "invalid_request_error",
            "resource_missing",
            "Unrecognized request URL.",
            None,
        ));
    };
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in pairs {
        if !takes.contains(&shape(k).as_str()) {
            return Err(bad(
                "parameter_unknown",
                &format!("Received unknown parameter: {k}"),
                k,
            ));
        }
        if params.insert(k.clone(), v.clone()).is_some() {
            return Err(bad("parameter_invalid", &format!("{k} was sent twice"), k));
        }
    }
    for r in requires {
        let present = if r.contains("[N]") {
            params.contains_key(&r.replace("[N]", "[0]"))
        } else {
            params.contains_key(*r)
        };
        if !present {
            return Err(bad(
                "parameter_missing",
                &format!("Missing required param: {r}."),
                r,
            ));
        }
    }
    let int = |k: &str| -> Result<Option<i64>, (u16, Value)> {
        params
            .get(k)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    bad(
                        "parameter_invalid_integer",
                        &format!("Invalid integer: {v}"),
                        k,
                    )
                })
            })
            .transpose()
    };
    let metadata = |prefix: &str| -> Value {
        let m: serde_json::Map<String, Value> = params
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(prefix)
                    .and_then(|r| r.strip_suffix(']'))
                    .map(|name| (name.to_owned(), json!(v)))
            })
            .collect();
        Value::Object(m)
    };
    let mut s = lock(state);
    let now = StripeState::now();
    match path {
        "/v1/checkout/sessions" => {
            if params.get("mode").map(String::as_str) != Some("payment") {
                return Err(bad(
                    "parameter_invalid",
                    "mode: tokn$ sells with mode=payment",
                    "mode",
                ));
            }
            let unit = int("line_items[0][price_data][unit_amount]")?.unwrap_or(0);
            let quantity = int("line_items[0][quantity]")?.unwrap_or(0);
            let currency = params
                .get("line_items[0][price_data][currency]")
                .cloned()
                .unwrap_or_default();
            if currency != currency.to_lowercase() || currency.len() != 3 {
                return Err(bad(
                    "parameter_invalid",
                    "currency: a lowercase ISO code",
                    "line_items[0][price_data][currency]",
                ));
            }
            if unit * quantity < 50 {
                return Err(bad(
                    "amount_too_small",
                    "Amount must be at least $0.50 usd",
                    "line_items[0][price_data][unit_amount]",
                ));
            }
            let id = s.id("cs");
            let session = json!({
                "id": id, "object": "checkout.session", "mode": "payment",
                "url": format!("{}/pay/{id}", s.base), "status": "open", "payment_status": "unpaid",
                "amount_subtotal": unit * quantity, "amount_total": unit * quantity, "currency": currency,
                "client_reference_id": params.get("client_reference_id"), "customer": null,
                "customer_email": params.get("customer_email"), "metadata": metadata("metadata["),
                "payment_intent": null, "expires_at": now + 86_400, "created": now, "livemode": false,
                "success_url": params.get("success_url"), "cancel_url": params.get("cancel_url"),
            });
            s.sessions.insert(id, session.clone());
            Ok(session)
        }
        "/v1/accounts" => {
            let id = s.id("acct");
            let account = json!({
                "id": id, "object": "account", "country": params.get("country").cloned().unwrap_or_else(|| "US".to_owned()),
                "email": params.get("email"), "charges_enabled": false, "payouts_enabled": false,
                "details_submitted": false,
                "capabilities": {"transfers": if params.contains_key("capabilities[transfers][requested]") { "inactive" } else { "unrequested" }},
                "requirements": {"currently_due": ["external_account", "tos_acceptance.date"], "past_due": [], "disabled_reason": "requirements.past_due"},
                "metadata": metadata("metadata["), "created": now, "livemode": false,
            });
            s.accounts.insert(id, account.clone());
            Ok(account)
        }
        "/v1/account_links" => {
            let account = params.get("account").cloned().unwrap_or_default();
            if !s.accounts.contains_key(&account) {
                return Err(bad(
                    "resource_missing",
                    &format!("No such account: '{account}'"),
                    "account",
                ));
            }
            if params.get("type").map(String::as_str) != Some("account_onboarding") {
                return Err(bad("parameter_invalid", "type: account_onboarding", "type"));
            }
            let link = s.id("link");
            Ok(
                json!({"object": "account_link", "created": now, "expires_at": now + 300,
                      "url": format!("{}/setup/{link}", s.base)}),
            )
        }
        "/v1/transfers" => {
            let amount = int("amount")?.unwrap_or(0);
            if amount <= 0 {
                return Err(bad(
                    "parameter_invalid_integer",
                    "amount must be a positive integer",
                    "amount",
                ));
            }
            let destination = params.get("destination").cloned().unwrap_or_default();
            let Some(account) = s.accounts.get(&destination) else {
                return Err(bad(
                    "resource_missing",
                    &format!("No such destination: '{destination}'"),
                    "destination",
                ));
            };
            if account["capabilities"]["transfers"] != "active" {
                return Err(bad("insufficient_capabilities_for_transfer",
                    "Your destination account needs to have at least one of the following capabilities enabled: transfers, crypto_transfers, legacy_payments", "destination"));
            }
            if s.available_cents < amount {
                return Err(error_value(400, "invalid_request_error", "balance_insufficient",
                    "You have insufficient available funds in your Stripe account. Try adding funds directly to your available balance by creating Charges using the 4000000000000077 test card.", None));
            }
            s.available_cents -= amount;
            s.transfers_made += 1;
            let id = s.id("tr");
            let transfer = json!({
                "id": id, "object": "transfer", "amount": amount, "amount_reversed": 0,
                "currency": params.get("currency"), "destination": destination, "created": now,
                "transfer_group": params.get("transfer_group"), "description": params.get("description"),
                "metadata": metadata("metadata["), "reversed": false, "livemode": false,
                "reversals": {"object": "list", "data": [], "has_more": false, "url": format!("/v1/transfers/{id}/reversals")},
            });
            s.transfers.insert(id, transfer.clone());
            Ok(transfer)
        }
        _ => {
            // /v1/transfers/{id}/reversals
            let id = path
                .trim_start_matches("/v1/transfers/")
                .trim_end_matches("/reversals")
                .to_owned();
            let Some(transfer) = s.transfers.get(&id).cloned() else {
                return Err(bad(
                    "resource_missing",
                    &format!("No such transfer: '{id}'"),
                    "id",
                ));
            };
            let left = transfer["amount"].as_i64().unwrap_or(0)
                - transfer["amount_reversed"].as_i64().unwrap_or(0);
            let amount = int("amount")?.unwrap_or(left);
            if amount <= 0 || amount > left {
                return Err(bad(
                    "parameter_invalid_integer",
                    "amount exceeds what is left to reverse",
                    "amount",
                ));
            }
            s.available_cents += amount;
            if let Some(t) = s.transfers.get_mut(&id) {
                t["amount_reversed"] =
                    json!(transfer["amount_reversed"].as_i64().unwrap_or(0) + amount);
                t["reversed"] = json!(amount == left);
            }
            let rid = s.id("trr");
            Ok(
                json!({"id": rid, "object": "transfer_reversal", "amount": amount, "currency": transfer["currency"],
                      "transfer": id, "metadata": metadata("metadata["), "created": now}),
            )
        }
    }
}

fn list(data: Vec<Value>, url: &str) -> Value {
    json!({"object": "list", "data": data, "has_more": false, "url": url})
}

fn get(state: &Mutex<StripeState>, path: &str, query: &[(String, String)]) -> Answer {
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let s = lock(state);
    let missing = |what: &str, id: &str| {
        error_value(
            404,
            "invalid_request_error",
            "resource_missing",
            &format!("No such {what}: '{id}'"),
            Some("id"),
        )
    };
    if let Some(id) = path.strip_prefix("/v1/checkout/sessions/") {
        return s
            .sessions
            .get(id)
            .cloned()
            .ok_or_else(|| missing("checkout.session", id));
    }
    if let Some(id) = path.strip_prefix("/v1/accounts/") {
        return s
            .accounts
            .get(id)
            .cloned()
            .ok_or_else(|| missing("account", id));
    }
    if let Some(id) = path.strip_prefix("/v1/transfers/") {
        return s
            .transfers
            .get(id)
            .cloned()
            .ok_or_else(|| missing("transfer", id));
    }
    match path {
        "/v1/transfers" => {
            let data = s
                .transfers
                .values()
                .filter(|t| q("transfer_group").is_none_or(|g| t["transfer_group"] == g.as_str()))
                .filter(|t| q("destination").is_none_or(|d| t["destination"] == d.as_str()))
                .cloned()
                .collect();
            Ok(list(data, "/v1/transfers"))
        }
        "/v1/balance" => Ok(json!({"object": "balance", "livemode": false,
            "available": [{"amount": s.available_cents, "currency": "usd", "source_types": {"card": s.available_cents}}],
            "pending": [{"amount": 0, "currency": "usd"}]})),
        "/v1/events" => {
            let data = s
                .events
                .iter()
                .rev()
                .filter(|e| q("type").is_none_or(|t| e["type"] == t.as_str()))
                .cloned()
                .collect();
            Ok(list(data, "/v1/events"))
        }
        _ => Err(error_value(
            404,
            "invalid_request_error",
            "resource_missing",
            "Unrecognized request URL.",
            None,
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::{stripe_signature, FakeStripe, FAKE_STRIPE_VERSION};

    async fn post(
        stripe: &FakeStripe,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value, bool) {
        let mut req = reqwest::Client::new()
            .post(format!("{}{path}", stripe.base_url()))
            .bearer_auth("sk_test_fake_key_0123456789")
            .header("stripe-version", FAKE_STRIPE_VERSION)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned());
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let resp = req.send().await.unwrap();
        let replayed = resp.headers().contains_key("idempotent-replayed");
        (resp.status().as_u16(), resp.json().await.unwrap(), replayed)
    }

    #[tokio::test]
    async fn idempotency_keys_and_strict_parameters_behave_as_stripes() {
        let stripe = FakeStripe::start(
            "sk_test_fake_key_0123456789",
            "whsec_a_0123456789",
            "whsec_b_0123456789",
        )
        .await
        .unwrap();
        let body = "country=US&capabilities%5Btransfers%5D%5Brequested%5D=true&metadata%5Baccount_id%5D=a1";
        let (status, first, replayed) =
            post(&stripe, "/v1/accounts", Some("connect:a1"), body).await;
        assert_eq!((status, replayed), (200, false));
        // The same key and body: the first answer again, nothing made.
        let (status, again, replayed) =
            post(&stripe, "/v1/accounts", Some("connect:a1"), body).await;
        assert_eq!((status, replayed), (200, true));
        assert_eq!(first["id"], again["id"]);
        assert_eq!(stripe.state().accounts.len(), 1);
        // The same key, other parameters: 400 idempotency_error.
        let (status, error, _) =
            post(&stripe, "/v1/accounts", Some("connect:a1"), "country=FR").await;
        assert_eq!(status, 400);
        assert_eq!(error["error"]["type"], "idempotency_error");
        // Unknown and malformed parameters, a missing key: Stripe's 400s.
        let (status, error, _) = post(&stripe, "/v1/accounts", Some("k2"), "colour=blue").await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (400, Some("parameter_unknown"))
        );
        let (status, error, _) = post(
            &stripe,
            "/v1/transfers",
            Some("k3"),
            "amount=ten&currency=usd&destination=acct_x",
        )
        .await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (400, Some("parameter_invalid_integer"))
        );
        let (status, _, _) = post(&stripe, "/v1/accounts", None, body).await;
        assert_eq!(status, 400);
        assert_eq!(stripe.rejected().len(), 2, "{:?}", stripe.rejected());
        // A transfer to an account that has not onboarded is refused.
        let dest = first["id"].as_str().unwrap();
        let (status, error, _) = post(
            &stripe,
            "/v1/transfers",
            Some("k4"),
            &format!("amount=100&currency=usd&destination={dest}"),
        )
        .await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (400, Some("insufficient_capabilities_for_transfer"))
        );
        // Signatures are Stripe's: the reference vector.
        assert_eq!(
            stripe_signature(
                "whsec_test_secret",
                1_700_000_000,
                br#"{"id":"evt_test_1","object":"event","type":"checkout.session.completed"}"#
            ),
            "t=1700000000,v1=ca796b857b81e24d595a4c37abf88d2fafb533a32ede6ce4cfc9b0e892a35b08"
        );
    }
}
