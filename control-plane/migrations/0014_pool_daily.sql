-- What each pool sold per UTC day, rolled up in the transaction that applies the records: the
-- seller's earnings (per pool, per week, within the payout hold) read these rows, never the
-- usage journal.
CREATE TABLE pool_daily (
    pool_id TEXT NOT NULL,
    day BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    sales_micros BIGINT NOT NULL,
    fee_micros BIGINT NOT NULL,
    seller_credit_micros BIGINT NOT NULL,
    PRIMARY KEY (pool_id, day)
);

INSERT INTO pool_daily
SELECT pool_id, (started_at / 86400000) * 86400000, COUNT(*), SUM(buyer_cost_micros),
       SUM(fee_micros), SUM(seller_credit_micros)
FROM usage_records WHERE pool_id IS NOT NULL
GROUP BY pool_id, (started_at / 86400000) * 86400000;
