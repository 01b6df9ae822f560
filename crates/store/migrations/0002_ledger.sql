-- Accounts, limits and the ledger. Money is integer pico-dollars
-- (1e-12 USD): a price in micro-dollars per million tokens is exactly
-- that many pico-dollars per token, so cost = tokens x price, no rounding.

-- Append-only double-entry ledger: the entries of one transaction sum to
-- zero. Accounts: `user:<id>`, `miner:<key>`, `fees`, `funding`, `free_tier`.
CREATE TABLE ledger_entries (
    id          TEXT PRIMARY KEY,
    txn         TEXT NOT NULL,
    account     TEXT NOT NULL,
    amount      BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);
CREATE INDEX ledger_account ON ledger_entries(account);
CREATE INDEX ledger_txn ON ledger_entries(txn);

-- One row per settled request: the primary key makes settlement happen
-- exactly once whatever retries or replicas do.
CREATE TABLE settlements (
    request_id  TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    cost        BIGINT NOT NULL,
    created_ms  BIGINT NOT NULL
);

-- Funds held for requests in flight; open rows lower the available
-- balance. Closed when the request settles or is released.
CREATE TABLE reservations (
    request_id  TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    amount      BIGINT NOT NULL,
    owner       TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);
CREATE INDEX reservations_open ON reservations(state, owner);
CREATE INDEX reservations_user ON reservations(user_id, state);

-- Durable daily request counters (free-tier quota), exact across replicas.
CREATE TABLE daily_counters (
    key_id  TEXT NOT NULL,
    day     TEXT NOT NULL,
    used    BIGINT NOT NULL,
    PRIMARY KEY (key_id, day)
);

ALTER TABLE requests ADD COLUMN cost BIGINT NOT NULL DEFAULT 0;
