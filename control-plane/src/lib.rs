//! tokn$ control plane: the marketplace's source of truth. It owns the store (Postgres or an
//! embedded SQLite file), serves the admin and self-service API, and pushes the configuration
//! every proxy runs. It never sits on the request path.

pub mod api;
pub mod cli;
mod conn;
pub mod feed;
pub mod hot;
pub mod ids;
pub mod ledger;
pub mod mail;
pub mod metrics;
pub mod payments;
pub mod payouts;
pub mod push;
pub mod sealing;
pub mod store;
pub mod stripe;
pub mod throttle;
pub mod tls;
pub mod units;
pub mod verify;
pub mod web;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokn_config::control_plane::{ControlLimits, ValidControlPlane};
use tokn_config::ModelConfig;

use crate::ledger::{PoolConsumption, WalletBalance};
use crate::sealing::Keyring;
use crate::store::{Backend, Credential, ModelAlias, ModelPrice, Store};

/// Everything a request handler reaches.
pub struct App {
    pub store: Store,
    pub keyring: Keyring,
    pub admin_token_sha256: [u8; 32],
    pub proxy_token_sha256: [u8; 32],
    pub limits: ControlLimits,
    pub push: push::Push,
    pub hot: Option<hot::HotMirror>,
    pub verifier: verify::Verifier,
    /// Balances for proxies without Redis.
    pub feed: feed::BalanceFeed,
    /// The embedded store (SQLite): a demo or a single machine, where the built-in mock may be
    /// listed.
    pub embedded: bool,
    /// What the usage drain last did (the operator's view of its lag).
    pub drain: std::sync::Mutex<DrainStatus>,
    /// Stripe (credit packs, onboarding, payouts); `None` when not configured.
    pub payments: Option<Payments>,
    /// Bad tokens counted per source address.
    pub auth_throttle: throttle::Throttle,
    pub waitlist_throttle: throttle::Throttle,
    /// Sign-in links asked for per source address.
    pub signin_throttle: throttle::Throttle,
    /// The web app's settings, and its origin (sign-in links point there).
    pub web: tokn_config::control_plane::WebConfig,
    pub web_origin: String,
    /// The pages' content security policy (forms may lead to Stripe's hosted pages).
    pub web_csp: Arc<str>,
    /// The playground's connection to the gateway.
    pub web_client: reqwest::Client,
    /// Where sign-in mail goes (SMTP, or the outbox).
    pub mailer: mail::Mailer,
    /// GitHub and Google sign-in, when configured.
    pub sign_in: web::oauth::SignInProviders,
}

/// The Stripe side: its client and its settings.
pub struct Payments {
    pub stripe: stripe::Stripe,
    pub config: tokn_config::control_plane::ValidStripe,
    /// This replica, as the payout lease names its holder.
    pub replica: String,
    /// One payout pass at a time in this replica (its worker, an operator's run).
    pub pass_turn: tokio::sync::Mutex<()>,
}

/// The usage drain as the operator sees it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, utoipa::ToSchema)]
pub struct DrainStatus {
    /// Records applied since this control plane started.
    pub applied: u64,
    /// Redelivered records skipped since it started.
    pub duplicates: u64,
    /// When the last batch was applied (null before the first).
    pub last_batch_at_ms: Option<i64>,
    /// In that batch, the longest time from a request's end to its ledger transaction: how far
    /// behind the ledger was.
    pub last_batch_lag_ms: i64,
}

impl App {
    /// Opens the store (applying migrations), seeds the catalog on first start, connects hot
    /// state and publishes the first configuration.
    pub async fn start(valid: &ValidControlPlane) -> Result<Arc<Self>, String> {
        let cfg = &valid.config;
        let store = match &valid.database_url {
            Some(url) => Store::open(Backend::Postgres(url)).await,
            None => Store::open(Backend::Sqlite(Path::new(&cfg.sqlite_path))).await,
        }
        .map_err(|e| format!("store: {e}"))?;
        let catalog_text = match &cfg.catalog_path {
            Some(path) => {
                std::fs::read_to_string(path).map_err(|e| format!("catalog_path `{path}`: {e}"))?
            }
            None => tokn_config::DEFAULT_CATALOG_TOML.to_owned(),
        };
        let (seed, aliases) = seed_prices(&catalog_text)?;
        store
            .seed_catalog(&seed, &aliases)
            .await
            .map_err(|e| format!("seeding the catalog: {e}"))?;
        let keks: Vec<(u32, &[u8])> = valid.keks.iter().map(|(v, k)| (*v, &k[..])).collect();
        let keyring = Keyring::new(&keks).map_err(|e| format!("kek: {e}"))?;
        let hot = match &valid.redis_url {
            Some(url) => {
                let prefix = cfg.redis.as_ref().map_or("tokn:", |r| r.prefix.as_str());
                Some(
                    hot::HotMirror::connect(url, prefix)
                        .await
                        .map_err(|e| format!("redis: {:?}", e.kind()))?,
                )
            }
            None => None,
        };
        let app = Arc::new(Self {
            store,
            keyring,
            admin_token_sha256: tokn_config::hash_key(&valid.admin_token),
            proxy_token_sha256: tokn_config::hash_key(&valid.proxy_token),
            limits: cfg.limits.clone(),
            push: push::Push::default(),
            hot,
            verifier: verify::Verifier::new(
                cfg.verify.clone(),
                Duration::from_millis(cfg.limits.verify_timeout_ms),
            )?,
            feed: feed::BalanceFeed::default(),
            embedded: valid.database_url.is_none(),
            drain: Default::default(),
            payments: match &valid.stripe {
                Some(config) => Some(Payments {
                    stripe: stripe::Stripe::new(config)?,
                    config: config.clone(),
                    replica: ids::new("replica"),
                    pass_turn: tokio::sync::Mutex::new(()),
                }),
                None => None,
            },
            auth_throttle: throttle::Throttle::new(throttle::FAILURES_MAX),
            waitlist_throttle: throttle::Throttle::new(throttle::WAITLIST_MAX),
            signin_throttle: throttle::Throttle::new(throttle::SIGNIN_LINKS_MAX),
            web: cfg.web.clone(),
            web_origin: cfg.web_origin(),
            web_csp: web::content_security_policy(
                &valid
                    .stripe
                    .iter()
                    .filter(|s| s.config.base_url != "https://api.stripe.com")
                    .map(|s| web::oauth::origin_of(&s.config.base_url))
                    .chain(web::oauth::SignInProviders::form_origins(&cfg.web))
                    .collect::<Vec<_>>(),
            )
            .into(),
            sign_in: web::oauth::SignInProviders::new(
                &cfg.web,
                valid.github_client_secret.as_deref(),
                valid.google_client_secret.as_deref(),
                &cfg.web_origin(),
            )?,
            web_client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(600))
                .build()
                .map_err(|e| format!("web client: {e}"))?,
            mailer: mail::Mailer::new(cfg.web.smtp.as_ref(), valid.smtp_password.as_deref())?,
        });
        if let Some(hot) = &app.hot {
            let restored = hot
                .restore_if_cold(&app.store)
                .await
                .map_err(|e| format!("redis: {e}"))?;
            if !restored {
                hot.reconcile(&app.store)
                    .await
                    .map_err(|e| format!("redis: {e}"))?;
            }
        }
        app.push
            .refresh(&app)
            .await
            .map_err(|e| format!("first configuration: {e}"))?;
        tokio::spawn(push::Push::publisher(Arc::downgrade(&app)));
        Ok(app)
    }

    /// After a change: announce changed keys to hot state before the API call that made the
    /// change returns, and wake the publisher, which builds the proxies' configuration off the
    /// request path (a burst of changes is built once).
    pub async fn changed(&self, key_hashes: &[String]) {
        if let Some(hot) = &self.hot {
            hot.announce(&self.store, key_hashes).await;
        }
        self.push.wake();
    }

    /// Applies a batch of usage records to the ledger (exactly once per request id) and
    /// publishes what it changed: balances and pool consumption to the proxies' books (Redis,
    /// where drained requests stop holding money; the feed), and a new configuration when a
    /// pool ran out. If Redis cannot be told, the call fails and the proxy sends the batch
    /// again: the ledger skips what it has, Redis is told then.
    pub async fn apply_usage(
        &self,
        records: &[ledger::UsageIn],
    ) -> Result<(ledger::Applied, Vec<WalletBalance>, Vec<PoolConsumption>), api::ApiError> {
        let fee_ratio_ppm = self
            .store
            .settings()
            .await
            .map_err(api::ApiError::store("settings"))?
            .fee_ratio_ppm;
        let applied = self
            .store
            .apply_usage(records, fee_ratio_ppm)
            .await
            .map_err(api::ApiError::store("usage"))?;
        self.note_drain(records, &applied);
        if !applied.exhausted_pools.is_empty() {
            self.changed(&[]).await;
        }
        let (wallets, consumption) = if applied.duplicates == 0 {
            // Every record moved money: the batch's own statements returned the balances after it.
            applied_balances(&applied)
        } else {
            // The balances after the batch, for every account and pool it touched (duplicates
            // included: an earlier delivery may not have reached Redis).
            let accounts: BTreeSet<String> =
                records.iter().filter_map(|r| r.account.clone()).collect();
            let pools: BTreeSet<String> =
                records.iter().filter_map(|r| r.pool_id.clone()).collect();
            let accounts: Vec<String> = accounts.into_iter().collect();
            let pools: Vec<String> = pools.into_iter().collect();
            let wallets = self
                .store
                .wallet_balances(Some(&accounts))
                .await
                .map_err(api::ApiError::store("wallet"))?;
            let consumption = self
                .store
                .pool_consumption(Some(&pools))
                .await
                .map_err(api::ApiError::store("pool"))?;
            (wallets, consumption)
        };
        if let Some(hot) = &self.hot {
            let drained: Vec<hot::Drained<'_>> = records
                .iter()
                .filter_map(|r| {
                    Some(hot::Drained {
                        account: r.account.as_deref()?,
                        pool: r.pool_id.as_deref(),
                        reservation: r.reservation.as_deref().unwrap_or(&r.request_id),
                    })
                })
                .collect();
            hot.drained(&drained, &wallets, &consumption)
                .await
                .map_err(|e| {
                    metrics::REDIS_ERRORS.inc();
                    tracing::warn!(message = "Redis not told of drained usage; the proxy retries.", error = %e);
                    api::ApiError::unavailable("hot state unreachable")
                })?;
        }
        self.feed.publish(&wallets, &consumption);
        Ok((applied, wallets, consumption))
    }

    fn note_drain(&self, records: &[ledger::UsageIn], applied: &ledger::Applied) {
        metrics::USAGE_APPLIED.inc_by(applied.applied.len() as u64);
        metrics::USAGE_DUPLICATES.inc_by(applied.duplicates as u64);
        let now = store::now_ms();
        let lag_ms = records
            .iter()
            .map(|r| now - r.started_at_ms.saturating_add(r.latency_ms))
            .max()
            .unwrap_or(0)
            .max(0);
        metrics::DRAIN_LAG.set(lag_ms as f64 / 1000.0);
        // A poisoned lock only means a panic elsewhere mid-update of plain counters.
        let mut drain = self.drain.lock().unwrap_or_else(|p| p.into_inner());
        drain.applied += applied.applied.len() as u64;
        drain.duplicates += applied.duplicates as u64;
        drain.last_batch_at_ms = Some(now);
        drain.last_batch_lag_ms = lag_ms;
    }

    /// Wallets changed outside usage (grants, welcome credit, refunds): the proxies' books
    /// follow. A Redis failure is logged; its reconcile repairs it.
    pub async fn wallets_changed(&self, accounts: &[String]) {
        let wallets = match self.store.wallet_balances(Some(accounts)).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(message = "Reading changed balances failed.", error = %e);
                return;
            }
        };
        if let Some(hot) = &self.hot {
            if let Err(e) = hot.set_balances(&wallets).await {
                metrics::REDIS_ERRORS.inc();
                tracing::warn!(message = "Redis balance mirror failed.", error = %e);
            }
        }
        self.feed.publish(&wallets, &[]);
    }

    /// Decrypts a stored credential (for the push and verification only).
    pub fn open_credential(&self, cred: &Credential) -> Result<tokn_config::Credential, String> {
        let plain = self
            .keyring
            .open(&cred.id, &cred.sealed)
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&plain).map_err(|_| "stored credential is malformed".to_owned())
    }

    /// Background upkeep (also trims the journal of key changes to the last
    /// [`CHANGES_KEPT`] versions): picks up other replicas' changes and price versions coming into
    /// force, and reconciles Redis. Runs until the process ends.
    pub async fn upkeep(self: Arc<Self>) {
        let tick = Duration::from_millis(self.limits.version_poll_ms);
        let reconcile_every = Duration::from_secs(60);
        let mut last_reconcile = tokio::time::Instant::now();
        let mut last_sweep = tokio::time::Instant::now();
        let mut last_forget = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            if self.push.activation_due() {
                if let Err(e) = self.store.bump_version().await {
                    tracing::error!(message = "Version bump failed.", error = %e);
                }
            }
            if let Err(e) = self.push.refresh(&self).await {
                tracing::warn!(message = "Configuration refresh failed.", error = %e);
            }
            if last_forget.elapsed() >= reconcile_every {
                last_forget = tokio::time::Instant::now();
                // The journal of changes is read from the published version on; a margin
                // for other replicas behind this one.
                let through = self.push.version().saturating_sub(CHANGES_KEPT) as i64;
                if let Err(e) = self.store.forget_changes(through).await {
                    tracing::warn!(message = "Trimming the change journal failed.", error = %e);
                }
            }
            if let Some(hot) = &self.hot {
                if let Err(e) = hot.restore_if_cold(&self.store).await {
                    metrics::REDIS_ERRORS.inc();
                    tracing::warn!(message = "Restoring Redis failed.", error = %e);
                }
                if last_sweep.elapsed() >= SWEEP_EVERY {
                    last_sweep = tokio::time::Instant::now();
                    match hot.expire_reservations(store::now_ms()).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            message = "Released reservations no proxy settled.",
                            count = n
                        ),
                        Err(e) => {
                            metrics::REDIS_ERRORS.inc();
                            tracing::warn!(message = "Reservation sweep failed.", error = %e);
                        }
                    }
                }
                if last_reconcile.elapsed() >= reconcile_every {
                    last_reconcile = tokio::time::Instant::now();
                    match hot.reconcile_if_changed(&self.store).await {
                        Ok(Some(r)) if r.written + r.removed > 0 => tracing::info!(
                            message = "Redis reconcile repaired the key mirror.",
                            written = r.written,
                            removed = r.removed
                        ),
                        Ok(_) => {}
                        Err(e) => {
                            metrics::REDIS_ERRORS.inc();
                            tracing::warn!(message = "Redis reconcile failed.", error = %e);
                        }
                    }
                }
            }
        }
    }
}

/// The wallets' balances and pools' consumption a batch's statements returned.
fn applied_balances(applied: &ledger::Applied) -> (Vec<WalletBalance>, Vec<PoolConsumption>) {
    let wallets = applied
        .balances
        .iter()
        .filter_map(|b| {
            Some(WalletBalance {
                account: ledger::wallet_owner(&b.ledger_account)?.to_owned(),
                balance_micros: b.balance_micros,
                seq: b.seq,
            })
        })
        .collect();
    let pools = applied
        .pools
        .iter()
        .map(|(pool, consumed)| PoolConsumption {
            pool: pool.clone(),
            consumed_micros: *consumed,
        })
        .collect();
    (wallets, pools)
}

#[derive(Deserialize)]
struct CatalogFile {
    #[serde(default)]
    models: Vec<ModelConfig>,
}

/// The first catalog version: the catalog file plus the built-in `mock` model, and the aliases
/// the file names.
fn seed_prices(catalog_text: &str) -> Result<(Vec<ModelPrice>, Vec<ModelAlias>), String> {
    let file: CatalogFile = toml::from_str(catalog_text).map_err(|e| format!("catalog: {e}"))?;
    let mock: CatalogFile = toml::from_str(tokn_config::DEFAULT_CONFIG_TOML)
        .map_err(|e| format!("default config: {e}"))?;
    let micros = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let aliases = file
        .models
        .iter()
        .flat_map(|m| {
            m.aliases.iter().map(|a| ModelAlias {
                alias: a.clone(),
                model_id: m.id.clone(),
            })
        })
        .collect();
    let prices = file
        .models
        .iter()
        .chain(
            mock.models
                .iter()
                .filter(|m| !file.models.iter().any(|f| f.id == m.id)),
        )
        .map(|m| ModelPrice {
            model_id: m.id.clone(),
            version: 0,
            provider: m.provider.as_str().to_owned(),
            upstream_model: m.upstream_model.clone().unwrap_or_else(|| m.id.clone()),
            input_price_micros_per_mtok: micros(m.input_price_micros_per_mtok),
            output_price_micros_per_mtok: micros(m.output_price_micros_per_mtok),
            cached_input_price_micros_per_mtok: micros(
                m.cached_input_price_micros_per_mtok
                    .unwrap_or(m.input_price_micros_per_mtok),
            ),
            cache_write_price_micros_per_mtok: micros(
                m.cache_write_price_micros_per_mtok
                    .unwrap_or(m.input_price_micros_per_mtok),
            ),
            cache_write_1h_price_micros_per_mtok: micros(
                m.cache_write_1h_price_micros_per_mtok
                    .or(m.cache_write_price_micros_per_mtok)
                    .unwrap_or(m.input_price_micros_per_mtok),
            ),
            effective_at_ms: 0,
            max_output_tokens: m.max_output_tokens.map(micros),
        })
        .collect();
    Ok((prices, aliases))
}

/// Serves the API until SIGTERM or Ctrl-C.
pub async fn serve(valid: &ValidControlPlane) -> Result<(), String> {
    let app = App::start(valid).await?;
    let listener = tokio::net::TcpListener::bind(&valid.config.listen)
        .await
        .map_err(|e| format!("listen {}: {e}", valid.config.listen))?;
    tokio::spawn(app.clone().upkeep());
    tokio::spawn(Payments::worker(app.clone()));
    tracing::info!(message = "Control plane serving.", listen = %valid.config.listen,
        version = app.push.version());
    let closing = app.clone();
    let shutdown = async move {
        shutdown_signal().await;
        // Proxies' long polls would otherwise hold the exit for up to their wait.
        closing.push.close();
    };
    // The client's address reaches the handlers (failed sign-ins are throttled by it).
    let router = api::router(app.clone()).into_make_service_with_connect_info::<api::Peer>();
    match &valid.config.tls {
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(tls) => {
            let listener = tls::listen(listener, tls::server_config(tls)?)
                .map_err(|e| format!("listen: {e}"))?;
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
    .map_err(|e| format!("serve: {e}"))?;
    app.store.close().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Re-encrypts every credential's data key under the current key-encryption key (rotation).
/// Returns (re-wrapped, already current).
pub async fn rewrap(valid: &ValidControlPlane) -> Result<(usize, usize), String> {
    let app = App::start(valid).await?;
    let current = app.keyring.current_version();
    let (mut moved, mut kept) = (0, 0);
    for cred in app
        .store
        .all_credentials()
        .await
        .map_err(|e| e.to_string())?
    {
        if cred.sealed.ciphertext.is_empty() {
            continue; // deleted: nothing left to protect
        }
        if cred.sealed.kek_version == current {
            kept += 1;
            continue;
        }
        let sealed = app
            .keyring
            .rewrap(&cred.id, &cred.sealed)
            .map_err(|e| format!("credential {}: {e}", cred.id))?;
        app.store
            .replace_sealed(&cred.id, &sealed)
            .await
            .map_err(|e| e.to_string())?;
        moved += 1;
    }
    app.store.close().await;
    Ok((moved, kept))
}

/// How often reservations past their deadline are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Versions of the key change journal kept behind the published one.
const CHANGES_KEPT: u64 = 100_000;

/// Takes a lock whatever a panicking holder left: every lock here guards plain data that stays
/// valid.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
