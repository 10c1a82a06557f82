-- Sign-in with GitHub or Google in flight: a row from the redirect to the provider until its
-- callback, used once, for ten minutes. `state` is a random secret the browser holds in a
-- cookie and the provider hands back; only its digest is stored. The PKCE verifier and the
-- OpenID nonce are the one-use values the callback needs to finish.
CREATE TABLE signin_flows (
    state_sha256 TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    role TEXT NOT NULL,
    return_to TEXT NOT NULL,
    pkce_verifier TEXT NOT NULL,
    nonce TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX signin_flows_expiry ON signin_flows (expires_at);
