-- Portable SQL: runs unchanged on SQLite and PostgreSQL.
-- Times are unix milliseconds; money is integer micro-dollars.
CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    tier        TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id),
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    revoked_ms  BIGINT
);
CREATE INDEX api_keys_user ON api_keys(user_id);

CREATE TABLE chutes (
    model_id            TEXT PRIMARY KEY,
    engine              TEXT NOT NULL,
    source              TEXT NOT NULL,
    concurrency         BIGINT NOT NULL,
    price_in_micros     BIGINT NOT NULL,
    price_out_micros    BIGINT NOT NULL,
    created_ms          BIGINT NOT NULL
);

CREATE TABLE miners (
    miner_key       TEXT PRIMARY KEY,
    endpoint        TEXT NOT NULL,
    hardware        TEXT NOT NULL,
    registered_ms   BIGINT NOT NULL,
    last_seen_ms    BIGINT NOT NULL
);

-- Per-request metadata only: never prompt or completion text.
CREATE TABLE requests (
    id                  TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL,
    key_id              TEXT NOT NULL,
    model               TEXT NOT NULL,
    kind                TEXT NOT NULL,
    stream              BIGINT NOT NULL,
    miner_key           TEXT,
    status              TEXT NOT NULL,
    http_status         BIGINT NOT NULL,
    prompt_tokens       BIGINT NOT NULL,
    completion_tokens   BIGINT NOT NULL,
    attempts            BIGINT NOT NULL,
    queue_ms            BIGINT NOT NULL,
    ttft_ms             BIGINT,
    latency_ms          BIGINT NOT NULL,
    created_ms          BIGINT NOT NULL
);
CREATE INDEX requests_user_time ON requests(user_id, created_ms);
