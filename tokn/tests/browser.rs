//! The product as a person meets it: `tokn` started as the README says (on its embedded
//! default, in a fresh data directory), driven in a real headless Chromium (Debian's
//! `chromium`, through Playwright for Python) by `browser.py`: sign-up by email link, the
//! welcome credit, the playground's stream and its bill, a key used with the official OpenAI
//! SDK; a seller connects a credential (a fake OpenAI), the operator approves its endpoint, the
//! seller lists two pools, the buyer's traffic consumes the first (FIFO) and earnings appear; a
//! third person signs in with GitHub and the first again with Google (fakes of both), one
//! account per address. Screenshots of each page go to `target/tmp/screenshots/`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "tests"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokn_testkit::harness::free_ports;
use tokn_testkit::python::venv_python;

const STRIPE_KEY: &str = "sk_test_browser_0123456789";
const STRIPE_WEBHOOK_SECRET: &str = "whsec_browser_0123456789";
const GITHUB_CLIENT_ID: &str = "Ov23liBrowserTest01";
const GITHUB_CLIENT_SECRET: &str = "github-browser-secret-0123456789";
const GOOGLE_CLIENT_ID: &str = "browser-test.apps.googleusercontent.com";
const GOOGLE_CLIENT_SECRET: &str = "GOCSPX-browser-secret-0123";

/// The running `tokn`, killed when dropped.
struct Tokn {
    child: Child,
    web: String,
    gateway: String,
    operator_link: String,
    demo_key: String,
}

impl Drop for Tokn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sign-in providers' fakes, their clients registered with `tokn`'s callbacks.
struct Providers {
    github: tokn_testkit::FakeGitHub,
    google: tokn_testkit::FakeOidc,
}

/// Starts `tokn` in `data` on `ports` (web app, API, metrics), and reads what it prints (at most
/// 120 s).
fn start(data: &Path, [web, api, metrics]: [u16; 3], stripe: &str, providers: &Providers) -> Tokn {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokn"))
        .arg("--data")
        .arg(data)
        .args(["--web-listen", &format!("127.0.0.1:{web}")])
        .args(["--api-listen", &format!("127.0.0.1:{api}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        // The seller's fake OpenAI is on this machine.
        .arg("--allow-internal-endpoints")
        .env("TOKN_LOG", "warn")
        .env("TOKN_STRIPE_SECRET_KEY", STRIPE_KEY)
        .env("TOKN_STRIPE_WEBHOOK_SECRET", STRIPE_WEBHOOK_SECRET)
        .env("TOKN_STRIPE_BASE_URL", stripe)
        .env("TOKN_GITHUB_CLIENT_ID", GITHUB_CLIENT_ID)
        .env("TOKN_GITHUB_CLIENT_SECRET", GITHUB_CLIENT_SECRET)
        .env("TOKN_GITHUB_URL", providers.github.base_url())
        .env("TOKN_GITHUB_API_URL", providers.github.base_url())
        .env("TOKN_GOOGLE_CLIENT_ID", GOOGLE_CLIENT_ID)
        .env("TOKN_GOOGLE_CLIENT_SECRET", GOOGLE_CLIENT_SECRET)
        .env("TOKN_GOOGLE_ISSUER", providers.google.issuer())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tokn starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[tokn] {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut operator_link, mut demo_key) = (None, None);
    while operator_link.is_none() || demo_key.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("tokn prints its URLs within 120 s");
        let word = |n: usize| line.split_whitespace().nth(n).map(str::to_owned);
        if line.starts_with("tokn: operator link") {
            operator_link = word(3);
        }
        if line.starts_with("tokn: demo buyer key") {
            demo_key = word(4);
        }
    }
    Tokn {
        child,
        web: format!("http://127.0.0.1:{web}"),
        gateway: format!("http://127.0.0.1:{api}/v1"),
        operator_link: operator_link.unwrap(),
        demo_key: demo_key.unwrap(),
    }
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

#[test]
fn a_person_signs_up_plays_and_calls_the_api_in_a_real_browser() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let chromium = chromium().expect("Debian's chromium is installed (.ci/run installs it)");
    let python = venv_python(&tmp, "venv-browser", &["playwright>=1.45", "openai>=1.40"]);
    let data = tmp.join(format!("tokn-data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    // The seller's provider: a fake OpenAI that checks what it receives.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime
        .block_on(tokn_testkit::fake::FakeUpstream::start(
            tokn_testkit::fake::Behavior::default(),
        ))
        .unwrap();
    // Stripe: a fake that speaks its API and hosts its Checkout page.
    let stripe = runtime
        .block_on(tokn_testkit::FakeStripe::start(
            STRIPE_KEY,
            STRIPE_WEBHOOK_SECRET,
            "whsec_browser_connect_0123",
        ))
        .unwrap();
    // GitHub and Google: fakes of their OAuth and OpenID Connect endpoints.
    let ports = free_ports();
    let [web, _, _] = ports;
    let client = |id: &str, secret: &str, provider: &str| tokn_testkit::RegisteredClient {
        client_id: id.to_owned(),
        client_secret: secret.to_owned(),
        redirect_uri: format!("http://127.0.0.1:{web}/signin/{provider}/callback"),
    };
    let providers = runtime.block_on(async {
        Providers {
            github: tokn_testkit::FakeGitHub::start(client(
                GITHUB_CLIENT_ID,
                GITHUB_CLIENT_SECRET,
                "github",
            ))
            .await
            .unwrap(),
            google: tokn_testkit::FakeOidc::start(client(
                GOOGLE_CLIENT_ID,
                GOOGLE_CLIENT_SECRET,
                "google",
            ))
            .await
            .unwrap(),
        }
    });
    let tokn = start(&data, ports, &stripe.base_url(), &providers);
    stripe.deliver_to(
        &format!("{}/v1/stripe/webhook", tokn.web),
        &format!("{}/v1/stripe/connect-webhook", tokn.web),
    );
    // The operator offers a credit pack (through the API, with the admin token `tokn` made).
    let secrets: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("secrets.json")).unwrap()).unwrap();
    let pack = runtime.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v1/admin/packs", tokn.web))
            .bearer_auth(secrets["admin_token"].as_str().unwrap())
            .json(&serde_json::json!({"name": "Starter", "price_cents": 2000, "credit_micros": 20_000_000}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(pack.as_u16(), 201);
    let shots = tmp.join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let status = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser.py"))
        .env("TOKN_WEB", &tokn.web)
        .env("TOKN_GATEWAY", &tokn.gateway)
        .env("TOKN_DEMO_KEY", &tokn.demo_key)
        .env("TOKN_OPERATOR_LINK", &tokn.operator_link)
        .env("TOKN_CHROMIUM", &chromium)
        .env("TOKN_FAKE_OPENAI", fake.base_url())
        .env("TOKN_SHOTS", &shots)
        .status()
        .expect("python runs");
    assert!(
        status.success(),
        "the browser walk failed (its output is above)"
    );
    assert_eq!(providers.github.exchanged(), 1, "one sign-in with GitHub");
    assert_eq!(providers.google.exchanged(), 1, "one sign-in with Google");
    assert!(
        providers.github.rejected().is_empty(),
        "{:?}",
        providers.github.rejected()
    );
    assert!(
        providers.google.rejected().is_empty(),
        "{:?}",
        providers.google.rejected()
    );
    drop(tokn);
    let _ = std::fs::remove_dir_all(&data);
}
