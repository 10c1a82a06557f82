//! The HTTP server scaffolding every fake shares: an accept loop that stops with its handle, one
//! hyper-util auto (HTTP/1.1 + h2) connection per socket, and small response helpers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::fake::Received;

/// The body every fake answers with.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// Stops the server (its accept loop and every open connection) when dropped.
pub struct StopHandle {
    _stop: watch::Sender<bool>,
}

/// Serves plain HTTP on `listener` with `handler` until the returned handle is dropped.
pub fn spawn<H, F>(listener: TcpListener, handler: H) -> StopHandle
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    spawn_with(listener, None, || {}, handler)
}

/// Like [`spawn`], with TLS when `tls` is given, calling `on_accept` for each accepted socket.
pub fn spawn_with<H, F>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    on_accept: impl Fn() + Send + 'static,
    handler: H,
) -> StopHandle
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => return,
            };
            let Ok((tcp, _)) = accepted else { continue };
            // Without TCP_NODELAY small SSE writes stall on Nagle + delayed ACK (~40 ms).
            let _ = tcp.set_nodelay(true);
            on_accept();
            let handler = handler.clone();
            let stop_conn = stop.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(tcp, handler, stop_conn).await,
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        serve_connection(stream, handler, stop_conn).await;
                    }
                }
            });
        }
    });
    StopHandle { _stop: stop_tx }
}

async fn serve_connection<S, H, F>(io: S, handler: H, mut stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), service_fn(handler));
    tokio::select! {
        _ = conn => {}
        _ = stop.changed() => {}
    }
}

/// What a fake records: the valid requests it served and why it refused the others.
#[derive(Debug, Default)]
pub struct FakeLog {
    pub received: Vec<Received>,
    pub rejected: Vec<String>,
    /// Keep nothing (a long-running benchmark upstream).
    pub paused: bool,
}

impl FakeLog {
    /// Records a valid request, unless paused.
    pub fn keep(&mut self, request: Received) {
        if !self.paused {
            self.received.push(request);
        }
    }
}

/// A fake's state: what it keeps between requests, its log among it.
pub trait FakeState: Send + 'static {
    fn log(&mut self) -> &mut FakeLog;
}

/// Records why a request was refused and answers with `response`.
pub fn refuse<S: FakeState>(
    state: &Mutex<S>,
    why: &str,
    response: Response<Body>,
) -> Result<Response<Body>, Infallible> {
    lock(state).log().rejected.push(why.to_owned());
    Ok(response)
}

/// A running fake: one handler over shared state `S`, served on `127.0.0.1`; stops when
/// dropped. Each fake is this with its own state (`FakeAnthropic = FakeServer<AnthropicState>`)
/// and its own methods to program it.
pub struct FakeServer<S> {
    pub addr: SocketAddr,
    state: Arc<Mutex<S>>,
    _stop: StopHandle,
}

impl<S: FakeState> FakeServer<S> {
    /// Starts on `127.0.0.1:0`; the state is made knowing the address.
    pub async fn serve<H, F>(
        state: impl FnOnce(SocketAddr) -> S,
        handler: H,
    ) -> std::io::Result<Self>
    where
        H: Fn(ReadRequest, Arc<Mutex<S>>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
    {
        Self::serve_on(([127, 0, 0, 1], 0).into(), state, handler).await
    }

    /// Starts on `addr`.
    pub async fn serve_on<H, F>(
        addr: SocketAddr,
        state: impl FnOnce(SocketAddr) -> S,
        handler: H,
    ) -> std::io::Result<Self>
    where
        H: Fn(ReadRequest, Arc<Mutex<S>>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
    {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(state(addr)));
        let shared = state.clone();
        let stop = spawn(listener, move |req| {
            let (handler, state) = (handler.clone(), shared.clone());
            async move { handler(read_request(req).await, state).await }
        });
        Ok(Self {
            addr,
            state,
            _stop: stop,
        })
    }

    /// `http://{addr}`: the base URL or endpoint a pool is configured with.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Valid requests received so far.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.state).log().received.clone()
    }

    /// Why each invalid request was refused.
    pub fn rejected(&self) -> Vec<String> {
        lock(&self.state).log().rejected.clone()
    }

    /// Keeps no more requests (a long-running benchmark upstream).
    pub fn stop_recording(&self) {
        lock(&self.state).log().paused = true;
    }

    /// The fake's state, locked (to program it).
    pub fn state(&self) -> MutexGuard<'_, S> {
        lock(&self.state)
    }

    /// The state itself, for work that must not hold the lock across an await.
    pub(crate) fn shared(&self) -> &Mutex<S> {
        &self.state
    }
}

/// Declares a fake over `FakeServer`: its public name, and where its state keeps its log.
macro_rules! fake_server {
    ($(#[$doc:meta])* $name:ident = $state:ident) => {
        $(#[$doc])*
        pub type $name = $crate::serve::FakeServer<$state>;

        impl $crate::serve::FakeState for $state {
            fn log(&mut self) -> &mut $crate::serve::FakeLog {
                &mut self.log
            }
        }
    };
}
pub(crate) use fake_server;

/// A request as the fakes read it: its head as text, and its whole body (`None`: unreadable).
pub struct ReadRequest {
    pub method: http::Method,
    pub path: String,
    pub query: Option<String>,
    /// `HTTP/1.1`, `HTTP/2.0`: recorded so tests can tell what the proxy spoke.
    pub version: String,
    pub headers: HashMap<String, String>,
    pub body: Option<Bytes>,
}

impl ReadRequest {
    /// Method, path, version, headers and body, for handlers that take them apart.
    pub fn parts(
        self,
    ) -> (
        http::Method,
        String,
        String,
        HashMap<String, String>,
        Option<Bytes>,
    ) {
        (
            self.method,
            self.path,
            self.version,
            self.headers,
            self.body,
        )
    }
}

pub async fn read_request(req: Request<Incoming>) -> ReadRequest {
    let (head, body) = req.into_parts();
    ReadRequest {
        path: head.uri.path().to_owned(),
        query: head.uri.query().map(str::to_owned),
        version: format!("{:?}", head.version),
        headers: header_strings(&head.headers),
        method: head.method,
        body: body.collect().await.ok().map(|b| b.to_bytes()),
    }
}

/// Locks a fake's state, carrying on past a panicked holder (the state stays usable for asserts).
pub fn lock<T>(state: &Mutex<T>) -> MutexGuard<'_, T> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A whole body.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An HTML page with `status` (200 when `status` is not a valid code).
pub fn html_page(status: u16, html: &str) -> Response<Body> {
    let mut resp = Response::new(full_body(html.to_owned()));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// A JSON answer with `status` (500 when `status` is not a valid code).
pub fn json_response(status: u16, body: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A JSON answer that also carries the provider's request-id header.
pub fn json_response_with_request_id(
    status: u16,
    body: &serde_json::Value,
    header: &'static str,
    request_id: &'static str,
) -> Response<Body> {
    let mut resp = json_response(status, body);
    resp.headers_mut()
        .insert(header, http::HeaderValue::from_static(request_id));
    resp
}

/// A request's headers by lowercase name, values as text (`<binary>` when not visible ASCII).
pub fn header_strings(headers: &http::HeaderMap) -> HashMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                v.to_str().unwrap_or("<binary>").to_owned(),
            )
        })
        .collect()
}

/// Pacing delays are capped so every fake stream ends by itself.
pub const PACE_MAX: Duration = Duration::from_secs(30);

/// How a fake paces a stream: the first content event waits `ttft` (the stream's time to first
/// token), each later one `interval`; other events go out at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pace {
    pub ttft: Duration,
    pub interval: Duration,
}

/// A 200 streaming `events` (`(is_content, bytes)`) at `pace`, as `content_type`.
pub fn paced_stream(
    events: Vec<(bool, Bytes)>,
    pace: Pace,
    content_type: &'static str,
) -> Response<Body> {
    let mut first = true;
    let paced: Vec<(Duration, Bytes)> = events
        .into_iter()
        .map(|(content, e)| {
            let delay = if !content {
                Duration::ZERO
            } else if std::mem::take(&mut first) {
                pace.ttft
            } else {
                pace.interval
            };
            (delay.min(PACE_MAX), e)
        })
        .collect();
    let body = futures_util::stream::unfold(paced.into_iter(), |mut events| async move {
        let (delay, event) = events.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, std::io::Error>(Frame::data(event)), events))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(body)));
    resp.headers_mut()
        .insert("content-type", http::HeaderValue::from_static(content_type));
    resp
}
