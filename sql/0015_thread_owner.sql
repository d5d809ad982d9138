-- A message (and an arena comparison) is stored only in a thread of its own user: the pair
-- (thread, user) is a key of threads, and messages and comparisons reference the pair, so the
-- schema itself refuses a row in a stranger's thread, whatever statement writes it.

-- Rows that crossed before this migration (a batched persist statement once kept a turn in a
-- thread another row of its batch owned) go back to their own user, each user's rows of a thread
-- into a new thread of that user's, titled like the thread they were in: nothing is deleted, and
-- the thread's owner no longer sees them.
CREATE TEMPORARY TABLE crossed ON COMMIT DROP AS
SELECT s.thread_id, s.user_id, gen_random_uuid() AS new_id
FROM (SELECT DISTINCT m.thread_id, m.user_id FROM messages m JOIN threads t ON t.id = m.thread_id
      WHERE t.user_id <> m.user_id) s;

INSERT INTO threads (id, user_id, title, created_at, updated_at)
SELECT c.new_id, c.user_id, t.title, t.created_at, t.updated_at FROM crossed c JOIN threads t ON t.id = c.thread_id;

UPDATE messages m SET thread_id = c.new_id FROM crossed c
WHERE m.thread_id = c.thread_id AND m.user_id = c.user_id;

UPDATE comparisons k SET thread_id = c.new_id FROM crossed c
WHERE k.thread_id = c.thread_id AND k.user_id = c.user_id;

ALTER TABLE threads ADD CONSTRAINT threads_id_user UNIQUE (id, user_id);

-- the pair's key replaces the thread's alone (every message has both, NOT NULL)
ALTER TABLE messages DROP CONSTRAINT messages_thread_id_fkey,
    ADD CONSTRAINT messages_thread_owner FOREIGN KEY (thread_id, user_id)
        REFERENCES threads (id, user_id) ON DELETE CASCADE;
ALTER TABLE comparisons DROP CONSTRAINT comparisons_thread_id_fkey,
    ADD CONSTRAINT comparisons_thread_owner FOREIGN KEY (thread_id, user_id)
        REFERENCES threads (id, user_id) ON DELETE CASCADE;
