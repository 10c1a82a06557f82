//! The request path. Pingora owns the client connection (HTTP/1.1, HTTP/2, TLS, keep-alive,
//! graceful upgrade); everything from authentication to the last byte happens in
//! `request_filter`, which answers the request itself and returns `Ok(true)`.
//!
//! ```text
//! route → authenticate → read body (bounded) → parse → model → for pool in FIFO:
//!     adapter builds request → upstream header ── 401/403/429/5xx/refused → back off, next pool
//!                                              └─ 2xx → relay (stream or whole) → record → last bytes
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use tokn_config::LimitsConfig;
use tracing::{error, warn};

use crate::chat::ChatRequest;
use crate::error::GatewayError;
use crate::hot_state::HotState;
use crate::metrics;
use crate::providers::google_token::MintError;
use crate::providers::{self, mock, FailureClass, StreamTranslator};
use crate::snapshot::{
    ConfigSource, Key, Model, Pool, PriceChoice, Snapshot, SnapshotSlot, Transport,
};
use crate::upstream::{HttpClient, UpstreamCall, UpstreamFailure};
use crate::usage::{Usage, UsageRecord, UsageSink, UsageSource};

/// Per-request state; everything the usage record needs is gathered here.
pub struct RequestCtx {
    request_id: String,
    started: Instant,
    started_at_ms: u64,
    key: Option<Arc<Key>>,
    model: Option<Arc<Model>>,
    /// The model's prices in force when the request started.
    price: Option<PriceChoice>,
    requested_model: Option<String>,
    pool: Option<Arc<Pool>>,
    stream: bool,
    usage: Usage,
    usage_source: UsageSource,
    /// Request body size, the basis of a prompt estimate when the upstream reports no usage.
    prompt_bytes_estimate: u64,
    ttft: Option<Duration>,
    attempts: u32,
    upstream_request_id: Option<String>,
    recorded: bool,
}

pub struct Gateway {
    slot: Arc<SnapshotSlot>,
    hot: Arc<HotState>,
    http: HttpClient,
    usage_sink: Arc<dyn UsageSink>,
    limits: LimitsConfig,
}

/// The API's routes.
enum Route<'a> {
    Chat,
    Models,
    Model(&'a str),
}

/// How a relayed response ended.
struct Ending {
    status: u16,
    outcome: &'static str,
}

impl Gateway {
    pub fn new(
        slot: Arc<SnapshotSlot>,
        hot: Arc<HotState>,
        http: HttpClient,
        usage_sink: Arc<dyn UsageSink>,
        limits: LimitsConfig,
    ) -> Self {
        Self {
            slot,
            hot,
            http,
            usage_sink,
            limits,
        }
    }

    /// Replaces the configuration if `snapshot` is newer than the one in use; requests in
    /// flight finish on the one they started with. Returns whether it was swapped.
    pub fn swap_snapshot(&self, snapshot: Snapshot, source: ConfigSource) -> bool {
        self.slot.store_if_newer(snapshot, source)
    }

    async fn serve(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
        let snap = self.slot.load();
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_owned();
        let (route, allowed) = match path.as_str() {
            "/v1/chat/completions" => (Route::Chat, http::Method::POST),
            "/v1/models" => (Route::Models, http::Method::GET),
            p => match p.strip_prefix("/v1/models/") {
                Some(id) => (Route::Model(id), http::Method::GET),
                None => return Err(GatewayError::route_not_found(method.as_str(), p)),
            },
        };
        if method != allowed {
            return Err(GatewayError::method_not_allowed(method.as_str()));
        }
        match route {
            Route::Chat => self.chat(session, ctx, &snap).await,
            Route::Models => {
                let key = self.authenticate(session, ctx, &snap).await?;
                self.respond_json(session, ctx, key.models_body.clone())
                    .await
            }
            Route::Model(id) => {
                let key = self.authenticate(session, ctx, &snap).await?;
                let model = snap
                    .models
                    .get(id)
                    .filter(|_| key.may_use(id))
                    .ok_or_else(|| GatewayError::model_not_found(id))?;
                self.respond_json(session, ctx, model.object_body.clone())
                    .await
            }
        }
    }

    /// A local 200 JSON answer (no upstream): recorded, then written.
    async fn respond_json(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: Bytes,
    ) -> Result<(), GatewayError> {
        self.finish_record(ctx, 200, "ok").await;
        self.write_whole(session, ctx, 200, "application/json", body)
            .await;
        Ok(())
    }

    async fn authenticate(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
    ) -> Result<Arc<Key>, GatewayError> {
        let headers = &session.req_header().headers;
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(GatewayError::missing_key)?;
        // An issued key with a wrong checksum is a typo or a forgery: refused before any lookup.
        if presented.starts_with(tokn_config::keys::KEY_PREFIX)
            && !tokn_config::keys::is_well_formed(presented)
        {
            return Err(GatewayError::invalid_key());
        }
        // The key is hashed and looked up; the plaintext lives only in the request header.
        let hash = tokn_config::hash_key(presented);
        let key = self
            .hot
            .lookup(snap, &hash)
            .await?
            .ok_or_else(GatewayError::invalid_key)?;
        ctx.key = Some(key.clone());
        Ok(key)
    }

    async fn read_body(&self, session: &mut Session) -> Result<Bytes, GatewayError> {
        let max = self.limits.request_body_bytes_max;
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(GatewayError::body_too_large(max));
        }
        let mut body = Body::with_expected_len(declared.unwrap_or(0));
        let deadline = Duration::from_millis(self.limits.request_body_timeout_ms);
        let read_all = async {
            while let Some(chunk) = session
                .read_request_body()
                .await
                .map_err(|_| GatewayError::bad_request("The request body could not be read."))?
            {
                if body.len() + chunk.len() > max {
                    return Err(GatewayError::body_too_large(max));
                }
                body.push(chunk);
            }
            Ok(())
        };
        tokio::time::timeout(deadline, read_all)
            .await
            .map_err(|_| GatewayError::body_timeout())??;
        Ok(body.into_bytes())
    }

    async fn chat(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
    ) -> Result<(), GatewayError> {
        let key = self.authenticate(session, ctx, snap).await?;
        self.hot.check_limits(&key).await?;
        let body = self.read_body(session).await?;
        ctx.prompt_bytes_estimate = body.len() as u64;
        let req = ChatRequest::parse(&body)?;
        ctx.stream = req.stream;
        ctx.requested_model = Some(req.model.chars().take(256).collect());
        let model = snap
            .models
            .get(req.model.as_ref())
            .filter(|_| key.may_use(&req.model))
            .cloned()
            .ok_or_else(|| GatewayError::model_not_found(&req.model))?;
        ctx.price = Some(model.prices_at(ctx.started_at_ms));
        ctx.model = Some(model.clone());
        let deadline = ctx.started + Duration::from_millis(self.limits.request_total_timeout_ms);
        // A catalog model of a provider without an adapter has no pool to serve it.
        let adapter = providers::adapter(model.provider).ok_or_else(GatewayError::no_live_pool)?;
        let hide_usage = req.stream && !req.client_include_usage;

        let mut last_error = GatewayError::no_live_pool();
        let candidates = model.pools.iter().filter(|p| p.is_available());
        for pool in candidates.take(self.limits.failover_attempts_max) {
            if ctx.attempts > 0 {
                metrics::FAILOVERS.inc();
            }
            ctx.attempts += 1;
            ctx.pool = Some(pool.clone());
            let source = match &pool.transport {
                Transport::Mock => {
                    let id = format!("chatcmpl-{}", ctx.request_id);
                    let chunks = mock::respond(&req, body.len(), req.stream, &id, unix_secs());
                    Source::Mock(chunks.into_iter())
                }
                Transport::Http(target) => {
                    let (mut header, upstream_body) =
                        adapter.chat_request(&req, &body, &model, target)?;
                    if let Some(token) = pool.access_token() {
                        // Usually the cached token; a mint waits at most until the deadline.
                        let until = tokio::time::Instant::from_std(deadline);
                        let minted = tokio::select! {
                            r = tokio::time::timeout_at(until, token.header()) => {
                                r.unwrap_or(Err(MintError::Unavailable))
                            }
                            _ = client_gone(session) => return Err(client_left()),
                        };
                        match minted {
                            Ok(v) => header
                                .insert_header(http::header::AUTHORIZATION, v)
                                .map_err(|_| GatewayError::upstream_unavailable())?,
                            Err(e) => {
                                last_error = self.settle_token_failure(pool, e);
                                continue;
                            }
                        }
                    }
                    let started =
                        self.http
                            .start(&target.url, &target.resolver, header, upstream_body);
                    let call = tokio::select! {
                        r = started => r,
                        _ = client_gone(session) => return Err(client_left()),
                    };
                    match call {
                        Ok(call) => {
                            ctx.upstream_request_id = call.upstream_request_id.clone();
                            if !(200..300).contains(&call.status) {
                                let refusal = self.read_refusal(call, adapter).await;
                                match self.settle_failure(pool, adapter, &refusal) {
                                    Some(err) => {
                                        last_error = err;
                                        continue;
                                    }
                                    None => {
                                        let (status, error_body) = adapter.error_response(
                                            refusal.status,
                                            refusal.error_type.as_deref(),
                                            refusal.body,
                                        );
                                        return self
                                            .relay_upstream_error(session, ctx, status, error_body)
                                            .await;
                                    }
                                }
                            }
                            Source::Http(Box::new(call))
                        }
                        Err(failure) => {
                            metrics::UPSTREAM_FAILURES
                                .with_label_values(&[pool.provider.as_str(), failure.label()])
                                .inc();
                            if failure == UpstreamFailure::Timeout {
                                // A slow upstream may still be generating (and billing): no fan-out.
                                return Err(GatewayError::upstream_timeout());
                            }
                            warn!(message = "Upstream unreachable; backing the pool off.", pool_id = %pool.id, failure = failure.label());
                            pool.back_off(self.limits.throttle_backoff_ms);
                            last_error = GatewayError::upstream_unavailable();
                            continue;
                        }
                    }
                }
            };
            let translator = adapter.stream_translator(hide_usage, &model.upstream_model);
            return self
                .relay(session, ctx, source, translator, adapter, deadline)
                .await;
        }
        Err(last_error)
    }

    /// A non-success answer, read whole (bounded), with the connection returned to the pool.
    async fn read_refusal(
        &self,
        mut call: UpstreamCall,
        adapter: &dyn providers::ProviderAdapter,
    ) -> Refusal {
        let (status, error_type) = (call.status, call.error_type.take());
        let header_retry_after_s = call.retry_after_s;
        let body = self.read_error_body(call).await;
        Refusal {
            status,
            retry_after_s: header_retry_after_s.or_else(|| adapter.retry_after_in_body(&body)),
            error_type,
            body,
        }
    }

    /// Reads a non-success answer's body (bounded) and returns the connection to the pool.
    async fn read_error_body(&self, mut call: UpstreamCall) -> Bytes {
        let mut body = Body::default();
        let idle = self.idle_read_timeout();
        let complete = loop {
            match tokio::time::timeout(idle, call.read()).await {
                Ok(Ok(Some(chunk))) if body.len() + chunk.len() <= ERROR_BODY_BYTES_MAX => {
                    body.push(chunk)
                }
                Ok(Ok(None)) => break true,
                _ => break false,
            }
        };
        if complete {
            self.http.release(call).await;
        }
        body.into_bytes()
    }

    /// Backs a pool off for an upstream failure and returns the error to try the next pool
    /// with, or `None` when the answer is about the request itself (relayed to the client).
    fn settle_failure(
        &self,
        pool: &Pool,
        adapter: &dyn providers::ProviderAdapter,
        refusal: &Refusal,
    ) -> Option<GatewayError> {
        let Refusal {
            status,
            retry_after_s,
            ..
        } = *refusal;
        let class = adapter.classify_failure(status, refusal.error_type.as_deref(), &refusal.body);
        let (kind, backoff_ms) = match class {
            FailureClass::Request => return None,
            FailureClass::Credential => match pool.access_token() {
                // A minted token refused (revoked, or expired early): dropped, and the pool
                // rests briefly — the next use mints afresh, and a service account that can no
                // longer mint is quarantined then.
                Some(token) if status == 401 => {
                    token.invalidate();
                    ("token_refused", self.limits.throttle_backoff_ms)
                }
                Some(token) => {
                    token.invalidate();
                    ("credential", self.limits.credential_quarantine_ms)
                }
                None => ("credential", self.limits.credential_quarantine_ms),
            },
            FailureClass::Transient => (
                if status == 429 {
                    "throttled"
                } else {
                    "server_error"
                },
                retry_after_s
                    .map(|s| {
                        s.saturating_mul(1000)
                            .min(self.limits.throttle_backoff_max_ms)
                    })
                    .unwrap_or(self.limits.throttle_backoff_ms),
            ),
        };
        warn!(message = "Upstream refused the request.", pool_id = %pool.id, status);
        back_off_pool(pool, kind, backoff_ms);
        // What the client gets if no later pool serves: throttling and overload keep their
        // meaning (and the provider's `retry-after`); anything else is a bad gateway.
        Some(match (kind, status) {
            ("throttled", _) => GatewayError::upstream_throttled(retry_after_s),
            ("server_error", 503 | 529) => GatewayError::upstream_overloaded(retry_after_s),
            _ => GatewayError::upstream_unavailable(),
        })
    }

    /// A pool whose access token could not be minted is backed off like one whose credential
    /// or upstream failed.
    fn settle_token_failure(&self, pool: &Pool, e: MintError) -> GatewayError {
        let (kind, backoff_ms) = match e {
            MintError::Refused => ("credential", self.limits.credential_quarantine_ms),
            MintError::Unavailable => ("token_unavailable", self.limits.throttle_backoff_ms),
        };
        back_off_pool(pool, kind, backoff_ms);
        GatewayError::upstream_unavailable()
    }

    /// Relays a non-success upstream answer that is about the request (400, 422, …).
    async fn relay_upstream_error(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        body: Bytes,
    ) -> Result<(), GatewayError> {
        // Only a well-formed OpenAI error body is passed on; anything else becomes ours.
        let is_error_json = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .is_some_and(|v| v.get("error").is_some_and(|e| e.is_object()));
        let body = if is_error_json {
            body
        } else {
            GatewayError::bad_request("The upstream provider rejected the request.").to_json()
        };
        self.finish_record(ctx, status, "upstream_rejected").await;
        self.write_whole(session, ctx, status, "application/json", body)
            .await;
        Ok(())
    }

    async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut source: Source,
        mut translator: Box<dyn StreamTranslator>,
        adapter: &'static dyn providers::ProviderAdapter,
        deadline: Instant,
    ) -> Result<(), GatewayError> {
        if !ctx.stream {
            return self
                .relay_whole(session, ctx, source, adapter, deadline)
                .await;
        }
        let idle = self.idle_read_timeout();
        let mut resp = response_header(200, "text/event-stream", &ctx.request_id, None)?;
        let _ = resp.insert_header("cache-control", "no-cache");
        // HTTP/1.1 streams are chunked: a close-delimited body would cost the client its
        // keep-alive connection. (HTTP/2 frames the body itself.)
        if session.req_header().version == http::Version::HTTP_11
            && !session.as_downstream().is_http2()
        {
            let _ = resp.insert_header("transfer-encoding", "chunked");
        }
        if session
            .write_response_header(Box::new(resp), false)
            .await
            .is_err()
        {
            return Err(client_left());
        }
        let ending = loop {
            let next = tokio::select! {
                r = source.read(idle) => r,
                _ = client_gone(session) => break Ending { status: 499, outcome: "client_disconnected" },
                _ = tokio::time::sleep_until(deadline.into()) => Err(ReadError::Timeout),
            };
            let read = match next {
                Ok(Some(bytes)) => translator
                    .feed(&bytes)
                    .map_err(|_| (GatewayError::upstream_bad_response(), "upstream_bad_stream")),
                Ok(None) => {
                    let tail = translator.finish();
                    if translator.is_done() {
                        Ok(tail)
                    } else {
                        // The upstream closed without its terminator: say so after what it sent.
                        let _ = session.write_response_body(Some(tail), false).await;
                        Err((GatewayError::upstream_bad_response(), "upstream_truncated"))
                    }
                }
                Err(ReadError::Timeout) => {
                    Err((GatewayError::upstream_timeout(), "upstream_timeout"))
                }
                Err(ReadError::Broken) => {
                    Err((GatewayError::upstream_bad_response(), "upstream_broken"))
                }
            };
            let mut out = match read {
                Ok(out) => out,
                Err((err, outcome)) => {
                    break self
                        .end_stream_with_error(session, ctx, &*translator, err, outcome)
                        .await
                }
            };
            // Merge chunks that are already waiting into one write (one syscall, not one per event).
            while !translator.is_done() {
                match source.read(idle).now_or_never() {
                    Some(Ok(Some(more))) => match translator.feed(&more) {
                        Ok(extra) => {
                            let mut merged = BytesMut::from(&out[..]);
                            merged.extend_from_slice(&extra);
                            out = merged.freeze();
                        }
                        Err(_) => break,
                    },
                    _ => break,
                }
            }
            if !out.is_empty() && ctx.ttft.is_none() {
                ctx.ttft = Some(ctx.started.elapsed());
            }
            if translator.is_done() {
                // Usage is recorded before the stream's last bytes go out.
                self.account_usage(ctx, &*translator);
                self.finish_record(ctx, 200, "ok").await;
                if session.write_response_body(Some(out), true).await.is_err() {
                    session.as_downstream_mut().set_keepalive(None);
                }
                source.drain_and_release(&self.http).await;
                return Ok(());
            }
            if !out.is_empty() && session.write_response_body(Some(out), false).await.is_err() {
                break Ending {
                    status: 499,
                    outcome: "client_disconnected",
                };
            }
        };
        if !ctx.recorded {
            self.account_usage(ctx, &*translator);
            self.finish_record(ctx, ending.status, ending.outcome).await;
        }
        // The upstream connection is dropped, not pooled: closing it stops the generation.
        session.as_downstream_mut().set_keepalive(None);
        Ok(())
    }

    /// Sends an error event and ends a stream whose header is already out.
    async fn end_stream_with_error(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        translator: &dyn StreamTranslator,
        err: GatewayError,
        outcome: &'static str,
    ) -> Ending {
        self.account_usage(ctx, translator);
        self.finish_record(ctx, 200, outcome).await;
        let _ = session
            .write_response_body(Some(err.to_sse_event()), true)
            .await;
        Ending {
            status: 200,
            outcome,
        }
    }

    async fn relay_whole(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut source: Source,
        adapter: &'static dyn providers::ProviderAdapter,
        deadline: Instant,
    ) -> Result<(), GatewayError> {
        let max = self.limits.response_body_bytes_max;
        let idle = self.idle_read_timeout();
        let mut body = Body::default();
        loop {
            let next = tokio::select! {
                r = source.read(idle) => r,
                _ = client_gone(session) => return Err(client_left()),
                _ = tokio::time::sleep_until(deadline.into()) => Err(ReadError::Timeout),
            };
            match next {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > max {
                        return Err(GatewayError::upstream_bad_response());
                    }
                    body.push(chunk);
                }
                Ok(None) => break,
                Err(ReadError::Timeout) => return Err(GatewayError::upstream_timeout()),
                Err(ReadError::Broken) => return Err(GatewayError::upstream_bad_response()),
            }
        }
        source.release(&self.http).await;
        let upstream_model = ctx.model.as_ref().map_or("", |m| m.upstream_model.as_str());
        let (body, usage) = adapter.complete_body(body.into_bytes(), upstream_model)?;
        match usage {
            Some(u) => {
                ctx.usage = u;
                ctx.usage_source = UsageSource::Reported;
            }
            None => self.estimate_usage(ctx, 0),
        }
        let cost = self.cost(ctx);
        self.finish_record(ctx, 200, "ok").await;
        let mut resp = response_header(200, "application/json", &ctx.request_id, Some(body.len()))?;
        let _ = resp.insert_header("x-tokn-cost-micros", cost.buyer_micros.to_string());
        if session
            .write_response_header(Box::new(resp), false)
            .await
            .is_ok()
        {
            let _ = session.write_response_body(Some(body), true).await;
        }
        Ok(())
    }

    fn idle_read_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.upstream_idle_read_timeout_ms)
    }

    fn account_usage(&self, ctx: &mut RequestCtx, translator: &dyn StreamTranslator) {
        match translator.usage() {
            Some(u) => {
                ctx.usage = u;
                ctx.usage_source = UsageSource::Reported;
            }
            None => self.estimate_usage(ctx, translator.generated_bytes()),
        }
    }

    /// The upstream reported nothing: bill an estimate (documented in `UsageSource::Estimated`).
    fn estimate_usage(&self, ctx: &mut RequestCtx, generated_bytes: u64) {
        let prompt_bytes = ctx.prompt_bytes_estimate;
        ctx.usage = Usage {
            prompt_tokens: prompt_bytes.div_ceil(4),
            completion_tokens: generated_bytes.div_ceil(4),
            cached_tokens: 0,
            reasoning_tokens: 0,
        };
        ctx.usage_source = UsageSource::Estimated;
    }

    fn cost(&self, ctx: &RequestCtx) -> crate::snapshot::Cost {
        match (&ctx.price, &ctx.pool) {
            (Some(price), Some(p)) => price.prices.cost(&ctx.usage, p.price_ratio_ppm),
            _ => Default::default(),
        }
    }

    /// Writes the request's one usage record (idempotent per request) and counts it in metrics.
    async fn finish_record(&self, ctx: &mut RequestCtx, status: u16, outcome: &'static str) {
        if ctx.recorded {
            return;
        }
        ctx.recorded = true;
        let cost = self.cost(ctx);
        let record = UsageRecord {
            request_id: &ctx.request_id,
            started_at_ms: ctx.started_at_ms,
            key_id: ctx.key.as_ref().map(|k| &*k.id),
            account: ctx.key.as_ref().map(|k| &*k.account),
            pool_id: ctx.pool.as_ref().map(|p| &*p.id),
            seller: ctx.pool.as_ref().and_then(|p| p.seller.as_deref()),
            model: ctx
                .model
                .as_ref()
                .map(|m| &*m.id)
                .or(ctx.requested_model.as_deref()),
            provider: ctx.pool.as_ref().map(|p| p.provider.as_str()),
            price_version: ctx.price.map(|p| p.version),
            stream: ctx.stream,
            status,
            outcome,
            usage: ctx.usage,
            usage_source: ctx.usage_source,
            list_cost_micros: cost.list_micros,
            buyer_cost_micros: cost.buyer_micros,
            latency_ms: ctx.started.elapsed().as_millis() as u64,
            ttft_ms: ctx.ttft.map(|d| d.as_millis() as u64),
            upstream_attempts: ctx.attempts,
            upstream_request_id: ctx.upstream_request_id.as_deref(),
        };
        metrics::observe(&record, ctx.model.as_ref().map_or("none", |m| &m.id));
        if let Err(e) = self.usage_sink.record(&record).await {
            metrics::USAGE_WRITE_ERRORS.inc();
            // Logged in full so it can be replayed; a record holds no secret.
            let line = serde_json::to_string(&record).unwrap_or_default();
            error!(message = "Usage record could not be written.", error = %e.0, record = %line);
        }
        if let Some(key) = &ctx.key {
            self.hot.record_spend(key, cost.buyer_micros);
        }
    }

    async fn write_whole(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        content_type: &str,
        body: Bytes,
    ) {
        let Ok(resp) = response_header(status, content_type, &ctx.request_id, Some(body.len()))
        else {
            return;
        };
        if session
            .write_response_header(Box::new(resp), false)
            .await
            .is_ok()
        {
            let _ = session.write_response_body(Some(body), true).await;
        }
    }

    /// A request rejected before its body was read (bad key, unknown route) would cost the
    /// client its connection: Pingora closes rather than leave unread bytes on it. A small
    /// declared body is read and discarded instead, so the connection stays reusable; a large or
    /// undeclared one still closes it.
    async fn drain_small_body(&self, session: &mut Session) {
        let downstream = session.as_downstream_mut();
        if downstream.is_body_done() {
            return;
        }
        let small = downstream
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n <= DRAIN_BODY_BYTES_MAX);
        if small {
            let wait = Duration::from_millis(self.limits.request_body_timeout_ms);
            let _ = tokio::time::timeout(wait, downstream.drain_request_body()).await;
        }
    }

    async fn respond_error(&self, session: &mut Session, ctx: &mut RequestCtx, err: GatewayError) {
        let outcome = err.metric_label();
        self.finish_record(ctx, err.status, outcome).await;
        if err.status == 499 {
            session.as_downstream_mut().set_keepalive(None);
            return;
        }
        self.drain_small_body(session).await;
        let body = err.to_json();
        let Ok(mut resp) = response_header(
            err.status,
            "application/json",
            &ctx.request_id,
            Some(body.len()),
        ) else {
            return;
        };
        if let Some(s) = err.retry_after_s {
            let _ = resp.insert_header("retry-after", s.to_string());
        }
        if session
            .write_response_header(Box::new(resp), false)
            .await
            .is_ok()
        {
            let _ = session.write_response_body(Some(body), true).await;
        }
    }
}

fn response_header(
    status: u16,
    content_type: &str,
    request_id: &str,
    len: Option<usize>,
) -> Result<ResponseHeader, GatewayError> {
    let mut resp = ResponseHeader::build(status, Some(4)).map_err(|_| GatewayError::internal())?;
    let ok = resp.insert_header("content-type", content_type).is_ok()
        && resp.insert_header("x-request-id", request_id).is_ok()
        && len.is_none_or(|n| resp.insert_header("content-length", n.to_string()).is_ok());
    if ok {
        Ok(resp)
    } else {
        Err(GatewayError::internal())
    }
}

/// Resolves when the client has closed its connection (HTTP/1) or reset its stream (HTTP/2).
/// A non-success upstream answer: what the adapter classifies and maps for the client.
struct Refusal {
    status: u16,
    /// From `retry-after`, or where the provider names it in the body.
    retry_after_s: Option<u64>,
    /// AWS's `x-amzn-ErrorType`.
    error_type: Option<String>,
    body: Bytes,
}

/// Skips a failing pool for `backoff_ms`, counting why.
fn back_off_pool(pool: &Pool, kind: &'static str, backoff_ms: u64) {
    warn!(message = "Backing the pool off.", pool_id = %pool.id, kind, backoff_ms);
    pool.back_off(backoff_ms);
    metrics::UPSTREAM_FAILURES
        .with_label_values(&[pool.provider.as_str(), kind])
        .inc();
}

async fn client_gone(session: &mut Session) {
    loop {
        match session.as_downstream_mut().read_body_or_idle(true).await {
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return,
        }
    }
}

/// The client went away; nothing can be sent, but the request is still recorded (status 499).
fn client_left() -> GatewayError {
    let mut e = GatewayError::bad_request("client disconnected");
    e.status = 499;
    e.code = Some("client_disconnected");
    e
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Largest unread request body drained after an early rejection to keep the connection.
const DRAIN_BODY_BYTES_MAX: usize = 64 * 1024;

/// Largest upstream error body read (to classify it or relay it).
const ERROR_BODY_BYTES_MAX: usize = 64 * 1024;

/// How long to wait for an upstream body's end after its stream terminator.
const STREAM_END_WAIT: Duration = Duration::from_millis(200);

enum ReadError {
    Timeout,
    Broken,
}

/// A body read in chunks. Most bodies arrive in one chunk, which is kept as is (no copy).
#[derive(Default)]
struct Body {
    first: Option<Bytes>,
    rest: BytesMut,
}

impl Body {
    /// `expected`: the declared length (already checked against the limit), so a body that
    /// arrives in several chunks is copied once, without regrowing.
    fn with_expected_len(expected: usize) -> Self {
        Self {
            first: None,
            rest: BytesMut::with_capacity(expected),
        }
    }

    fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.rest.len()
    }

    fn push(&mut self, chunk: Bytes) {
        match &self.first {
            None if self.rest.is_empty() && chunk.len() >= self.rest.capacity() => {
                self.first = Some(chunk)
            }
            _ => {
                if let Some(first) = self.first.take() {
                    self.rest.extend_from_slice(&first);
                }
                self.rest.extend_from_slice(&chunk);
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        match self.first {
            Some(first) => first,
            None => self.rest.freeze(),
        }
    }
}

/// Where response bytes come from: a pooled upstream connection or the in-process mock.
enum Source {
    Http(Box<UpstreamCall>),
    Mock(std::vec::IntoIter<Bytes>),
}

impl Source {
    /// The next chunk; an upstream silent for longer than `idle` has hung.
    async fn read(&mut self, idle: Duration) -> Result<Option<Bytes>, ReadError> {
        match self {
            Self::Http(call) => match tokio::time::timeout(idle, call.read()).await {
                Err(_) => Err(ReadError::Timeout),
                Ok(Err(e)) if matches!(e.etype(), pingora::ErrorType::ReadTimedout) => {
                    Err(ReadError::Timeout)
                }
                Ok(Err(_)) => Err(ReadError::Broken),
                Ok(Ok(chunk)) => Ok(chunk),
            },
            Self::Mock(chunks) => Ok(chunks.next()),
        }
    }

    /// Returns a fully read upstream connection to the pool.
    async fn release(self, http: &HttpClient) {
        if let Self::Http(call) = self {
            http.release(*call).await;
        }
    }

    /// After a stream's terminator: reads the body's end (HTTP/1's last chunk usually follows
    /// at once) and pools the connection; an upstream that keeps sending is dropped instead.
    async fn drain_and_release(mut self, http: &HttpClient) {
        if let Self::Http(call) = &mut self {
            if !call.is_done() && !matches!(self.read(STREAM_END_WAIT).await, Ok(None)) {
                return;
            }
        }
        self.release(http).await;
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            request_id: format!("req_{:032x}", rand::random::<u128>()),
            started: Instant::now(),
            started_at_ms: unix_millis(),
            key: None,
            model: None,
            price: None,
            requested_model: None,
            pool: None,
            stream: false,
            usage: Usage::default(),
            usage_source: UsageSource::None,
            prompt_bytes_estimate: 0,
            ttft: None,
            attempts: 0,
            upstream_request_id: None,
            recorded: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Notice a client that hangs up while we wait on the upstream (HTTP/1).
        session.as_downstream_mut().set_abort_on_close(true);
        if let Err(err) = self.serve(session, ctx).await {
            self.respond_error(session, ctx, err).await;
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // Never reached: `request_filter` answers every request itself.
        Error::e_explain(
            ErrorType::InternalError,
            "tokn answers every request in request_filter",
        )
    }

    async fn logging(
        &self,
        _session: &mut Session,
        _e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        // A request that ended on a path that did not record (Pingora-level failure) is still
        // billed once, here.
        if !ctx.recorded {
            self.finish_record(ctx, 500, "aborted").await;
        }
    }
}
