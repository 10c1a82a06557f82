-- Usage per account, UTC day, model and key, rolled up in the transaction that applies its
-- records (so it never disagrees with the usage journal): the buyer's charts read these rows,
-- never the journal. Requests without an account (refused before a key was known) are left out.
CREATE TABLE usage_daily (
    account_id TEXT NOT NULL,
    day BIGINT NOT NULL,
    model TEXT NOT NULL,
    key_id TEXT NOT NULL,
    requests BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cost_micros BIGINT NOT NULL,
    PRIMARY KEY (account_id, day, model, key_id)
);

INSERT INTO usage_daily
SELECT account_id, (started_at / 86400000) * 86400000, COALESCE(model, ''), key_id, COUNT(*),
       SUM(prompt_tokens), SUM(completion_tokens), SUM(buyer_cost_micros)
FROM usage_records WHERE account_id <> ''
GROUP BY account_id, (started_at / 86400000) * 86400000, COALESCE(model, ''), key_id;
