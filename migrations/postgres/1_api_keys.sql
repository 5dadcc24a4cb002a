-- Gateway-issued API keys. Only the HMAC-SHA256 of a key is stored, never the key.
-- Times are unix seconds.
CREATE TABLE api_keys (
    id           TEXT   PRIMARY KEY,
    client       TEXT   NOT NULL,
    name         TEXT,
    hmac         BYTEA  NOT NULL CHECK (length(hmac) = 32),
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT,
    last_used_at BIGINT
);
CREATE INDEX api_keys_client ON api_keys (client);

-- Bumped in the same transaction as every create, revoke and rotate, so a running gateway
-- learns of a change by reading one row.
CREATE TABLE api_keys_revision (
    id       SMALLINT PRIMARY KEY CHECK (id = 1),
    revision BIGINT   NOT NULL
);
INSERT INTO api_keys_revision (id, revision) VALUES (1, 0);
