//! `tokn`: the whole product in one command — the control plane (its API and the web app) and
//! the proxy, in one process, on the embedded default (SQLite, hot state in process, the `mock`
//! model), with a demo buyer holding the welcome credit. The two services stay apart: this
//! binary only configures them, starts them and introduces one to the other.
//!
//! Data lives in `--data` (default `./tokn-data`): the store, the proxy's spool and sealed
//! snapshot, and the secrets made on first start, so a restart keeps everything. A fleet is the
//! same command with `TOKN_DATABASE_URL` (Postgres) and `TOKN_REDIS_URL` set; Stripe (credit
//! packs, payouts) is on with `TOKN_STRIPE_SECRET_KEY` and `TOKN_STRIPE_WEBHOOK_SECRET`
//! (`TOKN_STRIPE_CONNECT_WEBHOOK_SECRET`, `TOKN_STRIPE_BASE_URL` optional). Sign-in with GitHub
//! is on with `TOKN_GITHUB_CLIENT_ID` and `TOKN_GITHUB_CLIENT_SECRET` (`TOKN_GITHUB_URL`,
//! `TOKN_GITHUB_API_URL` for GitHub Enterprise), with Google with `TOKN_GOOGLE_CLIENT_ID` and
//! `TOKN_GOOGLE_CLIENT_SECRET` (`TOKN_GOOGLE_ISSUER`); the callbacks to register are
//! `{web URL}/signin/github/callback` and `{web URL}/signin/google/callback`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokn_control::cli::ApiClient;

#[derive(Parser)]
#[command(
    name = "tokn",
    version,
    about = "tokn$: control plane, web app and proxy in one command"
)]
struct Args {
    /// Where the embedded store, the proxy's spool and snapshot and the generated secrets live.
    #[arg(long, default_value = "tokn-data")]
    data: PathBuf,
    /// The web app and the control plane's API (a loopback address: plain HTTP).
    #[arg(long, default_value = "127.0.0.1:7070")]
    web_listen: String,
    /// The gateway: the OpenAI and Anthropic APIs.
    #[arg(long, default_value = "127.0.0.1:8080")]
    api_listen: String,
    /// The proxy's Prometheus metrics, `/status` and `/healthz`.
    #[arg(long, default_value = "127.0.0.1:9090")]
    metrics_listen: String,
    /// Let sellers' endpoints be on this machine or a private network (a local model server);
    /// off by default, so a seller's endpoint can never reach the operator's network.
    #[arg(long)]
    allow_internal_endpoints: bool,
}

/// Made on first start, kept in `{data}/secrets.json` (mode 0600).
#[derive(Serialize, Deserialize)]
struct Secrets {
    admin_token: String,
    proxy_token: String,
    kek: String,
    snapshot_key: String,
}

/// The demo made on first start, kept in `{data}/demo.json`.
#[derive(Serialize, Deserialize)]
struct Demo {
    buyer_email: String,
    buyer_key: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOKN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("tokn: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<std::convert::Infallible, String> {
    private_dir(&args.data)?;
    let secrets = secrets(&args.data)?;
    let names: HashMap<&str, String> = HashMap::from([
        ("TOKN_ADMIN_TOKEN", secrets.admin_token.clone()),
        ("TOKN_PROXY_TOKEN", secrets.proxy_token.clone()),
        ("TOKN_KEK_1", secrets.kek.clone()),
        ("TOKN_SNAPSHOT_KEY", secrets.snapshot_key.clone()),
    ]);
    let resolve = |name: &str| {
        names
            .get(name)
            .cloned()
            .or_else(|| std::env::var(name).ok())
    };
    let database_url = std::env::var("TOKN_DATABASE_URL").ok();
    let redis_url = std::env::var("TOKN_REDIS_URL").ok();
    let web_origin = format!("http://{}", args.web_listen);
    let gateway_url = format!("http://{}/v1", args.api_listen);

    let control_text = control_toml(
        &args,
        &gateway_url,
        database_url.is_some(),
        redis_url.is_some(),
    );
    let control = tokn_config::control_plane::load_control_plane(&control_text, &resolve)
        .map_err(|p| format!("control plane configuration: {p}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let serving = runtime.spawn(async move { tokn_control::serve(&control).await });
    let setup = runtime.block_on(async {
        wait_until_up(&web_origin, &serving).await?;
        let api = ApiClient::new(&web_origin, &secrets.admin_token);
        let demo = demo(&api, &args.data).await?;
        let link = api.call("POST", "/v1/admin/signin-links", None).await?;
        Ok::<_, String>((demo, link["url"].as_str().unwrap_or_default().to_owned()))
    })?;
    // The control plane keeps running on the runtime's threads while the proxy has this one.
    std::mem::forget(runtime);

    let proxy_text = proxy_toml(&args, redis_url.is_some());
    let proxy = tokn_config::load(&proxy_text, std::env::vars(), &resolve)
        .map_err(|p| format!("proxy configuration: {p}"))?;
    let server = tokn_proxy::server::build(&proxy, false)?;
    let (demo, operator_link) = setup;
    eprintln!();
    eprintln!("tokn: web app         {web_origin}");
    eprintln!("tokn: API base URL    {gateway_url}");
    eprintln!("tokn: operator link   {operator_link}   (signs the operator in once)");
    eprintln!(
        "tokn: demo buyer key  {}   ({}, holds the welcome credit)",
        demo.buyer_key, demo.buyer_email
    );
    eprintln!(
        "tokn: store           {}",
        if database_url.is_some() {
            "Postgres (TOKN_DATABASE_URL)".to_owned()
        } else {
            format!("SQLite in {}", args.data.display())
        }
    );
    eprintln!();
    server.run_forever()
}

/// `dir`, made private to this user if new.
fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Writes `value` as JSON readable by this user only.
fn write_private<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, &text).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn secrets(data: &Path) -> Result<Secrets, String> {
    let path = data.join("secrets.json");
    if let Some(s) = read_json(&path)? {
        return Ok(s);
    }
    let random = || hex::encode(rand::random::<[u8; 32]>());
    let s = Secrets {
        admin_token: format!("adm_{}", random()),
        proxy_token: format!("prx_{}", random()),
        kek: random(),
        snapshot_key: random(),
    };
    write_private(&path, &s)?;
    Ok(s)
}

/// A TOML string literal.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn control_toml(args: &Args, gateway_url: &str, postgres: bool, redis: bool) -> String {
    let mut text = format!(
        "listen = {}\nsqlite_path = {}\nadmin_token = \"env:TOKN_ADMIN_TOKEN\"\n\
         proxy_token = \"env:TOKN_PROXY_TOKEN\"\n",
        quoted(&args.web_listen),
        quoted(&args.data.join("control.db").display().to_string()),
    );
    if postgres {
        text.push_str("database_url = \"env:TOKN_DATABASE_URL\"\n");
    }
    text.push_str("[[kek]]\nversion = 1\nkey = \"env:TOKN_KEK_1\"\n");
    text.push_str(&format!("[web]\ngateway_url = {}\n", quoted(gateway_url)));
    text.push_str(&sign_in_toml());
    if args.allow_internal_endpoints {
        text.push_str("[verify]\nallow_internal_endpoints = true\n");
    }
    if std::env::var_os("TOKN_STRIPE_SECRET_KEY").is_some() {
        // Credit packs and payouts; Stripe sends people back to the web app's pages.
        let web = format!("http://{}", args.web_listen);
        text.push_str(&format!(
            "[stripe]\nsecret_key = \"env:TOKN_STRIPE_SECRET_KEY\"\n\
             webhook_secrets = [\"env:TOKN_STRIPE_WEBHOOK_SECRET\"]\n\
             success_url = {}\ncancel_url = {}\n\
             onboarding_return_url = {}\nonboarding_refresh_url = {}\n",
            quoted(&format!(
                "{web}/app/purchases?session={{CHECKOUT_SESSION_ID}}"
            )),
            quoted(&format!("{web}/app")),
            quoted(&format!("{web}/sell")),
            quoted(&format!("{web}/sell")),
        ));
        if std::env::var_os("TOKN_STRIPE_CONNECT_WEBHOOK_SECRET").is_some() {
            text.push_str(
                "connect_webhook_secrets = [\"env:TOKN_STRIPE_CONNECT_WEBHOOK_SECRET\"]\n",
            );
        }
        if let Ok(base) = std::env::var("TOKN_STRIPE_BASE_URL") {
            text.push_str(&format!("base_url = {}\n", quoted(&base)));
        }
    }
    if redis {
        text.push_str("[redis]\nurl = \"env:TOKN_REDIS_URL\"\n");
    }
    text
}

/// `[web.github]` and `[web.google]` from `TOKN_GITHUB_*` and `TOKN_GOOGLE_*` (a client id
/// turns one on; its secret stays in the environment).
fn sign_in_toml() -> String {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut text = String::new();
    if let Some(id) = var("TOKN_GITHUB_CLIENT_ID") {
        text.push_str(&format!(
            "[web.github]\nclient_id = {}\nclient_secret = \"env:TOKN_GITHUB_CLIENT_SECRET\"\n",
            quoted(&id)
        ));
        for (field, name) in [
            ("url", "TOKN_GITHUB_URL"),
            ("api_url", "TOKN_GITHUB_API_URL"),
        ] {
            if let Some(v) = var(name) {
                text.push_str(&format!("{field} = {}\n", quoted(&v)));
            }
        }
    }
    if let Some(id) = var("TOKN_GOOGLE_CLIENT_ID") {
        text.push_str(&format!(
            "[web.google]\nclient_id = {}\nclient_secret = \"env:TOKN_GOOGLE_CLIENT_SECRET\"\n",
            quoted(&id)
        ));
        if let Some(v) = var("TOKN_GOOGLE_ISSUER") {
            text.push_str(&format!("issuer = {}\n", quoted(&v)));
        }
    }
    text
}

fn proxy_toml(args: &Args, redis: bool) -> String {
    let data = |name: &str| quoted(&args.data.join(name).display().to_string());
    let mut text = format!(
        "[server]\nlisten = [{}]\nmetrics_listen = {}\n\
         [usage]\npath = \"\"\nspool_dir = {}\n\
         [control]\nurl = {}\ntoken = \"env:TOKN_PROXY_TOKEN\"\nsnapshot_path = {}\n\
         snapshot_key = \"env:TOKN_SNAPSHOT_KEY\"\n",
        quoted(&args.api_listen),
        quoted(&args.metrics_listen),
        data("spool"),
        quoted(&format!("http://{}", args.web_listen)),
        data("snapshot.sealed"),
    );
    if redis {
        text.push_str("[hot_state]\nredis_url = \"env:TOKN_REDIS_URL\"\n");
    }
    if args.allow_internal_endpoints {
        text.push_str("[limits]\nallow_internal_upstreams = true\n");
    }
    text
}

/// Waits (at most 60 s) for the control plane to answer, or for it to fail.
async fn wait_until_up(
    origin: &str,
    serving: &tokio::task::JoinHandle<Result<(), String>>,
) -> Result<(), String> {
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if serving.is_finished() {
            return Err("the control plane stopped while starting (see the log above)".to_owned());
        }
        if let Ok(r) = http.get(format!("{origin}/healthz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the control plane did not answer within 60 s".to_owned())
}

/// The demo, made on first start: a house seller listing the `mock` model, and a buyer with
/// the welcome credit and one key.
async fn demo(api: &ApiClient, data: &Path) -> Result<Demo, String> {
    let path = data.join("demo.json");
    if let Some(d) = read_json(&path)? {
        return Ok(d);
    }
    let seller = api
        .call(
            "POST",
            "/v1/admin/accounts",
            Some(json!({"email": "house@tokn.local", "role": "seller"})),
        )
        .await?;
    let seller_token = seller["token"].as_str().unwrap_or_default();
    let credential = api
        .call_as(
            seller_token,
            "POST",
            "/v1/credentials",
            Some(json!({"credential": {"provider": "mock"}, "label": "the built-in mock"})),
        )
        .await?;
    let credential_id = credential["id"].as_str().unwrap_or_default();
    api.call_as(
        seller_token,
        "POST",
        &format!("/v1/credentials/{credential_id}/verify"),
        None,
    )
    .await?;
    api.call_as(
        seller_token,
        "POST",
        "/v1/pools",
        Some(
            json!({"credential_id": credential_id, "face_value_micros": 1_000_000_000_000i64,
                    "price_ratio_ppm": 600_000, "models": ["mock"]}),
        ),
    )
    .await?;
    let buyer_email = "demo@tokn.local".to_owned();
    let buyer = api
        .call(
            "POST",
            "/v1/admin/accounts",
            Some(json!({"email": buyer_email, "role": "buyer"})),
        )
        .await?;
    let key = api
        .call_as(
            buyer["token"].as_str().unwrap_or_default(),
            "POST",
            "/v1/keys",
            Some(json!({"name": "demo"})),
        )
        .await?;
    let demo = Demo {
        buyer_email,
        buyer_key: key["secret"].as_str().unwrap_or_default().to_owned(),
    };
    write_private(&path, &demo)?;
    Ok(demo)
}
