//! The operations endpoint on `server.metrics_listen`: `/metrics` (Prometheus text format),
//! `/status` (what this proxy runs: build, configuration version and where it came from —
//! `file`, `persisted`, `control`, or `none` before a control plane answered —, seconds since the
//! control plane last confirmed it, hot-state kind, uptime) and `/healthz` (for load
//! balancers). Kept off the API port, so probes produce no usage records.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use prometheus::{Encoder, TextEncoder};

use crate::snapshot::SnapshotSlot;

pub struct OpsApp {
    started: Instant,
    slot: Arc<SnapshotSlot>,
    hot_state: &'static str,
}

/// The service, ready for a listen address.
pub fn service(slot: Arc<SnapshotSlot>, hot_state: &'static str) -> Service<HttpServer<OpsApp>> {
    Service::new(
        "tokn operations".to_owned(),
        HttpServer::new_app(OpsApp {
            started: Instant::now(),
            slot,
            hot_state,
        }),
    )
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

#[async_trait]
impl ServeHttp for OpsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/metrics" => {
                let encoder = TextEncoder::new();
                let mut body = Vec::with_capacity(16 * 1024);
                match encoder.encode(&prometheus::gather(), &mut body) {
                    Ok(()) => respond(StatusCode::OK, encoder.format_type(), body),
                    Err(_) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", Vec::new()),
                }
            }
            "/status" => {
                let status = serde_json::json!({
                    "status": "ok",
                    "version": env!("CARGO_PKG_VERSION"),
                    "config_version": self.slot.version(),
                    "pools": self.slot.load().pool_count,
                    "config_source": self.slot.source().as_str(),
                    "last_sync_age_s": self.slot.sync_age_s(),
                    "hot_state": self.hot_state,
                    "uptime_s": self.started.elapsed().as_secs(),
                });
                respond(
                    StatusCode::OK,
                    "application/json",
                    status.to_string().into_bytes(),
                )
            }
            "/healthz" => respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            _ => respond(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}
