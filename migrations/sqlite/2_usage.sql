-- One row per request the gateway answered: who called, what ran where, the tokens it used
-- and what it cost. Never any prompt or answer text. Times are unix milliseconds (UTC).
-- `id` only orders rows; request ids may come from clients and are not unique.
CREATE TABLE usage_records (
    id                INTEGER PRIMARY KEY,
    time_ms           INTEGER NOT NULL,
    request_id        TEXT    NOT NULL,
    client            TEXT    NOT NULL,
    subject           TEXT,
    key_id            TEXT,
    operation         TEXT    NOT NULL,
    deployment        TEXT,
    backend           TEXT,
    prompt_tokens     INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    reasoning_tokens  INTEGER NOT NULL,
    estimated_tokens  INTEGER NOT NULL,
    usage_source      TEXT    NOT NULL,
    cost_usd          REAL    NOT NULL,
    status            INTEGER NOT NULL,
    stream            BOOLEAN NOT NULL
);
CREATE INDEX usage_records_time ON usage_records (time_ms);
CREATE INDEX usage_records_client_time ON usage_records (client, time_ms);
CREATE INDEX usage_records_deployment_time ON usage_records (deployment, time_ms);
