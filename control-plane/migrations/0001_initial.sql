-- The control plane's schema. The same text runs on Postgres and SQLite: only types both read
-- alike are used (BIGINT, TEXT; binary values are stored as hex text).
-- Times are Unix milliseconds; money is integer micro-USD; ratios are parts per million.

-- Bumped by every change that alters what proxies are pushed; the push version.
CREATE TABLE config_version (
    id BIGINT PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO config_version (id, version) VALUES (1, 1);

CREATE TABLE settings (
    id BIGINT PRIMARY KEY,
    fee_ratio_ppm BIGINT NOT NULL,
    welcome_credit_micros BIGINT NOT NULL,
    keys_per_account_max BIGINT NOT NULL,
    default_requests_per_minute BIGINT NULL,
    updated_at BIGINT NOT NULL
);
INSERT INTO settings VALUES (1, 150000, 10000000, 100, NULL, 0);

CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    status TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    name TEXT NOT NULL,
    lookup_prefix TEXT NOT NULL,
    key_sha256 TEXT NOT NULL UNIQUE,
    allowed_models TEXT NULL,
    spend_cap_micros BIGINT NULL,
    requests_per_minute BIGINT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT NULL
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE credentials (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    provider TEXT NOT NULL,
    label TEXT NOT NULL,
    public_fields TEXT NOT NULL,
    kek_version BIGINT NOT NULL,
    wrapped_dek TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    verified_at BIGINT NULL,
    verify_status TEXT NULL,
    deleted_at BIGINT NULL
);
CREATE INDEX credentials_account ON credentials (account_id);

CREATE TABLE pools (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    credential_id TEXT NOT NULL REFERENCES credentials (id),
    face_value_micros BIGINT NOT NULL,
    price_ratio_ppm BIGINT NOT NULL,
    models TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at BIGINT NULL,
    listed_seq BIGINT NOT NULL,
    listed_at BIGINT NOT NULL
);
CREATE INDEX pools_account ON pools (account_id);

CREATE TABLE model_prices (
    model_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    provider TEXT NOT NULL,
    upstream_model TEXT NOT NULL,
    input_micros BIGINT NOT NULL,
    output_micros BIGINT NOT NULL,
    cached_input_micros BIGINT NOT NULL,
    effective_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (model_id, version)
);

CREATE TABLE ledger_transactions (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    memo TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE ledger_postings (
    transaction_id TEXT NOT NULL REFERENCES ledger_transactions (id),
    ledger_account TEXT NOT NULL,
    amount_micros BIGINT NOT NULL,
    PRIMARY KEY (transaction_id, ledger_account)
);
CREATE INDEX ledger_postings_account ON ledger_postings (ledger_account);
