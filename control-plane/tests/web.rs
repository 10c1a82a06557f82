//! The web app's security, driven over HTTP as a browser would (cookies kept by hand, redirects
//! not followed): CSRF, session fixation, open redirects on the sign-in return, a sign-in link
//! used twice, another account's ids in URLs, user input echoed into pages; and GitHub and
//! Google sign-in against fakes of both (an OAuth `state` mismatch, a replayed callback, bad ID
//! tokens, unverified addresses, one account per address).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "tests"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokn_testkit::control::{ControlOptions, ControlProcess};

fn control() -> ControlProcess {
    ControlProcess::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_tokn-control")),
        ControlOptions::default(),
    )
}

/// One browser: its cookies, no redirects followed.
struct Browser {
    base: String,
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

struct Page {
    status: u16,
    location: Option<String>,
    set_cookies: Vec<String>,
    body: String,
}

impl Browser {
    fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: BTreeMap::new(),
        }
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> Page {
        let cookie: Vec<String> = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let resp = req
            .header("cookie", cookie.join("; "))
            .send()
            .await
            .unwrap();
        let set_cookies: Vec<String> = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        for c in &set_cookies {
            let (pair, _) = c.split_once(';').unwrap();
            let (k, v) = pair.split_once('=').unwrap();
            if v.is_empty() {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), v.to_owned());
            }
        }
        Page {
            status: resp.status().as_u16(),
            location: resp
                .headers()
                .get("location")
                .map(|v| v.to_str().unwrap().to_owned()),
            set_cookies,
            body: resp.text().await.unwrap(),
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send(req).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)], headers: &[(&str, &str)]) -> Page {
        let mut req = self.http.post(format!("{}{path}", self.base)).form(form);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }
}

/// The CSRF token of a page's forms.
fn csrf(body: &str) -> String {
    let at = body
        .find("name=\"csrf\" value=\"")
        .expect("a form with a csrf field")
        + 19;
    body[at..at + body[at..].find('"').unwrap()].to_owned()
}

/// Signs the operator in (the admin token mints the link).
async fn operator(control: &ControlProcess) -> Browser {
    let link = admin(
        control,
        reqwest::Method::POST,
        "/v1/admin/signin-links",
        None,
    )
    .await;
    let mut b = Browser::new(&control.url());
    let url = link["url"].as_str().unwrap();
    let path = &url[url.find("/signin").unwrap()..];
    let page = b.get(path).await;
    let token = path.split("token=").nth(1).unwrap().to_owned();
    let done = b
        .post(
            "/signin/link",
            &[("csrf", &csrf(&page.body)), ("token", &token)],
            &[],
        )
        .await;
    assert_eq!(done.status, 303);
    assert_eq!(done.location.as_deref(), Some("/operator"));
    b
}

/// The sign-in links in the outbox, newest first.
async fn outbox_links(op: &mut Browser) -> Vec<String> {
    let page = op.get("/operator").await;
    assert_eq!(page.status, 200);
    page.body
        .match_indices("/signin/link?token=")
        .map(|(at, _)| {
            let rest = &page.body[at + 19..];
            let end = rest
                .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .unwrap();
            rest[..end].to_owned()
        })
        .collect()
}

/// Posts the sign-in form for `email` (a buyer, returning to `return_to`).
async fn ask(b: &mut Browser, email: &str, return_to: &str) -> Page {
    let form = b.get("/signin").await;
    b.post(
        "/signin",
        &[
            ("csrf", &csrf(&form.body)),
            ("email", email),
            ("role", "buyer"),
            ("return_to", return_to),
        ],
        &[],
    )
    .await
}

/// Asks for a link for `email` and returns its token (read from the outbox).
async fn ask_link(b: &mut Browser, op: &mut Browser, email: &str, return_to: &str) -> String {
    let page = ask(b, email, return_to).await;
    assert_eq!(page.status, 200, "{}", page.body);
    outbox_links(op).await.remove(0)
}

/// A new browser, signed in as `email` by a link from the operator's outbox.
async fn browser_of(control: &ControlProcess, op: &mut Browser, email: &str) -> Browser {
    let mut b = Browser::new(&control.url());
    let link = ask_link(&mut b, op, email, "/app").await;
    use_link(&mut b, &link).await;
    b
}

async fn use_link(b: &mut Browser, token: &str) -> Page {
    let page = b.get(&format!("/signin/link?token={token}")).await;
    let token_csrf = csrf(&page.body);
    b.post(
        "/signin/link",
        &[("csrf", &token_csrf), ("token", token)],
        &[],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_resists_csrf_fixation_open_redirects_and_link_reuse() {
    let control = control();
    let mut op = operator(&control).await;
    let mut b = Browser::new(&control.url());
    let form = b.get("/signin").await;
    assert!(form.set_cookies.iter().any(|c| c.starts_with("tokn_anon=")
        && c.contains("HttpOnly")
        && c.contains("SameSite=Strict")
        && c.contains("Secure")));
    let token = csrf(&form.body);
    let before = outbox_links(&mut op).await.len();

    // CSRF: no token, a wrong token, a right token from another site, another visitor's
    // token — 403, nothing sent.
    let mut other = Browser::new(&control.url());
    let others = csrf(&other.get("/signin").await.body);
    for (t, headers) in [
        ("", &[][..]),
        ("anon_wrong", &[][..]),
        (token.as_str(), &[("origin", "http://evil.example")][..]),
        (token.as_str(), &[("sec-fetch-site", "cross-site")][..]),
        (others.as_str(), &[][..]),
    ] {
        let fields = [("csrf", t), ("email", "eve@example.com"), ("role", "buyer")];
        let page = b.post("/signin", &fields, headers).await;
        assert_eq!(page.status, 403, "{t} {headers:?}: {}", page.body);
    }
    assert_eq!(
        outbox_links(&mut op).await.len(),
        before,
        "no link was made"
    );

    // Fixation: a session id planted before sign-in is worth nothing after it.
    b.cookies.insert(
        "tokn_session".to_owned(),
        "ses_planted0123456789".to_owned(),
    );
    // Open redirect: the return URL is another site's; the sign-in returns home instead.
    let link = ask_link(&mut b, &mut op, "ana@example.com", "https://evil.example/x").await;
    let signed_in = use_link(&mut b, &link).await;
    assert_eq!(signed_in.status, 303);
    assert_eq!(
        signed_in.location.as_deref(),
        Some("/app"),
        "never another host"
    );
    let session = b.cookies["tokn_session"].clone();
    assert_ne!(session, "ses_planted0123456789");
    assert!(signed_in
        .set_cookies
        .iter()
        .any(|c| c.starts_with("tokn_session=")
            && c.contains("HttpOnly")
            && c.contains("SameSite=Lax")
            && c.contains("Secure")));
    let mut planted = Browser::new(&control.url());
    planted.cookies.insert(
        "tokn_session".to_owned(),
        "ses_planted0123456789".to_owned(),
    );
    assert_eq!(
        planted.get("/app").await.status,
        303,
        "the planted id signs no one in"
    );
    let home = b.get("/app").await;
    assert_eq!(home.status, 200);
    assert!(home.body.contains("$10.00"), "the welcome credit");
    for bad in ["//evil.example", "/\\evil.example"] {
        let link = ask_link(&mut b, &mut op, "ana@example.com", bad).await;
        let done = use_link(&mut b, &link).await;
        assert_eq!(done.location.as_deref(), Some("/app"), "{bad}");
    }

    // A link works once: the second use (a stolen copy) signs no one in.
    let mut thief = Browser::new(&control.url());
    let again = use_link(&mut thief, &link).await;
    assert_eq!(again.status, 400);
    assert!(again.body.contains("expired or was used"));
    assert!(!thief.cookies.contains_key("tokn_session"));
    assert_eq!(thief.get("/app").await.status, 303);

    // Signing in again does not grant the welcome credit twice.
    let home = b.get("/app").await;
    assert!(
        home.body.contains("data-balance-micros=\"10000000\""),
        "one grant, however often one signs in"
    );

    // Sign-out ends the session on the server, not only in this browser.
    let kept = b.cookies["tokn_session"].clone();
    let out = b
        .post("/signout", &[("csrf", &csrf(&home.body))], &[])
        .await;
    assert_eq!(out.status, 303);
    let mut replay = Browser::new(&control.url());
    replay.cookies.insert("tokn_session".to_owned(), kept);
    assert_eq!(replay.get("/app").await.status, 303, "a revoked session");

    // Sign out everywhere: every session of the person ends (the laptop's and the phone's).
    let mut laptop = browser_of(&control, &mut op, "ana@example.com").await;
    let mut phone = browser_of(&control, &mut op, "ana@example.com").await;
    let home = phone.get("/app").await;
    assert!(home.body.contains("formaction=\"/signout/everywhere\""));
    let out = phone
        .post("/signout/everywhere", &[("csrf", &csrf(&home.body))], &[])
        .await;
    assert_eq!(out.status, 303);
    assert_eq!(phone.get("/app").await.status, 303);
    assert_eq!(
        laptop.get("/app").await.status,
        303,
        "the other session ended too"
    );
    assert_eq!(
        op.get("/operator").await.status,
        200,
        "the operator's session is not the person's"
    );

    // A suspended account's live session opens nothing.
    let link = ask_link(&mut laptop, &mut op, "ana@example.com", "/app").await;
    use_link(&mut laptop, &link).await;
    assert_eq!(laptop.get("/app").await.status, 200);
    let accounts = admin_accounts(&control).await;
    let ana = accounts
        .iter()
        .find(|a| a["email"] == "ana@example.com")
        .unwrap();
    let suspended = admin(
        &control,
        reqwest::Method::PATCH,
        &format!("/v1/admin/accounts/{}", ana["id"].as_str().unwrap()),
        Some(serde_json::json!({"status": "suspended"})),
    )
    .await;
    assert_eq!(suspended["status"], "suspended");
    assert_eq!(laptop.get("/app").await.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_ids_are_404_and_input_is_escaped() {
    let control = control();
    let mut op = operator(&control).await;
    let mut ana = browser_of(&control, &mut op, "ana@example.com").await;
    let mut bo = browser_of(&control, &mut op, "bo@example.com").await;

    // Ana's key, named with markup.
    let home = ana.get("/app").await;
    let name = "<script>alert(1)</script>\"'&";
    let made = ana
        .post(
            "/app/keys",
            &[("csrf", &csrf(&home.body)), ("name", name)],
            &[],
        )
        .await;
    assert_eq!(made.status, 200, "{}", made.body);
    let home = ana.get("/app").await;
    assert!(!home.body.contains("<script>alert(1)"), "escaped");
    assert!(home
        .body
        .contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;'&amp;"));
    let at = home.body.find("/app/keys/key_").unwrap() + 10;
    let key_id = &home.body[at..at + home.body[at..].find('/').unwrap()];

    // Bo cannot revoke it: 404, and the key stays live.
    let bo_home = bo.get("/app").await;
    let tried = bo
        .post(
            &format!("/app/keys/{key_id}/revoke"),
            &[("csrf", &csrf(&bo_home.body))],
            &[],
        )
        .await;
    assert_eq!(tried.status, 404);
    assert!(ana
        .get("/app")
        .await
        .body
        .contains(&format!("/app/keys/{key_id}/revoke")));
    // Nor can a visitor, nor Ana with Bo's form token.
    let ana_home = ana.get("/app").await;
    let cross = ana
        .post(
            &format!("/app/keys/{key_id}/revoke"),
            &[("csrf", &csrf(&bo_home.body))],
            &[],
        )
        .await;
    assert_eq!(cross.status, 403);
    let mut nobody = Browser::new(&control.url());
    let anon = nobody.get("/signin").await;
    let tried = nobody
        .post(
            &format!("/app/keys/{key_id}/revoke"),
            &[("csrf", &csrf(&anon.body))],
            &[],
        )
        .await;
    assert_eq!(tried.status, 303, "to sign in");
    let revoked = ana
        .post(
            &format!("/app/keys/{key_id}/revoke"),
            &[("csrf", &csrf(&ana_home.body))],
            &[],
        )
        .await;
    assert_eq!(revoked.status, 303);
    assert!(!ana
        .get("/app")
        .await
        .body
        .contains(&format!("/app/keys/{key_id}/revoke")));

    // A return path with markup is echoed into the sign-in form escaped.
    let page = ana
        .get("/signin?return_to=/%22%3E%3Cscript%3Ealert(2)%3C/script%3E")
        .await;
    assert!(!page.body.contains("<script>alert(2)"));
    assert!(page.body.contains("&quot;&gt;&lt;script&gt;alert(2)"));
    // The operator's page is not there for people.
    assert_eq!(ana.get("/operator").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_links_go_out_by_smtp_and_never_into_the_outbox() {
    let smtp = tokn_testkit::FakeSmtp::start(Some(("mailer", "mail-password-0123")))
        .await
        .unwrap();
    let control = ControlProcess::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_tokn-control")),
        ControlOptions {
            extra: Some(format!(
                "[web.smtp]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
                 username = \"mailer\"\npassword = \"mail-password-0123\"\n\
                 from = \"tokn$ <no-reply@tokn.example>\"\n",
                smtp.port
            )),
            ..ControlOptions::default()
        },
    );
    let mut op = operator(&control).await;
    let mut b = Browser::new(&control.url());
    let sent = ask(&mut b, "Ana@Example.com", "/app").await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    let mail = smtp.received();
    assert_eq!(mail.len(), 1, "{:?}", smtp.errors());
    assert!(smtp.errors().is_empty(), "{:?}", smtp.errors());
    let m = &mail[0];
    assert_eq!(m.from, "no-reply@tokn.example");
    assert_eq!(m.to, ["ana@example.com"]);
    assert_eq!(m.user.as_deref(), Some("mailer"), "authenticated");
    assert!(
        m.data.contains("Subject: Your tokn$ sign-in link"),
        "{}",
        m.data
    );
    // The body as a mail client reads it (quoted-printable: soft breaks, `=3D` for `=`).
    let body = m.data.replace("=\r\n", "").replace("=3D", "=");
    let token = body.split("token=").nth(1).unwrap();
    let token: String = token
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    assert!(
        outbox_links(&mut op).await.is_empty(),
        "a link that was mailed is not kept"
    );
    let done = use_link(&mut b, &token).await;
    assert_eq!(done.status, 303);
    assert_eq!(
        b.get("/app").await.status,
        200,
        "signed in by the mailed link"
    );
    assert!(!control.log().contains(&token), "the link is in no log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_server_that_is_down_gives_a_clear_error_and_no_link() {
    // Port 1: nothing listens there.
    let control = ControlProcess::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_tokn-control")),
        ControlOptions {
            extra: Some(
                "[web.smtp]\nhost = \"127.0.0.1\"\nport = 1\ntls = \"none\"\n\
                 from = \"no-reply@tokn.example\"\n"
                    .to_owned(),
            ),
            ..ControlOptions::default()
        },
    );
    let mut b = Browser::new(&control.url());
    let sent = ask(&mut b, "ana@example.com", "/app").await;
    assert_eq!(sent.status, 503, "{}", sent.body);
    assert!(sent.body.contains("could not be sent"));
}

/// An admin API call that must succeed; its JSON answer.
async fn admin(
    control: &ControlProcess,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut req = reqwest::Client::new()
        .request(method, format!("{}{path}", control.url()))
        .bearer_auth(&control.admin_token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.unwrap()
}

/// Every account (through the admin API).
async fn admin_accounts(control: &ControlProcess) -> Vec<serde_json::Value> {
    let list = admin(
        control,
        reqwest::Method::GET,
        "/v1/admin/accounts?limit=1000",
        None,
    )
    .await;
    list.as_array().unwrap().clone()
}

/// All accounts' emails.
async fn account_emails(control: &ControlProcess) -> Vec<String> {
    admin_accounts(control)
        .await
        .iter()
        .map(|a| a["email"].as_str().unwrap().to_owned())
        .collect()
}

/// The query of a URL as pairs.
fn query(url: &str) -> Vec<(String, String)> {
    let q = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

/// Starts a sign-in with `provider` on the sign-in form; the provider's authorize URL.
async fn start_with(b: &mut Browser, provider: &str, return_to: &str) -> String {
    let form = b.get(&format!("/signin?return_to={return_to}")).await;
    assert!(form
        .body
        .contains(&format!("formaction=\"/signin/{provider}\"")));
    let started = b
        .post(
            &format!("/signin/{provider}"),
            &[
                ("csrf", &csrf(&form.body)),
                ("email", ""),
                ("role", "buyer"),
                ("return_to", return_to),
            ],
            &[],
        )
        .await;
    assert_eq!(started.status, 303, "{}", started.body);
    assert!(
        started
            .set_cookies
            .iter()
            .any(|c| c.starts_with("tokn_signin=st_")
                && c.contains("HttpOnly")
                && c.contains("SameSite=Lax")),
        "{:?}",
        started.set_cookies
    );
    started.location.unwrap()
}

/// The person at the provider: its page opens (the fake checks the request), then they approve
/// as `email` (or cancel); the callback URL the provider sends the browser back to.
async fn at_provider(authorize: &str, email: &str, approve: bool) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = http.get(authorize).send().await.unwrap();
    assert_eq!(page.status(), 200, "{}", page.text().await.unwrap());
    let mut form = query(authorize);
    form.push(("login".into(), email.into()));
    form.push((
        "decision".into(),
        if approve { "approve" } else { "cancel" }.into(),
    ));
    let action = authorize.split('?').next().unwrap();
    let back = http.post(action).form(&form).send().await.unwrap();
    assert_eq!(back.status(), 302);
    back.headers()["location"].to_str().unwrap().to_owned()
}

/// The callback as a path on the control plane.
fn path_of(url: &str) -> String {
    format!("/{}", url.splitn(4, '/').nth(3).unwrap())
}

/// A control plane with GitHub and Google sign-in, against fakes of both.
async fn with_providers() -> (
    tokn_testkit::FakeGitHub,
    tokn_testkit::FakeOidc,
    ControlProcess,
) {
    use tokn_testkit::{FakeGitHub, FakeOidc, RegisteredClient};
    let port = tokn_testkit::harness::free_port();
    let client = |provider: &str, secret: &str| RegisteredClient {
        client_id: format!("{provider}-client-0001"),
        client_secret: secret.to_owned(),
        redirect_uri: format!("http://127.0.0.1:{port}/signin/{provider}/callback"),
    };
    let github = FakeGitHub::start(client("github", "gh-secret-0123456789"))
        .await
        .unwrap();
    let google = FakeOidc::start(client("google", "gg-secret-0123456789"))
        .await
        .unwrap();
    let control = ControlProcess::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_tokn-control")),
        ControlOptions {
            port: Some(port),
            extra: Some(format!(
                "[web.github]\nclient_id = \"github-client-0001\"\n\
                 client_secret = \"gh-secret-0123456789\"\nurl = \"{gh}\"\napi_url = \"{gh}\"\n\
                 [web.google]\nclient_id = \"google-client-0001\"\n\
                 client_secret = \"gg-secret-0123456789\"\nissuer = \"{issuer}\"\n",
                gh = github.base_url(),
                issuer = google.issuer(),
            )),
            ..ControlOptions::default()
        },
    );
    (github, google, control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_and_google_sign_in_check_state_pkce_and_verified_addresses() {
    let (github, google, control) = with_providers().await;

    // The forms may lead to the providers (a form's redirect counts as its action).
    let mut b = Browser::new(&control.url());
    let form = b.get("/signin").await;
    assert!(
        form.body.contains("Continue with GitHub") && form.body.contains("Continue with Google")
    );
    let csp = reqwest::get(format!("{}/signin", control.url()))
        .await
        .unwrap()
        .headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains(&github.base_url()) && csp.contains(&google.issuer()),
        "{csp}"
    );

    // GitHub: a person's own flow signs them in and returns where they were going.
    let authorize = start_with(&mut b, "github", "/app/usage").await;
    assert!(authorize.starts_with(&format!("{}/login/oauth/authorize?", github.base_url())));
    let q = query(&authorize);
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("code_challenge_method").as_deref(), Some("S256"));
    let callback = at_provider(&authorize, "Dev.Person@Example.com", true).await;

    // OAuth `state` mismatch: an attacker's own callback (its state, its code) opened in the
    // victim's browser signs the victim into nothing.
    let mut attacker = Browser::new(&control.url());
    let theirs = start_with(&mut attacker, "github", "/app").await;
    let their_callback = at_provider(&theirs, "attacker@example.com", true).await;
    let refused = b.get(&path_of(&their_callback)).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("did not start in this browser"));
    // A browser with no flow at all, and the victim's own code under a changed state.
    assert_eq!(
        Browser::new(&control.url())
            .get(&path_of(&callback))
            .await
            .status,
        400
    );
    let forged = path_of(&callback).replace("state=st_", "state=st_X");
    assert_eq!(b.get(&forged).await.status, 400);
    assert_eq!(
        github.exchanged(),
        0,
        "no code was spent on a refused callback"
    );

    let done = b.get(&path_of(&callback)).await;
    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(done.location.as_deref(), Some("/app/usage"));
    assert!(done
        .set_cookies
        .iter()
        .any(|c| c.starts_with("tokn_session=ses_")));
    assert!(done
        .set_cookies
        .iter()
        .any(|c| c.starts_with("tokn_signin=;")));
    let home = b.get("/app").await;
    assert_eq!(home.status, 200);
    assert!(home.body.contains("$10.00"), "the welcome credit");
    // The callback is good once.
    assert_eq!(b.get(&path_of(&callback)).await.status, 400);
    assert_eq!(github.exchanged(), 1);
    assert!(github.rejected().is_empty(), "{:?}", github.rejected());

    // Google, same address: the same account, the welcome credit not granted again.
    let mut g = Browser::new(&control.url());
    let authorize = start_with(&mut g, "google", "/app").await;
    let q = query(&authorize);
    assert!(q.iter().any(|(k, v)| k == "nonce" && v.len() > 16));
    assert!(q
        .iter()
        .any(|(k, v)| k == "scope" && v.split(' ').any(|s| s == "openid")));
    let callback = at_provider(&authorize, "dev.person@example.com", true).await;
    let done = g.get(&path_of(&callback)).await;
    assert_eq!(done.status, 303, "{}", done.body);
    assert!(g.get("/app").await.body.contains("$10.00"));
    let emails = account_emails(&control).await;
    assert_eq!(
        emails
            .iter()
            .filter(|e| *e == "dev.person@example.com")
            .count(),
        1,
        "one account per verified email: {emails:?}"
    );
    assert!(google.rejected().is_empty(), "{:?}", google.rejected());

    // GitHub with an unverified primary address; a person who cancels at the provider.
    github.mark_unverified("unverified@example.com");
    let mut u = Browser::new(&control.url());
    let authorize = start_with(&mut u, "github", "/app").await;
    let callback = at_provider(&authorize, "unverified@example.com", true).await;
    assert_eq!(u.get(&path_of(&callback)).await.status, 403);
    let authorize = start_with(&mut u, "github", "/app").await;
    let callback = at_provider(&authorize, "someone@example.com", false).await;
    let cancelled = u.get(&path_of(&callback)).await;
    assert_eq!(cancelled.status, 403);
    assert!(cancelled
        .body
        .contains("GitHub did not sign you in: you cancelled it there"));
    assert!(cancelled
        .set_cookies
        .iter()
        .any(|c| c.starts_with("tokn_signin=;")));
    assert_eq!(u.get("/app").await.status, 303);

    let emails = account_emails(&control).await;
    for never in [
        "attacker@example.com",
        "unverified@example.com",
        "someone@example.com",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain((0..5).map(|n| format!("fault{n}@example.com")))
    {
        assert!(
            !emails.contains(&never),
            "{never} has no account: {emails:?}"
        );
    }
    // An unknown provider, and a start without the form's token.
    let form = u.get("/signin").await;
    let unknown = u
        .post(
            "/signin/facebook",
            &[("csrf", &csrf(&form.body)), ("role", "buyer")],
            &[],
        )
        .await;
    assert_eq!(unknown.status, 404);
    let forged = u
        .post(
            "/signin/github",
            &[("csrf", "nope"), ("role", "buyer")],
            &[],
        )
        .await;
    assert_eq!(forged.status, 403);
    // Ten starts from this address in the minute (five above): the eleventh waits (each start
    // stores a flow).
    let mut started = 5;
    loop {
        let status = u
            .post(
                "/signin/google",
                &[("csrf", &csrf(&form.body)), ("role", "buyer")],
                &[],
            )
            .await
            .status;
        if status == 429 {
            break;
        }
        assert_eq!(status, 303);
        started += 1;
        assert!(started <= 10, "the throttle holds at ten a minute");
    }
    assert_eq!(started, 10);
    let log = control.log();
    for secret in [
        "gh-secret-0123456789",
        "gg-secret-0123456789",
        "gho_",
        "ya29.",
    ] {
        assert!(!log.contains(secret), "{secret} is in no log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_sees_payouts_and_runs_them_from_the_page() {
    // Payments off: the page says so.
    let plain = control();
    let mut op = operator(&plain).await;
    assert!(op.get("/operator").await.body.contains("Payments are off"));
    drop(plain);

    let stripe = tokn_testkit::FakeStripe::start(
        "sk_test_web_0123456789",
        "whsec_web_account_0123456789",
        "whsec_web_connect_0123456789",
    )
    .await
    .unwrap();
    let control = ControlProcess::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_tokn-control")),
        ControlOptions {
            stripe: Some(tokn_testkit::control::StripeOptions {
                base_url: stripe.base_url(),
                secret_key: "sk_test_web_0123456789".to_owned(),
                webhook_secret: "whsec_web_account_0123456789".to_owned(),
                connect_webhook_secret: "whsec_web_connect_0123456789".to_owned(),
                extra: "[stripe.payouts]\nautomatic = false\n".to_owned(),
            }),
            ..ControlOptions::default()
        },
    );
    let mut op = operator(&control).await;
    let home = op.get("/operator").await;
    assert!(home.body.contains("Run payouts now") && home.body.contains("None yet."));
    let ran = op
        .post("/operator/payouts/run", &[("csrf", &csrf(&home.body))], &[])
        .await;
    assert_eq!(ran.status, 200, "{}", ran.body);
    assert!(
        ran.body.contains("Payouts run") && ran.body.contains("0 made"),
        "{}",
        ran.body
    );
    // Not the operator's session: as if the page did not exist; a forged form: refused.
    let mut ana = browser_of(&control, &mut op, "ana@example.com").await;
    let page = ana.get("/app").await;
    let theirs = ana
        .post("/operator/payouts/run", &[("csrf", &csrf(&page.body))], &[])
        .await;
    assert_eq!(theirs.status, 404);
    let forged = op
        .post("/operator/payouts/run", &[("csrf", "nope")], &[])
        .await;
    assert_eq!(forged.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_tokens_that_fail_verification_sign_no_one_in() {
    use tokn_testkit::IdTokenFault;
    let (_github, google, control) = with_providers().await;
    for (n, fault) in [
        IdTokenFault::ForeignKey,
        IdTokenFault::WrongNonce,
        IdTokenFault::WrongAudience,
        IdTokenFault::Expired,
        IdTokenFault::UnverifiedEmail,
        IdTokenFault::WrongIssuer,
        IdTokenFault::BadAtHash,
        IdTokenFault::HmacWithSecret,
    ]
    .into_iter()
    .enumerate()
    {
        google.set_fault(fault);
        let mut x = Browser::new(&control.url());
        let authorize = start_with(&mut x, "google", "/app").await;
        let callback = at_provider(&authorize, &format!("fault{n}@example.com"), true).await;
        let refused = x.get(&path_of(&callback)).await;
        let want = if fault == IdTokenFault::UnverifiedEmail {
            403
        } else {
            502
        };
        assert_eq!(refused.status, want, "{fault:?}: {}", refused.body);
        assert!(!refused
            .set_cookies
            .iter()
            .any(|c| c.starts_with("tokn_session=ses_")));
        assert_eq!(x.get("/app").await.status, 303, "{fault:?}: not signed in");
    }
    google.set_fault(IdTokenFault::None);

    let emails = account_emails(&control).await;
    assert!(
        !emails.iter().any(|e| e.starts_with("fault")),
        "no account for a refused token: {emails:?}"
    );
    // The fake itself accepted every exchange: the refusals are ours.
    assert_eq!(google.exchanged(), 8);
    let log = control.log();
    for why in [
        "ID token signature invalid",
        "ID token nonce mismatch",
        "ID token for another client",
        "ID token expired",
        "ID token from another issuer",
        "access token hash mismatch",
    ] {
        assert!(log.contains(why), "{why} is logged");
    }
}
