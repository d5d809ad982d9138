-- An app's own chat id (the AI SDK door's `id`, any string up to 200 characters) names one thread
-- of its user: unique per user, so the same id of two users are two threads, and the thread's
-- deletion takes the name with it.
ALTER TABLE threads ADD COLUMN chat_id text;
CREATE UNIQUE INDEX threads_user_chat_id ON threads (user_id, chat_id) WHERE chat_id IS NOT NULL;
