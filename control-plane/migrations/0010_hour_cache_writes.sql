-- Anthropic prices a cache write that lives an hour (`ttl: "1h"`) at 2× input, above the
-- 5-minute write's 1.25×. NULL reads as the version's cache write price (what it billed).
ALTER TABLE model_prices ADD COLUMN cache_write_1h_micros BIGINT;
-- The tokens a request wrote to the 1-hour cache (a part of its cache writes).
ALTER TABLE usage_records ADD COLUMN cache_write_1h_tokens BIGINT NOT NULL DEFAULT 0;
