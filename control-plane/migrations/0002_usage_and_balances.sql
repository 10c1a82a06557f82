-- Usage moves money: every request a proxy served, once, as one balanced ledger transaction
-- (the usage journal), running balances for every ledger account, and pool consumption.

-- One row per request id (the primary key makes redelivery harmless). A row is a balanced
-- transaction with three postings: the buyer's wallet -buyer_cost_micros, the seller's payable
-- +seller_credit_micros, platform revenue +fee_micros (buyer_cost = seller_credit + fee).
CREATE TABLE usage_records (
    request_id TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    account_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    pool_id TEXT NULL,
    seller_id TEXT NULL,
    model TEXT NULL,
    provider TEXT NULL,
    price_version BIGINT NULL,
    stream BIGINT NOT NULL,
    status BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    usage_source TEXT NOT NULL,
    list_cost_micros BIGINT NOT NULL,
    buyer_cost_micros BIGINT NOT NULL,
    fee_micros BIGINT NOT NULL,
    seller_credit_micros BIGINT NOT NULL,
    latency_ms BIGINT NOT NULL,
    ttft_ms BIGINT NULL,
    upstream_attempts BIGINT NOT NULL,
    upstream_request_id TEXT NULL,
    applied_at BIGINT NOT NULL
);
CREATE INDEX usage_account_time ON usage_records (account_id, started_at);
CREATE INDEX usage_key_time ON usage_records (key_id, started_at);
CREATE INDEX usage_pool_time ON usage_records (pool_id, started_at);
CREATE INDEX usage_model_time ON usage_records (model, started_at);

-- The running balance of every ledger account (wallets, payables, platform accounts), moved in
-- the transaction of every posting; `seq` counts its moves, so a mirror can tell newer from
-- older. The ledger check holds it equal to the sum of the account's postings.
CREATE TABLE ledger_balances (
    ledger_account TEXT PRIMARY KEY,
    balance_micros BIGINT NOT NULL,
    seq BIGINT NOT NULL
);
INSERT INTO ledger_balances (ledger_account, balance_micros, seq)
    SELECT ledger_account, SUM(amount_micros), 1 FROM ledger_postings GROUP BY ledger_account;

-- Face value consumed, at list cost, by the requests a pool served.
ALTER TABLE pools ADD COLUMN consumed_micros BIGINT NOT NULL DEFAULT 0;

-- The most output tokens one request of a model can produce: what a reservation holds for a
-- request that names no max_tokens (the proxies' default when NULL).
ALTER TABLE model_prices ADD COLUMN max_output_tokens BIGINT NULL;

-- Marketplace integrity: a credential whose endpoint the seller chose (a self-hosted server, a
-- custom base URL) decides the usage billed through it, so its pools serve only once the
-- operator approved it.
ALTER TABLE credentials ADD COLUMN custom_endpoint BIGINT NOT NULL DEFAULT 0;
ALTER TABLE credentials ADD COLUMN approved_at BIGINT NULL;

-- The operator paused the pool: its seller cannot resume it.
ALTER TABLE pools ADD COLUMN operator_hold BIGINT NOT NULL DEFAULT 0;
