//! Keeping the snapshot in step with the control plane (`[control]`).
//!
//! At start the last configuration the control plane sent, kept sealed on disk, is applied (a
//! proxy restarted while the control plane is down still serves). Then a background service
//! long-polls `GET {url}/internal/v1/config?after={version}&wait_s={watch_timeout_s}`: the
//! control plane answers 200 with a `PushedConfig` as soon as it has a newer version, or 204
//! when nothing changed within `wait_s`. Each new version is validated (`with_pushed`), built
//! into a `Snapshot`, swapped in, then sealed to disk. The next poll is issued at once, so a
//! change reaches the proxy within one round trip. Failures are logged (never with a secret),
//! counted in `tokn_control_sync_errors_total{kind}` and retried with exponential back-off
//! (100 ms doubling to 2 s).
//!
//! The proxy asks with `delta=true&pools=true`: when only keys, pools or the catalog changed
//! since its version, the answer is a `ConfigDelta` (header `x-tokn-config: delta`), applied in
//! place (`Snapshot::with_delta`: the cost of the change, not of the 10⁵ keys and 10⁴ pools
//! around it; only the pools it brings are built).
//!
//! The sealed file: `MAGIC ‖ nonce (12 bytes) ‖ AES-256-GCM(ciphertext ‖ tag)` of the
//! `PushedConfig` JSON exactly as received, with `MAGIC` as associated data. A fresh random
//! nonce per write; written to a temporary file (mode 0600), fsynced, renamed over the old one.
//! Deltas are appended to a log beside it (`{snapshot_path}.deltas`: records of a 4-byte
//! little-endian length and a delta sealed the same way), so a change costs its own size on
//! disk too. A full configuration replaces the file and empties the log; once the log outgrows
//! half the file (at least 1 MiB) the next watch asks for a full configuration. At start the
//! file is applied, then the log's deltas in order up to the first that does not open or
//! apply (a write a crash cut short): the proxy resumes at the last whole version and catches
//! up from the control plane. The plaintext never touches the disk.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use bytes::Bytes;
use tokio::sync::watch;
use tokn_config::{ConfigDelta, PushedConfig, ValidConfig, ValidControl, CONFIG_KIND_HEADER};
use tracing::{debug, info, warn};

use crate::hot_state::HotState;
use crate::metrics;
use crate::retry::Retry;
use crate::snapshot::{ConfigSource, DeltaRefused, PoolHealthRegistry, Snapshot, SnapshotSlot};

/// Format tag at the start of a sealed snapshot file, also bound as associated data.
pub const SEALED_MAGIC: &[u8; 16] = b"tokn-snapshot-1\n";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Largest configuration accepted from the control plane (and from the sealed file).
pub const PUSHED_BYTES_MAX: usize = 128 * 1024 * 1024;
/// A watch request may take this much longer than the `wait_s` it asks for.
const WATCH_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The delta log may grow to this size before it is compacted, however small the sealed file.
const DELTA_LOG_BYTES_MIN: u64 = 1 << 20;

/// Why a sealed snapshot could not be opened. Deliberately says nothing of the key or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// Not a sealed snapshot of this format.
    Format,
    /// Wrong key, or the file was altered.
    Corrupt,
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Format => f.write_str("not a sealed tokn snapshot"),
            Self::Corrupt => f.write_str("sealed snapshot does not open (wrong key or altered)"),
        }
    }
}

impl std::error::Error for SealError {}

/// Encrypts `plaintext` under `key` with a fresh random nonce.
pub fn seal(key: &[u8; 32], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let cipher = Aes256Gcm::new(key.into());
    let nonce = rand::random::<[u8; NONCE_LEN]>();
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: SEALED_MAGIC,
            },
        )
        .map_err(|_| SealError::Corrupt)?;
    let mut out = Vec::with_capacity(SEALED_MAGIC.len() + NONCE_LEN + ciphertext.len());
    out.extend_from_slice(SEALED_MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Opens what `seal` produced.
pub fn unseal(key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    let rest = sealed
        .strip_prefix(SEALED_MAGIC.as_slice())
        .ok_or(SealError::Format)?;
    if rest.len() < NONCE_LEN + TAG_LEN {
        return Err(SealError::Format);
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    Aes256Gcm::new(key.into())
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: SEALED_MAGIC,
            },
        )
        .map_err(|_| SealError::Corrupt)
}

/// Seals `plaintext` into `path` atomically: a temporary file beside it (mode 0600), fsynced,
/// renamed over `path`, and the directory fsynced.
pub fn write_sealed(path: &Path, key: &[u8; 32], plaintext: &[u8]) -> std::io::Result<()> {
    let sealed = seal(key, plaintext).map_err(std::io::Error::other)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A leftover from a crash may have other permissions: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&sealed)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Why the persisted snapshot was not used.
#[derive(Debug)]
pub enum SnapshotFileError {
    Io(std::io::Error),
    TooLarge,
    Seal(SealError),
}

impl fmt::Display for SnapshotFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::TooLarge => write!(f, "larger than {PUSHED_BYTES_MAX} bytes"),
            Self::Seal(e) => write!(f, "{e}"),
        }
    }
}

/// Reads and opens a sealed snapshot; `Ok(None)` when there is no file.
pub fn read_sealed(path: &Path, key: &[u8; 32]) -> Result<Option<Vec<u8>>, SnapshotFileError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SnapshotFileError::Io(e)),
    };
    let mut sealed = Vec::new();
    let limit = (PUSHED_BYTES_MAX + SEALED_MAGIC.len() + NONCE_LEN + TAG_LEN) as u64;
    file.take(limit + 1)
        .read_to_end(&mut sealed)
        .map_err(SnapshotFileError::Io)?;
    if sealed.len() as u64 > limit {
        return Err(SnapshotFileError::TooLarge);
    }
    unseal(key, &sealed)
        .map(Some)
        .map_err(SnapshotFileError::Seal)
}

/// Why one exchange with the control plane failed. `Display` holds no secret.
#[derive(Debug)]
pub enum SyncError {
    /// No connection, or it broke.
    Transport(String),
    Timeout,
    /// 401/403: the control plane refused this proxy's token.
    Unauthorized(u16),
    /// Any other unexpected status.
    Status(u16),
    /// The body was larger than `PUSHED_BYTES_MAX` or could not be read.
    Body,
    /// Not a `PushedConfig`.
    Parse(String),
    /// A `PushedConfig` this proxy cannot apply.
    Config(String),
    /// A 200 whose version is not newer than the one in use.
    Stale {
        got: u64,
        have: u64,
    },
    /// A delta from another version than the one in use (the next watch asks for everything).
    Gap {
        from: u64,
        have: u64,
    },
    /// A delta placing a pool after one this proxy does not hold (the next watch asks for
    /// everything).
    Unplaced {
        after: String,
    },
}

impl SyncError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Transport(_) => "transport",
            Self::Timeout => "timeout",
            Self::Unauthorized(_) => "unauthorized",
            Self::Status(_) => "status",
            Self::Body => "body",
            Self::Parse(_) => "parse",
            Self::Config(_) => "config",
            Self::Stale { .. } => "stale",
            Self::Gap { .. } => "gap",
            Self::Unplaced { .. } => "unplaced",
        }
    }
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "control plane unreachable: {e}"),
            Self::Timeout => f.write_str("control plane did not answer in time"),
            Self::Unauthorized(s) => write!(
                f,
                "control plane refused this proxy's token (HTTP {s}); check control.token"
            ),
            Self::Status(s) => write!(f, "control plane answered HTTP {s}"),
            Self::Body => f.write_str("control plane's answer could not be read"),
            Self::Parse(e) => write!(f, "control plane sent an unreadable configuration: {e}"),
            Self::Config(e) => write!(
                f,
                "control plane sent a configuration this proxy refuses: {e}"
            ),
            Self::Stale { got, have } => write!(
                f,
                "control plane sent version {got}, not newer than version {have} in use"
            ),
            Self::Gap { from, have } => write!(
                f,
                "control plane sent the changes since version {from}, but version {have} is in use"
            ),
            Self::Unplaced { after } => write!(
                f,
                "control plane placed a pool after `{after}`, which this proxy left out"
            ),
        }
    }
}

/// What one watch request brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// A new version, now in use.
    Applied(u64),
    /// Nothing changed within `wait_s` (204).
    Unchanged,
}

/// The control-plane sync: applies the persisted snapshot at start and runs the watch loop.
pub struct ControlSync {
    /// The proxy's own configuration (server, limits, usage, hot state) the pushed catalog,
    /// pools and keys are merged into.
    base: ValidConfig,
    control: ValidControl,
    watch_url: String,
    snapshot_path: PathBuf,
    watch_timeout_s: u64,
    slot: Arc<SnapshotSlot>,
    hot: Arc<HotState>,
    /// Pool back-offs, carried across configuration changes.
    health: PoolHealthRegistry,
    http: reqwest::Client,
    /// A version the proxy refused: not asked for again (the next poll waits for a newer one).
    refused_through: std::sync::atomic::AtomicU64,
    /// Bytes in the delta log, and in the sealed file it extends.
    log_bytes: std::sync::atomic::AtomicU64,
    sealed_bytes: std::sync::atomic::AtomicU64,
    /// A delta did not fit the version in use: the next watch asks for everything.
    full_wanted: std::sync::atomic::AtomicBool,
    /// What the sealed copy takes next, written in order beside the watch (which never waits
    /// for the disk: a 20 MB configuration takes a while to seal and fsync).
    to_disk: tokio::sync::mpsc::Sender<ToDisk>,
    to_disk_queue: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<ToDisk>>>,
}

/// A configuration applied, for the sealed copy on disk.
enum ToDisk {
    Whole(Bytes),
    Delta(Vec<u8>),
}

/// Applied configurations waiting for the disk (the watch waits beyond this many).
const TO_DISK_QUEUE: usize = 16;

impl fmt::Debug for ControlSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControlSync({})", self.watch_url)
    }
}

impl ControlSync {
    /// `base` must have a `[control]` section.
    pub fn new(
        base: &ValidConfig,
        slot: Arc<SnapshotSlot>,
        hot: Arc<HotState>,
    ) -> Result<Self, String> {
        let (Some(control), Some(section)) = (&base.control, &base.config.control) else {
            return Err("control: section missing".to_owned());
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("tokn-proxy/", env!("CARGO_PKG_VERSION")));
        if let Some(ca_file) = &section.ca_file {
            let pem =
                std::fs::read(ca_file).map_err(|e| format!("control.ca_file `{ca_file}`: {e}"))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("control.ca_file `{ca_file}`: {e}"))?;
            if certs.is_empty() {
                return Err(format!("control.ca_file `{ca_file}`: no certificate"));
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&section.client_cert_file, &section.client_key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = std::fs::read(cert)
                    .map_err(|e| format!("control.client_cert_file `{cert}`: {e}"))?;
                pem.push(b'\n');
                pem.extend(
                    std::fs::read(key)
                        .map_err(|e| format!("control.client_key_file `{key}`: {e}"))?,
                );
                let identity = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| format!("control.client_cert_file/client_key_file: {e}"))?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err("control: client_cert_file and client_key_file go together".to_owned()),
        }
        let http = builder
            .build()
            .map_err(|e| format!("control: HTTP client: {e}"))?;
        let (to_disk, to_disk_queue) = tokio::sync::mpsc::channel(TO_DISK_QUEUE);
        Ok(Self {
            base: base.clone(),
            control: control.clone(),
            watch_url: format!("{}/internal/v1/config", control.url),
            snapshot_path: PathBuf::from(&section.snapshot_path),
            watch_timeout_s: section.watch_timeout_s,
            slot,
            hot,
            health: PoolHealthRegistry::default(),
            http,
            refused_through: std::sync::atomic::AtomicU64::new(0),
            log_bytes: std::sync::atomic::AtomicU64::new(0),
            sealed_bytes: std::sync::atomic::AtomicU64::new(0),
            full_wanted: std::sync::atomic::AtomicBool::new(false),
            to_disk,
            to_disk_queue: std::sync::Mutex::new(Some(to_disk_queue)),
        })
    }

    /// The client this proxy talks to its control plane with (its CA settings included).
    pub fn http(&self) -> reqwest::Client {
        self.http.clone()
    }

    /// Applies the sealed snapshot a previous run left, if any; returns its version. A file
    /// that does not open or apply is logged, counted and ignored.
    pub fn load_persisted(&self) -> Option<u64> {
        let path = &self.snapshot_path;
        let plaintext = match read_sealed(path, &self.control.snapshot_key) {
            Ok(Some(p)) => p,
            Ok(None) => {
                info!(message = "No persisted snapshot; waiting for the control plane.", path = %path.display());
                return None;
            }
            Err(e) => {
                metrics::CONTROL_SYNC_ERRORS
                    .with_label_values(&["snapshot_load"])
                    .inc();
                warn!(message = "Persisted snapshot ignored.", path = %path.display(), error = %e);
                return None;
            }
        };
        self.sealed_bytes
            .store(plaintext.len() as u64, std::sync::atomic::Ordering::Relaxed);
        match self.apply(&plaintext, ConfigSource::Persisted) {
            Ok(version) => {
                let version = self.replay_deltas().unwrap_or(version);
                info!(
                    message = "Serving the persisted snapshot until the control plane answers.",
                    version
                );
                Some(version)
            }
            Err(e) => {
                metrics::CONTROL_SYNC_ERRORS
                    .with_label_values(&["snapshot_load"])
                    .inc();
                warn!(message = "Persisted snapshot ignored.", path = %path.display(), error = %e);
                None
            }
        }
    }

    /// Validates, builds and swaps in a pushed configuration; returns its version.
    pub fn apply(&self, body: &[u8], source: ConfigSource) -> Result<u64, SyncError> {
        let pushed: PushedConfig =
            serde_json::from_slice(body).map_err(|e| SyncError::Parse(e.to_string()))?;
        let version = pushed.version;
        let have = self.slot.version();
        if version <= have {
            return Err(SyncError::Stale { got: version, have });
        }
        let refuse = |e: String| {
            self.refused_through
                .fetch_max(version, std::sync::atomic::Ordering::Relaxed);
            SyncError::Config(e)
        };
        // Problems name fields and ids, never secret values.
        let (valid, skipped) = self
            .base
            .with_pushed(pushed)
            .map_err(|p| refuse(p.0.join("; ")))?;
        let snapshot = Snapshot::build_leaving_out(
            &valid,
            &skipped,
            version,
            self.hot.counters(),
            &self.health,
        )
        .map_err(refuse)?;
        if !skipped.is_empty() {
            warn!(message = "Pools left out: pushed without their credential, or with fields this build refuses.", version, pools = ?skipped);
        }
        self.store(snapshot, source);
        Ok(version)
    }

    /// Applies a configuration delta to the snapshot in use; returns the new version.
    pub fn apply_delta(&self, body: &[u8], source: ConfigSource) -> Result<u64, SyncError> {
        let delta: ConfigDelta =
            serde_json::from_slice(body).map_err(|e| SyncError::Parse(e.to_string()))?;
        let current = self.slot.load();
        if delta.from != current.version || delta.version <= delta.from {
            return Err(SyncError::Gap {
                from: delta.from,
                have: current.version,
            });
        }
        let (snapshot, skipped) = current
            .with_delta(
                &delta,
                self.hot.counters(),
                &self.health,
                self.base.config.limits.allow_internal_upstreams,
            )
            .map_err(|e| match e {
                DeltaRefused::Invalid(why) => {
                    self.refused_through
                        .fetch_max(delta.version, std::sync::atomic::Ordering::Relaxed);
                    SyncError::Config(why)
                }
                DeltaRefused::Unplaced { after } => SyncError::Unplaced { after },
            })?;
        if !skipped.is_empty() {
            warn!(message = "Pools left out: pushed without their credential, or with fields this build refuses.", version = delta.version, pools = ?skipped);
        }
        self.store(snapshot, source);
        Ok(delta.version)
    }

    /// Puts `snapshot` in use unless a newer one is.
    fn store(&self, snapshot: Snapshot, source: ConfigSource) {
        let left_out = snapshot.left_out_count();
        if self.slot.store_if_newer(snapshot, source) {
            metrics::CONFIG_POOLS_SKIPPED.set(left_out as i64);
        }
    }

    fn deltas_path(&self) -> PathBuf {
        let mut name = self.snapshot_path.as_os_str().to_owned();
        name.push(".deltas");
        PathBuf::from(name)
    }

    /// Applies the persisted deltas after the sealed file, in order, up to the first that does
    /// not open or apply; the version reached, if any delta applied.
    fn replay_deltas(&self) -> Option<u64> {
        let path = self.deltas_path();
        let log = std::fs::read(&path).ok()?;
        let mut reached = None;
        // Where the whole, applied records end.
        let mut good = 0;
        while let Some((len, after)) = log[good..].split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*len) as usize;
            let Some(record) = after.get(..len) else {
                break;
            };
            let applied = unseal(&self.control.snapshot_key, record)
                .map_err(|e| e.to_string())
                .and_then(|plain| {
                    self.apply_delta(&plain, ConfigSource::Persisted)
                        .map_err(|e| e.to_string())
                });
            match applied {
                Ok(version) => {
                    reached = Some(version);
                    good += 4 + len;
                }
                Err(e) => {
                    warn!(message = "Persisted configuration deltas stop here; the rest comes from the control plane.", error = %e);
                    break;
                }
            }
        }
        if good < log.len() {
            // What follows cannot be applied (cut short, or older than the file): new deltas
            // go after the last good one, where a later start reaches them.
            let cut = OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(good as u64));
            if let Err(e) = cut {
                warn!(message = "The delta log could not be cut back; the next watch asks for everything.", error = %e);
                self.full_wanted
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.log_bytes
            .store(good as u64, std::sync::atomic::Ordering::Relaxed);
        reached
    }

    /// Appends a delta to the log beside the sealed file (off the async threads).
    async fn persist_delta(&self, plaintext: Vec<u8>) {
        let path = self.deltas_path();
        let key = self.control.snapshot_key;
        let written = tokio::task::spawn_blocking(move || {
            let sealed = seal(&key, &plaintext).map_err(std::io::Error::other)?;
            let mut record = Vec::with_capacity(4 + sealed.len());
            record.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
            record.extend_from_slice(&sealed);
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)?;
            // One write: a crash leaves a whole record or a short last one, which replay drops.
            file.write_all(&record)?;
            Ok::<_, std::io::Error>(record.len() as u64)
        })
        .await;
        match written {
            Ok(Ok(n)) => {
                self.log_bytes
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
            failed => {
                // A record may be half written: later ones would sit behind it, unreachable.
                // The next whole configuration starts the log afresh.
                self.full_wanted
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                match failed {
                    Ok(Err(e)) => self.persist_failed(&e.to_string()),
                    _ => self.persist_failed("writer task failed"),
                }
            }
        }
    }

    /// Whether the next watch asks for everything: the version in use is not the one asked
    /// after (a refused version), or the delta log outgrew the sealed file it extends.
    fn wants_full(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let log = self.log_bytes.load(Relaxed);
        self.full_wanted.load(Relaxed)
            || self.after() != self.slot.version()
            || log > (self.sealed_bytes.load(Relaxed) / 2).max(DELTA_LOG_BYTES_MIN)
    }

    fn after(&self) -> u64 {
        self.slot.version().max(
            self.refused_through
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// One watch request: waits up to `watch_timeout_s` for a version newer than the one in
    /// use, applies it and seals it to disk.
    pub async fn watch_once(&self) -> Result<Watched, SyncError> {
        // Deltas of every kind (keys, pools, the catalog) unless everything is wanted.
        let delta = !self.wants_full();
        let url = format!(
            "{}?after={}&wait_s={}&delta={delta}&pools={delta}",
            self.watch_url,
            self.after(),
            self.watch_timeout_s,
        );
        let timeout = Duration::from_secs(self.watch_timeout_s) + WATCH_TIMEOUT_MARGIN;
        let mut resp = self
            .http
            .get(&url)
            .bearer_auth(&self.control.token)
            .header(http::header::ACCEPT, "application/json")
            .timeout(timeout)
            .send()
            .await
            .map_err(transport_error)?;
        match resp.status().as_u16() {
            200 => {}
            204 => {
                self.slot.mark_synced();
                return Ok(Watched::Unchanged);
            }
            s @ (401 | 403) => return Err(SyncError::Unauthorized(s)),
            s => return Err(SyncError::Status(s)),
        }
        let delta = resp
            .headers()
            .get(CONFIG_KIND_HEADER)
            .is_some_and(|v| v.as_bytes() == b"delta");
        let mut body = Vec::with_capacity(
            resp.content_length()
                .map_or(0, |n| n as usize)
                .min(PUSHED_BYTES_MAX),
        );
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            if e.is_timeout() {
                SyncError::Timeout
            } else {
                SyncError::Body
            }
        })? {
            if body.len() + chunk.len() > PUSHED_BYTES_MAX {
                return Err(SyncError::Body);
            }
            body.extend_from_slice(&chunk);
        }
        if delta {
            let version = self
                .apply_delta(&body, ConfigSource::Control)
                .inspect_err(|e| {
                    if matches!(
                        e,
                        SyncError::Gap { .. } | SyncError::Unplaced { .. } | SyncError::Parse(_)
                    ) {
                        self.full_wanted
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                })?;
            self.slot.mark_synced();
            metrics::CONFIG_APPLIED.with_label_values(&["delta"]).inc();
            debug!(
                message = "Configuration delta from the control plane in use.",
                version
            );
            self.to_disk(ToDisk::Delta(body)).await;
            return Ok(Watched::Applied(version));
        }
        let version = self.apply(&body, ConfigSource::Control)?;
        self.slot.mark_synced();
        metrics::CONFIG_APPLIED.with_label_values(&["full"]).inc();
        info!(
            message = "Configuration from the control plane in use.",
            version
        );
        // Whatever the disk does with it: deltas fit this version now, and the log starts
        // afresh behind it.
        {
            use std::sync::atomic::Ordering::Relaxed;
            self.full_wanted.store(false, Relaxed);
            self.log_bytes.store(0, Relaxed);
            self.sealed_bytes.store(body.len() as u64, Relaxed);
        }
        self.to_disk(ToDisk::Whole(Bytes::from(body))).await;
        Ok(Watched::Applied(version))
    }

    async fn to_disk(&self, what: ToDisk) {
        // Closed only once the watch has stopped.
        let _ = self.to_disk.send(what).await;
    }

    async fn write(&self, what: ToDisk) {
        match what {
            ToDisk::Whole(body) => self.persist(body).await,
            ToDisk::Delta(body) => self.persist_delta(body).await,
        }
    }

    /// Seals the configuration now in use to disk and empties the delta log (off the async
    /// threads). The log goes after the file is replaced: a crash between leaves deltas from
    /// older versions, which replay refuses.
    async fn persist(&self, plaintext: Bytes) {
        let (path, log) = (self.snapshot_path.clone(), self.deltas_path());
        let key = self.control.snapshot_key;
        let written = tokio::task::spawn_blocking(move || {
            write_sealed(&path, &key, &plaintext)?;
            match std::fs::remove_file(&log) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.persist_failed(&e.to_string()),
            Err(_) => self.persist_failed("writer task failed"),
        }
    }

    fn persist_failed(&self, error: &str) {
        metrics::CONTROL_SYNC_ERRORS
            .with_label_values(&["persist"])
            .inc();
        warn!(message = "Snapshot could not be persisted; a restart would wait for the control plane.", path = %self.snapshot_path.display(), error = %error);
    }

    /// The watch loop, and beside it the writer of the sealed copy. Runs until `shutdown` turns
    /// true (or its sender is dropped); what is applied by then is written before it returns.
    pub async fn run(&self, shutdown: watch::Receiver<bool>) {
        let queue = crate::sync::lock(&self.to_disk_queue).take();
        let Some(mut queue) = queue else {
            return self.watch(shutdown).await;
        };
        let mut stopping = shutdown.clone();
        let writing = async {
            loop {
                // A write under way is never cut short: the shutdown is seen between writes.
                let first = tokio::select! {
                    first = queue.recv() => first,
                    _ = stopping.wait_for(|stop| *stop) => None,
                };
                let Some(first) = first else { break };
                let mut waiting = vec![first];
                while let Ok(next) = queue.try_recv() {
                    waiting.push(next);
                }
                // A whole configuration makes everything before it moot.
                let from = waiting
                    .iter()
                    .rposition(|w| matches!(w, ToDisk::Whole(_)))
                    .unwrap_or(0);
                for what in waiting.drain(from..) {
                    self.write(what).await;
                }
            }
            // What was applied by then goes to disk before the process ends.
            queue.close();
            while let Ok(what) = queue.try_recv() {
                self.write(what).await;
            }
        };
        futures_util::join!(self.watch(shutdown), writing);
    }

    /// Re-polls at once after every answer, backs off after failures.
    async fn watch(&self, mut shutdown: watch::Receiver<bool>) {
        let mut retry = Retry::new("control-plane sync", BACKOFF_MIN, BACKOFF_MAX);
        while !*shutdown.borrow() {
            let outcome = tokio::select! {
                _ = shutdown.changed() => return,
                r = self.watch_once() => r,
            };
            let Err(e) = outcome else {
                retry.succeeded();
                continue;
            };
            metrics::CONTROL_SYNC_ERRORS
                .with_label_values(&[e.label()])
                .inc();
            let wait = retry.failed(&e);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn transport_error(e: reqwest::Error) -> SyncError {
    if e.is_timeout() {
        SyncError::Timeout
    } else {
        // The URL is the control plane's address, not a secret; the token is never in it.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        for _ in 0..4 {
            let Some(s) = source else { break };
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        SyncError::Transport(text)
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for ControlSync {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        self.run(shutdown).await;
    }
}
