//! Wiring: a validated configuration in, a ready-to-run Pingora server out.

use std::path::Path;
use std::sync::Arc;

use pingora::listeners::tls::TlsSettings;
use pingora::proxy::http_proxy_service;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use tokn_config::ValidConfig;

use crate::control::ControlSync;
use crate::gateway::Gateway;
use crate::hot_state::HotState;
use crate::shipper::Shipper;
use crate::snapshot::{ConfigSource, Snapshot, SnapshotSlot};
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
        let snapshot = Snapshot::build(valid, 1, hot.counters())?;
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
    // With a control plane, billed records also go to the spool that ships them to the ledger.
    let u = &cfg.usage;
    let shipper = match (&control, &valid.control) {
        (Some(sync), Some(c)) => {
            let limits = SpoolLimits {
                bytes_max: u.spool_bytes_max,
                segment_bytes_max: u.spool_segment_bytes_max,
            };
            let spool = Spool::open(Path::new(&u.spool_dir), limits)
                .map_err(|e| format!("usage.spool_dir `{}`: {e}", u.spool_dir))?;
            let spool = Arc::new(spool);
            Some(Shipper::new(spool, sync.http(), &c.url, &c.token, u))
        }
        _ => None,
    };
    let log = UsageLog::open(
        Path::new(&u.path),
        shipper.as_ref().map(Shipper::spool),
        u.on_spool_full,
    )
    .map_err(|e| format!("usage.path `{}`: {e}", u.path))?;
    let http = HttpClient::new(&server.configuration, cfg.limits.clone());
    let gateway = Gateway::new(
        slot.clone(),
        hot.clone(),
        http,
        Arc::new(log),
        cfg.limits.clone(),
    );

    let mut proxy = http_proxy_service(&server.configuration, gateway);
    for addr in &cfg.server.listen {
        proxy.add_tcp(addr);
    }
    if let (Some(cert), Some(key)) = (&cfg.server.tls_cert_path, &cfg.server.tls_key_path) {
        for addr in &cfg.server.tls_listen {
            let mut tls = TlsSettings::intermediate(cert, key)
                .map_err(|e| format!("server.tls_cert_path/tls_key_path: {e}"))?;
            tls.enable_h2();
            proxy.add_tls_with_settings(addr, None, tls);
        }
    }
    server.add_service(proxy);
    if let Some(sync) = control {
        server.add_service(background_service("tokn control-plane sync", sync));
    }
    if let Some(shipper) = shipper {
        server.add_service(background_service("tokn usage shipper", shipper));
    }
    if let Some(subscriber) = hot.subscriber() {
        server.add_service(background_service("tokn key announcements", subscriber));
    }

    if let Some(addr) = &cfg.server.metrics_listen {
        let mut ops = crate::ops::service(slot, hot.kind());
        ops.add_tcp(addr);
        server.add_service(ops);
    }
    Ok(server)
}
