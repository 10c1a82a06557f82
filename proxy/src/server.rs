//! Wiring: a validated configuration in, a ready-to-run Pingora server out.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use tokn_config::ValidConfig;
use tracing::warn;

use crate::balances::BalanceFeed;
use crate::control::ControlSync;
use crate::drain::Tracked;
use crate::gateway::Gateway;
use crate::hot_state::HotState;
use crate::money::Money;
use crate::shipper::Shipper;
use crate::snapshot::{ConfigSource, PoolHealthRegistry, Snapshot, SnapshotSlot};
use crate::spool::{Spool, SpoolLimits};
use crate::upstream::HttpClient;
use crate::usage::UsageLog;

/// Builds the server: the proxy service on every listen address; `/metrics`, `/status` and
/// `/healthz` on the operations address. With `[control]` the proxy starts on the sealed
/// snapshot of its last run (or on an empty one: version 0, no model, no key) and a background
/// service keeps it in step with the control plane; with Redis hot state another one follows
/// the control plane's key announcements.
pub fn build(valid: &ValidConfig, upgrade: bool) -> Result<Server, String> {
    let cfg = &valid.config;
    let conf = ServerConf {
        threads: cfg.server.threads,
        grace_period_seconds: Some(cfg.server.grace_period_s),
        graceful_shutdown_timeout_seconds: Some(cfg.server.grace_period_s + 5),
        upstream_keepalive_pool_size: cfg.limits.upstream_keepalive_pool_size,
        // Failover is the gateway's own loop; Pingora never retries on its behalf.
        max_retries: 0,
        ca_file: cfg.server.upstream_ca_file.clone(),
        ..ServerConf::default()
    };
    // Checked here: Pingora would panic on an unreadable CA file when it builds the connector.
    for (field, path) in [
        ("server.upstream_ca_file", &cfg.server.upstream_ca_file),
        ("server.tls_cert_path", &cfg.server.tls_cert_path),
        ("server.tls_key_path", &cfg.server.tls_key_path),
    ] {
        if let Some(path) = path {
            std::fs::metadata(path).map_err(|e| format!("{field} `{path}`: {e}"))?;
        }
    }
    let upgrade_sock = upgrade_socket(cfg)?;
    let conf = ServerConf {
        upgrade_sock,
        ..conf
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let hot = Arc::new(HotState::from_config(valid)?);
    let slot = if valid.control.is_some() {
        Arc::new(SnapshotSlot::new(Snapshot::empty(), ConfigSource::None))
    } else {
        let snapshot = Snapshot::build(valid, 1, hot.counters(), &PoolHealthRegistry::default())?;
        Arc::new(SnapshotSlot::new(snapshot, ConfigSource::File))
    };
    let control = match valid.control {
        None => None,
        Some(_) => {
            let sync = ControlSync::new(valid, slot.clone(), hot.clone())?;
            sync.load_persisted();
            Some(sync)
        }
    };
    // With a control plane, money is in play: reservations against its balances, and billed
    // records go to the spool that ships them to the ledger.
    let u = &cfg.usage;
    let money = Arc::new(money_book(valid)?);
    let mut lost = Vec::new();
    let (shipper, feed) = match (&control, &valid.control) {
        (Some(sync), Some(c)) => {
            let limits = SpoolLimits {
                bytes_max: u.spool_bytes_max,
                segment_bytes_max: u.spool_segment_bytes_max,
            };
            let spool = Spool::open(Path::new(&u.spool_dir), limits)
                .map_err(|e| format!("usage.spool_dir `{}`: {e}", u.spool_dir))?;
            // Requests a killed process had in flight are billed before anything ships.
            lost = spool
                .settle_lost()
                .map_err(|e| format!("usage.spool_dir `{}`: {e}", u.spool_dir))?;
            // Records not yet applied hold their cost again until they drain.
            spool
                .for_each_unshipped(|lines| money.hold_again(lines))
                .map_err(|e| format!("usage.spool_dir `{}`: {e}", u.spool_dir))?;
            let spool = Arc::new(spool);
            let shipper = Shipper::new(spool, money.clone(), sync.http(), &c.url, &c.token, u);
            let feed = valid
                .redis_url
                .is_none()
                .then(|| BalanceFeed::new(money.clone(), sync.http(), &c.url, &c.token));
            (Some(shipper), feed)
        }
        _ => (None, None),
    };
    let log = UsageLog::open(
        Path::new(&u.path),
        shipper.as_ref().map(Shipper::spool),
        u.on_spool_full,
    )
    .map_err(|e| format!("usage.path `{}`: {e}", u.path))?;
    if !lost.is_empty() {
        let requests = memchr::memchr_iter(b'\n', &lost).count();
        warn!(
            message = "Billed the requests a stopped process left in flight (outcome proxy_lost).",
            requests
        );
        log.audit(&lost)
            .map_err(|e| format!("usage.path `{}`: {}", u.path, e.why))?;
    }
    let http = HttpClient::new(&server.configuration, cfg.limits.clone());
    let gateway = Gateway::new(
        slot.clone(),
        hot.clone(),
        http,
        Arc::new(log),
        money,
        cfg.limits.clone(),
    );

    let app = pingora::proxy::http_proxy(&server.configuration, gateway);
    let app = crate::headers::HeaderDeadline::new(
        app,
        Duration::from_millis(cfg.limits.request_header_timeout_ms),
        cfg.limits.header_connections_per_ip_max,
    );
    let mut proxy = pingora::services::listening::Service::new("tokn gateway".to_owned(), app);
    for addr in &cfg.server.listen {
        proxy.add_listener(ListenerConfig::tcp(addr).l4_buffer(downstream_buffer()));
    }
    if let (Some(cert), Some(key)) = (&cfg.server.tls_cert_path, &cfg.server.tls_key_path) {
        for addr in &cfg.server.tls_listen {
            let mut tls = TlsSettings::intermediate(cert, key)
                .map_err(|e| format!("server.tls_cert_path/tls_key_path: {e}"))?;
            tls.enable_h2();
            proxy.add_listener(
                ListenerConfig::tcp(addr)
                    .tls(tls)
                    .l4_buffer(downstream_buffer()),
            );
        }
    }
    server.add_service(proxy);
    if let Some(sync) = control {
        server.add_service(background_service(
            "tokn control-plane sync",
            Tracked::new(sync),
        ));
    }
    if let Some(shipper) = shipper {
        server.add_service(background_service(
            "tokn usage shipper",
            Tracked::new(shipper),
        ));
    }
    if let Some(feed) = feed {
        server.add_service(background_service("tokn balance feed", Tracked::new(feed)));
    }
    if let Some(subscriber) = hot.subscriber() {
        server.add_service(background_service(
            "tokn key announcements",
            Tracked::new(subscriber),
        ));
    }

    if let Some(addr) = &cfg.server.metrics_listen {
        let mut ops = crate::ops::service(slot, hot.kind());
        ops.add_tcp(addr);
        server.add_service(ops);
    }
    crate::drain::exit_when_drained(
        server.watch_execution_phase(),
        Duration::from_secs(cfg.server.grace_period_s),
    );
    Ok(server)
}

/// A client connection's read buffer: 16 KiB (one TLS record) instead of Pingora's 64 KiB, which
/// is zeroed when the connection opens and so resident for every open stream. Bodies bypass it
/// (Pingora reads them into a buffer of its own, larger than this), so it only serves headers
/// and TLS records.
fn downstream_buffer() -> L4BufferSettings {
    L4BufferSettings::default().read(16 * 1024)
}

/// The hand-over socket of a graceful upgrade, in a directory only this user can enter (made
/// so if this process creates it): Pingora's default is one fixed path in the shared temporary
/// directory, where two proxies collide and another local user could bind it first.
fn upgrade_socket(cfg: &tokn_config::GatewayConfig) -> Result<String, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let path = match &cfg.server.upgrade_sock {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::PathBuf::from(format!("{}.upgrade", cfg.usage.spool_dir)).join("sock"),
    };
    let field = "server.upgrade_sock";
    // `sun_path` holds 108 bytes with its terminating NUL.
    if path.as_os_str().len() > 107 {
        return Err(format!(
            "{field} `{}`: longer than 107 bytes",
            path.display()
        ));
    }
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_owned(),
        None => std::path::PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("{field}: creating `{}`: {e}", dir.display()))?;
    }
    let meta = std::fs::metadata(&dir).map_err(|e| format!("{field} `{}`: {e}", dir.display()))?;
    // This process's own entry in /proc belongs to its effective user.
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| format!("{field}: reading this process's user: {e}"))?;
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{field}: `{}` must be a directory of this user that no one else may enter (mode 0700)",
            dir.display()
        ));
    }
    Ok(path.display().to_string())
}

/// The book balances are checked against: none without a control plane; Redis when the proxy
/// has it (the control plane mirrors balances there); otherwise in process, fed by the control
/// plane.
fn money_book(valid: &ValidConfig) -> Result<Money, String> {
    let cfg = &valid.config;
    // A reservation outlives its request by a margin; past it the sweep releases it.
    let deadline = Duration::from_millis(cfg.limits.request_total_timeout_ms) + RESERVATION_MARGIN;
    Ok(match (&valid.control, &valid.redis_url) {
        (None, _) => Money::off(),
        (Some(_), Some(url)) => Money::redis(
            url,
            &cfg.hot_state.prefix,
            cfg.hot_state.on_balance_unavailable,
            cfg.hot_state.local_allowance_micros,
            deadline,
        )?,
        (Some(control), None) => {
            let snapshot = cfg
                .control
                .as_ref()
                .map_or("tokn-snapshot.sealed", |c| c.snapshot_path.as_str());
            let saved = format!("{snapshot}.balances");
            Money::local(deadline, Some((saved.into(), control.snapshot_key)))
        }
    })
}

const RESERVATION_MARGIN: Duration = Duration::from_secs(60);
