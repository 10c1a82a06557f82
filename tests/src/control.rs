//! Starts the real `tokn-control` binary on a free port with a fresh store, capturing its log.

#![allow(
    clippy::disallowed_methods,
    reason = "the harness waits on a child process, briefly and in bounded loops"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{free_port, temp_dir};

#[derive(Default)]
pub struct ControlOptions {
    /// Postgres URL; SQLite in `dir` when absent.
    pub database_url: Option<String>,
    /// Redis URL and key prefix.
    pub redis: Option<(String, String)>,
    /// Where verification calls go for OpenAI credentials.
    pub verify_openai_base: Option<String>,
    /// Where verification calls go for Bedrock credentials (the control endpoint).
    pub verify_bedrock_base: Option<String>,
    /// Reuse a directory (and its SQLite file) across restarts.
    pub dir: Option<PathBuf>,
    /// Key-encryption keys `(version, 64 hex)`; one random key when empty.
    pub keks: Vec<(u32, String)>,
    /// Keep the port of a previous run (restart at the same address).
    pub port: Option<u16>,
    /// `TOKN_LOG` filter; `info` when absent.
    pub log: Option<String>,
    /// Stripe, pointed at a fake.
    pub stripe: Option<StripeOptions>,
    /// `[tls]`: certificate, key, and the client CA if client certificates are required.
    pub tls: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
    /// More of the file, appended as is (sections such as `[web.smtp]`).
    pub extra: Option<String>,
}

/// A `[stripe]` section: the fake's address and secrets (passed in the environment, as an
/// operator would), and any further lines of the section (`timeout_ms = …`, `[stripe.payouts]`).
#[derive(Clone, Default)]
pub struct StripeOptions {
    pub base_url: String,
    pub secret_key: String,
    pub webhook_secret: String,
    pub connect_webhook_secret: String,
    pub extra: String,
}

pub struct ControlProcess {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub admin_token: String,
    pub proxy_token: String,
    pub keks: Vec<(u32, String)>,
    log_filter: String,
    config_path: PathBuf,
    binary: PathBuf,
    log_path: PathBuf,
    /// Further secrets the configuration names (`env:…`).
    secrets: Vec<(String, String)>,
    /// It serves HTTPS.
    tls: bool,
}

pub fn random_hex32() -> String {
    (0..4)
        .map(|_| format!("{:016x}", rand::random::<u64>()))
        .collect()
}

impl ControlProcess {
    pub fn start(binary: &Path, opts: ControlOptions) -> Self {
        let dir = opts.dir.clone().unwrap_or_else(|| temp_dir("control"));
        let _ = std::fs::create_dir_all(&dir);
        let port = opts.port.unwrap_or_else(free_port);
        let keks = if opts.keks.is_empty() {
            vec![(1, random_hex32())]
        } else {
            opts.keks.clone()
        };
        let admin_token = format!("admin-{}", random_hex32());
        let proxy_token = format!("proxy-{}", random_hex32());
        let mut config = format!(
            "listen = \"127.0.0.1:{port}\"\nsqlite_path = \"{}\"\nadmin_token = \"env:T_ADMIN\"\nproxy_token = \"env:T_PROXY\"\n",
            dir.join("control.db").display()
        );
        if let Some(url) = &opts.database_url {
            config.push_str(&format!("database_url = \"{url}\"\n"));
        }
        for (v, _) in &keks {
            config.push_str(&format!(
                "[[kek]]\nversion = {v}\nkey = \"env:T_KEK_{v}\"\n"
            ));
        }
        if let Some((url, prefix)) = &opts.redis {
            config.push_str(&format!(
                "[redis]\nurl = \"{url}\"\nprefix = \"{prefix}\"\n"
            ));
        }
        config.push_str("[limits]\nversion_poll_ms = 100\n");
        // The fake providers listen on loopback.
        config.push_str("[verify]\nallow_internal_endpoints = true\n");
        if let Some(base) = &opts.verify_openai_base {
            config.push_str(&format!("openai_base_url = \"{base}\"\n"));
        }
        if let Some(base) = &opts.verify_bedrock_base {
            config.push_str(&format!("bedrock_base_url = \"{base}\"\n"));
        }
        if let Some((cert, key, client_ca)) = &opts.tls {
            config.push_str(&format!(
                "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = client_ca {
                config.push_str(&format!("client_ca_file = \"{}\"\n", ca.display()));
            }
        }
        if let Some(stripe) = &opts.stripe {
            config.push_str(&format!(
                "[stripe]\nbase_url = \"{}\"\nsecret_key = \"env:T_STRIPE_KEY\"\n\
                 webhook_secrets = [\"env:T_STRIPE_WHSEC\"]\n\
                 connect_webhook_secrets = [\"env:T_STRIPE_CONNECT_WHSEC\"]\n\
                 success_url = \"https://app.example/credits/ok?session={{CHECKOUT_SESSION_ID}}\"\n\
                 cancel_url = \"https://app.example/credits\"\n\
                 onboarding_return_url = \"https://app.example/seller/payouts\"\n\
                 onboarding_refresh_url = \"https://app.example/seller/payouts/refresh\"\n\
                 retry_base_ms = 50\n{}\n",
                stripe.base_url, stripe.extra
            ));
        }
        if let Some(extra) = &opts.extra {
            config.push_str(extra);
            config.push('\n');
        }
        let config_path = dir.join(format!("control-{port}.toml"));
        let _ = std::fs::write(&config_path, config);
        let secrets: Vec<(String, String)> = opts
            .stripe
            .iter()
            .flat_map(|s| {
                [
                    ("T_STRIPE_KEY".to_owned(), s.secret_key.clone()),
                    ("T_STRIPE_WHSEC".to_owned(), s.webhook_secret.clone()),
                    (
                        "T_STRIPE_CONNECT_WHSEC".to_owned(),
                        s.connect_webhook_secret.clone(),
                    ),
                ]
            })
            .collect();
        let mut me = Self {
            child: Self::spawn_child(
                binary,
                &config_path,
                &dir,
                (&admin_token, &proxy_token),
                &keks,
                &secrets,
                opts.log.as_deref().unwrap_or("info"),
            ),
            port,
            dir,
            admin_token,
            proxy_token,
            keks,
            log_filter: opts.log.clone().unwrap_or_else(|| "info".to_owned()),
            config_path,
            binary: binary.to_owned(),
            log_path: PathBuf::new(),
            secrets,
            tls: opts.tls.is_some(),
        };
        me.log_path = me.dir.join("control.log");
        me.wait_ready();
        me
    }

    fn spawn_child(
        binary: &Path,
        config: &Path,
        dir: &Path,
        (admin, proxy): (&str, &str),
        keks: &[(u32, String)],
        secrets: &[(String, String)],
        log_filter: &str,
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("control.log"))
            .unwrap_or_else(|e| panic!("control log: {e}"));
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env("TOKN_LOG", log_filter)
            .env("T_ADMIN", admin)
            .env("T_PROXY", proxy)
            .envs(secrets.iter().cloned());
        for (v, key) in keks {
            cmd.env(format!("T_KEK_{v}"), key);
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()))
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tokn-control exited at start ({status}):\n{}", self.log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tokn-control did not start:\n{}", self.log());
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits (at most `timeout`) for the process to exit; returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the process at once (no graceful shutdown).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port, store and secrets.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn_child(
            &self.binary,
            &self.config_path,
            &self.dir,
            (&self.admin_token, &self.proxy_token),
            &self.keks,
            &self.secrets,
            &self.log_filter,
        );
        self.wait_ready();
    }

    /// Runs a one-shot command (`rewrap`, `check`) with this instance's configuration, plus
    /// extra key-encryption keys; returns (success, log).
    pub fn run_command(&self, command: &str, keks: &[(u32, String)]) -> (bool, String) {
        let mut config = std::fs::read_to_string(&self.config_path).unwrap_or_default();
        for (v, _) in keks {
            config = config.replacen(
                "[limits]",
                &format!("[[kek]]\nversion = {v}\nkey = \"env:T_KEK_{v}\"\n[limits]"),
                1,
            );
        }
        let path = self.dir.join(format!("{command}.toml"));
        let _ = std::fs::write(&path, config);
        let all: Vec<(u32, String)> = self.keks.iter().chain(keks).cloned().collect();
        let out = Command::new(&self.binary)
            .arg("--config")
            .arg(&path)
            .arg(command)
            .env("TOKN_LOG", "info")
            .env("T_ADMIN", &self.admin_token)
            .env("T_PROXY", &self.proxy_token)
            .envs(self.secrets.iter().cloned())
            .envs(all.iter().map(|(v, k)| (format!("T_KEK_{v}"), k.clone())))
            .output()
            .unwrap_or_else(|e| panic!("{command}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- tokn-control log ---\n{}", self.log());
        }
        self.kill();
    }
}
