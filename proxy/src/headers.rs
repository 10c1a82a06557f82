//! Slow clients: a deadline for each request's header, and a cap per client address on
//! connections still sending one.
//!
//! Pingora 0.9 times out each *read* of a request header (60 s), not the header: a client that
//! sends one byte every few seconds (slowloris) holds a connection forever, and a few hundred
//! of them hold the proxy. [`HeaderDeadline`] wraps the proxy's `ServerApp` and every accepted
//! stream in [`Deadlined`], which follows each HTTP/1 request header from its first byte to the
//! blank line that ends it: past `request_header_timeout_ms` the read fails and the connection
//! closes; a client address with `header_connections_per_ip_max` connections mid-header gets no
//! more. Between requests the connection is idle (Pingora's keep-alive timeout governs it), and
//! an HTTP/2 connection (its preface) is left alone: its frames have no header to finish.
//!
//! A header larger than `HEADER_BYTES_MAX` or of more than `HEADER_LINES_MAX` lines is answered
//! here, 431 with an OpenAI error body, and the connection closed: Pingora would answer an
//! oversized header with an empty 400 (or none) before any hook of ours runs.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics;
use crate::sync::lock;

/// The proxy's app, behind the header rules.
pub struct HeaderDeadline<A> {
    inner: Arc<A>,
    rules: Arc<Rules>,
}

struct Rules {
    timeout: Duration,
    per_ip_max: usize,
    /// Connections mid-header, by client address.
    sending: Mutex<HashMap<IpAddr, usize>>,
}

impl<A> HeaderDeadline<A> {
    pub fn new(inner: A, timeout: Duration, per_ip_max: usize) -> Self {
        Self {
            inner: Arc::new(inner),
            rules: Arc::new(Rules {
                timeout,
                per_ip_max: per_ip_max.max(1),
                sending: Mutex::new(HashMap::new()),
            }),
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let peer = session
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        // HTTP/2 by ALPN (over TLS): frames, not headers to time.
        let state = if session.selected_alpn_proto() == Some(ALPN::H2) {
            State::Off
        } else {
            State::Idle { first: true }
        };
        let wrapped = Deadlined {
            inner: session,
            rules: self.rules.clone(),
            peer,
            state,
            tail: [0; 3],
        };
        self.inner.process_new(Box::new(wrapped), shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Where a connection is between requests.
enum State {
    /// Waiting for a request (`first`: none yet on this connection).
    Idle { first: bool },
    /// A header has begun; it must end before the deadline. `bytes` and `lines` of it so far.
    Header {
        deadline: Pin<Box<Sleep>>,
        bytes: usize,
        lines: usize,
    },
    /// The header is too large: the 431 is going out (`written` bytes of it so far), then the
    /// connection closes.
    Refusing { written: usize },
    /// The header has ended: the body and the response follow, with no deadline of ours.
    Request,
    /// HTTP/2, or a stream that is not ours to time.
    Off,
}

/// An accepted stream whose request headers are timed.
pub struct Deadlined {
    inner: Stream,
    rules: Arc<Rules>,
    peer: Option<IpAddr>,
    state: State,
    /// The last bytes read, for a blank line split across reads.
    tail: [u8; 3],
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// The largest request header taken, and its most lines (clients send a few hundred bytes in
/// a dozen lines; a header this large is a mistake or an attack).
const HEADER_BYTES_MAX: usize = 64 * 1024;
const HEADER_LINES_MAX: usize = 128;

/// Why a read of a header is refused.
enum Refusal {
    Io(std::io::Error),
    TooLarge,
}

/// The answer to a header over the limits: an OpenAI error, then the connection closes.
fn too_large_response() -> Vec<u8> {
    let body = format!(
        "{{\"error\":{{\"message\":\"The request header is too large: at most {HEADER_BYTES_MAX} bytes in {HEADER_LINES_MAX} lines.\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"request_header_too_large\"}}}}"
    );
    format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn lines_in(bytes: &[u8]) -> usize {
    memchr::memchr_iter(b'\n', bytes).count()
}

fn over_limits(bytes: usize, lines: usize) -> bool {
    bytes > HEADER_BYTES_MAX || lines > HEADER_LINES_MAX
}

impl Deadlined {
    /// Counts this connection as mid-header for its address; false when the address is at
    /// its cap.
    fn enter_header(&self) -> bool {
        let Some(ip) = self.peer else { return true };
        let mut sending = lock(&self.rules.sending);
        let n = sending.entry(ip).or_default();
        if *n >= self.rules.per_ip_max {
            return false;
        }
        *n += 1;
        true
    }

    fn leave_header(&mut self) {
        if let (State::Header { .. }, Some(ip)) = (&self.state, self.peer) {
            let mut sending = lock(&self.rules.sending);
            if let Some(n) = sending.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    sending.remove(&ip);
                }
            }
        }
    }

    /// Follows the bytes just read: a header starts, ends, or an HTTP/2 preface turns timing
    /// off. A header that arrives whole in one read (nearly all of them) costs one scan: only
    /// one still arriving is timed and counted against its address. `Err` when the address
    /// already has its most connections mid-header, or the header is over the limits.
    fn saw(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        if bytes.is_empty() {
            return Ok(());
        }
        match &mut self.state {
            State::Idle { first } => {
                // (An HTTP/1 request may well begin "P": only the whole preface says HTTP/2.)
                if *first && bytes.starts_with(H2_PREFACE) {
                    self.state = State::Off;
                } else if let Some(end) = memchr::memmem::find(bytes, b"\r\n\r\n") {
                    if over_limits(end + 4, lines_in(&bytes[..end])) {
                        return Err(Refusal::TooLarge);
                    }
                    self.state = State::Request;
                } else if over_limits(bytes.len(), lines_in(bytes)) {
                    return Err(Refusal::TooLarge);
                } else if !self.enter_header() {
                    metrics::SLOW_HEADERS
                        .with_label_values(&["per_ip_cap"])
                        .inc();
                    return Err(Refusal::Io(std::io::Error::other(
                        "too many connections from this address are still sending a header",
                    )));
                } else {
                    self.state = State::Header {
                        deadline: Box::pin(tokio::time::sleep_until(
                            Instant::now() + self.rules.timeout,
                        )),
                        bytes: bytes.len(),
                        lines: lines_in(bytes),
                    };
                    self.tail = [0; 3];
                    self.keep_tail(bytes);
                }
            }
            State::Header {
                bytes: seen, lines, ..
            } => {
                let across = [&self.tail[..], &bytes[..bytes.len().min(3)]].concat();
                // The header's part of this read: up to its blank line, if it ends here.
                let end = match memchr::memmem::find(bytes, b"\r\n\r\n") {
                    Some(end) => Some(end + 4),
                    None => memchr::memmem::find(&across, b"\r\n\r\n")
                        .map(|at| at + 4 - self.tail.len()),
                };
                let part = &bytes[..end.unwrap_or(bytes.len()).min(bytes.len())];
                *seen += part.len();
                *lines += lines_in(part);
                if over_limits(*seen, *lines) {
                    return Err(Refusal::TooLarge);
                }
                if end.is_some() {
                    self.leave_header();
                    self.state = State::Request;
                } else {
                    self.keep_tail(bytes);
                }
            }
            State::Request | State::Off | State::Refusing { .. } => {}
        }
        Ok(())
    }

    /// Sends the 431 (as far as the socket takes it now), then fails the read: Pingora closes
    /// the connection without answering again.
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let out = too_large_response();
        let Self { inner, state, .. } = self;
        if let State::Refusing { written } = state {
            while *written < out.len() {
                match Pin::new(&mut *inner).poll_write(cx, &out[*written..]) {
                    Poll::Ready(Ok(n)) if n > 0 => *written += n,
                    Poll::Ready(_) => break,
                    Poll::Pending => return Poll::Pending,
                }
            }
            if Pin::new(&mut *inner).poll_flush(cx).is_pending() {
                return Poll::Pending;
            }
        }
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the request header is too large",
        )))
    }

    /// A final response's header is going out: the request it answers has been read, and the
    /// next one starts with its first byte. (An interim `100 Continue` comes before the body:
    /// the request is still being read.)
    fn responding(&mut self, out: &[u8]) {
        let final_response = out.len() > 9 && out.starts_with(b"HTTP/1.") && out[9] != b'1';
        if final_response && matches!(self.state, State::Request) {
            self.state = State::Idle { first: false };
        }
    }

    /// The last three bytes read, for a blank line split across reads.
    fn keep_tail(&mut self, bytes: &[u8]) {
        let joined = [&self.tail[..], bytes].concat();
        let last = &joined[joined.len() - 3..];
        self.tail.copy_from_slice(last);
    }
}

impl Drop for Deadlined {
    fn drop(&mut self) {
        self.leave_header();
    }
}

impl AsyncRead for Deadlined {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if matches!(self.state, State::Refusing { .. }) {
            return self.get_mut().poll_refuse(cx);
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => match &self.state {
                // Bodies and HTTP/2 frames pass untouched.
                State::Request | State::Off => Poll::Ready(Ok(())),
                State::Header { deadline, .. } if deadline.is_elapsed() => {
                    Poll::Ready(Err(late_header()))
                }
                _ => {
                    let me = self.get_mut();
                    match me.saw(&buf.filled()[before..]) {
                        Ok(()) => Poll::Ready(Ok(())),
                        Err(Refusal::Io(e)) => Poll::Ready(Err(e)),
                        Err(Refusal::TooLarge) => {
                            metrics::SLOW_HEADERS
                                .with_label_values(&["too_large"])
                                .inc();
                            me.leave_header();
                            me.state = State::Refusing { written: 0 };
                            me.poll_refuse(cx)
                        }
                    }
                }
            },
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let State::Header { deadline, .. } = &mut self.state {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(late_header()));
                    }
                }
                Poll::Pending
            }
        }
    }
}

fn late_header() -> std::io::Error {
    metrics::SLOW_HEADERS.with_label_values(&["deadline"]).inc();
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the request header did not arrive in time",
    )
}

impl AsyncWrite for Deadlined {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.responding(buf);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            self.responding(first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl std::fmt::Debug for Deadlined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadlined")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl Shutdown for Deadlined {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for Deadlined {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Deadlined {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Deadlined {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Deadlined {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Deadlined {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for Deadlined {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
