-- `estimated_tokens` becomes optional: requests that nothing needed an estimate for
-- (`[limits] estimate = "when_needed"`, the default) store NULL. SQLite cannot drop a NOT NULL
-- constraint in place, so the table is rebuilt (once; its rows are copied as they are).
CREATE TABLE usage_records_new (
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
    estimated_tokens  INTEGER,
    usage_source      TEXT    NOT NULL,
    cost_usd          REAL    NOT NULL,
    status            INTEGER NOT NULL,
    stream            BOOLEAN NOT NULL
);
INSERT INTO usage_records_new SELECT * FROM usage_records;
DROP TABLE usage_records;
ALTER TABLE usage_records_new RENAME TO usage_records;
CREATE INDEX usage_records_time ON usage_records (time_ms);
CREATE INDEX usage_records_client_time ON usage_records (client, time_ms);
CREATE INDEX usage_records_deployment_time ON usage_records (deployment, time_ms);
