//! The balance feed a proxy without Redis follows: `GET /internal/v1/balances?after=&wait_s=`
//! (proxy token) long-polls the control plane for wallet balances and pool consumption that
//! changed since the last version this proxy has (all of them the first time, or when it fell
//! too far behind), and mirrors them into the in-process book. Grants and top-ups arrive this
//! way; the proxy's own usage arrives with each acknowledged batch (`shipper.rs`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Deserialize;

use crate::money::{BalanceIn, Money, PoolIn};
use crate::retry::Retry;

const WAIT_S: u64 = 25;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// One answer of the feed.
#[derive(Deserialize)]
struct FeedAnswer {
    version: u64,
    /// Every balance (not just changes): the book is complete after applying it.
    complete: bool,
    balances: Vec<BalanceIn>,
    pools: Vec<PoolIn>,
}

pub struct BalanceFeed {
    money: Arc<Money>,
    http: reqwest::Client,
    url: String,
    token: String,
}

impl BalanceFeed {
    pub fn new(money: Arc<Money>, http: reqwest::Client, control_url: &str, token: &str) -> Self {
        Self {
            money,
            http,
            url: format!("{control_url}/internal/v1/balances"),
            token: token.to_owned(),
        }
    }

    async fn poll(&self, after: u64) -> Result<Option<FeedAnswer>, String> {
        let answer = self
            .http
            .get(&self.url)
            .query(&[("after", after), ("wait_s", WAIT_S)])
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(WAIT_S + 5))
            .send()
            .await
            .map_err(|e| format!("transport: {}", e.without_url()))?;
        match answer.status().as_u16() {
            204 => Ok(None),
            200 => answer
                .json()
                .await
                .map(Some)
                .map_err(|e| format!("unreadable answer: {}", e.without_url())),
            status => Err(format!("the control plane answered {status}")),
        }
    }
}

#[async_trait]
impl BackgroundService for BalanceFeed {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut after = 0;
        let mut retry = Retry::new("balance feed", BACKOFF_MIN, BACKOFF_MAX);
        loop {
            let wait = tokio::select! {
                polled = self.poll(after) => match polled {
                    Ok(Some(feed)) => {
                        self.money.mirror(&feed.balances, &feed.pools, feed.complete);
                        after = feed.version;
                        retry.succeeded();
                        Duration::ZERO
                    }
                    Ok(None) => {
                        retry.succeeded();
                        Duration::ZERO
                    }
                    Err(e) => retry.failed(&e),
                },
                _ = shutdown.changed() => return,
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}
