//! Talking to HTTP upstreams through Pingora's own connector: pooled keep-alive connections,
//! HTTP/1.1 or HTTP/2 (ALPN) over rustls, `TCP_NODELAY` (Pingora sets it on every connection).
//!
//! The gateway reads the whole client body before it knows the upstream (the model is in the
//! body), so it drives the exchange itself instead of letting Pingora proxy (see ARCHITECTURE.md).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::ALPN;
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;
use tokn_config::{LimitsConfig, UpstreamUrl};

/// Addresses of one upstream tried before giving up on it.
const CONNECT_ADDRS_MAX: usize = 3;

/// Resolved addresses are reused for this long.
const DNS_TTL: Duration = Duration::from_secs(30);

/// Why an upstream exchange failed before a response header arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No connection could be made (refused, unreachable, TLS failure, name not found).
    Connect,
    /// The upstream took longer than the header timeout.
    Timeout,
    /// The connection broke while sending the request or reading the header.
    Broken,
    /// Every address the upstream resolves to is internal, and the pool may not reach one.
    Internal,
}

impl UpstreamFailure {
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Broken => "broken",
            Self::Internal => "internal_address",
        }
    }
}

/// An exchange whose response header has arrived.
pub struct UpstreamCall {
    session: HttpSession,
    peer: HttpPeer,
    pub status: u16,
    pub retry_after_s: Option<u64>,
    pub upstream_request_id: Option<String>,
    /// AWS's `x-amzn-ErrorType` on error answers (the exception's name; the body may not say).
    pub error_type: Option<String>,
    /// Bedrock's `x-amzn-bedrock-input-token-count`: the input tokens of an answer whose body
    /// does not say (Cohere's embeddings).
    pub input_tokens: Option<u64>,
}

/// Where one pool's requests go: its base URL (the adapter appends paths to `url.base_path`),
/// the `Host` header for it, and its cached addresses.
pub struct Endpoint {
    pub url: UpstreamUrl,
    pub host_header: HeaderValue,
    resolver: Resolver,
}

impl Endpoint {
    pub fn new(base_url: &str) -> Result<Self, String> {
        let url = UpstreamUrl::parse(base_url).map_err(|why| format!("base_url: {why}"))?;
        let host_header = HeaderValue::try_from(url.host_header())
            .map_err(|_| "base_url: the host is not a valid header value".to_owned())?;
        Ok(Self {
            url,
            host_header,
            resolver: Resolver::default(),
        })
    }
}

/// An upstream's address cache.
#[derive(Default)]
struct Resolver {
    cached: Mutex<Option<(Instant, Vec<SocketAddr>)>>,
}

impl Resolver {
    async fn addrs(&self, url: &UpstreamUrl) -> Option<Vec<SocketAddr>> {
        if let Ok(ip) = url.host.parse::<std::net::IpAddr>() {
            return Some(vec![SocketAddr::new(ip, url.port)]);
        }
        if let Ok(guard) = self.cached.lock() {
            if let Some((at, addrs)) = guard.as_ref() {
                if at.elapsed() < DNS_TTL {
                    return Some(addrs.clone());
                }
            }
        }
        // Pingora resolves names with blocking std DNS (and panics on failure): resolve here.
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .ok()?
            .collect();
        if addrs.is_empty() {
            return None;
        }
        if let Ok(mut guard) = self.cached.lock() {
            *guard = Some((Instant::now(), addrs.clone()));
        }
        Some(addrs)
    }
}

pub struct HttpClient {
    connector: Connector,
    limits: LimitsConfig,
}

impl HttpClient {
    pub fn new(server_conf: &ServerConf, limits: LimitsConfig) -> Self {
        Self {
            connector: Connector::new(Some(ConnectorOptions::from_server_conf(server_conf))),
            limits,
        }
    }

    fn peer(&self, addr: SocketAddr, url: &UpstreamUrl) -> HttpPeer {
        let sni = if url.tls {
            url.host.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(addr, url.tls, sni);
        let o = &mut peer.options;
        o.connection_timeout = Some(Duration::from_millis(
            self.limits.upstream_connect_timeout_ms,
        ));
        o.total_connection_timeout =
            Some(Duration::from_millis(self.limits.upstream_tls_timeout_ms));
        o.read_timeout = Some(Duration::from_millis(
            self.limits.upstream_idle_read_timeout_ms,
        ));
        o.write_timeout = Some(Duration::from_millis(
            self.limits.upstream_idle_read_timeout_ms,
        ));
        o.idle_timeout = Some(Duration::from_secs(self.limits.upstream_keepalive_idle_s));
        o.alpn = if url.tls { ALPN::H2H1 } else { ALPN::H1 };
        o.max_h2_streams = self.limits.upstream_h2_streams_max;
        peer
    }

    /// Sends the request and waits (at most the header timeout) for the response header.
    /// Without `internal_ok`, internal addresses (see `tokn_config::addr`) are never connected
    /// to, whatever name or spelling led there: checked on every resolution.
    pub async fn start(
        &self,
        endpoint: &Endpoint,
        internal_ok: bool,
        header: Box<RequestHeader>,
        body: Bytes,
    ) -> Result<UpstreamCall, UpstreamFailure> {
        let url = &endpoint.url;
        let mut addrs = endpoint
            .resolver
            .addrs(url)
            .await
            .ok_or(UpstreamFailure::Connect)?;
        if !internal_ok {
            addrs.retain(|a| !tokn_config::addr::is_internal(a.ip()));
            if addrs.is_empty() {
                return Err(UpstreamFailure::Internal);
            }
        }
        // A name may resolve to addresses the upstream does not listen on (e.g. `localhost` to
        // `::1` first): try a few in order.
        let mut connected = None;
        for addr in addrs.iter().take(CONNECT_ADDRS_MAX) {
            let peer = self.peer(*addr, url);
            if let Ok((session, _reused)) = self.connector.get_http_session(&peer).await {
                connected = Some((session, peer));
                break;
            }
        }
        let (mut session, peer) = connected.ok_or(UpstreamFailure::Connect)?;
        let exchange = async {
            session
                .write_request_header(header)
                .await
                .map_err(|_| UpstreamFailure::Broken)?;
            session
                .write_request_body(body, true)
                .await
                .map_err(|_| UpstreamFailure::Broken)?;
            // Over HTTP/1 the end flag above is ignored: finishing is explicit.
            session
                .finish_request_body()
                .await
                .map_err(|_| UpstreamFailure::Broken)?;
            session
                .read_response_header()
                .await
                .map_err(|_| UpstreamFailure::Broken)
        };
        let header_timeout = Duration::from_millis(self.limits.upstream_header_timeout_ms);
        match tokio::time::timeout(header_timeout, exchange).await {
            Err(_) => return Err(UpstreamFailure::Timeout),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => {}
        }
        UpstreamCall::new(session, peer)
    }

    /// Returns a fully read exchange's connection to the pool.
    pub async fn release(&self, call: UpstreamCall) {
        let idle = Some(Duration::from_secs(self.limits.upstream_keepalive_idle_s));
        self.connector
            .release_http_session(call.session, &call.peer, idle)
            .await;
    }
}

impl UpstreamCall {
    /// An exchange whose response header has been read, with the headers the gateway uses.
    fn new(session: HttpSession, peer: HttpPeer) -> Result<Self, UpstreamFailure> {
        let resp = session.response_header().ok_or(UpstreamFailure::Broken)?;
        let status = resp.status.as_u16();
        let text = |name: &str| {
            resp.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after_s = text("retry-after").and_then(|v| v.trim().parse().ok());
        // OpenAI's name for it, then Anthropic's and AWS's.
        let upstream_request_id = text("x-request-id")
            .or_else(|| text("request-id"))
            .or_else(|| text("x-amzn-requestid"))
            .filter(|v| v.len() <= 128);
        let error_type = (status >= 400)
            .then(|| text("x-amzn-errortype"))
            .flatten()
            .filter(|v| v.len() <= 256);
        let input_tokens = resp
            .headers
            .get("x-amzn-bedrock-input-token-count")
            .and_then(|v| v.to_str().ok()?.trim().parse().ok());
        Ok(Self {
            session,
            peer,
            status,
            retry_after_s,
            upstream_request_id,
            error_type,
            input_tokens,
        })
    }

    /// The next body chunk; `None` at the end. Errors (including the idle-read timeout) mean
    /// the upstream broke off.
    pub async fn read(&mut self) -> Result<Option<Bytes>, pingora::BError> {
        self.session.read_response_body().await
    }

    /// The whole response body has been read.
    pub fn is_done(&mut self) -> bool {
        self.session.response_done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A name that resolved to a public address when the pool was configured and resolves
    /// inside now (DNS rebinding): the check runs on the addresses of this use, so the request
    /// is refused and nothing connects.
    #[tokio::test]
    async fn a_name_that_now_resolves_inside_is_refused_at_use() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((_socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let endpoint = Endpoint::new(&format!("http://rebinding.example:{port}/v1")).unwrap();
        // What the name resolves to this time (as a stub resolver answering for it would).
        *endpoint.resolver.cached.lock().unwrap() = Some((
            Instant::now(),
            vec![SocketAddr::from(([127, 0, 0, 1], port))],
        ));
        let http = HttpClient::new(&ServerConf::default(), LimitsConfig::default());
        let header =
            || Box::new(RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap());
        let refused = http.start(&endpoint, false, header(), Bytes::new()).await;
        assert_eq!(refused.err(), Some(UpstreamFailure::Internal));
        assert_eq!(connections.load(Ordering::SeqCst), 0);
        // Where the operator allows internal upstreams, the same use connects.
        let _ = http.start(&endpoint, true, header(), Bytes::new()).await;
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }
}
