-- Each account's live keys, counted as keys are created and revoked: creating a key checks the
-- per-account cap and moves the count in one statement, instead of counting keys under a lock.
ALTER TABLE accounts ADD COLUMN live_keys BIGINT NOT NULL DEFAULT 0;
UPDATE accounts SET live_keys =
    (SELECT COUNT(*) FROM api_keys k WHERE k.account_id = accounts.id AND k.revoked_at IS NULL);
