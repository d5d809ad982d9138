-- The arena: one prompt, two replies (messages.slot 'a' and 'b'), one comparison, one vote.

CREATE TABLE comparisons (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    thread_id       uuid NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    user_message_id uuid NOT NULL UNIQUE REFERENCES messages (id) ON DELETE CASCADE,
    message_a       uuid NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    message_b       uuid NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    model_a         text NOT NULL,  -- as planned; the reply rows name the model that answered
    model_b         text NOT NULL,
    anonymous       boolean NOT NULL,
    winner          text CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),
    voted_at        timestamptz,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX comparisons_user ON comparisons (user_id, created_at DESC);
-- the leaderboard reads only voted comparisons
CREATE INDEX comparisons_voted ON comparisons (voted_at) WHERE winner IS NOT NULL;
