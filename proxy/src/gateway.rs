//! The request path. Pingora owns the client connection (HTTP/1.1, HTTP/2, TLS, keep-alive,
//! graceful upgrade); everything from authentication to the last byte happens in
//! `request_filter`, which answers the request itself and returns `Ok(true)`.
//!
//! ```text
//! route → authenticate → limits → read body (bounded) → parse → model
//!   → for pool in FIFO order, at most failover_attempts_max:            (try_pools)
//!         adapter builds the request (the mock answers in process)       (attempt)
//!         → access token, if the pool mints one → upstream header
//!         → Serve: 2xx | Refuse: about the request | Next: back the pool off, try the next
//!   → Serve:  relay (stream: read → merge → write; whole: read → translate → write)
//!     Refuse: the upstream's error, rendered by error.rs
//!   → record: the usage record is written before the last bytes        (finish_record)
//! ```
//!
//! Money enters at two marked places: a reservation before each attempt (`reserve`) and its
//! settlement when the record is written (`finish_record`).
//!
//! Two APIs take this path: OpenAI's chat completions (`chat`), which every pool serves through
//! its adapter's translation, and Anthropic's Messages API (`messages`), which pools that speak
//! it natively serve on a pass-through lane — the client's body, betas, events and errors
//! travel as they are, and only the usage is read on the way. A request's errors are written
//! in its API's shape (`Dialect`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use tokn_config::LimitsConfig;
use tracing::{debug, error, warn};

use crate::chat::ChatRequest;
use crate::clock::unix_millis;
use crate::error::{Dialect, GatewayError};
use crate::health::Ejection;
use crate::hot_state::HotState;
use crate::keys::Key;
use crate::messages::MessagesRequest;
use crate::metrics;
use crate::money::{Hold, Money, Reservation, ReserveError};
use crate::providers::google_token::{AccessToken, MintError};
use crate::providers::{
    ChatCall, EmbeddingsCall, FailureClass, MessagesCall, Outbound, ProviderAdapter, ResponsesCall,
    StreamTranslator,
};
use crate::relay::CostFields;
use crate::responses::ResponsesRequest;
use crate::snapshot::{Cost, Model, Pool, PriceChoice, Snapshot, SnapshotSlot};
use crate::upstream::{HttpClient, UpstreamCall, UpstreamFailure};
use crate::usage::{Usage, UsageLog, UsageRecord, UsageSource};

/// Per-request state; everything the usage record needs is gathered here.
pub struct RequestCtx {
    request_id: String,
    started: Instant,
    started_at_ms: u64,
    /// When the whole request must be over (`request_total_timeout_ms`).
    deadline: Instant,
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
    /// Microseconds spent waiting for upstreams (their answers and their chunks): the rest of
    /// the request's time is the gateway's own overhead. Atomic because the relay reads chunks
    /// with a shared borrow of the context.
    upstream_wait_us: AtomicU64,
    attempts: u32,
    upstream_request_id: Option<String>,
    recorded: bool,
    /// The hold on the pool being tried, settled when the record is written.
    reservation: Option<Reservation>,
    /// The buyer's available balance after settlement, when the book knows it.
    balance_after: Option<i64>,
    /// `x-tokn-via` for upstream requests: the chain it arrived with, and this instance.
    via: http::HeaderValue,
    /// The API the request came to: its errors are written in that API's shape.
    dialect: Dialect,
    /// The conversation the request names, for sticky routing.
    conversation: Option<crate::sticky::Conversation>,
    /// Counts the request as in flight until the context is dropped (a shutdown waits for it).
    _in_flight: crate::drain::InFlight,
}

impl RequestCtx {
    /// The request waited for an upstream from `since` until now.
    fn waited_upstream(&self, since: Instant) {
        let us = since.elapsed().as_micros() as u64;
        self.upstream_wait_us.fetch_add(us, Ordering::Relaxed);
    }
}

pub struct Gateway {
    slot: Arc<SnapshotSlot>,
    hot: Arc<HotState>,
    http: HttpClient,
    usage_log: Arc<UsageLog>,
    money: Arc<Money>,
    limits: LimitsConfig,
    sticky: crate::sticky::Sticky,
    /// Which pool stored each response a pass-through Responses call stored upstream, by model
    /// and response id (the same bounded table as conversations).
    stored_responses: crate::sticky::Sticky,
}

/// The API's routes.
enum Route<'a> {
    Chat,
    /// Anthropic's Messages API (Claude Code's `ANTHROPIC_BASE_URL` points here).
    Messages,
    CountTokens,
    /// OpenAI's Responses API (Codex, the Agents SDK).
    Responses,
    Embeddings,
    Models,
    Model(&'a str),
    /// `HEAD /` (and `GET /`): clients check that the base URL answers.
    Root,
}

/// One call on its way to a pool, in the API it came in.
enum Call<'a> {
    Chat(ChatCall<'a>),
    Messages(MessagesCall<'a>),
    Responses(ResponsesCall<'a>),
    Embeddings(EmbeddingsCall<'a>),
}

impl Call<'_> {
    fn body(&self) -> &Bytes {
        match self {
            Self::Chat(c) => c.body,
            Self::Messages(m) => m.body,
            Self::Responses(r) => r.body,
            Self::Embeddings(e) => e.body,
        }
    }

    /// The output cap the client set, if it set one.
    fn max_output_tokens(&self) -> Option<u64> {
        match self {
            Self::Chat(c) => c.req.max_output_tokens,
            Self::Messages(m) => m.req.max_tokens,
            Self::Responses(r) => r.req.max_output_tokens,
            // An embedding has no output tokens.
            Self::Embeddings(_) => Some(0),
        }
    }

    /// Whether `pool` can serve the call at all (every pool serves chat).
    fn served_by(&self, pool: &Pool) -> bool {
        match self {
            Self::Chat(_) => true,
            Self::Messages(m) => {
                pool.adapter.serves_messages(m.upstream_model)
                    && (!m.count_tokens || pool.adapter.counts_message_tokens())
            }
            Self::Responses(r) => {
                pool.adapter.serves_responses() && r.stored_by.is_none_or(|id| *pool.id == *id)
            }
            Self::Embeddings(e) => pool.adapter.serves_embeddings(e.upstream_model),
        }
    }

    fn outbound<'p>(&self, adapter: &'p dyn ProviderAdapter) -> Result<Outbound<'p>, GatewayError> {
        match self {
            Self::Chat(c) => adapter.chat_request(c),
            Self::Messages(m) => adapter.messages_request(m),
            Self::Responses(r) => adapter.responses_request(r),
            Self::Embeddings(e) => adapter.embeddings_request(e),
        }
    }
}

/// How a served answer reaches the client.
enum Relay<F> {
    /// A stream, through its translator.
    Stream(Box<dyn StreamTranslator>),
    /// A whole answer, made the client's (and its usage read) by the function.
    Whole(F),
}

/// How a pool answered.
enum Answer {
    /// A 2xx (or the mock's answer): relay it.
    Serve(Source),
    /// A refusal about the request itself: the client gets it.
    Refuse(Refusal),
}

/// What one attempt on a pool came to.
enum Attempt {
    Answered(Answer),
    /// The pool cannot serve now: back it off and try the next.
    Next(BackOff),
}

/// Why a pool is skipped for a while (and what the client hears if no pool serves).
#[derive(Debug, Clone, Copy)]
enum BackOff {
    /// The credential was refused, or the seller's account cannot pay: quarantined.
    Credential,
    /// A minted access token was refused (revoked, or expired early): dropped, and the pool
    /// rests briefly; its next use mints afresh.
    TokenRefused,
    /// No access token could be minted (the token endpoint failed or was too slow).
    TokenUnavailable,
    /// 429, for the provider's `retry-after` when it named one.
    Throttled { retry_after_s: Option<u64> },
    /// 5xx; `overloaded` for 503 and Anthropic's 529.
    ServerError {
        overloaded: bool,
        retry_after_s: Option<u64>,
    },
    /// No connection, or it broke before the response header.
    Unreachable(UpstreamFailure),
}

impl BackOff {
    /// Metric label (`tokn_upstream_failures_total{kind}`).
    fn label(self) -> &'static str {
        match self {
            Self::Credential => "credential",
            Self::TokenRefused => "token_refused",
            Self::TokenUnavailable => "token_unavailable",
            Self::Throttled { .. } => "throttled",
            Self::ServerError { .. } => "server_error",
            Self::Unreachable(failure) => failure.label(),
        }
    }

    fn duration_ms(self, limits: &LimitsConfig) -> u64 {
        let retry_after_ms = |s: Option<u64>| {
            s.map_or(limits.throttle_backoff_ms, |s| {
                s.saturating_mul(1000).min(limits.throttle_backoff_max_ms)
            })
        };
        match self {
            Self::Credential => limits.credential_quarantine_ms,
            Self::Throttled { retry_after_s } | Self::ServerError { retry_after_s, .. } => {
                retry_after_ms(retry_after_s)
            }
            Self::TokenRefused | Self::TokenUnavailable | Self::Unreachable(_) => {
                limits.throttle_backoff_ms
            }
        }
    }

    /// What the client gets if no later pool serves: throttling and overload keep their meaning
    /// (and the provider's `retry-after`); anything else is a bad gateway.
    fn client_error(self) -> GatewayError {
        match self {
            Self::Throttled { retry_after_s } => GatewayError::upstream_throttled(retry_after_s),
            Self::ServerError {
                overloaded: true,
                retry_after_s,
            } => GatewayError::upstream_overloaded(retry_after_s),
            _ => GatewayError::upstream_unavailable(),
        }
    }
}

/// A non-success upstream answer, read whole (bounded).
struct Refusal {
    status: u16,
    /// From `retry-after`, or where the provider names it in the body.
    retry_after_s: Option<u64>,
    /// AWS's `x-amzn-ErrorType`.
    error_type: Option<String>,
    body: Bytes,
}

/// The usage record of the request so far, billed `usage` at `cost` (status and outcome for
/// the caller to set: the record of a request that ends now, or of one lost from now on).
fn record_of(
    ctx: &RequestCtx,
    usage: Usage,
    usage_source: UsageSource,
    cost: Cost,
) -> UsageRecord<'_> {
    UsageRecord {
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
        status: 0,
        outcome: "",
        usage,
        usage_source,
        list_cost_micros: cost.list_micros,
        buyer_cost_micros: cost.buyer_micros,
        latency_ms: 0,
        ttft_ms: None,
        upstream_attempts: ctx.attempts,
        upstream_request_id: ctx.upstream_request_id.as_deref(),
        reservation: ctx.reservation.as_ref().and_then(|r| r.reserved_ahead()),
    }
}

/// How a relayed response ended.
struct Ending {
    status: u16,
    outcome: &'static str,
}

impl Ending {
    const CLIENT_LEFT: Self = Self {
        status: 499,
        outcome: "client_disconnected",
    };
}

/// One read step of a stream.
enum StreamStep {
    /// Bytes for the client (possibly none yet).
    Bytes(Bytes),
    /// The stream ends with an error event, after `tail` (what the upstream sent last).
    Failed {
        tail: Bytes,
        error: GatewayError,
        outcome: &'static str,
    },
    ClientLeft,
}

impl Gateway {
    pub fn new(
        slot: Arc<SnapshotSlot>,
        hot: Arc<HotState>,
        http: HttpClient,
        usage_log: Arc<UsageLog>,
        money: Arc<Money>,
        limits: LimitsConfig,
    ) -> Self {
        Self {
            slot,
            hot,
            http,
            usage_log,
            money,
            limits,
            sticky: crate::sticky::Sticky::default(),
            stored_responses: crate::sticky::Sticky::default(),
        }
    }

    async fn serve(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
        let req = session.req_header();
        // Before anything else: a looping request is neither authenticated nor billed.
        ctx.via = crate::via::outgoing(req.headers.get(crate::via::VIA_HEADER))?;
        let snap = self.slot.load();
        let method = req.method.clone();
        let path = req.uri.path().to_owned();
        let (route, allowed) = match path.as_str() {
            "/v1/chat/completions" => (Route::Chat, http::Method::POST),
            "/v1/messages" => (Route::Messages, http::Method::POST),
            "/v1/messages/count_tokens" => (Route::CountTokens, http::Method::POST),
            "/v1/responses" => (Route::Responses, http::Method::POST),
            "/v1/embeddings" => (Route::Embeddings, http::Method::POST),
            "/v1/models" => (Route::Models, http::Method::GET),
            "/" if method == http::Method::HEAD => (Route::Root, http::Method::HEAD),
            "/" => (Route::Root, http::Method::GET),
            p => match p.strip_prefix("/v1/models/") {
                Some(id) => (Route::Model(id), http::Method::GET),
                None => return Err(GatewayError::route_not_found(method.as_str(), p)),
            },
        };
        let anthropic_client = req.headers.contains_key("anthropic-version");
        if matches!(route, Route::Messages | Route::CountTokens)
            || (anthropic_client && matches!(route, Route::Models))
        {
            ctx.dialect = Dialect::Anthropic;
        }
        if method != allowed {
            return Err(GatewayError::method_not_allowed(method.as_str()));
        }
        match route {
            Route::Chat => self.chat(session, ctx, &snap).await,
            Route::Messages => self.messages(session, ctx, &snap, false).await,
            Route::CountTokens => self.messages(session, ctx, &snap, true).await,
            Route::Responses => self.responses(session, ctx, &snap).await,
            Route::Embeddings => self.embeddings(session, ctx, &snap).await,
            Route::Root => {
                let body = match method {
                    http::Method::HEAD => Bytes::new(),
                    _ => Bytes::from_static(b"{\"status\":\"ok\"}"),
                };
                self.respond_json(session, ctx, body).await
            }
            Route::Models => {
                let key = self.authenticate(session, ctx, &snap).await?;
                // Anthropic's clients list models in their API's shape.
                let body = if anthropic_client {
                    snap.anthropic_models_body(&key)
                } else {
                    snap.models_body(&key)
                };
                self.respond_json(session, ctx, body).await
            }
            Route::Model(id) => {
                let key = self.authenticate(session, ctx, &snap).await?;
                let model = snap
                    .models
                    .get(id)
                    .filter(|m| key.may_use(&m.id))
                    .ok_or_else(|| GatewayError::model_not_found(id))?;
                self.respond_json(session, ctx, model.object_body.clone())
                    .await
            }
        }
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

    /// The conversation the request names (its session header, else `prompt_cache_key`).
    fn name_conversation(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        model: &Model,
        prompt_cache_key: Option<&str>,
    ) {
        let headers = &session.req_header().headers;
        ctx.conversation = crate::sticky::conversation_name(headers, prompt_cache_key)
            .map(|name| self.sticky.conversation(&model.id, name));
    }

    /// What every call on a pool starts with: the key, its limits, the body (bounded).
    async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
    ) -> Result<(Arc<Key>, Bytes), GatewayError> {
        let key = self.authenticate(session, ctx, snap).await?;
        self.hot.check_limits(&key).await?;
        if self.usage_log.refuses_billed_traffic() {
            // Nothing is served that cannot be billed.
            return Err(GatewayError::usage_spool_full());
        }
        let body = self.read_body(session).await?;
        ctx.prompt_bytes_estimate = body.len() as u64;
        Ok((key, body))
    }

    async fn chat(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
    ) -> Result<(), GatewayError> {
        let (key, body) = self.admit(session, ctx, snap).await?;
        let req = ChatRequest::parse(&body)?;
        let model = choose_model(ctx, snap, &key, &req.model, req.stream)?;
        self.name_conversation(session, ctx, &model, req.prompt_cache_key.as_deref());
        let request_id = ctx.request_id.clone();
        let call = Call::Chat(ChatCall {
            req: &req,
            body: &body,
            upstream_model: &model.upstream_model,
            request_id: &request_id,
        });
        let (pool, answer) = Box::pin(self.try_pools(session, ctx, &model, &call)).await?;
        let adapter = pool.adapter.as_ref();
        let relay = if req.stream {
            let hide_usage = !req.client_include_usage;
            Relay::Stream(adapter.stream_translator(hide_usage, &model.upstream_model))
        } else {
            Relay::Whole(|body| adapter.complete_body(body, &model.upstream_model))
        };
        self.relay_answer(session, ctx, adapter, answer, relay)
            .await
    }

    /// Relays what a pool answered, as `relay` says; a refusal is rendered like every error.
    async fn relay_answer<F>(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        adapter: &dyn ProviderAdapter,
        answer: Answer,
        relay: Relay<F>,
    ) -> Result<(), GatewayError>
    where
        F: FnOnce(Bytes) -> Result<(Bytes, Option<Usage>), GatewayError>,
    {
        match (answer, relay) {
            (Answer::Serve(source), Relay::Stream(translator)) => {
                self.relay_stream(session, ctx, source, translator).await
            }
            (Answer::Serve(source), Relay::Whole(complete)) => {
                self.relay_whole(session, ctx, source, complete).await
            }
            (Answer::Refuse(refusal), _) => {
                self.relay_refusal(session, ctx, adapter, refusal).await
            }
        }
    }

    /// Anthropic's Messages API (`count_tokens`: its token count, which is not billed), on the
    /// pass-through lane: pools that speak it natively get the client's body and betas as they
    /// are, and the client gets their answer, events and errors as they are.
    async fn messages(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
        count_tokens: bool,
    ) -> Result<(), GatewayError> {
        let (key, body) = self.admit(session, ctx, snap).await?;
        let req = MessagesRequest::parse(&body, &session.req_header().headers)?;
        let model = choose_model(
            ctx,
            snap,
            &key,
            &req.model.name,
            req.stream && !count_tokens,
        )?;
        self.name_conversation(session, ctx, &model, None);
        if count_tokens {
            // Counting is free: no price, so no reservation and a zero cost.
            ctx.price = None;
        }
        let call = Call::Messages(MessagesCall {
            req: &req,
            body: &body,
            upstream_model: &model.upstream_model,
            count_tokens,
        });
        if !model.pools.iter().any(|p| call.served_by(p)) {
            return self
                .messages_translated(session, ctx, &model, &body, count_tokens)
                .await;
        }
        let (pool, answer) = Box::pin(self.try_pools(session, ctx, &model, &call)).await?;
        let adapter = pool.adapter.as_ref();
        match answer {
            Answer::Serve(source) if ctx.stream => {
                self.relay_stream(session, ctx, source, adapter.messages_stream())
                    .await
            }
            Answer::Serve(source) if count_tokens => {
                let counted = |body| Ok((adapter.count_tokens_body(body)?, Some(Usage::default())));
                self.relay_whole(session, ctx, source, counted).await
            }
            Answer::Serve(source) => {
                self.relay_whole(session, ctx, source, |body| adapter.messages_body(body))
                    .await
            }
            Answer::Refuse(refusal) => {
                let Refusal {
                    status,
                    error_type,
                    body,
                    ..
                } = refusal;
                let body = adapter.messages_refusal(status, error_type.as_deref(), body);
                self.finish_record(ctx, status, "upstream_rejected").await;
                self.write_whole(session, ctx, status, "application/json", body)
                    .await;
                Ok(())
            }
        }
    }

    /// OpenAI's Responses API on its pass-through lane: pools that serve it natively get the
    /// client's body with the model renamed, and the client gets their response or events as
    /// they are, metered from the usage of `response.completed`.
    async fn responses(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
    ) -> Result<(), GatewayError> {
        let (key, body) = self.admit(session, ctx, snap).await?;
        let req = ResponsesRequest::parse(&body)?;
        let model = choose_model(ctx, snap, &key, &req.model.name, req.stream)?;
        self.name_conversation(session, ctx, &model, req.prompt_cache_key.as_deref());
        // A stored response lives in one seller's account: its continuation goes there alone.
        let stored_by = match &req.previous_response_id {
            Some(id) => Some(
                self.stored_responses
                    .pool_of(self.stored_responses.conversation(&model.id, id))
                    .ok_or_else(crate::responses::unknown_previous_response)?,
            ),
            None => None,
        };
        let call = Call::Responses(ResponsesCall {
            req: &req,
            body: &body,
            upstream_model: &model.upstream_model,
            stored_by: stored_by.as_deref(),
        });
        if !model.pools.iter().any(|p| call.served_by(p)) {
            if stored_by.is_some() {
                return Err(crate::responses::unknown_previous_response());
            }
            return self.responses_translated(session, ctx, &model, &body).await;
        }
        let (pool, answer) = Box::pin(self.try_pools(session, ctx, &model, &call)).await?;
        let id = crate::responses::ResponseIdCell::default();
        let relay = if req.stream {
            Relay::Stream(Box::new(crate::responses::ResponsesRelay::new(id.clone())))
        } else {
            Relay::Whole(|b| crate::responses::response_body(b, &id))
        };
        let relayed = self
            .relay_answer(session, ctx, pool.adapter.as_ref(), answer, relay)
            .await;
        if let (true, Some(id)) = (req.store, id.get()) {
            let stored = self.stored_responses.conversation(&model.id, id);
            self.stored_responses.remember(stored, &pool.id);
        }
        relayed
    }

    /// OpenAI's embeddings API: passed through to pools that serve it natively, embedded through
    /// the others' own APIs; billed for its input tokens.
    async fn embeddings(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
    ) -> Result<(), GatewayError> {
        let (key, body) = self.admit(session, ctx, snap).await?;
        let req = crate::embeddings::EmbeddingsRequest::parse(&body)?;
        let model = choose_model(ctx, snap, &key, &req.model.name, false)?;
        let input = std::sync::OnceLock::new();
        let call = Call::Embeddings(EmbeddingsCall {
            req: &req,
            body: &body,
            upstream_model: &model.upstream_model,
            input: &input,
        });
        if !model.pools.iter().any(|p| call.served_by(p)) {
            return Err(GatewayError::not_served_on(&model.id, "embeddings API"));
        }
        let (pool, answer) = Box::pin(self.try_pools(session, ctx, &model, &call)).await?;
        let header_tokens = match &answer {
            Answer::Serve(Source::Http(up)) => up.input_tokens,
            _ => None,
        };
        // A translating adapter read the texts: where its provider reports no tokens, they are
        // what the estimate counts.
        let texts = input.get().and_then(|i| i.as_ref().ok());
        if let Some(texts) = texts {
            ctx.prompt_bytes_estimate = texts.text_bytes();
        }
        let adapter = pool.adapter.as_ref();
        let complete = |body: Bytes| match texts {
            Some(input) => adapter.embeddings_body(
                body,
                &crate::embeddings::EmbeddingsAnswer {
                    model: &model.id,
                    input,
                    header_tokens,
                },
            ),
            // A native pool's answer, OpenAI's already.
            None => crate::embeddings::embeddings_body(body),
        };
        self.relay_answer(session, ctx, adapter, answer, Relay::Whole(complete))
            .await
    }

    /// The Responses API for a model no pool serves natively: the call goes to the pools as a
    /// chat completion, and the chat answer comes back as a response (`responses_lane`).
    async fn responses_translated(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        model: &Arc<Model>,
        body: &Bytes,
    ) -> Result<(), GatewayError> {
        let (chat_body, custom) = crate::responses_lane::chat_body(body)?;
        let lane = crate::responses_lane::ResponsesFromChat::new(&model.id, custom);
        self.through_chat(session, ctx, model, chat_body, Box::new(lane))
            .await
    }

    /// The Messages API for a model no pool serves natively: the call goes to the pools as a
    /// chat completion, and the chat answer comes back as Anthropic's (`messages_lane`).
    /// `count_tokens` has no chat equivalent: it is answered here, estimated from the body.
    async fn messages_translated(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        model: &Arc<Model>,
        body: &Bytes,
        count_tokens: bool,
    ) -> Result<(), GatewayError> {
        if count_tokens {
            // (Unpriced already: `messages` took the price off.)
            let estimate = (body.len() as u64).div_ceil(4);
            let counted = Bytes::from(format!("{{\"input_tokens\":{estimate}}}"));
            return self.respond_json(session, ctx, counted).await;
        }
        let chat_body = crate::messages_lane::chat_body(body)?;
        let lane = crate::messages_lane::MessagesFromChat::new(&model.id);
        self.through_chat(session, ctx, model, chat_body, Box::new(lane))
            .await
    }

    /// A translation lane: `chat_body` goes to the pools as a chat completion (every pool
    /// serves chat), and `lane` makes the chat answer — whole or streamed — the client's.
    async fn through_chat(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        model: &Arc<Model>,
        chat_body: Bytes,
        lane: Box<dyn crate::relay::FromChat>,
    ) -> Result<(), GatewayError> {
        let req = ChatRequest::parse(&chat_body)?;
        let request_id = ctx.request_id.clone();
        let call = Call::Chat(ChatCall {
            req: &req,
            body: &chat_body,
            upstream_model: &model.upstream_model,
            request_id: &request_id,
        });
        let (pool, answer) = Box::pin(self.try_pools(session, ctx, model, &call)).await?;
        let adapter = pool.adapter.as_ref();
        let relay = if req.stream {
            let chat = adapter.stream_translator(false, &model.upstream_model);
            Relay::Stream(Box::new(crate::relay::ThroughChat::new(chat, lane)))
        } else {
            Relay::Whole(move |body| {
                let (chat, usage) = adapter.complete_body(body, &model.upstream_model)?;
                Ok((lane.whole(&chat, &usage.unwrap_or_default())?, usage))
            })
        };
        self.relay_answer(session, ctx, adapter, answer, relay)
            .await
    }

    /// Tries the model's available pools in FIFO order until one answers. When none is
    /// available, the half-open rule: the first pool (FIFO) that is out only because it was
    /// ejected is probed by one request a second, and the others hear when to retry.
    ///
    /// Callers box it: its future (reservation, connection, token minting: ~14 KiB) is done
    /// once the answer starts, and unboxed it would size every request's task for as long as
    /// the request lives — a stream's relay needs ~6 KiB.
    async fn try_pools(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        model: &Model,
        call: &Call<'_>,
    ) -> Result<(Arc<Pool>, Answer), GatewayError> {
        let buyer = ctx.key.as_ref().map(|k| k.account.clone());
        let pools = &model.pools;
        // The one exception to FIFO: a conversation's pool first, while it can serve.
        let remembered = ctx.conversation.and_then(|c| self.sticky.pool_of(c));
        let kept = remembered.as_ref().and_then(|id| {
            pools.iter().position(|p| {
                p.id == *id
                    && is_eligible(p, buyer.as_deref())
                    && p.is_available()
                    && call.served_by(p)
            })
        });
        let mut order = Candidates::new(kept);
        let mut next = order.next(pools, buyer.as_deref());
        let (mut probe, mut last_error) = match next {
            Some(_) => (None, GatewayError::no_live_pool(1)),
            None => half_open(pools, buyer.as_deref()),
        };
        loop {
            let pool = match next {
                Some(i) => {
                    next = order.next(pools, buyer.as_deref());
                    &pools[i]
                }
                None => match probe.take() {
                    Some(pool) => pool,
                    None => break,
                },
            };
            if ctx.attempts as usize == self.limits.failover_attempts_max {
                break;
            }
            if !call.served_by(pool) || !self.reserve(ctx, model, pool, call).await? {
                continue;
            }
            if ctx.attempts > 0 {
                metrics::FAILOVERS.inc();
            }
            ctx.attempts += 1;
            ctx.pool = Some(pool.clone());
            self.intend(ctx).await;
            match self.attempt(session, ctx, pool, call).await? {
                Attempt::Answered(answer) => {
                    pool.succeeded();
                    if let Some(c) = ctx.conversation {
                        let outcome = match &remembered {
                            None => "placed",
                            Some(id) if *id == pool.id => "kept",
                            Some(_) => "moved",
                        };
                        metrics::STICKY.with_label_values(&[outcome]).inc();
                        self.sticky.remember(c, &pool.id);
                    }
                    return Ok((pool.clone(), answer));
                }
                Attempt::Next(reason) => {
                    if let Some(r) = ctx.reservation.take() {
                        r.release();
                    }
                    if let (Some(c), Some(id)) = (ctx.conversation, &remembered) {
                        if *id == pool.id {
                            self.sticky.release(c);
                        }
                    }
                    last_error = self.back_off(pool, reason);
                }
            }
        }
        Err(last_error)
    }

    /// Reserves the request's maximum cost on `pool` before anything is sent upstream: the
    /// prompt estimated from the body, the output at its cap. `Ok(false)`: the pool's face value
    /// cannot cover it (the next pool is tried); a buyer who cannot cover it gets 402.
    async fn reserve(
        &self,
        ctx: &mut RequestCtx,
        model: &Model,
        pool: &Arc<Pool>,
        call: &Call<'_>,
    ) -> Result<bool, GatewayError> {
        let (Some(key), Some(price)) = (&ctx.key, ctx.price) else {
            return Ok(true);
        };
        let prompt_tokens = (call.body().len() as u64).div_ceil(4);
        let mut most = Usage {
            prompt_tokens,
            completion_tokens: call
                .max_output_tokens()
                .or(model.max_output_tokens)
                .unwrap_or(self.limits.reserve_output_tokens_default),
            ..Usage::default()
        };
        // The whole prompt may be written to the provider's cache: hold the dearest rate.
        let p = &price.prices;
        if p.cache_write.max(p.cache_write_1h) > p.input {
            most.cache_write_tokens = prompt_tokens;
            if p.cache_write_1h >= p.cache_write {
                most.cache_write_1h_tokens = prompt_tokens;
            }
        }
        let hold: Hold = price.prices.cost(&most, pool.price_ratio_ppm);
        match self
            .money
            .reserve(&ctx.request_id, key, &pool.id, pool.face_value_micros, hold)
            .await
        {
            Ok(r) => {
                ctx.reservation = Some(r);
                Ok(true)
            }
            Err(ReserveError::PoolShort) => Ok(false),
            Err(ReserveError::Insufficient { available_micros }) => Err(
                GatewayError::insufficient_funds(available_micros, hold.buyer_micros),
            ),
            Err(ReserveError::Unavailable) => Err(GatewayError::balance_unavailable()),
        }
    }

    /// Before a billed request goes upstream: journals what its record would say were this
    /// proxy lost from now on — its prompt, estimated (one token per 4 bytes), billed; status 0
    /// and outcome `proxy_lost` — so a proxy killed mid-request bills it when it starts again.
    async fn intend(&self, ctx: &RequestCtx) {
        let (Some(price), Some(pool), Some(_)) = (&ctx.price, &ctx.pool, &ctx.reservation) else {
            return;
        };
        let usage = Usage {
            prompt_tokens: ctx.prompt_bytes_estimate.div_ceil(4),
            ..Usage::default()
        };
        let cost = price.prices.cost(&usage, pool.price_ratio_ppm);
        let record = UsageRecord {
            outcome: "proxy_lost",
            ..record_of(ctx, usage, UsageSource::Estimated, cost)
        };
        if let Err(e) = self.usage_log.intend(&record).await {
            metrics::USAGE_WRITE_ERRORS.inc();
            warn!(message = "A request's intent could not be journaled.", error = %e.why);
        }
    }

    /// One pool's try: its request, its access token if it mints one, the upstream's header.
    async fn attempt(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        pool: &Pool,
        call: &Call<'_>,
    ) -> Result<Attempt, GatewayError> {
        let (endpoint, mut header, body) = match call.outbound(pool.adapter.as_ref())? {
            Outbound::Local(chunks) => {
                let source = Source::Local(chunks.into_iter());
                return Ok(Attempt::Answered(Answer::Serve(source)));
            }
            Outbound::Http {
                endpoint,
                header,
                body,
            } => (endpoint, header, body),
        };
        if let Some(token) = pool.adapter.access_token() {
            if let Err(reason) = self.authorize(session, ctx, token, &mut header).await? {
                return Ok(Attempt::Next(reason));
            }
        }
        header
            .insert_header(crate::via::VIA_HEADER, ctx.via.clone())
            .map_err(|_| GatewayError::internal())?;
        // The whole header, at debug level: credential values print as `Sensitive`.
        debug!(message = "Sending to the upstream.", pool_id = %pool.id, header = ?header);
        let started = self.http.start(endpoint, pool.internal_ok, header, body);
        let waiting = Instant::now();
        let call = tokio::select! {
            r = started => r,
            _ = client_gone(session) => return Err(GatewayError::client_disconnected()),
        };
        ctx.waited_upstream(waiting);
        match call {
            Err(UpstreamFailure::Timeout) => {
                count_failure(pool, UpstreamFailure::Timeout.label());
                // A slow upstream may still be generating (and billing): no fan-out.
                Err(GatewayError::upstream_timeout())
            }
            Err(UpstreamFailure::Internal) => {
                warn!(message = "The pool's upstream resolves only to internal addresses; refused.", pool_id = %pool.id);
                Ok(Attempt::Next(BackOff::Credential))
            }
            Err(failure) => Ok(Attempt::Next(BackOff::Unreachable(failure))),
            Ok(call) => {
                ctx.upstream_request_id = call.upstream_request_id.clone();
                if (200..300).contains(&call.status) {
                    return Ok(Attempt::Answered(Answer::Serve(Source::Http(Box::new(
                        call,
                    )))));
                }
                Ok(self.judge_refusal(pool, call).await)
            }
        }
    }

    /// Adds the pool's minted access token: usually the cached one; a mint waits at most until
    /// the request's deadline. `Ok(Err(_))`: no token, the pool is to be backed off.
    async fn authorize(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        token: &Arc<AccessToken>,
        header: &mut RequestHeader,
    ) -> Result<Result<(), BackOff>, GatewayError> {
        let until = tokio::time::Instant::from_std(ctx.deadline);
        let minted = tokio::select! {
            r = tokio::time::timeout_at(until, token.header()) => {
                r.unwrap_or(Err(MintError::Unavailable))
            }
            _ = client_gone(session) => return Err(GatewayError::client_disconnected()),
        };
        match minted {
            Ok(value) => header
                .insert_header(http::header::AUTHORIZATION, value)
                .map(Ok)
                .map_err(|_| GatewayError::upstream_unavailable()),
            Err(MintError::Refused) => Ok(Err(BackOff::Credential)),
            Err(MintError::Unavailable) => Ok(Err(BackOff::TokenUnavailable)),
        }
    }

    /// Reads a non-success answer and decides: relay it (about the request) or back off.
    async fn judge_refusal(&self, pool: &Pool, call: UpstreamCall) -> Attempt {
        let adapter = pool.adapter.as_ref();
        let refusal = self.read_refusal(call, adapter).await;
        let Refusal {
            status,
            retry_after_s,
            ..
        } = refusal;
        let class = adapter.classify_failure(status, refusal.error_type.as_deref(), &refusal.body);
        if class != FailureClass::Request {
            warn!(message = "Upstream refused the request.", pool_id = %pool.id, status);
        }
        Attempt::Next(match class {
            FailureClass::Request => return Attempt::Answered(Answer::Refuse(refusal)),
            FailureClass::Credential => match adapter.access_token() {
                // A refused token is dropped; a 401 means the token, not the account.
                Some(token) => {
                    token.invalidate();
                    if status == 401 {
                        BackOff::TokenRefused
                    } else {
                        BackOff::Credential
                    }
                }
                None => BackOff::Credential,
            },
            FailureClass::Transient if status == 429 => BackOff::Throttled { retry_after_s },
            FailureClass::Transient => BackOff::ServerError {
                overloaded: matches!(status, 503 | 529),
                retry_after_s,
            },
        })
    }

    /// A non-success answer, read whole (bounded), with the connection returned to the pool.
    async fn read_refusal(&self, mut call: UpstreamCall, adapter: &dyn ProviderAdapter) -> Refusal {
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

    /// Takes a failing pool out as `reason` says — quarantine for a refused credential, the
    /// pause the provider asked for, ejection only after errors in a row — and returns what the
    /// client gets if no later pool serves.
    fn back_off(&self, pool: &Pool, reason: BackOff) -> GatewayError {
        let kind = reason.label();
        match reason {
            BackOff::Credential => {
                let ms = reason.duration_ms(&self.limits);
                warn!(message = "Quarantining the pool.", pool_id = %pool.id, kind, backoff_ms = ms);
                pool.quarantine(ms);
            }
            BackOff::ServerError {
                overloaded: false, ..
            }
            | BackOff::Unreachable(_) => {
                let rule = Ejection {
                    after_failures: self.limits.eject_after_failures,
                    base_ms: self.limits.throttle_backoff_ms,
                    max_ms: self.limits.throttle_backoff_max_ms,
                };
                match pool.failed(&rule) {
                    Some(ms) => {
                        warn!(message = "Ejecting the pool after errors in a row.", pool_id = %pool.id, kind, backoff_ms = ms);
                    }
                    None => {
                        warn!(message = "The pool failed; it stays in rotation.", pool_id = %pool.id, kind);
                    }
                }
            }
            _ => {
                let ms = reason.duration_ms(&self.limits);
                warn!(message = "Backing the pool off.", pool_id = %pool.id, kind, backoff_ms = ms);
                pool.back_off(ms);
            }
        }
        count_failure(pool, kind);
        reason.client_error()
    }

    /// Relays a refusal about the request itself (400, 422, …), rendered like every error.
    async fn relay_refusal(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        adapter: &dyn ProviderAdapter,
        refusal: Refusal,
    ) -> Result<(), GatewayError> {
        let upstream =
            adapter.upstream_error(refusal.status, refusal.error_type.as_deref(), &refusal.body);
        let error = GatewayError::upstream(refusal.status, upstream);
        self.finish_record(ctx, error.status(), error.metric_label())
            .await;
        self.write_whole(
            session,
            ctx,
            error.status(),
            "application/json",
            error.render(ctx.dialect),
        )
        .await;
        Ok(())
    }

    async fn relay_stream(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut source: Source,
        mut translator: Box<dyn StreamTranslator>,
    ) -> Result<(), GatewayError> {
        self.write_stream_header(session, ctx).await?;
        // With money in play, the usage chunk waits for the stream's end, where it learns what
        // the call cost (it is followed at once by the terminator).
        let mut held = BytesMut::new();
        let ending = loop {
            let out = match self
                .read_step(session, ctx, &mut source, translator.as_mut())
                .await
            {
                StreamStep::Bytes(out) => self.merge_waiting(&mut source, translator.as_mut(), out),
                StreamStep::Failed {
                    tail,
                    error,
                    outcome,
                } => {
                    let end = (joined(held, tail), error, outcome);
                    break self
                        .end_stream_with_error(session, ctx, translator.as_ref(), end)
                        .await;
                }
                StreamStep::ClientLeft => break Ending::CLIENT_LEFT,
            };
            if !out.is_empty() && ctx.ttft.is_none() {
                ctx.ttft = Some(ctx.started.elapsed());
            }
            if translator.is_done() {
                let last = joined(std::mem::take(&mut held), out);
                self.finish_stream(session, ctx, source, translator.as_ref(), last)
                    .await;
                return Ok(());
            }
            // (A Messages stream holds its last usage event itself.)
            let usage_chunk = ctx.dialect == Dialect::OpenAi && crate::relay::has_usage_chunk(&out);
            if !held.is_empty() || (self.money.is_on() && usage_chunk) {
                held.extend_from_slice(&out);
                continue;
            }
            if !out.is_empty() && session.write_response_body(Some(out), false).await.is_err() {
                break Ending::CLIENT_LEFT;
            }
        };
        if !ctx.recorded {
            self.account_usage(ctx, translator.as_ref());
            self.finish_record(ctx, ending.status, ending.outcome).await;
        }
        // The upstream connection is dropped, not pooled: closing it stops the generation.
        session.as_downstream_mut().set_keepalive(None);
        Ok(())
    }

    async fn write_stream_header(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
    ) -> Result<(), GatewayError> {
        let mut resp = response_header(200, "text/event-stream", &ctx.request_id, None)?;
        let _ = resp.insert_header("cache-control", "no-cache");
        // HTTP/1.1 streams are chunked: a close-delimited body would cost the client its
        // keep-alive connection. (HTTP/2 frames the body itself.)
        if session.req_header().version == http::Version::HTTP_11
            && !session.as_downstream().is_http2()
        {
            let _ = resp.insert_header("transfer-encoding", "chunked");
        }
        session
            .write_response_header(Box::new(resp), false)
            .await
            .map_err(|_| GatewayError::client_disconnected())
    }

    /// Waits for the upstream's next bytes and translates them.
    async fn read_step(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        source: &mut Source,
        translator: &mut dyn StreamTranslator,
    ) -> StreamStep {
        let failed = |error, outcome| StreamStep::Failed {
            tail: Bytes::new(),
            error,
            outcome,
        };
        let waiting = Instant::now();
        let next = tokio::select! {
            r = source.read(self.idle_read_timeout()) => r,
            _ = client_gone(session) => return StreamStep::ClientLeft,
            _ = tokio::time::sleep_until(ctx.deadline.into()) => Err(ReadError::Timeout),
        };
        ctx.waited_upstream(waiting);
        match next {
            Ok(Some(bytes)) => match translator.feed(&bytes) {
                Ok(out) => StreamStep::Bytes(out),
                Err(_) => failed(GatewayError::upstream_bad_response(), "upstream_bad_stream"),
            },
            Ok(None) => {
                let tail = translator.finish();
                if translator.is_done() {
                    return StreamStep::Bytes(tail);
                }
                // The upstream closed without its terminator: say so after what it sent.
                StreamStep::Failed {
                    tail,
                    error: GatewayError::upstream_bad_response(),
                    outcome: "upstream_truncated",
                }
            }
            Err(ReadError::Timeout) => failed(GatewayError::upstream_timeout(), "upstream_timeout"),
            Err(ReadError::Broken) => {
                failed(GatewayError::upstream_bad_response(), "upstream_broken")
            }
        }
    }

    /// Merges chunks that are already waiting into one write (one syscall, not one per event);
    /// never waits for more.
    fn merge_waiting(
        &self,
        source: &mut Source,
        translator: &mut dyn StreamTranslator,
        mut out: Bytes,
    ) -> Bytes {
        while !translator.is_done() {
            let Some(Ok(Some(more))) = source.read(self.idle_read_timeout()).now_or_never() else {
                break;
            };
            let Ok(extra) = translator.feed(&more) else {
                break;
            };
            let mut merged = BytesMut::from(&out[..]);
            merged.extend_from_slice(&extra);
            out = merged.freeze();
        }
        out
    }

    /// The stream reached its terminator: usage is recorded before its last bytes go out.
    async fn finish_stream(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        source: Source,
        translator: &dyn StreamTranslator,
        last: Bytes,
    ) {
        self.account_usage(ctx, translator);
        self.finish_record(ctx, 200, "ok").await;
        // With money in play, the usage chunk (when the client asked for it) tells what the
        // call cost and what is left.
        let last = if self.money.is_on() {
            let cost = self.cost(ctx);
            let fields = CostFields {
                cost_micros: cost.buyer_micros,
                list_cost_micros: cost.list_micros,
                balance_micros: ctx.balance_after,
            };
            crate::relay::with_cost_fields(last, &fields)
        } else {
            last
        };
        if session.write_response_body(Some(last), true).await.is_err() {
            session.as_downstream_mut().set_keepalive(None);
        }
        source.drain_and_release(&self.http).await;
    }

    /// Sends what the upstream sent last and an error event, ending a stream whose header is
    /// already out.
    async fn end_stream_with_error(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        translator: &dyn StreamTranslator,
        (tail, error, outcome): (Bytes, GatewayError, &'static str),
    ) -> Ending {
        self.account_usage(ctx, translator);
        self.finish_record(ctx, 200, outcome).await;
        let mut last = BytesMut::from(&tail[..]);
        last.extend_from_slice(&error.render_sse_event(ctx.dialect));
        let _ = session.write_response_body(Some(last.freeze()), true).await;
        Ending {
            status: 200,
            outcome,
        }
    }

    /// A complete answer: read whole, made the client's by `complete` (which reads its usage).
    async fn relay_whole(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        source: Source,
        complete: impl FnOnce(Bytes) -> Result<(Bytes, Option<Usage>), GatewayError>,
    ) -> Result<(), GatewayError> {
        let body = self.read_whole(session, ctx, source).await?;
        let (body, usage) = complete(body)?;
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
        if let Some(balance) = ctx.balance_after {
            let _ = resp.insert_header("x-tokn-balance-micros", balance.to_string());
        }
        if session
            .write_response_header(Box::new(resp), false)
            .await
            .is_ok()
        {
            let _ = session.write_response_body(Some(body), true).await;
        }
        Ok(())
    }

    /// A whole upstream body (bounded), with the connection returned to the pool.
    async fn read_whole(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        mut source: Source,
    ) -> Result<Bytes, GatewayError> {
        let max = self.limits.response_body_bytes_max;
        let mut body = Body::default();
        loop {
            let waiting = Instant::now();
            let next = tokio::select! {
                r = source.read(self.idle_read_timeout()) => r,
                _ = client_gone(session) => return Err(GatewayError::client_disconnected()),
                _ = tokio::time::sleep_until(ctx.deadline.into()) => Err(ReadError::Timeout),
            };
            ctx.waited_upstream(waiting);
            match next {
                Ok(Some(chunk)) if body.len() + chunk.len() > max => {
                    return Err(GatewayError::upstream_bad_response())
                }
                Ok(Some(chunk)) => body.push(chunk),
                Ok(None) => break,
                Err(ReadError::Timeout) => return Err(GatewayError::upstream_timeout()),
                Err(ReadError::Broken) => return Err(GatewayError::upstream_bad_response()),
            }
        }
        source.release(&self.http).await;
        Ok(body.into_bytes())
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

    async fn read_body(&self, session: &mut Session) -> Result<Bytes, GatewayError> {
        let read = self.read_body_within_limits(session).await;
        if read.is_err() {
            // A body left unread (a framing error, a timeout, one over the limit) would be read
            // as the next request: the connection ends with the answer (RFC 9112).
            session.as_downstream_mut().set_keepalive(None);
        }
        read
    }

    async fn read_body_within_limits(&self, session: &mut Session) -> Result<Bytes, GatewayError> {
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
            ..Usage::default()
        };
        ctx.usage_source = UsageSource::Estimated;
    }

    fn cost(&self, ctx: &RequestCtx) -> Cost {
        match (&ctx.price, &ctx.pool) {
            (Some(price), Some(p)) => price.prices.cost(&ctx.usage, p.price_ratio_ppm),
            _ => Default::default(),
        }
    }

    /// Writes the request's one usage record (idempotent per request) and counts it in metrics.
    /// Settlement (the money issue) happens here: once per request, from the final usage.
    async fn finish_record(&self, ctx: &mut RequestCtx, status: u16, outcome: &'static str) {
        if ctx.recorded {
            return;
        }
        ctx.recorded = true;
        let cost = self.cost(ctx);
        let total = ctx.started.elapsed();
        let record = UsageRecord {
            status,
            outcome,
            latency_ms: total.as_millis() as u64,
            ttft_ms: ctx.ttft.map(|d| d.as_millis() as u64),
            ..record_of(ctx, ctx.usage, ctx.usage_source, cost)
        };
        let timing = metrics::Timing {
            total,
            ttft: ctx.ttft,
            upstream_wait: Duration::from_micros(ctx.upstream_wait_us.load(Ordering::Relaxed)),
        };
        metrics::observe(
            &record,
            ctx.model.as_ref().map_or("none", |m| &m.id),
            &timing,
        );
        if let Err(e) = self.usage_log.record(&record).await {
            metrics::USAGE_WRITE_ERRORS.inc();
            if e.unbilled {
                metrics::USAGE_UNBILLED.inc();
            }
            // Logged in full so it can be replayed; a record holds no secret.
            let line = serde_json::to_string(&record).unwrap_or_default();
            error!(message = "Usage record could not be written.", error = %e.why, record = %line);
        }
        if let Some(key) = &ctx.key {
            let counted = ctx.reservation.as_ref().is_some_and(|r| r.counts_spend());
            self.hot.record_spend(key, cost.buyer_micros, counted);
        }
        // Settlement: the actual cost is charged, the rest of the hold released.
        if let Some(r) = ctx.reservation.take() {
            ctx.balance_after = r.settle(cost);
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
        // Nothing to keep reusable: the body is read, or the connection closes after this answer
        // (its body could not be read: a timed-out one is not waited for a second time).
        let closing = downstream.as_http1().is_some_and(|h1| !h1.will_keepalive());
        if downstream.is_body_done() || closing {
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
        self.finish_record(ctx, err.status(), outcome).await;
        if err.status() == 499 {
            session.as_downstream_mut().set_keepalive(None);
            return;
        }
        self.drain_small_body(session).await;
        let body = err.render(ctx.dialect);
        let Ok(mut resp) = response_header(
            err.status(),
            "application/json",
            &ctx.request_id,
            Some(body.len()),
        ) else {
            return;
        };
        if let Some(s) = err.retry_after_s() {
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

/// `first` then `then`, without a copy when `first` is empty.
fn joined(first: BytesMut, then: Bytes) -> Bytes {
    if first.is_empty() {
        return then;
    }
    let mut all = first;
    all.extend_from_slice(&then);
    all.freeze()
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

/// Counts an upstream failure of `pool` by kind.
fn count_failure(pool: &Pool, kind: &'static str) {
    metrics::UPSTREAM_FAILURES
        .with_label_values(&[pool.provider.as_str(), kind])
        .inc();
}

/// Picks the requested model (if the key may use it) and fixes the prices the request is
/// billed at.
fn choose_model(
    ctx: &mut RequestCtx,
    snap: &Snapshot,
    key: &Key,
    requested: &str,
    stream: bool,
) -> Result<Arc<Model>, GatewayError> {
    ctx.stream = stream;
    ctx.requested_model = Some(requested.chars().take(256).collect());
    let model = snap
        .models
        .get(requested)
        .filter(|m| key.may_use(&m.id))
        .cloned()
        .ok_or_else(|| GatewayError::model_not_found(requested))?;
    ctx.price = Some(model.prices_at(ctx.started_at_ms));
    ctx.model = Some(model.clone());
    Ok(model)
}

/// Resolves when the client has closed its connection (HTTP/1) or reset its stream (HTTP/2).
async fn client_gone(session: &mut Session) {
    loop {
        match session.as_downstream_mut().read_body_or_idle(true).await {
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return,
        }
    }
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

/// Where response bytes come from: a pooled upstream connection, or an answer made in process.
enum Source {
    Http(Box<UpstreamCall>),
    Local(std::vec::IntoIter<Bytes>),
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
            Self::Local(chunks) => Ok(chunks.next()),
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

/// A buyer's request never goes to a pool its own account sells.
fn is_eligible(pool: &Pool, buyer: Option<&str>) -> bool {
    pool.seller
        .as_deref()
        .is_none_or(|seller| Some(seller) != buyer)
}

/// The order pools are tried in: a conversation's pool first (when it can serve), then FIFO
/// without it.
struct Candidates {
    kept: Option<usize>,
    skip: Option<usize>,
    fifo_at: usize,
}

impl Candidates {
    fn new(kept: Option<usize>) -> Self {
        Self {
            kept,
            skip: kept,
            fifo_at: 0,
        }
    }

    fn next(&mut self, pools: &[Arc<Pool>], buyer: Option<&str>) -> Option<usize> {
        if let Some(k) = self.kept.take() {
            return Some(k);
        }
        loop {
            let i = next_available(pools, self.fifo_at, buyer)?;
            self.fifo_at = i + 1;
            if Some(i) != self.skip {
                return Some(i);
            }
        }
    }
}

/// The first pool at or after `from` that may serve `buyer` now.
fn next_available(pools: &[Arc<Pool>], from: usize, buyer: Option<&str>) -> Option<usize> {
    (from..pools.len()).find(|&i| is_eligible(&pools[i], buyer) && pools[i].is_available())
}

/// No pool may serve: the one whose pause ends first, if this request may probe it, and
/// otherwise the 503 that says when to retry.
fn half_open<'a>(
    pools: &'a [Arc<Pool>],
    buyer: Option<&str>,
) -> (Option<&'a Arc<Pool>>, GatewayError) {
    let mut wait_ms = u64::MAX;
    for pool in pools.iter().filter(|p| is_eligible(p, buyer)) {
        match pool.claim_probe() {
            Ok(()) => return (Some(pool), GatewayError::no_live_pool(1)),
            Err(ms) => wait_ms = wait_ms.min(ms),
        }
    }
    let retry_after_s = match wait_ms {
        u64::MAX => 1,
        ms => ms.div_ceil(1000).max(1),
    };
    (None, GatewayError::no_live_pool(retry_after_s))
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        let started = Instant::now();
        let started_at_ms = unix_millis();
        RequestCtx {
            // Time first, then 80 random bits: ids sort by time, so the ledger's index on them
            // grows at one end instead of everywhere.
            request_id: format!(
                "req_{started_at_ms:012x}{:020x}",
                rand::random::<u128>() >> 48
            ),
            started,
            started_at_ms,
            deadline: started + Duration::from_millis(self.limits.request_total_timeout_ms),
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
            upstream_wait_us: AtomicU64::new(0),
            attempts: 0,
            upstream_request_id: None,
            recorded: false,
            reservation: None,
            balance_after: None,
            via: crate::via::own(),
            dialect: Dialect::OpenAi,
            conversation: None,
            _in_flight: crate::drain::InFlight::start(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        crate::clock::anchor_timers();
        // Notice a client that hangs up while we wait on the upstream (HTTP/1).
        session.as_downstream_mut().set_abort_on_close(true);
        if crate::drain::is_closing() {
            session.set_keepalive(None);
        }
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
