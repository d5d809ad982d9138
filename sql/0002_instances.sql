-- Which instance generates a reply (crash recovery: a dead instance's live rows are interrupted),
-- and secrets shared by every instance (the stream-token signing key).

ALTER TABLE messages ADD COLUMN instance_id uuid;

CREATE TABLE gateway_secrets (
    name       text PRIMARY KEY,
    value      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
