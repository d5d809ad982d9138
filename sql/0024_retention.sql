-- Retention (gateway/store/retention.py) deletes threads untouched for `[retention] threads_days`,
-- oldest first, in batches: it finds them by updated_at alone (the list's index leads with user_id).
CREATE INDEX threads_updated ON threads (updated_at);
-- A thread's delete cascades to its comparisons (by thread) and, through its messages, to the
-- comparisons naming them: without these indexes each cascaded row scanned the whole table.
CREATE INDEX comparisons_thread ON comparisons (thread_id, user_id);
CREATE INDEX comparisons_message_a ON comparisons (message_a);
CREATE INDEX comparisons_message_b ON comparisons (message_b);
-- A message's delete cascades to its replies (reply_to): the lookup by reply_to alone could not use
-- the index of replies (it is limited to role = 'assistant'), so each deleted message scanned the
-- table (a batch of 500 threads of 10 messages did not end in 30 s on 10 M messages). Only
-- assistant rows have a reply_to: the same index limited to reply_to IS NOT NULL holds the same
-- rows and serves both the reads of replies and the cascade.
DROP INDEX messages_replies;
CREATE INDEX messages_replies ON messages (reply_to, seq) WHERE reply_to IS NOT NULL;
