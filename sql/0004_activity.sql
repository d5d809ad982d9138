-- Who did what, when, from where: one row per authenticated API request, written in batches off
-- the request path. No foreign keys on purpose: the log outlives deleted users and keys, and an
-- insert must never fail on a row it only records.

CREATE TABLE activity_log (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL,
    user_id    uuid NOT NULL,
    api_key_id uuid,                 -- NULL for a JWT or a stream token
    action     text NOT NULL,        -- the handler, e.g. 'keys.create_key'
    method     text NOT NULL,
    path       text NOT NULL,        -- never the query string (it may carry a token)
    status     integer NOT NULL,
    ip         text,
    request_id text
);
-- a user's history, newest first; a key's history
CREATE INDEX activity_log_user_at ON activity_log (user_id, at DESC);
CREATE INDEX activity_log_key_at ON activity_log (api_key_id, at DESC) WHERE api_key_id IS NOT NULL;
