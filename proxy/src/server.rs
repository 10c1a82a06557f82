//! Wiring: a validated configuration in, a ready-to-run Pingora server out.

use std::path::Path;
use std::sync::Arc;

use pingora::listeners::tls::TlsSettings;
use pingora::proxy::http_proxy_service;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use tokn_config::ValidConfig;

use crate::gateway::Gateway;
use crate::snapshot::Snapshot;
use crate::upstream::HttpClient;
use crate::usage::JsonlFileSink;

/// Builds the server: the proxy service on every listen address; `/metrics`, `/status` and
/// `/healthz` on the operations address.
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

    let snapshot = Snapshot::build(valid, 1)?;
    let sink = JsonlFileSink::open(Path::new(&cfg.usage.path))
        .map_err(|e| format!("usage.path `{}`: {e}", cfg.usage.path))?;
    let http = HttpClient::new(&server.configuration, cfg.limits.clone());
    let gateway = Gateway::new(snapshot, http, Arc::new(sink), cfg.limits.clone());

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

    if let Some(addr) = &cfg.server.metrics_listen {
        let mut ops = crate::ops::service();
        ops.add_tcp(addr);
        server.add_service(ops);
    }
    Ok(server)
}
