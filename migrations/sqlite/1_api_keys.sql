-- Gateway-issued API keys. Only the HMAC-SHA256 of a key is stored, never the key.
-- Times are unix seconds.
CREATE TABLE api_keys (
    id           TEXT    PRIMARY KEY,
    client       TEXT    NOT NULL,
    name         TEXT,
    hmac         BLOB    NOT NULL CHECK (length(hmac) = 32),
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER,
    last_used_at INTEGER
);
CREATE INDEX api_keys_client ON api_keys (client);

-- Bumped in the same transaction as every create, revoke and rotate, so a running gateway
-- learns of a change by reading one row.
CREATE TABLE api_keys_revision (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);
INSERT INTO api_keys_revision (id, revision) VALUES (1, 0);
