//! Starts the real `tokn-proxy` binary on free ports with a given configuration, and reads back
//! the usage records it writes. The process is killed when the handle drops.

#![allow(
    clippy::disallowed_methods,
    reason = "the harness waits on a child process and a file, briefly and in bounded loops"
)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct ProxyProcess {
    child: Child,
    /// How it was started: a restart runs the same command on the same ports and directory.
    launch: Launch,
    pub port: u16,
    /// The HTTPS port, when started with [`ProxyProcess::start_tls`].
    pub tls_port: Option<u16>,
    pub metrics_port: u16,
    pub dir: PathBuf,
    pub usage_path: PathBuf,
}

/// A proxy's command line and environment.
#[derive(Clone)]
struct Launch {
    binary: PathBuf,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(String, String)>,
}

impl Launch {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }
}

/// A port that was free a moment ago (the OS does not hand it out again right away).
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct ports that were free a moment ago. Each is held until all are chosen: two
/// ports asked for one after the other can be the same one, and a proxy whose gateway port was
/// its metrics port looked ready (both "listened") while its metrics service answered the API.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<Option<TcpListener>> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").ok())
        .collect();
    std::array::from_fn(|i| {
        held[i]
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(0, |a| a.port())
    })
}

/// A fresh directory under the system temp dir, unique to this process and `name`.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tokn-test-{}-{}-{}",
        std::process::id(),
        name,
        rand_suffix()
    ));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Whether every one of `ports` on 127.0.0.1 accepts a connection.
fn all_listen(ports: &[Option<u16>]) -> bool {
    ports
        .iter()
        .flatten()
        .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

impl ProxyProcess {
    /// Writes `body_toml` (everything but `[server]` and `[usage]`, which this fills in;
    /// `{PROXY_ADDR}` in it becomes the proxy's own address) and starts `binary` on it, waiting
    /// until it accepts connections.
    pub fn start(binary: &Path, name: &str, body_toml: &str, envs: &[(&str, &str)]) -> Self {
        Self::start_with(binary, name, body_toml, envs, None)
    }

    /// Also serves HTTPS (HTTP/2 by ALPN) with `tls.cert`/`tls.key` and trusts `tls.ca` upstream.
    pub fn start_tls(
        binary: &Path,
        name: &str,
        body_toml: &str,
        envs: &[(&str, &str)],
        tls: &crate::tls::TestCa,
    ) -> Self {
        Self::start_with(binary, name, body_toml, envs, Some(tls))
    }

    fn start_with(
        binary: &Path,
        name: &str,
        body_toml: &str,
        envs: &[(&str, &str)],
        tls: Option<&crate::tls::TestCa>,
    ) -> Self {
        for _ in 0..3 {
            if let Some(p) = Self::try_start(binary, name, body_toml, envs, tls) {
                return p;
            }
        }
        panic!("tokn-proxy did not start (its log is printed above)");
    }

    fn try_start(
        binary: &Path,
        name: &str,
        body_toml: &str,
        envs: &[(&str, &str)],
        tls: Option<&crate::tls::TestCa>,
    ) -> Option<Self> {
        let dir = temp_dir(name);
        let [port, metrics_port, https_port] = free_ports();
        let tls_port = tls.map(|_| https_port);
        let usage_path = dir.join("usage.jsonl");
        let tls_lines = match (tls, tls_port) {
            (Some(ca), Some(p)) => format!(
                "tls_listen = [\"127.0.0.1:{p}\"]\ntls_cert_path = \"{}\"\ntls_key_path = \"{}\"\nupstream_ca_file = \"{}\"\n",
                ca.leaf_cert_path.display(),
                ca.leaf_key_path.display(),
                ca.ca_cert_path.display()
            ),
            _ => String::new(),
        };
        let config = format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\nthreads = 2\ngrace_period_s = 0\n{tls_lines}\n[usage]\npath = \"{}\"\nspool_dir = \"{}\"\n\n{}",
            usage_path.display(),
            dir.join("spool").display(),
            body_toml.replace("{PROXY_ADDR}", &format!("127.0.0.1:{port}"))
        );
        let config_path = dir.join("tokn.toml");
        std::fs::write(&config_path, config).ok()?;
        // Debug: the log searched for secrets holds every upstream request's header.
        let mut all_envs = vec![("TOKN_LOG".to_owned(), "debug".to_owned())];
        all_envs.extend(envs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let launch = Launch {
            binary: binary.to_owned(),
            args: vec!["--config".into(), config_path.into_os_string()],
            envs: all_envs,
        };
        Self::spawn(launch, dir, port, tls_port, metrics_port, usage_path)
    }

    /// Runs the binary on its embedded default configuration (no `--config`), moved to free
    /// ports and a private usage file by `TOKN__…` environment overrides.
    pub fn start_default(binary: &Path, name: &str) -> Self {
        for _ in 0..3 {
            let dir = temp_dir(name);
            let [port, metrics_port] = free_ports();
            let usage_path = dir.join("usage.jsonl");
            let launch = Launch {
                binary: binary.to_owned(),
                args: Vec::new(),
                envs: vec![
                    ("TOKN_LOG".to_owned(), "warn".to_owned()),
                    (
                        "TOKN__SERVER__LISTEN".to_owned(),
                        format!("[\"127.0.0.1:{port}\"]"),
                    ),
                    (
                        "TOKN__SERVER__METRICS_LISTEN".to_owned(),
                        format!("127.0.0.1:{metrics_port}"),
                    ),
                    (
                        "TOKN__USAGE__PATH".to_owned(),
                        usage_path.display().to_string(),
                    ),
                ],
            };
            if let Some(p) = Self::spawn(launch, dir, port, None, metrics_port, usage_path) {
                return p;
            }
        }
        panic!("tokn-proxy did not start on its embedded default (its log is printed above)");
    }

    fn spawn(
        launch: Launch,
        dir: PathBuf,
        port: u16,
        tls_port: Option<u16>,
        metrics_port: u16,
        usage_path: PathBuf,
    ) -> Option<Self> {
        let mut child = Self::spawn_child(&launch, &dir)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default();
                eprintln!("--- tokn-proxy exited at start ---\n{log}");
                return None;
            }
            // Every listener, not the first: Pingora opens its services one by one.
            if all_listen(&[Some(port), Some(metrics_port), tls_port]) {
                return Some(Self {
                    child,
                    launch,
                    port,
                    tls_port,
                    metrics_port,
                    dir,
                    usage_path,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        None
    }

    /// Starts the command in `dir`, its log appended to `proxy.log` there.
    fn spawn_child(launch: &Launch, dir: &Path) -> Option<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("proxy.log"))
            .ok()?;
        let mut cmd = launch.command();
        cmd.current_dir(dir).stdin(Stdio::null()).stderr(log);
        cmd.spawn().ok()
    }

    /// SIGKILL: the process dies at once, mid-request, with nothing flushed or shipped.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again (after [`Self::sigkill`]) with the same configuration, ports, spool and
    /// usage file; waits until it accepts connections.
    pub fn restart(&mut self) {
        self.sigkill();
        self.child = Self::spawn_child(&self.launch, &self.dir)
            .unwrap_or_else(|| panic!("tokn-proxy did not start again"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !all_listen(&[Some(self.port), Some(self.metrics_port), self.tls_port]) {
            assert!(Instant::now() < deadline, "tokn-proxy did not listen again");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A graceful upgrade: the same command started again with `--upgrade` takes the listening
    /// sockets over from this process (sent SIGQUIT), which finishes what it serves and exits.
    /// Returns the old process, still finishing.
    pub fn upgrade(&mut self) -> Child {
        let mut launch = self.launch.clone();
        launch.args.push("--upgrade".into());
        let new = Self::spawn_child(&launch, &self.dir)
            .unwrap_or_else(|| panic!("tokn-proxy --upgrade did not start"));
        let old = std::mem::replace(&mut self.child, new);
        let _ = Command::new("kill")
            .arg("-QUIT")
            .arg(old.id().to_string())
            .status();
        old
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// Asserts that none of `secrets` is in the log, and that the log holds what makes the
    /// search meaningful: an upstream request's header logged at debug level, with the
    /// credential header in it (one of `credential_headers`, its value redacted), so the check
    /// cannot pass on a log that says nothing.
    pub fn assert_log_free_of(&self, secrets: &[&str], credential_headers: &[&str]) {
        let log = self.log();
        let positive = log.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("sending to the upstream.")
                && credential_headers.iter().any(|h| l.contains(h))
        });
        assert!(
            positive,
            "no upstream request header with {credential_headers:?} in the debug log:\n{log}"
        );
        for secret in secrets {
            assert!(!log.contains(secret), "a secret is in the proxy's log");
        }
    }

    /// `/status` on the operations port: what the proxy runs.
    pub fn status_url(&self) -> String {
        format!("http://127.0.0.1:{}/status", self.metrics_port)
    }

    /// Every usage record written so far.
    pub fn usage_records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.usage_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (at most `timeout`) until at least `n` records exist, and returns them all.
    pub fn wait_for_records(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.usage_records();
            if records.len() >= n || Instant::now() > deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The record of one request id.
    pub fn record_for(&self, request_id: &str) -> Option<Value> {
        self.usage_records()
            .into_iter()
            .find(|r| r["request_id"] == request_id)
    }

    /// Sends SIGTERM: a graceful shutdown (in-flight requests finish within the grace period).
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
            if !self.is_running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Everything the process wrote to stderr (its log) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- tokn-proxy log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
