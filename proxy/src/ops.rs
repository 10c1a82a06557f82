//! The operations endpoint on `server.metrics_listen`: `/metrics` (Prometheus text format),
//! `/status` (what this proxy runs: build, configuration version, uptime) and `/healthz` (for
//! load balancers). Kept off the API port, so probes produce no usage records.

use std::time::Instant;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use prometheus::{Encoder, TextEncoder};

use crate::metrics;

pub struct OpsApp {
    started: Instant,
}

/// The service, ready for a listen address.
pub fn service() -> Service<HttpServer<OpsApp>> {
    Service::new(
        "tokn operations".to_owned(),
        HttpServer::new_app(OpsApp {
            started: Instant::now(),
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
                    "config_version": metrics::CONFIG_VERSION.get(),
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
