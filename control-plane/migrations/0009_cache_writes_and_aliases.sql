-- Prompt tokens written to a provider's cache are priced at their own rate (Anthropic bills the
-- 5-minute cache write at 1.25× input). A price version written before has no such rate: NULL
-- reads as its input price, which is what its requests were billed at — versions never change.
ALTER TABLE model_prices ADD COLUMN cache_write_micros BIGINT;
-- The tokens a request wrote to the cache (a part of its prompt tokens).
ALTER TABLE usage_records ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;

-- Other names for catalog models: Claude Code lists only `claude*` ids and sends the dated ids it
-- knows (`claude-sonnet-4-5-20250929`), so an operator names catalog models for it. An alias
-- is never also a model id (the store refuses both ways).
CREATE TABLE model_aliases (
    alias TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
