//! The layout both services agree on in Redis hot state. Only hashes of buyer keys are ever
//! written there; seller credentials never are.

/// Redis string holding the JSON `KeyConfig` (with `key_sha256`, never the key) of a live key.
pub fn key_record(prefix: &str, key_sha256_hex: &str) -> String {
    format!("{prefix}key:{key_sha256_hex}")
}

/// Pub/sub channel on which the control plane announces every key change (creation, limit
/// change, revocation) as the key's SHA-256 hex; proxies drop their cached entry.
pub fn key_channel(prefix: &str) -> String {
    format!("{prefix}keys")
}

/// Counter of a key's requests in one minute window (`unix_minute`).
pub fn rate_counter(prefix: &str, key_id: &str, unix_minute: u64) -> String {
    format!("{prefix}rpm:{key_id}:{unix_minute}")
}

/// Running total of what a key has spent, micro-USD.
pub fn spend_counter(prefix: &str, key_id: &str) -> String {
    format!("{prefix}spend:{key_id}")
}

// === Money: balances, pool capacity and reservations ===
//
// Every money key carries the hash tag `{money}`, so the scripts below (which touch an account,
// a pool and a reservation at once) run on Redis Cluster: all their keys live in one slot.
//
// - `acct:{id}` (hash): `bal` and `seq` — the wallet's ledger balance as the control plane last
//   mirrored it, and the ledger's count of changes to it (a newer `seq` wins, so mirrors may
//   arrive in any order) — and `held`: what open and settled-but-not-yet-drained requests hold.
//   Available = bal − held.
// - `pool:{id}` (hash): `consumed` (list cost applied to the ledger; only grows, the larger
//   wins) and `held` likewise. Remaining = face value (pushed) − consumed − held.
// - `res:{request_id}` (hash): `acct`, `pool`, `buyer`, `list` (the amounts it holds) and
//   `state`: `open` (reserved) → `settled` (the proxy charged the actual cost) → `drained` (the
//   ledger has it; nothing held); `open` → `expired` (its proxy never settled: released) → a
//   late drain leaves it alone. Each transition happens once, so a retried call moves nothing.
// - `open` (sorted set): open reservations by deadline, for the expiry sweep.
// - `epoch`: set once the control plane has loaded every balance; absent after Redis lost its
//   data, when proxies treat hot state as unavailable.

/// The prefix of every money key (with the hash tag).
pub fn money_prefix(prefix: &str) -> String {
    format!("{prefix}{{money}}:")
}

pub fn money_account(prefix: &str, account_id: &str) -> String {
    format!("{}acct:{account_id}", money_prefix(prefix))
}

pub fn money_pool(prefix: &str, pool_id: &str) -> String {
    format!("{}pool:{pool_id}", money_prefix(prefix))
}

pub fn money_reservation(prefix: &str, request_id: &str) -> String {
    format!("{}res:{request_id}", money_prefix(prefix))
}

pub fn money_open(prefix: &str) -> String {
    format!("{}open", money_prefix(prefix))
}

pub fn money_epoch(prefix: &str) -> String {
    format!("{}epoch", money_prefix(prefix))
}

/// How long a reservation record is kept after it stops holding money (answers a late
/// duplicate call the same way).
pub const RESERVATION_RECORD_TTL_MS: u64 = 24 * 3_600_000;

/// Reserve. KEYS: account, pool, reservation, open set, epoch. ARGV: buyer micros, list micros,
/// pool face value (-1: unlimited), deadline (unix ms), request id, record TTL ms, account id,
/// pool id (kept for the expiry sweep).
/// Returns `{0, available after}`, `{1, available}` (buyer short), `{2}` (pool short), `{3}`
/// (balances not loaded), `{4}` (request id already reserved).
pub const RESERVE_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[5]) == 0 then return {3} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {4} end
local bal = tonumber(redis.call('HGET', KEYS[1], 'bal') or '0')
local held = tonumber(redis.call('HGET', KEYS[1], 'held') or '0')
local buyer = tonumber(ARGV[1])
local list = tonumber(ARGV[2])
if bal - held < buyer then return {1, bal - held} end
local face = tonumber(ARGV[3])
if face >= 0 then
  local consumed = tonumber(redis.call('HGET', KEYS[2], 'consumed') or '0')
  local pheld = tonumber(redis.call('HGET', KEYS[2], 'held') or '0')
  if face - consumed - pheld < list then return {2} end
end
redis.call('HINCRBY', KEYS[1], 'held', buyer)
redis.call('HINCRBY', KEYS[2], 'held', list)
redis.call('HSET', KEYS[3], 'acct', ARGV[7], 'pool', ARGV[8], 'buyer', buyer, 'list', list,
  'state', 'open')
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
return {0, bal - held - buyer}
"#;

/// Settle to the actual cost. KEYS: account, pool, reservation, open set. ARGV: actual buyer
/// micros, actual list micros, request id. An open reservation holds the actual cost until
/// drained; an expired one holds it again; a settled or drained one is left alone. Returns
/// `{0, available after}`, or `{1, available}` when there is no such reservation.
pub const SETTLE_SCRIPT: &str = r#"
local bal = tonumber(redis.call('HGET', KEYS[1], 'bal') or '0')
local state = redis.call('HGET', KEYS[3], 'state')
if not state then
  return {1, bal - tonumber(redis.call('HGET', KEYS[1], 'held') or '0')}
end
local buyer = tonumber(ARGV[1])
local list = tonumber(ARGV[2])
if state == 'open' then
  redis.call('HINCRBY', KEYS[1], 'held', buyer - tonumber(redis.call('HGET', KEYS[3], 'buyer')))
  redis.call('HINCRBY', KEYS[2], 'held', list - tonumber(redis.call('HGET', KEYS[3], 'list')))
  redis.call('HSET', KEYS[3], 'buyer', buyer, 'list', list, 'state', 'settled')
  redis.call('ZREM', KEYS[4], ARGV[3])
elseif state == 'expired' then
  redis.call('HINCRBY', KEYS[1], 'held', buyer)
  redis.call('HINCRBY', KEYS[2], 'held', list)
  redis.call('HSET', KEYS[3], 'buyer', buyer, 'list', list, 'state', 'settled')
end
return {0, bal - tonumber(redis.call('HGET', KEYS[1], 'held') or '0')}
"#;

/// The ledger applied a request. KEYS: account, pool, reservation, open set. ARGV: the account's
/// balance and seq after it, the pool's consumption after it, request id. Mirrors the balance
/// (if newer) and the consumption (if larger) before it releases what the reservation holds,
/// so the available balance is never overstated in between.
pub const DRAIN_SCRIPT: &str = r#"
local seq = tonumber(ARGV[2])
if seq > tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1') then
  redis.call('HSET', KEYS[1], 'bal', ARGV[1], 'seq', seq)
end
local consumed = tonumber(ARGV[3])
if consumed >= 0 and consumed > tonumber(redis.call('HGET', KEYS[2], 'consumed') or '-1') then
  redis.call('HSET', KEYS[2], 'consumed', consumed)
end
local state = redis.call('HGET', KEYS[3], 'state')
if state == 'open' or state == 'settled' then
  redis.call('HINCRBY', KEYS[1], 'held', -tonumber(redis.call('HGET', KEYS[3], 'buyer')))
  redis.call('HINCRBY', KEYS[2], 'held', -tonumber(redis.call('HGET', KEYS[3], 'list')))
  redis.call('HSET', KEYS[3], 'state', 'drained')
  redis.call('ZREM', KEYS[4], ARGV[4])
end
return 0
"#;

/// An open reservation whose proxy never settled it (killed): release what it holds. KEYS:
/// account, pool, reservation, open set. ARGV: request id.
pub const EXPIRE_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[3], 'state') == 'open' then
  redis.call('HINCRBY', KEYS[1], 'held', -tonumber(redis.call('HGET', KEYS[3], 'buyer')))
  redis.call('HINCRBY', KEYS[2], 'held', -tonumber(redis.call('HGET', KEYS[3], 'list')))
  redis.call('HSET', KEYS[3], 'state', 'expired')
end
redis.call('ZREM', KEYS[4], ARGV[1])
return 0
"#;

/// A balance the ledger holds now. KEYS: account. ARGV: balance, seq. Newer wins.
pub const SET_BALANCE_SCRIPT: &str = r#"
if tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1') then
  redis.call('HSET', KEYS[1], 'bal', ARGV[1], 'seq', ARGV[2])
end
return 0
"#;

/// A pool's consumption the ledger holds now. KEYS: pool. ARGV: consumed. Larger wins.
pub const SET_CONSUMED_SCRIPT: &str = r#"
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'consumed') or '-1') then
  redis.call('HSET', KEYS[1], 'consumed', ARGV[1])
end
return 0
"#;
