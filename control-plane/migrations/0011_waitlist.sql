-- People asking for early access (the public page's form): one row per email address,
-- lowercased; the first sign-up stands.
CREATE TABLE waitlist (
    email TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX waitlist_created ON waitlist (created_at, email);
