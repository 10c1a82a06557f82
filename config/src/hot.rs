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

/// Running total of what a key has spent, micro-USD. In the money slot: the settle script adds
/// to it in the same step that charges the request.
pub fn spend_counter(prefix: &str, key_id: &str) -> String {
    format!("{}spend:{key_id}", money_prefix(prefix))
}

/// Where a key's spend was counted before it moved into the money slot. Nothing writes it any
/// more; proxies add what it holds to [`spend_counter`], so spend counted by an earlier release
/// (or by a proxy not yet upgraded) still counts against the cap.
pub fn legacy_spend_counter(prefix: &str, key_id: &str) -> String {
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
// - `spend:{key id}`: what the key has spent (see `spend_counter`).
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

/// How long a reservation record is kept: until the ledger has its request (a drained record
/// then lives ten more minutes, to answer a late duplicate call the same way; the drain script
/// sets that), or this long at most.
pub const RESERVATION_RECORD_TTL_MS: u64 = 24 * 3_600_000;

// The per-request scripts take many requests per call, in groups (a group's keys and arguments
// in the order given below, groups one after another): a script call's fixed cost is most of
// its cost, so a proxy sends the reservations and settlements that gathered meanwhile together.
// Groups run in order, each as if alone. What a call's groups share — an account's or a pool's
// `held`, a key's spend, the open set — is read once and written once at the call's end, summed:
// the groups see each other's moves, and a call costs a few commands per request, not sixteen.

/// Reserve. KEYS: account, pool, reservation, open set, epoch. ARGV: buyer micros, list micros,
/// pool face value (-1: unlimited), deadline (unix ms), request id, record TTL ms, account id,
/// pool id (kept for the expiry sweep), buyer room, pool room: granted only if the available
/// balance covers buyer room × the buyer micros and the pool's remaining face value pool room
/// × the list micros (1 and 1 for a request's own reservation; more for one taken ahead, which
/// must leave the balance and the pool to others). Returns a pair per reservation:
/// `{0, available after}`, `{1, available}` (buyer short), `{2, 0}` (pool short), `{3, 0}`
/// (balances not loaded), `{4, 0}` (request id already reserved).
const RESERVE: &str = r#"
local function reserve(KEYS, ARGV)
  if #KEYS == 0 then return end
  local loaded = redis.call('EXISTS', KEYS[5]) == 1
  for i = 0, #KEYS / 5 - 1 do
    local k, a = 5 * i, 10 * i
    local acct, pool, res = KEYS[k+1], KEYS[k+2], KEYS[k+3]
    local code, avail = 0, 0
    if not loaded then
      code = 3
    elseif redis.call('EXISTS', res) == 1 then
      code = 4
    else
      local bal, held = book(acct, 'bal')
      local free = bal - held
      local buyer, list, face = tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3])
      local buyer_room, pool_room = tonumber(ARGV[a+9]), tonumber(ARGV[a+10])
      if free < buyer * buyer_room then
        code, avail = 1, free
      else
        if face >= 0 then
          local consumed, pool_held = book(pool, 'consumed')
          if face - consumed - pool_held < list * pool_room then code = 2 end
        end
        if code == 0 then
          hold(acct, buyer)
          hold(pool, list)
          redis.call('HSET', res, 'acct', ARGV[a+7], 'pool', ARGV[a+8], 'buyer', ARGV[a+1],
            'list', ARGV[a+2], 'state', 'open')
          redis.call('PEXPIRE', res, ARGV[a+6])
          opened[#opened+1] = ARGV[a+4]
          opened[#opened+1] = ARGV[a+5]
          open_set = KEYS[k+4]
          avail = free - buyer
        end
      end
    end
    out[#out+1] = code
    out[#out+1] = avail
  end
end
"#;

/// Settle to the actual cost. KEYS: account, pool, reservation, open set, the key's spend
/// counter. ARGV: actual buyer micros, actual list micros, request id. An open reservation holds
/// the actual cost until drained; an expired one holds it again; a settled or drained one is
/// left alone; one settled to nothing is kept only ten minutes. The key's spend grows by the
/// buyer's cost once per reservation (`spent` marks it), whatever its state — a settlement that
/// arrives after the drain still counts. Returns a pair per settlement: `{0, available after}`,
/// or `{1, available}` when there is no such reservation.
const SETTLE: &str = r#"
local function settle(KEYS, ARGV)
  for i = 0, #KEYS / 5 - 1 do
    local acct, pool, res = KEYS[5*i+1], KEYS[5*i+2], KEYS[5*i+3]
    local buyer, list = tonumber(ARGV[3*i+1]), tonumber(ARGV[3*i+2])
    local r = redis.call('HMGET', res, 'state', 'buyer', 'list', 'spent')
    local code = 0
    -- The key's spend counts once per reservation: marked in the write that settles it.
    local spends = r[1] and buyer > 0 and not r[4]
    local mark = {}
    if spends then
      mark = {'spent', 1}
      spent[KEYS[5*i+5]] = (spent[KEYS[5*i+5]] or 0) + buyer
      if not spent_order[KEYS[5*i+5]] then
        spent_order[KEYS[5*i+5]] = true
        spent_keys[#spent_keys+1] = KEYS[5*i+5]
      end
    end
    if not r[1] then
      code = 1
    elseif r[1] == 'open' or r[1] == 'expired' then
      if r[1] == 'open' then
        hold(acct, buyer - tonumber(r[2]))
        hold(pool, list - tonumber(r[3]))
        closed[#closed+1] = ARGV[3*i+3]
        open_set = KEYS[5*i+4]
      else
        hold(acct, buyer)
        hold(pool, list)
      end
      redis.call('HSET', res, 'buyer', ARGV[3*i+1], 'list', ARGV[3*i+2], 'state', 'settled',
        unpack(mark))
      if buyer == 0 and list == 0 then
        -- Holds nothing now (released, or taken ahead and never used): no drain need find it.
        redis.call('PEXPIRE', res, 600000)
      end
    elseif spends then
      redis.call('HSET', res, 'spent', 1)
    end
    local bal, held = book(acct, 'bal')
    out[#out+1] = code
    out[#out+1] = bal - held
  end
end
"#;

/// What a call's groups share, and its write-back (see above).
const SHARED: &str = r#"
local out = {}
local seen, moved, touched = {}, {}, {}
local spent, spent_order, spent_keys = {}, {}, {}
local opened, closed, open_set = {}, {}, nil
-- An account's `bal` (or a pool's `consumed`) and its `held` with this call's moves.
local function book(key, field)
  local s = seen[key]
  if not s then
    local h = redis.call('HMGET', key, field, 'held')
    s = {tonumber(h[1] or '0'), tonumber(h[2] or '0')}
    seen[key] = s
  end
  return s[1], s[2] + (moved[key] or 0)
end
local function hold(key, d)
  if not moved[key] then
    moved[key] = 0
    touched[#touched+1] = key
  end
  moved[key] = moved[key] + d
end
"#;

/// Settlements, then reservations, in one script call: what a proxy's batch carries leaves in one
/// write and comes back in one reply. ARGV[1]: the number of settlements; then the
/// settlements' keys and arguments as `SETTLE` takes them, then the reservations' as `RESERVE`
/// does. Returns the settlements' pairs, then the reservations'.
pub fn money_script() -> String {
    format!("{SHARED}{SETTLE}{RESERVE}{MONEY_DISPATCH}")
}

const MONEY_DISPATCH: &str = r#"
local n = tonumber(ARGV[1])
local sk, sa, rk, ra = {}, {}, {}, {}
for i = 1, 5 * n do sk[#sk+1] = KEYS[i] end
for i = 5 * n + 1, #KEYS do rk[#rk+1] = KEYS[i] end
for i = 2, 3 * n + 1 do sa[#sa+1] = ARGV[i] end
for i = 3 * n + 2, #ARGV do ra[#ra+1] = ARGV[i] end
settle(sk, sa)
reserve(rk, ra)
for _, key in ipairs(touched) do
  if moved[key] ~= 0 then redis.call('HINCRBY', key, 'held', moved[key]) end
end
for _, key in ipairs(spent_keys) do redis.call('INCRBY', key, spent[key]) end
-- Settlements come first, so a member both closed and opened here is open at the end.
for k = 1, #closed, 500 do
  redis.call('ZREM', open_set, unpack(closed, k, math.min(k + 499, #closed)))
end
for k = 1, #opened, 1000 do
  redis.call('ZADD', open_set, unpack(opened, k, math.min(k + 999, #opened)))
end
return out
"#;

/// The ledger applied requests. ARGV[1..3]: n requests, a accounts, p pools. KEYS: the open
/// set, each request's reservation, then the a accounts' and the p pools' keys (each account
/// and pool once, however many of the requests name it). ARGV then: for each request its id,
/// its account's place among the a (1-based) and its pool's among the p (0: none); for each
/// account its balance and seq after it (both empty: not moved, not mirrored); for each pool
/// its consumption after it (empty: not mirrored). Mirrors the balances (if newer) and
/// consumption (if larger), and releases what the drained reservations held, summed per
/// account and pool: a call's cost grows with its requests by three commands each, not six.
pub const DRAIN_SCRIPT: &str = r#"
local n, a, p = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local open = KEYS[1]
local held_a, held_p, gone = {}, {}, {}
for i = 1, n do
  local res, at = KEYS[1+i], 1 + 3*i
  local r = redis.call('HMGET', res, 'state', 'buyer', 'list')
  if r[1] == 'open' or r[1] == 'settled' then
    local ai, pi = tonumber(ARGV[at+1]), tonumber(ARGV[at+2])
    held_a[ai] = (held_a[ai] or 0) + tonumber(r[2])
    if pi > 0 then held_p[pi] = (held_p[pi] or 0) + tonumber(r[3]) end
    redis.call('HSET', res, 'state', 'drained')
    redis.call('PEXPIRE', res, 600000)
    gone[#gone+1] = ARGV[at]
  end
end
for j = 1, a do
  local acct, seq = KEYS[1+n+j], ARGV[3+3*n+2*j]
  if seq ~= '' and tonumber(seq) > tonumber(redis.call('HGET', acct, 'seq') or '-1') then
    redis.call('HSET', acct, 'bal', ARGV[2+3*n+2*j], 'seq', seq)
  end
  if held_a[j] then redis.call('HINCRBY', acct, 'held', 0 - held_a[j]) end
end
for j = 1, p do
  local pool, consumed = KEYS[1+n+a+j], ARGV[3+3*n+2*a+j]
  if consumed ~= '' and tonumber(consumed) > tonumber(redis.call('HGET', pool, 'consumed') or '-1') then
    redis.call('HSET', pool, 'consumed', consumed)
  end
  if held_p[j] then redis.call('HINCRBY', pool, 'held', 0 - held_p[j]) end
end
for k = 1, #gone, 500 do
  redis.call('ZREM', open, unpack(gone, k, math.min(k + 499, #gone)))
end
return 0
"#;

/// An open reservation whose proxy never settled it (killed): release what it holds. KEYS:
/// account, pool, reservation, open set. ARGV: request id.
pub const EXPIRE_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[3], 'state') == 'open' then
  redis.call('HINCRBY', KEYS[1], 'held', 0 - tonumber(redis.call('HGET', KEYS[3], 'buyer')))
  redis.call('HINCRBY', KEYS[2], 'held', 0 - tonumber(redis.call('HGET', KEYS[3], 'list')))
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
