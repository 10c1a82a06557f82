-- Creating a key counts the account's live keys (the per-account cap): an index of live keys
-- alone answers that from the index, without visiting a row per key.
CREATE INDEX api_keys_live ON api_keys (account_id) WHERE revoked_at IS NULL;
