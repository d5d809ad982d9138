-- Retention (gateway/store/retention.py) deletes threads untouched for `[retention] threads_days`,
-- oldest first, in batches: it finds them by updated_at alone (the list's index leads with user_id).
CREATE INDEX threads_updated ON threads (updated_at);
-- A thread's delete cascades to its comparisons (by thread) and, through its messages, to the
-- comparisons naming them: without these indexes each cascaded row scanned the whole table.
CREATE INDEX comparisons_thread ON comparisons (thread_id, user_id);
CREATE INDEX comparisons_message_a ON comparisons (message_a);
CREATE INDEX comparisons_message_b ON comparisons (message_b);
