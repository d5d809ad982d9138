-- The message lifecycle of issue 13: persist first, then decide (items 1 and 2).
--
-- `refused`: a terminal status for an assistant reply the policy stopped after the user message
-- was committed (a daily cap, a model the key may not use, too many concurrent streams). No
-- provider was called; `error` says why ({"type": "policy", "reason", "reset_at", ...}).
ALTER TABLE messages DROP CONSTRAINT messages_status_check,
    ADD CONSTRAINT messages_status_check CHECK (status IN
        ('pending', 'streaming', 'complete', 'failed', 'cancelled', 'interrupted', 'refused'));

-- Regenerate: a user message may now have several replies (each kept, the newest shown), but
-- never two live at once (per arena slot): the one-reply index becomes a one-live-reply index.
DROP INDEX messages_one_reply;
CREATE UNIQUE INDEX messages_one_live_reply ON messages (reply_to, coalesce(slot, ''))
    WHERE role = 'assistant' AND status IN ('pending', 'streaming');
-- a user message's replies, oldest first (the history's "newest complete reply", duplicates)
CREATE INDEX messages_replies ON messages (reply_to, seq) WHERE role = 'assistant';

-- idempotency of POST /api/messages/{id}/regenerate: one reply per (user, client_request_id)
ALTER TABLE messages ADD COLUMN client_request_id text;
CREATE UNIQUE INDEX messages_client_request ON messages (user_id, client_request_id)
    WHERE client_request_id IS NOT NULL;
