-- Core tables: users, API keys, threads, messages, usage, daily totals, models.

CREATE TABLE users (
    id           uuid PRIMARY KEY,
    email        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL,
    prefix       text NOT NULL,               -- shown in listings; the key itself is never stored
    key_hash     bytea NOT NULL UNIQUE,       -- sha256 of the whole key
    scopes       text[] NOT NULL DEFAULT '{chat}',
    limits       jsonb,
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_user ON api_keys (user_id, created_at DESC);

CREATE TABLE threads (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title      text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- the thread list: newest first, keyset-paginated on (created_at, id)
CREATE INDEX threads_user_created ON threads (user_id, created_at DESC, id DESC);

CREATE TABLE messages (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq               bigint GENERATED ALWAYS AS IDENTITY,  -- order within a thread
    thread_id         uuid NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    user_id           uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role              text NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content           text NOT NULL DEFAULT '',
    status            text NOT NULL CHECK (status IN
                          ('pending', 'streaming', 'complete', 'failed', 'cancelled', 'interrupted')),
    reply_to          uuid REFERENCES messages (id) ON DELETE CASCADE,
    slot              text,                   -- arena slot 'a' / 'b'; NULL for single chat
    client_message_id text,
    model             text,
    provider          text,
    prompt_tokens     integer,
    completion_tokens integer,
    ttft_ms           integer,
    latency_ms        integer,
    error             jsonb,
    metadata          jsonb NOT NULL DEFAULT '{}',
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at       timestamptz
);
-- idempotency: one user message per (user, client_message_id)
CREATE UNIQUE INDEX messages_client_id ON messages (user_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
-- never two assistant replies to one user message (per arena slot)
CREATE UNIQUE INDEX messages_one_reply ON messages (reply_to, coalesce(slot, ''))
    WHERE role = 'assistant';
CREATE INDEX messages_thread ON messages (thread_id, seq);
-- only live rows are scanned at start (crash recovery) and by waiters on other instances
CREATE INDEX messages_live ON messages (created_at) WHERE status IN ('pending', 'streaming');

-- One row per assistant message: the primary key makes counting a reply twice impossible.
-- No foreign key: accounting outlives a deleted thread.
CREATE TABLE usage (
    message_id        uuid PRIMARY KEY,
    user_id           uuid NOT NULL,
    api_key_id        uuid,
    model             text NOT NULL,
    provider          text NOT NULL,
    prompt_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    total_tokens      integer NOT NULL,
    estimated         boolean NOT NULL DEFAULT false,
    cost_usd          numeric(16, 8) NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_user_time ON usage (user_id, created_at);

-- Running daily totals, updated in the same transaction as the usage row.
CREATE TABLE daily_usage (
    user_id  uuid NOT NULL,
    day      date NOT NULL,
    tokens   bigint NOT NULL DEFAULT 0,
    requests integer NOT NULL DEFAULT 0,
    cost_usd numeric(16, 8) NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);

-- Models as configured, synced at start so other features can query what is enabled.
CREATE TABLE models (
    name                  text PRIMARY KEY,
    provider              text NOT NULL,
    upstream              text NOT NULL,
    enabled               boolean NOT NULL DEFAULT true,
    weight                double precision NOT NULL DEFAULT 1,
    input_price_per_mtok  double precision NOT NULL DEFAULT 0,
    output_price_per_mtok double precision NOT NULL DEFAULT 0,
    updated_at            timestamptz NOT NULL DEFAULT now()
);
