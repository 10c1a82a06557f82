-- Real money in and out through Stripe: credit packs bought with Checkout, sellers onboarded
-- with Connect, weekly payouts by transfer. Stripe ids are unique where one of ours maps to
-- one of theirs, so a redelivered event or a retried call can never make a second row.

-- The packs buyers can buy: data the operator edits, not code.
CREATE TABLE credit_packs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    -- What the buyer pays, in cents of `currency`.
    price_cents BIGINT NOT NULL,
    currency TEXT NOT NULL,
    -- What the wallet receives, micro-USD (at least the price: a bonus is a promotion).
    credit_micros BIGINT NOT NULL,
    active BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

-- One purchase of a pack: made before Stripe is called (its id is the Checkout idempotency key
-- and the session's client_reference_id), credited once by the webhook.
CREATE TABLE purchases (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    pack_id TEXT NOT NULL,
    price_cents BIGINT NOT NULL,
    currency TEXT NOT NULL,
    credit_micros BIGINT NOT NULL,
    -- creating | open | paid | failed | expired | unavailable
    status TEXT NOT NULL,
    stripe_session_id TEXT NULL UNIQUE,
    payment_intent TEXT NULL,
    checkout_expires_at BIGINT NULL,
    -- Cents refunded and disputed so far (Stripe's cumulative figures), and the credit taken
    -- back for them (from the wallet, the rest a receivable).
    refunded_cents BIGINT NOT NULL DEFAULT 0,
    disputed_cents BIGINT NOT NULL DEFAULT 0,
    taken_back_micros BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    paid_at BIGINT NULL
);
CREATE INDEX purchases_account ON purchases (account_id, created_at);
CREATE INDEX purchases_payment_intent ON purchases (payment_intent);

-- What Stripe reported returned of a payment (cumulative cents), whether or not its purchase was
-- credited yet: a refund or dispute that overtakes the payment's own event is applied when the
-- credit is. Its row is also the lock that puts a payment's events one after another.
CREATE TABLE payment_returns (
    payment_intent TEXT PRIMARY KEY,
    refunded_cents BIGINT NOT NULL,
    disputed_cents BIGINT NOT NULL
);

-- Every webhook event applied, once: its effect commits in the transaction that inserts it.
CREATE TABLE stripe_events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    -- applied | ignored (with why)
    outcome TEXT NOT NULL,
    received_at BIGINT NOT NULL
);

-- A seller's Connect account and whether it can be paid (mirrored from account.updated).
CREATE TABLE connect_accounts (
    account_id TEXT PRIMARY KEY,
    stripe_account TEXT NOT NULL UNIQUE,
    transfers_active BIGINT NOT NULL DEFAULT 0,
    payouts_enabled BIGINT NOT NULL DEFAULT 0,
    details_submitted BIGINT NOT NULL DEFAULT 0,
    -- JSON list of what Stripe still needs, and why the account is disabled (if it is).
    requirements_due TEXT NOT NULL DEFAULT '[]',
    disabled_reason TEXT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- One payout: a seller's payable earnings of one run, as one transfer. pending (the ledger moved
-- them to in transit; the transfer is being made) → sent (Stripe accepted the transfer) → paid
-- (confirmed on Stripe), or failed (refused: back to payable). A (seller, run) pair pays once.
CREATE TABLE payouts (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    run TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    stripe_account TEXT NOT NULL,
    transfer_id TEXT NULL UNIQUE,
    attempts BIGINT NOT NULL DEFAULT 0,
    -- Why it waits or failed, for the operator (Stripe's code and message).
    last_error TEXT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (account_id, run)
);
CREATE INDEX payouts_status ON payouts (status, updated_at);

-- Payout runs started (the weekly schedule's, named by their date, or an operator's): a run
-- happens once.
CREATE TABLE payout_runs (
    run TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL
);

-- Leases: one control-plane replica at a time runs a named job.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
