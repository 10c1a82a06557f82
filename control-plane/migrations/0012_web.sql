-- The web app's sign-in. Links and sessions are random secrets handed to a browser; only their
-- SHA-256 digests are stored, so a copy of the database signs no one in.

-- One-time sign-in links: `email` for a person (an account is made on first use, with `role`),
-- or the operator (`kind = 'operator'`, email empty). Used once: `used_at` is set by the one
-- statement that accepts it.
CREATE TABLE signin_links (
    token_sha256 TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    email TEXT NOT NULL,
    role TEXT NOT NULL,
    return_to TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX signin_links_expiry ON signin_links (expires_at);

-- Browser sessions: a person's (`account_id`) or the operator's. `csrf` is the form token of
-- this session (not a secret on its own: it is useless without the session cookie).
CREATE TABLE web_sessions (
    id_sha256 TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    account_id TEXT REFERENCES accounts (id),
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX web_sessions_account ON web_sessions (account_id);

-- Mail the embedded mode does not send: the operator reads it on the outbox page.
CREATE TABLE outbox (
    id TEXT PRIMARY KEY,
    recipient TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX outbox_created ON outbox (created_at, id);

-- The key the playground calls the gateway with, one per account, sealed like a credential
-- (the secret is never shown; the account sees and can revoke the key like any other). A key
-- that no longer opens (its key-encryption key retired) is replaced by a new one.
CREATE TABLE playground_keys (
    account_id TEXT PRIMARY KEY REFERENCES accounts (id),
    key_id TEXT NOT NULL,
    kek_version BIGINT NOT NULL,
    wrapped_dek TEXT NOT NULL,
    ciphertext TEXT NOT NULL
);
