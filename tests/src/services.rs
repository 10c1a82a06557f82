//! Private Redis (a single server or a three-node cluster) and Postgres servers for tests that
//! kill, freeze or restart them, or need what the shared instances are not: each on a port of
//! its own, with its data in a temporary directory, never the shared instances.

#![allow(
    clippy::disallowed_methods,
    reason = "the harness waits on child processes, briefly and in bounded loops"
)]

use std::io::Read;
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

    /// SIGKILL (a frozen one too: SIGKILL needs no SIGCONT).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: it keeps its connections and its data but answers nothing, as a server stalled
    /// by swapping or a long fork does, until [`Self::thaw`].
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Self::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(which)
                .arg(child.id().to_string())
                .status();
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

/// Three `redis-server` masters joined into a Redis Cluster (no replicas, no persistence), each
/// in a temporary directory of its own for its `nodes-<port>.conf`; killed and their directories
/// removed on drop.
pub struct PrivateRedisCluster {
    children: Vec<Child>,
    dirs: Vec<PathBuf>,
    pub ports: [u16; 3],
}

impl PrivateRedisCluster {
    /// Starts the nodes and waits until every node reports the cluster as `ok` (all 16384 slots
    /// served). A port can be taken between choosing and binding it, so a failed attempt is
    /// retried on fresh ports, three times at most.
    pub fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                Err(e) => failures.push(e),
            }
        }
        panic!(
            "private Redis Cluster did not start: {}",
            failures.join("; ")
        );
    }

    /// `redis://` URLs of the three nodes (any one is enough for a cluster client to find the
    /// others).
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// On an error the partly started cluster is dropped, which kills what did start.
    fn try_start() -> Result<Self, String> {
        let ports = cluster_ports()?;
        let mut me = Self {
            children: Vec::new(),
            dirs: Vec::new(),
            ports,
        };
        for port in ports {
            let dir = temp_dir(&format!("redis-cluster-{port}"));
            me.dirs.push(dir.clone());
            let child = Command::new("redis-server")
                .current_dir(&dir)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("redis-server: {e}"))?;
            me.children.push(child);
        }
        for port in ports {
            if !listening(port, Duration::from_secs(5)) {
                return Err(format!("cluster node on port {port} did not start"));
            }
        }
        let mut create = Command::new("redis-cli");
        create
            .args(["--cluster", "create"])
            .args(ports.iter().map(|port| format!("127.0.0.1:{port}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"]);
        output_within(&mut create, Duration::from_secs(30))
            .map_err(|e| format!("redis-cli --cluster create: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in ports {
            let mut ok = false;
            for _ in 0..400 {
                if Instant::now() >= deadline {
                    break;
                }
                let mut info = Command::new("redis-cli");
                info.args(["-p", &port.to_string(), "cluster", "info"]);
                ok = output_within(&mut info, Duration::from_secs(5))
                    .is_ok_and(|out| out.contains("cluster_state:ok"));
                if ok {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !ok {
                return Err(format!(
                    "node on port {port} never reported cluster_state:ok"
                ));
            }
        }
        Ok(me)
    }
}

impl Drop for PrivateRedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Three distinct ports that are free together with their cluster bus ports (port + 10000).
/// Drawn from 12000..22000, so neither the port nor its bus port falls in the ephemeral range
/// (from 32768) that outgoing connections and `free_port` use.
fn cluster_ports() -> Result<[u16; 3], String> {
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    let mut ports = Vec::with_capacity(3);
    for _ in 0..1000 {
        let port = rand::random_range(12_000..22_000);
        if !ports.contains(&port) && free(port) && free(port + 10_000) {
            ports.push(port);
            if let Ok(ports) = <[u16; 3]>::try_from(ports.as_slice()) {
                return Ok(ports);
            }
        }
    }
    Err("no three free port pairs for a Redis Cluster".to_owned())
}

/// Runs `cmd` to completion, killing it after `within`: its standard output, or why it failed.
/// The output is read after the exit, so it must fit in a pipe's buffer (a few KiB here).
fn output_within(cmd: &mut Command, within: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + within;
    let mut status = None;
    for _ in 0..within.as_millis() / 10 + 1 {
        status = child.try_wait().ok().flatten();
        if status.is_some() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("still running after {within:?}"));
    };
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    if status.success() {
        Ok(out)
    } else {
        Err(format!("{status}: {out}{err}"))
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
