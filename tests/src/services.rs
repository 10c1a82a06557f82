//! Private Redis and Postgres servers for tests that kill, freeze or restart them: each on a
//! port of its own, with its data in a temporary directory, never the shared instances.

#![allow(
    clippy::disallowed_methods,
    reason = "the harness waits on child processes, briefly and in bounded loops"
)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{free_port, temp_dir};

/// Waits (at most `within`) until something accepts connections on `port`.
fn listening(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A `redis-server` of the test's own (no persistence: a restart loses every key, as a
/// restarted cache does), killed on drop.
pub struct PrivateRedis {
    child: Option<Child>,
    pub port: u16,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let mut me = Self {
            child: None,
            port: free_port(),
        };
        me.restart();
        me
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it (if running) and starts a fresh, empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server: {e}"));
        self.child = Some(child);
        assert!(
            listening(self.port, Duration::from_secs(5)),
            "private redis-server did not start"
        );
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Postgres server of the test's own: `initdb` into a temporary directory (trust auth), then
/// `postgres` on a free port. Run as the `postgres` system user when the test runs as root
/// (Postgres refuses root). Stopped (immediate shutdown) and its data removed on drop.
pub struct PrivatePostgres {
    child: Option<Child>,
    pub port: u16,
    data: PathBuf,
    dir: PathBuf,
    /// `(uid, gid)` to run as, when not the current user.
    user: Option<(u32, u32)>,
}

/// The `postgres` system user's uid and gid, from /etc/passwd.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let dir = temp_dir("private-postgres");
        let data = dir.join("data");
        let user = if is_root() {
            Some(postgres_user().unwrap_or_else(|| panic!("running as root: no postgres user")))
        } else {
            None
        };
        std::fs::create_dir_all(&data).unwrap_or_else(|e| panic!("{e}"));
        if let Some((uid, gid)) = user {
            let chown = Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(&dir)
                .status();
            assert!(chown.is_ok_and(|s| s.success()), "chown {}", dir.display());
        }
        let mut initdb = Self::command("initdb", user);
        initdb
            .args([
                "--auth=trust",
                "--username=postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = initdb.status().unwrap_or_else(|e| panic!("initdb: {e}"));
        assert!(status.success(), "initdb failed");
        let mut me = Self {
            child: None,
            port: free_port(),
            data,
            dir,
            user,
        };
        me.start_server();
        me
    }

    fn command(program: &str, user: Option<(u32, u32)>) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(program);
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn start_server(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .unwrap_or_else(|e| panic!("{e}"));
        let child = Self::command("postgres", self.user)
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            // A test server: durability across machine crashes is not what it tests (the
            // machine stays up, so what reached the kernel survives). Commits stay synchronous:
            // a commit acknowledged before its WAL is written is lost by an immediate shutdown.
            .args(["-c", "fsync=off"])
            .args(["-c", "max_connections=100"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("postgres: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ready() {
            assert!(Instant::now() < deadline, "private postgres did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ready(&self) -> bool {
        Command::new("pg_isready")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The server's URL (no database path).
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// The URL of database `postgres` on it.
    pub fn url(&self) -> String {
        format!("{}/postgres", self.server_url())
    }

    /// Immediate shutdown (SIGQUIT: every backend stops at once, as in a crash; the next start
    /// recovers from the write-ahead log).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it at once and starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.start_server();
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
