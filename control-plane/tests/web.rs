//! The web app's security, driven over HTTP as a browser would (cookies kept by hand, redirects
//! not followed): CSRF, session fixation, open redirects on the sign-in return, a sign-in link
//! used twice, another account's ids in URLs, and user input echoed into pages.

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
    let link: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/admin/signin-links", control.url()))
        .bearer_auth(&control.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_ids_are_404_and_input_is_escaped() {
    let control = control();
    let mut op = operator(&control).await;
    let mut ana = Browser::new(&control.url());
    let link = ask_link(&mut ana, &mut op, "ana@example.com", "/app").await;
    use_link(&mut ana, &link).await;
    let mut bo = Browser::new(&control.url());
    let link = ask_link(&mut bo, &mut op, "bo@example.com", "/app").await;
    use_link(&mut bo, &link).await;

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
