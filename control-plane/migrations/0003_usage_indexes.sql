-- Fewer indexes on the usage table: every index is paid on every record drained, and the key
-- and model indexes served no query the others cannot. A key's usage is found through its
-- account's index (the filter adds the key's account), a model's within an account, a pool or
-- a time range; the time index serves the operator's newest-first listing, which had none.
DROP INDEX usage_key_time;
DROP INDEX usage_model_time;
CREATE INDEX usage_time ON usage_records (started_at);
