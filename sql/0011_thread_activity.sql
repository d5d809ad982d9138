-- A thread's updated_at is its latest activity: a message saved (the persist step sets it) or a
-- reply that ends (this trigger: when a message leaves pending/streaming, whoever writes it — the
-- finish write, a cancel, the sweep). The thread list is ordered by it (gateway/store/threads.py),
-- keyset-paginated on (updated_at, id).
--
-- A row trigger with a WHEN clause: the checkpoints' frequent UPDATEs of live rows change no status,
-- so the condition, checked without calling the function, skips them.
CREATE FUNCTION gateway_touch_thread() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE threads SET updated_at = greatest(updated_at, clock_timestamp()) WHERE id = NEW.thread_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_touch_thread AFTER UPDATE OF status ON messages FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.status NOT IN ('pending', 'streaming'))
    EXECUTE FUNCTION gateway_touch_thread();

-- the thread list: latest activity first
CREATE INDEX threads_user_updated ON threads (user_id, updated_at DESC, id DESC);
