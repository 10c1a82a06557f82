//! A buyer's money on the hot path: before a request goes upstream its maximum cost is reserved
//! against the buyer's available balance and the pool's remaining face value, in one atomic
//! step; when it ends, the reservation is settled to the actual cost (the rest released). The
//! ledger (the control plane's) stays the source of truth: its balances are mirrored here, and
//! what requests hold stays held until the ledger has applied their usage.
//!
//! Two books with one meaning:
//! - **Redis** (fleet): the scripts in `tokn_config::hot` — reserve and settle run here, the
//!   control plane mirrors balances and releases what drained requests held.
//! - **in process** (one proxy, embedded): balances come from the control plane's feed and from
//!   the answer to each usage batch; held amounts are sums (reserve +max, settle +actual−max,
//!   applied −actual), so the order of settle and drain does not matter, and a report is taken
//!   together with the release of the records it covers (see [`Mirrored`]). At start, what the
//!   spool still holds unshipped is held again.
//!
//! Hot state unavailable (Redis unreachable, or balances not loaded): `fail_closed` answers 503;
//! `local_allowance` lets each key spend up to `local_allowance_micros` per proxy meanwhile —
//! the worst-case overspend is that allowance × keys in use × proxies.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, ServerErrorKind};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, OnceCell};
use tokn_config::{hot, BalancePolicy};
use tracing::warn;

use crate::batch::Batcher;
use crate::clock::unix_millis;
use crate::keys::Key;
use crate::metrics;
use crate::sync::lock;

/// What a request holds on one pool: a cost, the buyer's price and the pool's list cost.
pub type Hold = crate::snapshot::Cost;

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveError {
    /// The buyer's available balance does not cover the request.
    Insufficient { available_micros: i64 },
    /// The pool's remaining face value does not: try the next pool.
    PoolShort,
    /// Hot state is unavailable and the policy says no.
    Unavailable,
}

/// A reservation in force. Settle it (or release it); dropping it unsettled releases it.
pub struct Reservation {
    money: Arc<MoneyInner>,
    /// The id it is held under: the request's, or a reservation's taken ahead (`ahead`).
    request_id: String,
    ahead: bool,
    account: Arc<str>,
    /// The buyer key's id, whose spend the Redis book counts when it settles.
    key_id: Arc<str>,
    pool: Arc<str>,
    held: Hold,
    kind: Held,
    /// The buyer's available balance just after the reservation, when the book said (Redis).
    available_after: Option<i64>,
    settled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Nothing is held (no money in play: a file-configured proxy, the mock).
    Nothing,
    /// Held in the book.
    Book,
    /// Counted against the key's local allowance (hot state was unavailable).
    Allowance,
}

pub struct Money {
    inner: Arc<MoneyInner>,
}

struct MoneyInner {
    book: Book,
    policy: BalancePolicy,
    allowance_micros: u64,
    /// How long a reservation may stay open before the sweep releases it.
    deadline: Duration,
    /// Per key, what this proxy let through on its allowance during the current outage.
    allowance: Mutex<HashMap<Arc<str>, u64>>,
}

enum Book {
    /// No money in play (a proxy configured from a file).
    Off,
    Local(LocalBook),
    Redis(Box<RedisBook>),
}

impl Money {
    /// No money in play.
    pub fn off() -> Self {
        Self::with(Book::Off, BalancePolicy::FailClosed, 0, Duration::ZERO)
    }

    /// The in-process book (one proxy with a control plane, no Redis), kept sealed in `saved`
    /// (a file and the key it is sealed with, beside the sealed configuration): a proxy
    /// restarted while the control plane is down serves on the balances it last had, its
    /// spooled records held again on top.
    pub fn local(deadline: Duration, saved: Option<(PathBuf, [u8; 32])>) -> Self {
        let book = LocalBook::default();
        if let Some((path, key)) = &saved {
            book.restore(path, key);
        }
        let book = LocalBook { saved, ..book };
        Self::with(Book::Local(book), BalancePolicy::FailClosed, 0, deadline)
    }

    /// The Redis book at `url`, its keys under `prefix`.
    pub fn redis(
        url: &str,
        prefix: &str,
        policy: BalancePolicy,
        allowance_micros: u64,
        deadline: Duration,
    ) -> Result<Self, String> {
        let client = redis::Client::open(url)
            .map_err(|_| "hot_state.redis_url: not a valid Redis URL".to_owned())?;
        let book = Book::Redis(Box::new(RedisBook::new(RedisLink {
            client,
            conn: OnceCell::new(),
            prefix: prefix.to_owned(),
            script: redis::Script::new(&hot::money_script()),
            healthy: AtomicBool::new(true),
        })));
        Ok(Self::with(book, policy, allowance_micros, deadline))
    }

    fn with(book: Book, policy: BalancePolicy, allowance_micros: u64, deadline: Duration) -> Self {
        Self {
            inner: Arc::new(MoneyInner {
                book,
                policy,
                allowance_micros,
                deadline,
                allowance: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether requests are billed against balances here (a control plane feeds this proxy).
    pub fn is_on(&self) -> bool {
        !matches!(self.inner.book, Book::Off)
    }

    /// Reserves `hold` for `request_id` against `key`'s account and `pool` (whose face value
    /// is `face_value_micros`, unlimited when `None`).
    pub async fn reserve(
        &self,
        request_id: &str,
        key: &Key,
        pool: &Arc<str>,
        face_value_micros: Option<u64>,
        hold: Hold,
    ) -> Result<Reservation, ReserveError> {
        let inner = &self.inner;
        // `ahead`: the id of a reservation taken ahead that holds it, if one does.
        let reservation = |kind, ahead: Option<String>, available_after| Reservation {
            money: inner.clone(),
            ahead: ahead.is_some(),
            request_id: ahead.unwrap_or_else(|| request_id.to_owned()),
            account: key.account.clone(),
            key_id: key.id.clone(),
            pool: pool.clone(),
            held: hold,
            kind,
            available_after,
            settled: false,
        };
        let outcome = match &inner.book {
            Book::Off => return Ok(reservation(Held::Nothing, None, None)),
            Book::Local(book) => book
                .reserve(&key.account, pool, face_value_micros, hold)
                .map(|()| (None, None)),
            Book::Redis(book) => {
                let deadline_ms = unix_millis() + inner.deadline.as_millis() as u64;
                book.reserve(
                    request_id,
                    &key.account,
                    pool,
                    face_value_micros,
                    hold,
                    deadline_ms,
                )
                .await
                .map(|g| (g.ahead, Some(g.available)))
            }
        };
        let (kind, ahead, available_after) = match outcome {
            Ok((ahead, available_after)) => {
                inner.end_outage(&key.account);
                (Held::Book, ahead, available_after)
            }
            Err(ReserveError::Unavailable) => (inner.on_allowance(&key.account, hold)?, None, None),
            Err(e) => {
                metrics::RESERVATIONS
                    .with_label_values(&[reserve_label(e)])
                    .inc();
                return Err(e);
            }
        };
        let label = if ahead.is_some() {
            "reserved_ahead"
        } else {
            "reserved"
        };
        metrics::RESERVATIONS.with_label_values(&[label]).inc();
        Ok(reservation(kind, ahead, available_after))
    }

    /// The in-process book takes the balances and pool consumption the control plane's feed
    /// reports; newer ones win.
    pub fn mirror(&self, balances: &[BalanceIn], pools: &[PoolIn], complete: bool) {
        if let Book::Local(book) = &self.inner.book {
            book.mirror(balances, pools, complete);
        }
    }

    /// A batch of usage lines leaves for the ledger: in the in-process book, what its records
    /// hold waits for the ledger's answer ([`Money::applied`]) to be released.
    pub fn shipping(&self, lines: &[u8]) -> Shipping {
        let held = match &self.inner.book {
            Book::Local(book) => {
                let held = RecordsHeld::of(lines);
                book.ship(&held);
                held
            }
            _ => RecordsHeld::default(),
        };
        Shipping {
            money: self.inner.clone(),
            held,
        }
    }

    /// The ledger applied a batch and reported the balances and pool consumption after it.
    pub fn applied(&self, mut shipping: Shipping, balances: &[BalanceIn], pools: &[PoolIn]) {
        if let Book::Local(book) = &self.inner.book {
            book.applied(&shipping.held, balances, pools);
        }
        // Nothing is left on its way for the drop to undo.
        shipping.held = RecordsHeld::default();
    }

    /// Records the spool still held at start: in the in-process book they hold their cost again
    /// until they are applied.
    pub fn hold_again(&self, lines: &[u8]) {
        if let Book::Local(book) = &self.inner.book {
            book.hold_again(&RecordsHeld::of(lines));
        }
    }

    /// The available balance of `account` in the in-process book (tests, `/status`).
    pub fn available(&self, account: &str) -> Option<i64> {
        match &self.inner.book {
            Book::Local(book) => book.available(account),
            _ => None,
        }
    }
}

impl MoneyInner {
    /// Hot state is unavailable: the policy decides.
    fn on_allowance(&self, account: &Arc<str>, hold: Hold) -> Result<Held, ReserveError> {
        metrics::RESERVATIONS
            .with_label_values(&["unavailable"])
            .inc();
        if self.policy == BalancePolicy::FailClosed {
            return Err(ReserveError::Unavailable);
        }
        let mut used = lock(&self.allowance);
        let spent = used.entry(account.clone()).or_default();
        if *spent + hold.buyer_micros > self.allowance_micros {
            return Err(ReserveError::Unavailable);
        }
        *spent += hold.buyer_micros;
        Ok(Held::Allowance)
    }

    /// Hot state answers again: the allowance starts afresh for the next outage.
    fn end_outage(&self, account: &Arc<str>) {
        if self.policy == BalancePolicy::LocalAllowance {
            lock(&self.allowance).remove(account);
        }
    }
}

impl Reservation {
    /// Charges the actual cost (the rest of the hold is released). Returns the buyer's available
    /// balance afterwards, when the book knows it.
    pub fn settle(mut self, actual: Hold) -> Option<i64> {
        self.charge(actual)
    }

    /// Whether settling adds the cost to the key's spend in hot state (the Redis book does it in
    /// the same script step that charges the request, so it is counted once and needs no round
    /// trip of its own).
    pub fn counts_spend(&self) -> bool {
        self.kind == Held::Book && matches!(self.money.book, Book::Redis(_))
    }

    /// The id of the reservation holding the cost when it was reserved ahead of the request
    /// (the usage record names it, for the drain to release).
    pub fn reserved_ahead(&self) -> Option<&str> {
        self.ahead.then_some(self.request_id.as_str())
    }

    /// Nothing was charged: everything is released.
    pub fn release(mut self) {
        self.charge(Hold::default());
    }

    fn charge(&mut self, actual: Hold) -> Option<i64> {
        if std::mem::replace(&mut self.settled, true) {
            return None;
        }
        match self.kind {
            Held::Nothing => None,
            Held::Allowance => {
                let mut used = lock(&self.money.allowance);
                if let Some(spent) = used.get_mut(&self.account) {
                    *spent = (*spent + actual.buyer_micros).saturating_sub(self.held.buyer_micros);
                }
                None
            }
            Held::Book => match &self.money.book {
                Book::Off => None,
                Book::Local(book) => book.settle(&self.account, &self.pool, self.held, actual),
                Book::Redis(book) => {
                    // Sent in the background: the balance after it is the one after the
                    // reservation with the unused part of the hold back.
                    book.settle(SettleCall {
                        request_id: std::mem::take(&mut self.request_id),
                        account: self.account.clone(),
                        key_id: self.key_id.clone(),
                        pool: self.pool.clone(),
                        actual,
                    });
                    let released = self.held.buyer_micros as i64 - actual.buyer_micros as i64;
                    self.available_after.map(|a| a + released)
                }
            },
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // A request that ended without settling (it cannot today; a future path might): its
        // hold is released rather than leaked.
        self.charge(Hold::default());
    }
}

fn reserve_label(e: ReserveError) -> &'static str {
    match e {
        ReserveError::Insufficient { .. } => "insufficient_funds",
        ReserveError::PoolShort => "pool_short",
        ReserveError::Unavailable => "unavailable",
    }
}

// === The control plane's reports ===

/// A wallet's balance as the ledger holds it.
#[derive(Debug, Clone, Deserialize)]
pub struct BalanceIn {
    pub account: String,
    pub balance_micros: i64,
    pub seq: i64,
}

/// A pool's consumption as the ledger holds it.
#[derive(Debug, Clone, Deserialize)]
pub struct PoolIn {
    pub pool: String,
    pub consumed_micros: i64,
}

// === In process ===

#[derive(Default)]
struct LocalBook {
    state: Mutex<LocalState>,
    /// Where the mirrored balances are saved after each change, and the sealing key.
    saved: Option<(PathBuf, [u8; 32])>,
    /// One save at a time, from taking the figures to the file in place: two (the feed's and
    /// the shipper's) could otherwise land older figures last.
    saving: Mutex<()>,
}

/// The mirrored part of the book, as saved.
#[derive(Serialize, Deserialize)]
struct SavedBook {
    accounts: Vec<(String, i64, i64)>,
    pools: Vec<(String, i64)>,
}

#[derive(Default)]
struct LocalState {
    /// The control plane's feed has delivered every balance once.
    loaded: bool,
    /// Wallet balances (versioned by the ledger's `seq`).
    accounts: HashMap<Arc<str>, Mirrored>,
    /// Pool consumption (its own version: it only grows).
    pools: HashMap<Arc<str>, Mirrored>,
    /// A figure the saved copy holds changed since it was saved.
    unsaved: bool,
}

/// One figure the ledger owns (a wallet's balance, a pool's consumption) as this proxy sees it,
/// and what this proxy holds on it.
///
/// The ledger reports a figure after applying a batch (its answer) and whenever it changes (the
/// feed); either may arrive first, and a report may or may not include a batch still on its
/// way. So a report and the release of the records it covers move together, and only while
/// none of this figure's records is on its way: then the newest report includes every record
/// applied so far (each batch's answer is read after its commit), and nothing is counted twice
/// — neither in the report and still held (a balance below the truth, a false 402), nor
/// released and not yet in the report (above the truth: overspend).
#[derive(Debug, Default, Clone, Copy)]
struct Mirrored {
    /// The ledger's figure and its version.
    value: i64,
    seq: i64,
    /// What open reservations hold, and records not yet covered by `value`.
    held: i64,
    /// Records of this figure in batches on their way to the ledger.
    shipping: u32,
    /// The newest report not yet taken, and what the applied records it covers release then.
    report: Option<(i64, i64)>,
    applied: i64,
}

impl Mirrored {
    /// Whether the figure changed.
    fn report(&mut self, value: i64, seq: i64) -> bool {
        if self.report.is_none_or(|(_, s)| seq > s) {
            self.report = Some((value, seq));
        }
        self.take()
    }

    /// Takes the newest report and releases the applied records, unless records are on their
    /// way. Whether the figure changed.
    fn take(&mut self) -> bool {
        if self.shipping > 0 {
            return false;
        }
        let mut changed = false;
        if let Some((value, seq)) = self.report.take() {
            if seq > self.seq {
                changed = (self.value, self.seq) != (value, seq);
                (self.value, self.seq) = (value, seq);
            }
        }
        self.held -= std::mem::take(&mut self.applied);
        changed
    }
}

/// What records hold, per wallet and per pool: `(records, micros)`.
#[derive(Default)]
struct RecordsHeld {
    accounts: HashMap<Arc<str>, (u32, i64)>,
    pools: HashMap<Arc<str>, (u32, i64)>,
}

impl RecordsHeld {
    /// Sums a batch of usage lines (the billed ones; unreadable lines are the ledger's to refuse).
    fn of(lines: &[u8]) -> Self {
        /// The fields of a usage record the book needs.
        #[derive(Deserialize)]
        struct RecordHold<'a> {
            #[serde(borrow)]
            account: Option<&'a str>,
            #[serde(borrow)]
            pool_id: Option<&'a str>,
            #[serde(borrow)]
            provider: Option<&'a str>,
            #[serde(borrow)]
            key_id: Option<&'a str>,
            buyer_cost_micros: i64,
            list_cost_micros: i64,
        }
        let mut held = Self::default();
        for line in lines.split(|b| *b == b'\n') {
            let Ok(r) = serde_json::from_slice::<RecordHold<'_>>(line) else {
                continue;
            };
            if r.key_id.is_none() || r.provider == Some("mock") {
                continue;
            }
            // A batch names few accounts and pools: an id is copied the first time only.
            let add = |to: &mut HashMap<Arc<str>, (u32, i64)>, id: &str, micros: i64| {
                let entry = match to.get_mut(id) {
                    Some(entry) => entry,
                    None => to.entry(Arc::from(id)).or_default(),
                };
                entry.0 += 1;
                entry.1 += micros;
            };
            if let Some(account) = r.account {
                add(&mut held.accounts, account, r.buyer_cost_micros);
            }
            if let Some(pool) = r.pool_id {
                add(&mut held.pools, pool, r.list_cost_micros);
            }
        }
        held
    }

    /// Calls `f` with each mirrored figure these records name, their number and what they hold.
    fn each(&self, st: &mut LocalState, mut f: impl FnMut(&mut Mirrored, u32, i64)) {
        for (id, &(n, micros)) in &self.accounts {
            f(st.accounts.entry(id.clone()).or_default(), n, micros);
        }
        for (id, &(n, micros)) in &self.pools {
            f(st.pools.entry(id.clone()).or_default(), n, micros);
        }
    }
}

/// A batch of records on its way to the ledger (in-process book). Applied ([`Money::applied`])
/// or dropped (the send failed; it will be sent again), it stops counting as on its way.
pub struct Shipping {
    money: Arc<MoneyInner>,
    held: RecordsHeld,
}

impl Drop for Shipping {
    fn drop(&mut self) {
        if let Book::Local(book) = &self.money.book {
            book.unship(&self.held);
        }
    }
}

impl LocalBook {
    fn reserve(
        &self,
        account: &Arc<str>,
        pool: &Arc<str>,
        face: Option<u64>,
        hold: Hold,
    ) -> Result<(), ReserveError> {
        let mut st = lock(&self.state);
        if !st.loaded {
            return Err(ReserveError::Unavailable);
        }
        let (buyer, list) = (hold.buyer_micros as i64, hold.list_micros as i64);
        let a = st.accounts.get(account).copied().unwrap_or_default();
        if a.value - a.held < buyer {
            return Err(ReserveError::Insufficient {
                available_micros: a.value - a.held,
            });
        }
        let p = st.pools.get(pool).copied().unwrap_or_default();
        if face.is_some_and(|f| (f as i64) - p.value - p.held < list) {
            return Err(ReserveError::PoolShort);
        }
        st.accounts.entry(account.clone()).or_default().held += buyer;
        st.pools.entry(pool.clone()).or_default().held += list;
        Ok(())
    }

    fn settle(&self, account: &Arc<str>, pool: &Arc<str>, held: Hold, actual: Hold) -> Option<i64> {
        let mut st = lock(&self.state);
        let a = st.accounts.entry(account.clone()).or_default();
        a.held += actual.buyer_micros as i64 - held.buyer_micros as i64;
        let available = a.value - a.held;
        st.pools.entry(pool.clone()).or_default().held +=
            actual.list_micros as i64 - held.list_micros as i64;
        Some(available)
    }

    /// The control plane's reports: balances (versioned) and pool consumption.
    fn report(st: &mut LocalState, balances: &[BalanceIn], pools: &[PoolIn]) {
        let mut changed = false;
        for b in balances {
            let a = st
                .accounts
                .entry(Arc::from(b.account.as_str()))
                .or_default();
            changed |= a.report(b.balance_micros, b.seq);
        }
        for p in pools {
            let hot = st.pools.entry(Arc::from(p.pool.as_str())).or_default();
            changed |= hot.report(p.consumed_micros, p.consumed_micros);
        }
        st.unsaved |= changed;
    }

    fn mirror(&self, balances: &[BalanceIn], pools: &[PoolIn], complete: bool) {
        if balances.is_empty() && pools.is_empty() && !complete {
            return;
        }
        {
            let mut st = lock(&self.state);
            Self::report(&mut st, balances, pools);
            st.unsaved |= complete && !st.loaded;
            st.loaded |= complete;
        }
        self.save();
    }

    fn ship(&self, held: &RecordsHeld) {
        held.each(&mut lock(&self.state), |m, n, _| m.shipping += n);
    }

    fn unship(&self, held: &RecordsHeld) {
        let mut changed = false;
        {
            let mut st = lock(&self.state);
            held.each(&mut st, |m, n, _| {
                m.shipping -= n;
                changed |= m.take();
            });
            st.unsaved |= changed;
        }
        self.save();
    }

    fn applied(&self, held: &RecordsHeld, balances: &[BalanceIn], pools: &[PoolIn]) {
        {
            let mut st = lock(&self.state);
            Self::report(&mut st, balances, pools);
            let mut changed = false;
            held.each(&mut st, |m, n, micros| {
                m.shipping -= n;
                m.applied += micros;
                changed |= m.take();
            });
            st.unsaved |= changed;
        }
        self.save();
    }

    /// Records found unshipped at start hold their cost again until they are applied.
    fn hold_again(&self, held: &RecordsHeld) {
        held.each(&mut lock(&self.state), |m, _, micros| m.held += micros);
    }

    /// Saves the mirrored balances if they changed since the last save (from the feed's and
    /// the shipper's tasks, never a request's: the feed's report of a batch the shipper's answer
    /// already gave saves nothing).
    fn save(&self) {
        let Some((path, key)) = &self.saved else {
            return;
        };
        let _one_at_a_time = lock(&self.saving);
        let saved = {
            let mut st = lock(&self.state);
            if !st.loaded || !std::mem::take(&mut st.unsaved) {
                return;
            }
            SavedBook {
                accounts: st
                    .accounts
                    .iter()
                    .map(|(id, a)| (id.to_string(), a.value, a.seq))
                    .collect(),
                pools: st
                    .pools
                    .iter()
                    .map(|(id, p)| (id.to_string(), p.value))
                    .collect(),
            }
        };
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::control::write_sealed(path, key, &bytes));
        if let Err(e) = written {
            // Tried again with the next change.
            lock(&self.state).unsaved = true;
            warn!(message = "Saving the balance book failed.", error = %e);
        }
    }

    /// Takes the balances a previous run saved.
    fn restore(&self, path: &std::path::Path, key: &[u8; 32]) {
        let Ok(Some(bytes)) = crate::control::read_sealed(path, key) else {
            return;
        };
        let Ok(saved) = serde_json::from_slice::<SavedBook>(&bytes) else {
            warn!(message = "The saved balance book is unreadable; waiting for the control plane.");
            return;
        };
        let balances: Vec<BalanceIn> = saved
            .accounts
            .into_iter()
            .map(|(account, balance_micros, seq)| BalanceIn {
                account,
                balance_micros,
                seq,
            })
            .collect();
        let pools: Vec<PoolIn> = saved
            .pools
            .into_iter()
            .map(|(pool, consumed_micros)| PoolIn {
                pool,
                consumed_micros,
            })
            .collect();
        let mut st = lock(&self.state);
        Self::report(&mut st, &balances, &pools);
        st.loaded = true;
    }

    fn available(&self, account: &str) -> Option<i64> {
        let st = lock(&self.state);
        st.loaded
            .then(|| st.accounts.get(account).map_or(0, |a| a.value - a.held))
    }
}

// === Redis ===

/// A reservation waiting for its batch, and where its answer goes.
struct ReserveCall {
    request_id: String,
    account: Arc<str>,
    pool: Arc<str>,
    face: Option<u64>,
    hold: Hold,
    deadline_ms: u64,
    /// How many more of the same size to take ahead for the stock, after this one.
    ahead: usize,
    /// A pair per reservation: this one's, then those taken ahead.
    reply: oneshot::Sender<Option<Vec<[i64; 2]>>>,
}

/// Writes into `out` the id of the `i`-th reservation a request makes: its own (`0`), then
/// those taken ahead, its id suffixed.
fn write_reservation_id(request_id: &str, i: usize, out: &mut String) {
    use std::fmt::Write;
    out.clear();
    out.push_str(request_id);
    if i > 0 {
        let _ = write!(out, ".{i}");
    }
}

/// A settlement waiting for its batch (nobody waits for its answer).
struct SettleCall {
    request_id: String,
    account: Arc<str>,
    key_id: Arc<str>,
    pool: Arc<str>,
    actual: Hold,
}

/// A call to the Redis book.
enum MoneyCall {
    Reserve(ReserveCall),
    Settle(SettleCall),
}

/// Reservations (answered) and settlements (not waited for, so they linger) go to Redis in
/// batches: see [`crate::batch`]. A batch's settlements go before its reservations. Requests
/// served from the [`Stock`] make no call before they go upstream.
struct RedisBook {
    calls: Arc<Batcher<MoneyCall>>,
    stock: Arc<Stock>,
    /// Set once the task releasing stale stock runs (started by the first reservation, on the
    /// request runtime).
    sweeper: OnceLock<()>,
}

/// What the Redis book granted: the id it is held under when it was taken ahead, and the
/// buyer's available balance after it.
struct Granted {
    ahead: Option<String>,
    available: i64,
}

/// The connection and scripts the batch senders share.
struct RedisLink {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    /// Settlements and reservations, in one call (`hot::money_script`).
    script: redis::Script,
    /// Last call's outcome, to log an outage once rather than per request.
    healthy: AtomicBool,
}

/// Longest a money call waits for Redis before the request is treated as degraded.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// Most requests one script call carries.
const REDIS_BATCH_MAX: usize = 128;

impl RedisBook {
    fn new(link: RedisLink) -> Self {
        let link = Arc::new(link);
        let calls = Batcher::new(REDIS_BATCH_MAX, move |batch| {
            let link = link.clone();
            async move { link.send(batch).await }
        });
        Self {
            calls,
            stock: Arc::default(),
            sweeper: OnceLock::new(),
        }
    }

    /// Takes a reservation from the stock, or reserves in the next batch (with more for the
    /// stock when the balance is ample).
    async fn reserve(
        &self,
        request_id: &str,
        account: &Arc<str>,
        pool: &Arc<str>,
        face: Option<u64>,
        hold: Hold,
        deadline_ms: u64,
    ) -> Result<Granted, ReserveError> {
        self.start_sweeper();
        let ahead = match self.stock.take(account, pool, hold) {
            Take::Stocked(granted) => return Ok(granted),
            Take::Reserve { ahead, stale } => {
                for id in stale {
                    self.calls
                        .push_lazy(release(id, account.clone(), pool.clone()));
                }
                ahead
            }
        };
        let (reply, answer) = oneshot::channel();
        self.calls.push(MoneyCall::Reserve(ReserveCall {
            request_id: request_id.to_owned(),
            account: account.clone(),
            pool: pool.clone(),
            face,
            hold,
            deadline_ms,
            ahead,
            reply,
        }));
        let pairs = answer.await.ok().flatten().unwrap_or_default();
        self.stock.put(account, pool, hold, request_id, &pairs);
        match pairs.first() {
            Some([0, available]) => Ok(Granted {
                ahead: None,
                available: *available,
            }),
            Some([1, available]) => Err(ReserveError::Insufficient {
                available_micros: *available,
            }),
            Some([2, _]) => Err(ReserveError::PoolShort),
            // Not loaded (`3`), a reused request id (`4`), or no answer.
            _ => Err(ReserveError::Unavailable),
        }
    }

    /// Settles in a coming batch (meanwhile the request holds its whole reservation: the safe
    /// side). Unanswered, the reservation stays open: the sweep releases it at its deadline and
    /// the drained record charges the actual cost.
    fn settle(&self, call: SettleCall) {
        self.calls.push_lazy(MoneyCall::Settle(call));
    }

    /// Starts the task that releases stock nobody took within [`STOCK_LIFE`] (a buyer who
    /// stopped sending): on the runtime of the first reservation, as the batcher's sender.
    fn start_sweeper(&self) {
        if self.sweeper.get().is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.sweeper.get_or_init(|| {
            let (stock, calls) = (self.stock.clone(), self.calls.clone());
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(STOCK_LIFE);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    for (account, pool, id) in stock.stale() {
                        calls.push_lazy(release(id, account, pool));
                    }
                }
            });
        });
    }
}

/// The call releasing a reservation taken ahead and never used.
fn release(id: String, account: Arc<str>, pool: Arc<str>) -> MoneyCall {
    MoneyCall::Settle(SettleCall {
        request_id: id,
        account,
        // Nothing is charged, so no key's spend is counted.
        key_id: Arc::from(""),
        pool,
        actual: Hold::default(),
    })
}

/// How long reservations taken ahead wait to be used before they are released.
const STOCK_LIFE: Duration = Duration::from_secs(2);
/// Most reservations taken ahead with one reservation.
const STOCK_MAX: usize = 15;
/// Reservations are taken ahead only from a balance this many times what they hold: the stock
/// never holds more than a small share of what a buyer has.
const STOCK_SHARE: i64 = 4;
/// ... and only from a pool with this many times their list cost left: never near its end,
/// where stock one proxy holds would send others' requests to the next pool (FIFO).
const STOCK_POOL_ROOM: i64 = 1_000;

/// Reservations taken ahead, per account and pool. When a buyer's balance is ample, a
/// reservation that goes to Redis anyway takes up to [`STOCK_MAX`] more of the same size in the
/// same script call, and the account's next requests on that pool use them without a round
/// trip of their own — a lone client's requests otherwise each wait on Redis, which costs more
/// CPU than the rest of the money path. Each is an ordinary reservation under its own id
/// (settled and drained like any, the usage record naming it), so every guarantee of the
/// scripts holds. The price: unused stock holds a share of the buyer's balance for up to
/// [`STOCK_LIFE`], and a proxy killed with stock holds it until the sweep's deadline.
#[derive(Default)]
struct Stock {
    shelves: Mutex<HashMap<ShelfKey, Shelf>>,
}

/// An account and a pool.
type ShelfKey = (Arc<str>, Arc<str>);

struct Shelf {
    /// Reservations taken ahead, unused: their ids and what each holds.
    slots: Vec<(String, Hold)>,
    /// The buyer's available balance Redis last reported here (what the slots hold is out of
    /// it already).
    available: i64,
    /// When Redis last answered for this shelf.
    stocked: Instant,
}

enum Take {
    /// A reservation from the stock covers the request.
    Stocked(Granted),
    /// Reserve in Redis, taking `ahead` more for the stock; `stale`: stock to release.
    Reserve { ahead: usize, stale: Vec<String> },
}

impl Stock {
    fn take(&self, account: &Arc<str>, pool: &Arc<str>, hold: Hold) -> Take {
        let mut shelves = lock(&self.shelves);
        let key = (account.clone(), pool.clone());
        let Some(shelf) = shelves.get_mut(&key) else {
            return Take::Reserve {
                ahead: 0,
                stale: Vec::new(),
            };
        };
        if shelf.stocked.elapsed() > STOCK_LIFE {
            let stale = shelf.slots.drain(..).map(|(id, _)| id).collect();
            shelves.remove(&key);
            return Take::Reserve { ahead: 0, stale };
        }
        let covers =
            |h: &Hold| h.buyer_micros >= hold.buyer_micros && h.list_micros >= hold.list_micros;
        if let Some(i) = shelf.slots.iter().position(|(_, h)| covers(h)) {
            let (id, _) = shelf.slots.swap_remove(i);
            let unused: i64 = shelf.slots.iter().map(|(_, h)| h.buyer_micros as i64).sum();
            return Take::Stocked(Granted {
                ahead: Some(id),
                available: shelf.available + unused,
            });
        }
        let per = (hold.buyer_micros as i64).max(1) * STOCK_SHARE;
        let ahead = (shelf.available / per).clamp(0, STOCK_MAX as i64) as usize;
        Take::Reserve {
            ahead,
            stale: Vec::new(),
        }
    }

    /// Redis answered a reservation (`pairs`: its own, then those taken ahead): the ones
    /// granted ahead go on the shelf, and the balance it reported is remembered.
    fn put(
        &self,
        account: &Arc<str>,
        pool: &Arc<str>,
        hold: Hold,
        request_id: &str,
        pairs: &[[i64; 2]],
    ) {
        if pairs.is_empty() {
            return; // No answer: nothing learnt.
        }
        let mut shelves = lock(&self.shelves);
        let shelf = shelves
            .entry((account.clone(), pool.clone()))
            .or_insert_with(|| Shelf {
                slots: Vec::new(),
                available: 0,
                stocked: Instant::now(),
            });
        for (i, [code, available]) in pairs.iter().enumerate() {
            if i > 0 && *code == 0 {
                let mut id = String::new();
                write_reservation_id(request_id, i, &mut id);
                shelf.slots.push((id, hold));
            }
            // Granted (`0`) or refused for the balance (`1`): a figure of the buyer's balance.
            if *code <= 1 {
                shelf.available = *available;
                shelf.stocked = Instant::now();
            }
        }
    }

    /// Takes every shelf Redis has not answered for within [`STOCK_LIFE`] off, with its
    /// unused reservations (to release).
    fn stale(&self) -> Vec<(Arc<str>, Arc<str>, String)> {
        let mut out = Vec::new();
        lock(&self.shelves).retain(|(account, pool), shelf| {
            if shelf.stocked.elapsed() <= STOCK_LIFE {
                return true;
            }
            out.extend(
                shelf
                    .slots
                    .drain(..)
                    .map(|(id, _)| (account.clone(), pool.clone(), id)),
            );
            false
        });
        out
    }
}

impl RedisLink {
    async fn conn(&self) -> Option<ConnectionManager> {
        self.conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await
            .ok()
            .cloned()
    }

    /// Runs the money script (`call`: EVALSHA with its keys and arguments); its answer as
    /// pairs, `None` when Redis cannot be reached in time or answers otherwise.
    async fn run(&self, call: &redis::Cmd, n: usize) -> Option<Vec<i64>> {
        let mut conn = self.conn().await?;
        let result = tokio::time::timeout(REDIS_TIMEOUT, async {
            match call.query_async::<Vec<i64>>(&mut conn).await {
                // A Redis that restarted has forgotten the script: load it, call again.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    self.script.prepare_invoke().load_async(&mut conn).await?;
                    call.query_async::<Vec<i64>>(&mut conn).await
                }
                other => other,
            }
        })
        .await;
        match result {
            Ok(Ok(reply)) if reply.len() == 2 * n => {
                self.healthy.store(true, Ordering::Relaxed);
                Some(reply)
            }
            other => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    let why = match other {
                        Err(_) => "timeout".to_owned(),
                        Ok(Err(e)) => format!("{:?}", e.kind()),
                        Ok(Ok(_)) => "unexpected reply".to_owned(),
                    };
                    warn!(message = "Money hot state unavailable.", why);
                }
                metrics::HOT_STATE_ERRORS
                    .with_label_values(&["money"])
                    .inc();
                None
            }
        }
    }

    /// One script call, one round trip: the batch's settlements, then its reservations (so a
    /// buyer's settled request frees its hold before the next reserves). The call is written
    /// straight into one command buffer, keys first, then arguments, as EVALSHA takes them (the
    /// script invocation builder allocates per key and argument and copies them twice more; a
    /// reservation that takes stock ahead carries sixteen groups).
    async fn send(&self, batch: Vec<MoneyCall>) {
        let mut reserves = Vec::new();
        let mut settles = Vec::new();
        for call in batch {
            match call {
                MoneyCall::Reserve(c) => reserves.push(c),
                MoneyCall::Settle(c) => settles.push(c),
            }
        }
        let p = &self.prefix;
        let groups = settles.len() + reserves.iter().map(|c| 1 + c.ahead).sum::<usize>();
        let (open, epoch) = (hot::money_open(p), hot::money_epoch(p));
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.script.get_hash()).arg(5 * groups);
        let mut id = String::new();
        for c in &settles {
            call.arg(hot::money_account(p, &c.account))
                .arg(hot::money_pool(p, &c.pool))
                .arg(hot::money_reservation(p, &c.request_id))
                .arg(&open)
                .arg(hot::spend_counter(p, &c.key_id));
        }
        for c in &reserves {
            let (account, pool) = (
                hot::money_account(p, &c.account),
                hot::money_pool(p, &c.pool),
            );
            for i in 0..=c.ahead {
                write_reservation_id(&c.request_id, i, &mut id);
                call.arg(&account)
                    .arg(&pool)
                    .arg(hot::money_reservation(p, &id))
                    .arg(&open)
                    .arg(&epoch);
            }
        }
        call.arg(settles.len());
        for c in &settles {
            call.arg(c.actual.buyer_micros)
                .arg(c.actual.list_micros)
                .arg(&c.request_id);
        }
        for c in &reserves {
            for i in 0..=c.ahead {
                // Taken ahead, a reservation may wait up to the stock's life to be used.
                let deadline = match i {
                    0 => c.deadline_ms,
                    _ => c.deadline_ms + STOCK_LIFE.as_millis() as u64,
                };
                // Taken ahead, a reservation leaves the balance and the pool room for others.
                let (buyer_room, pool_room) = match i {
                    0 => (1, 1),
                    _ => (STOCK_SHARE, STOCK_POOL_ROOM),
                };
                write_reservation_id(&c.request_id, i, &mut id);
                call.arg(c.hold.buyer_micros)
                    .arg(c.hold.list_micros)
                    .arg(c.face.map_or(-1, |f| f as i64))
                    .arg(deadline)
                    .arg(&id)
                    .arg(hot::RESERVATION_RECORD_TTL_MS)
                    .arg(&*c.account)
                    .arg(&*c.pool)
                    .arg(buyer_room)
                    .arg(pool_room);
            }
        }
        let answers = self.run(&call, groups).await;
        // The reservations' pairs follow the settlements'.
        let mut at = settles.len();
        for c in reserves {
            let n = 1 + c.ahead;
            let answer = answers
                .as_ref()
                .map(|a| (at..at + n).map(|g| [a[2 * g], a[2 * g + 1]]).collect());
            at += n;
            // The request may have gone (its client left): nobody to tell.
            let _ = c.reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(account: &str) -> Key {
        Key {
            id: "k".into(),
            account: account.into(),
            allowed_models: None,
            spend_cap_micros: None,
            requests_per_minute: None,
            counters: Default::default(),
        }
    }

    fn hold(buyer: u64, list: u64) -> Hold {
        Hold {
            buyer_micros: buyer,
            list_micros: list,
        }
    }

    fn balance(account: &str, micros: i64, seq: i64) -> BalanceIn {
        BalanceIn {
            account: account.to_owned(),
            balance_micros: micros,
            seq,
        }
    }

    fn record(account: &str, buyer: i64, list: i64) -> Vec<u8> {
        json!({"account": account, "pool_id": "p", "provider": "openai", "key_id": "k",
            "buyer_cost_micros": buyer, "list_cost_micros": list})
        .to_string()
        .into_bytes()
    }

    /// A book holding 100 for `a`, with `spent` charged by requests whose records are spooled.
    async fn book_with_spent(spent: &[u64]) -> Money {
        let money = Money::local(Duration::from_secs(60), None);
        money.mirror(&[balance("a", 100, 1)], &[], true);
        for (i, &micros) in spent.iter().enumerate() {
            let r = money
                .reserve(&format!("r{i}"), &key("a"), &"p".into(), None, hold(50, 50))
                .await
                .unwrap();
            r.settle(hold(micros, micros));
        }
        money
    }

    #[tokio::test]
    async fn batches_answered_out_of_commit_order_count_each_record_once() {
        let money = book_with_spent(&[25, 10]).await;
        assert_eq!(money.available("a"), Some(65));
        let (b1, b2) = (
            money.shipping(&record("a", 25, 25)),
            money.shipping(&record("a", 10, 10)),
        );
        // The ledger commits the second batch first, then the first; the feed reports both.
        money.mirror(&[balance("a", 90, 2)], &[], false);
        assert_eq!(money.available("a"), Some(65));
        money.mirror(&[balance("a", 65, 3)], &[], false);
        assert_eq!(money.available("a"), Some(65));
        // Answers come in spool order: the first's balance includes the second batch, which is
        // still on its way.
        money.applied(b1, &[balance("a", 65, 3)], &[]);
        assert_eq!(money.available("a"), Some(65));
        money.applied(b2, &[balance("a", 90, 2)], &[]);
        assert_eq!(money.available("a"), Some(65));
        // A grant reported afterwards is taken at once.
        money.mirror(&[balance("a", 1_065, 4)], &[], false);
        assert_eq!(money.available("a"), Some(1_065));
    }

    #[tokio::test]
    async fn a_failed_send_keeps_its_records_held_until_they_are_applied() {
        let money = book_with_spent(&[25]).await;
        let lines = record("a", 25, 25);
        let first = money.shipping(&lines);
        // The send fails; the records stay held and go again.
        drop(first);
        assert_eq!(money.available("a"), Some(75));
        let again = money.shipping(&lines);
        // The first send had been applied after all: the second finds a duplicate, and the
        // answer reports the balance that includes it.
        let consumed = PoolIn {
            pool: "p".to_owned(),
            consumed_micros: 25,
        };
        money.applied(again, &[balance("a", 75, 2)], &[consumed]);
        assert_eq!(money.available("a"), Some(75));
        // The pool's consumption follows the same rule: 75 of its 100 are left.
        let pool: Arc<str> = "p".into();
        let short = money
            .reserve("r9", &key("a"), &pool, Some(100), hold(1, 76))
            .await;
        assert_eq!(short.err(), Some(ReserveError::PoolShort));
    }

    #[tokio::test]
    async fn the_local_book_holds_settles_and_releases_on_drain() {
        let money = Money::local(Duration::from_secs(60), None);
        let (k, pool): (Key, Arc<str>) = (key("a"), "p".into());
        // Not loaded: unavailable (fail closed).
        let early = money.reserve("r0", &k, &pool, None, hold(1, 1)).await;
        assert_eq!(early.err(), Some(ReserveError::Unavailable));
        money.mirror(&[balance("a", 100, 1)], &[], true);
        let r1 = money
            .reserve("r1", &k, &pool, Some(50), hold(60, 30))
            .await
            .unwrap();
        // 40 left: a second hold of 60 is refused, naming what is available.
        let refused = money.reserve("r2", &k, &pool, Some(50), hold(60, 10)).await;
        assert_eq!(
            refused.err(),
            Some(ReserveError::Insufficient {
                available_micros: 40
            })
        );
        // The pool has 20 left.
        let short = money.reserve("r3", &k, &pool, Some(50), hold(10, 21)).await;
        assert_eq!(short.err(), Some(ReserveError::PoolShort));
        // Settled to 25: 75 available.
        assert_eq!(r1.settle(hold(25, 12)), Some(75));
        // Its record leaves for the ledger, which applies it (balance 75 at seq 2) and reports
        // it through the feed before its answer arrives: nothing is counted twice.
        let batch = money.shipping(&record("a", 25, 12));
        money.mirror(&[balance("a", 75, 2)], &[], false);
        assert_eq!(money.available("a"), Some(75));
        money.applied(batch, &[balance("a", 75, 2)], &[]);
        assert_eq!(money.available("a"), Some(75));
        // An older balance arriving late changes nothing.
        money.mirror(&[balance("a", 100, 1)], &[], false);
        assert_eq!(money.available("a"), Some(75));
        // A dropped reservation is released.
        let r4 = money
            .reserve("r4", &k, &pool, None, hold(70, 0))
            .await
            .unwrap();
        drop(r4);
        assert_eq!(money.available("a"), Some(75));
    }

    #[tokio::test]
    async fn the_saved_book_is_rewritten_only_when_a_figure_changed_and_restores_it() {
        let dir = std::env::temp_dir().join(format!("tokn-book-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("book.sealed");
        let saved = || Some((path.clone(), [7u8; 32]));
        let money = Money::local(Duration::from_secs(60), saved());
        money.mirror(&[balance("a", 100, 1)], &[], true);
        assert!(path.exists(), "saved once loaded");
        // The shipper's answer reports a batch; the feed then reports the same figures: nothing
        // to save again.
        let shipping = money.shipping(&record("a", 0, 0));
        money.applied(shipping, &[balance("a", 90, 2)], &[]);
        std::fs::remove_file(&path).unwrap();
        money.mirror(&[balance("a", 90, 2)], &[], false);
        assert!(!path.exists(), "an unchanged report is not saved");
        money.mirror(&[balance("a", 1_090, 3)], &[], false);
        assert!(path.exists(), "a changed one is");
        // A restart starts from what was saved.
        let again = Money::local(Duration::from_secs(60), saved());
        assert_eq!(again.available("a"), Some(1_090));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn ahead(take: Take) -> usize {
        match take {
            Take::Reserve { ahead, .. } => ahead,
            Take::Stocked(_) => panic!("served from the stock"),
        }
    }

    #[test]
    fn stock_is_taken_ahead_only_from_an_ample_balance_and_serves_holds_it_covers() {
        let stock = Stock::default();
        let (a, p) = (Arc::<str>::from("a"), Arc::<str>::from("p"));
        // Nothing known of the balance: nothing is taken ahead.
        assert_eq!(ahead(stock.take(&a, &p, hold(10, 20))), 0);
        // A balance of 3 holds' worth: still nothing (the stock takes at most a quarter).
        stock.put(&a, &p, hold(10, 20), "r0", &[[0, 30]]);
        assert_eq!(ahead(stock.take(&a, &p, hold(10, 20))), 0);
        // Ample: as many as a quarter of it covers, at most STOCK_MAX.
        stock.put(&a, &p, hold(10, 20), "r1", &[[0, 120]]);
        assert_eq!(ahead(stock.take(&a, &p, hold(10, 20))), 3);
        stock.put(&a, &p, hold(10, 20), "r2", &[[0, 1_000_000]]);
        assert_eq!(ahead(stock.take(&a, &p, hold(10, 20))), STOCK_MAX);
        // Two granted ahead, the third refused (the pool ran short).
        stock.put(
            &a,
            &p,
            hold(10, 20),
            "r3",
            &[[0, 990], [0, 980], [0, 970], [2, 0]],
        );
        // A larger hold than the stock's is not served from it.
        assert_eq!(ahead(stock.take(&a, &p, hold(11, 20))), 15);
        let Take::Stocked(first) = stock.take(&a, &p, hold(10, 5)) else {
            panic!("not served from the stock")
        };
        // The balance Redis reported, with the other unused reservation given back.
        assert_eq!(first.available, 980);
        let Take::Stocked(second) = stock.take(&a, &p, hold(10, 20)) else {
            panic!("not served from the stock")
        };
        let mut ids = vec![first.ahead.unwrap(), second.ahead.unwrap()];
        ids.sort();
        assert_eq!(ids, ["r3.1", "r3.2"]);
        assert_eq!(second.available, 970);
        // Another account, another pool: their own shelves.
        assert_eq!(ahead(stock.take(&Arc::from("b"), &p, hold(10, 20))), 0);
        assert_eq!(ahead(stock.take(&a, &Arc::from("q"), hold(10, 20))), 0);
    }

    #[test]
    fn stock_nobody_took_in_time_is_handed_back_for_release() {
        let stock = Stock::default();
        let (a, p) = (Arc::<str>::from("a"), Arc::<str>::from("p"));
        stock.put(&a, &p, hold(10, 20), "r", &[[0, 990], [0, 980], [0, 970]]);
        assert!(stock.stale().is_empty(), "fresh stock stays");
        let long_ago = Instant::now() - 2 * STOCK_LIFE;
        lock(&stock.shelves)
            .get_mut(&(a.clone(), p.clone()))
            .unwrap()
            .stocked = long_ago;
        let mut stale: Vec<String> = stock.stale().into_iter().map(|(_, _, id)| id).collect();
        stale.sort();
        assert_eq!(stale, ["r.1", "r.2"]);
        // Gone with its balance figure: the next reservation takes nothing ahead.
        assert_eq!(ahead(stock.take(&a, &p, hold(10, 20))), 0);
        // A request that finds its shelf stale takes the stale stock to release itself.
        stock.put(&a, &p, hold(10, 20), "s", &[[0, 990], [0, 980]]);
        lock(&stock.shelves)
            .get_mut(&(a.clone(), p.clone()))
            .unwrap()
            .stocked = long_ago;
        match stock.take(&a, &p, hold(10, 20)) {
            Take::Reserve { ahead, stale } => {
                assert_eq!(ahead, 0);
                assert_eq!(stale, ["s.1"]);
            }
            Take::Stocked(_) => panic!("stale stock served"),
        }
    }
}
