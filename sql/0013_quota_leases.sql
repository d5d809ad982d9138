-- Quota leases (issue 17 item 1): an instance takes a slice of a caller's remaining quota in one
-- atomic statement and spends it in memory (gateway/policy.py, QuotaLeases), so a busy caller's
-- requests pay no database round trip. A slice is an admission of many requests at once:
--
--   requests   slots in the current minute's windows (the user's and each key's that has a limit)
--   tokens     reserved on the day rows exactly as an admission reserves them (daily_usage.reserved
--              and key_daily_usage.reserved of every capped key: the same amount on each)
--   cost       the same in USD (cost_reserved)
--   streams    stream leases made ahead (stream_leases rows of this instance, counted in
--              stream_counts), each handed to one request whose finish gives it back as today
--
-- A request served from a slice carries its share as a normal admission does (its usage record
-- releases it, store/usage.py) and names the slice (`quota` in the record's `held`): the
-- settlement takes the same amount off the slice's row, so the row always says what the slice
-- still holds in the database (unused + in flight). Its owner gives the unused part back (store/
-- limits.py, return_quota); when the owner dies, the sweep releases what the row still holds.
CREATE TABLE quota_leases (
    id          uuid PRIMARY KEY,
    instance_id uuid NOT NULL,
    user_id     uuid NOT NULL,
    api_key_id  uuid,
    day         date NOT NULL,
    user_tokens bigint NOT NULL DEFAULT 0 CHECK (user_tokens >= 0),
    key_tokens  bigint NOT NULL DEFAULT 0 CHECK (key_tokens >= 0),
    user_cost   numeric(16, 8) NOT NULL DEFAULT 0 CHECK (user_cost >= 0),
    key_cost    numeric(16, 8) NOT NULL DEFAULT 0 CHECK (key_cost >= 0),
    -- false once its owner gave the unused part back: the row then holds only what requests it
    -- served still hold, and nothing can be recalled from it (gateway/policy.py, recall)
    open        boolean NOT NULL DEFAULT true
);
CREATE INDEX quota_leases_open ON quota_leases (user_id) WHERE open;
CREATE INDEX quota_leases_instance ON quota_leases (instance_id);

-- A user whose quota was recalled (an exact admission refused while slices held some of it:
-- gateway/policy.py) gets no slice on any instance until `until`.
CREATE TABLE quota_recalls (
    user_id uuid PRIMARY KEY,
    until   timestamptz NOT NULL
);

-- A slice that cannot cover one request refuses with this SQLSTATE (nothing taken): the caller
-- then goes the exact way (gateway_admit_full) for that request.
--   GW4L0     no slice: some limit has too little left

-- Take a slice. p_requests: window slots wanted (granted: the least any window has left, all or
-- nothing below p_min_requests = 1); p_want / p_want_cost: tokens and USD wanted, granted as
-- gateway_admit_full grants (the least any cap has left) but never below p_min / p_min_cost (one
-- request's worst case); p_streams: stream leases wanted (the least any counter has left, at
-- least one). A slice takes at most half of what a daily cap has left (but one request's worst
-- case), so a second instance still finds some. NULL caps are skipped, as in gateway_admit_full; so is a NULL p_requests (no
-- window limit applies) and a p_streams of 0 (no stream cap applies). Lock order as
-- gateway_admit_full: windows, stream counters in subject order, day rows keys leaf first then
-- the user, then the slice's own row.
CREATE FUNCTION gateway_lease_quota(p_lease uuid, p_instance uuid, p_user uuid, p_key uuid, p_keys uuid[],
                                    p_day date, p_window timestamptz, p_user_rpm integer, p_key_rpms integer[],
                                    p_requests integer, p_want bigint, p_min bigint, p_user_cap bigint,
                                    p_key_caps bigint[], p_want_cost numeric, p_min_cost numeric,
                                    p_user_cost_cap numeric, p_key_cost_caps numeric[], p_user_streams integer,
                                    p_key_streams integer[], p_streams integer,
                                    OUT g_requests integer, OUT g_tokens bigint, OUT g_cost numeric, OUT g_streams uuid[])
LANGUAGE plpgsql AS $$
DECLARE
    n        integer := coalesce(cardinality(p_keys), 0);
    s        record;
    c        bigint;
    left_    numeric;
    user_t   boolean := p_user_cap IS NOT NULL;
    key_t    boolean := false;
    user_c   boolean := p_user_cost_cap IS NOT NULL AND p_want_cost > 0;
    key_c    boolean := false;
    subjects text[] := '{}';
BEGIN
    g_requests := p_requests;
    g_tokens := p_want;
    g_cost := p_want_cost;
    g_streams := '{}';
    IF EXISTS (SELECT 1 FROM quota_recalls r WHERE r.user_id = p_user AND r.until > clock_timestamp()) THEN
        RAISE EXCEPTION 'no slice' USING ERRCODE = 'GW4L0';
    END IF;
    -- windows: the fewest slots any of them has left
    IF p_requests IS NOT NULL THEN
        FOR s IN
            SELECT x.subject, x.cap FROM (
                SELECT 'u:' || p_user AS subject, p_user_rpm AS cap
                UNION ALL SELECT 'k:' || t.id, t.cap FROM unnest(p_keys, p_key_rpms) AS t (id, cap)
            ) x WHERE x.cap IS NOT NULL
        LOOP
            INSERT INTO rate_windows (subject, window_start, count) VALUES (s.subject, p_window, 0)
            ON CONFLICT (subject, window_start) DO NOTHING;
            SELECT w.count INTO c FROM rate_windows w WHERE w.subject = s.subject AND w.window_start = p_window
            FOR UPDATE;
            g_requests := LEAST(g_requests, s.cap - c);
            IF g_requests <= 0 THEN RAISE EXCEPTION 'no slice' USING ERRCODE = 'GW4L0'; END IF;
            subjects := subjects || s.subject;
        END LOOP;
        UPDATE rate_windows w SET count = w.count + g_requests
        WHERE w.subject = ANY(subjects) AND w.window_start = p_window;
    END IF;
    -- stream counters, in subject order: the fewest places any of them has left
    IF p_streams > 0 THEN
        subjects := '{}';
        FOR s IN
            SELECT x.subject, x.cap FROM (
                SELECT 'u:' || p_user AS subject, p_user_streams AS cap
                UNION ALL SELECT 'k:' || t.id, t.cap FROM unnest(p_keys, p_key_streams) AS t (id, cap)
            ) x WHERE x.cap IS NOT NULL ORDER BY x.subject
        LOOP
            INSERT INTO stream_counts (subject, streams) VALUES (s.subject, 0) ON CONFLICT (subject) DO NOTHING;
            SELECT sc.streams INTO c FROM stream_counts sc WHERE sc.subject = s.subject FOR UPDATE;
            p_streams := LEAST(p_streams, s.cap - c);
            IF p_streams <= 0 THEN RAISE EXCEPTION 'no slice' USING ERRCODE = 'GW4L0'; END IF;
            subjects := subjects || s.subject;
        END LOOP;
        IF cardinality(subjects) > 0 THEN
            UPDATE stream_counts sc SET streams = sc.streams + p_streams WHERE sc.subject = ANY(subjects);
            SELECT array_agg(gen_random_uuid()) INTO g_streams FROM generate_series(1, p_streams);
            INSERT INTO stream_leases (id, instance_id, subjects)
            SELECT id, p_instance, subjects FROM unnest(g_streams) AS id;
        END IF;
    END IF;
    -- day rows: lock them (keys leaf first, then the user) and find the least left
    FOR i IN 1 .. n LOOP
        IF p_key_caps[i] IS NOT NULL OR (p_key_cost_caps[i] IS NOT NULL AND p_want_cost > 0) THEN
            INSERT INTO key_daily_usage (api_key_id, day) VALUES (p_keys[i], p_day)
            ON CONFLICT (api_key_id, day) DO NOTHING;
            SELECT d.tokens + d.reserved, d.cost_usd + d.cost_reserved INTO c, left_
            FROM key_daily_usage d WHERE d.api_key_id = p_keys[i] AND d.day = p_day FOR UPDATE;
            IF p_key_caps[i] IS NOT NULL THEN
                g_tokens := LEAST(g_tokens, greatest(p_min, (p_key_caps[i] - c) / 2), p_key_caps[i] - c);
                key_t := true;
            END IF;
            IF p_key_cost_caps[i] IS NOT NULL AND p_want_cost > 0 THEN
                g_cost := LEAST(g_cost, greatest(p_min_cost, (p_key_cost_caps[i] - left_) / 2), p_key_cost_caps[i] - left_);
                key_c := true;
            END IF;
        END IF;
    END LOOP;
    IF user_t OR user_c THEN
        INSERT INTO daily_usage (user_id, day) VALUES (p_user, p_day) ON CONFLICT (user_id, day) DO NOTHING;
        SELECT d.tokens + d.reserved, d.cost_usd + d.cost_reserved INTO c, left_
        FROM daily_usage d WHERE d.user_id = p_user AND d.day = p_day FOR UPDATE;
        IF user_t THEN g_tokens := LEAST(g_tokens, greatest(p_min, (p_user_cap - c) / 2), p_user_cap - c); END IF;
        IF user_c THEN
            g_cost := LEAST(g_cost, greatest(p_min_cost, (p_user_cost_cap - left_) / 2), p_user_cost_cap - left_);
        END IF;
    END IF;
    IF NOT (user_t OR key_t) THEN g_tokens := 0;
    ELSIF g_tokens < p_min THEN RAISE EXCEPTION 'no slice' USING ERRCODE = 'GW4L0';
    END IF;
    -- whole requests only (their worst case), so the last of a cap is never a piece no request fits
    IF p_min > 0 THEN g_tokens := (g_tokens / p_min) * p_min; END IF;
    IF p_min_cost > 0 THEN g_cost := floor(g_cost / p_min_cost) * p_min_cost; END IF;
    g_cost := trunc(g_cost, 8);  -- what the columns keep: the slice holds exactly what its row says
    IF NOT (user_c OR key_c) THEN g_cost := 0;
    ELSIF g_cost < p_min_cost THEN RAISE EXCEPTION 'no slice' USING ERRCODE = 'GW4L0';
    END IF;
    IF g_tokens > 0 OR g_cost > 0 THEN
        FOR i IN 1 .. n LOOP
            UPDATE key_daily_usage d
            SET reserved = d.reserved + CASE WHEN p_key_caps[i] IS NOT NULL THEN g_tokens ELSE 0 END,
                cost_reserved = d.cost_reserved
                    + CASE WHEN p_key_cost_caps[i] IS NOT NULL AND p_want_cost > 0 THEN g_cost ELSE 0 END
            WHERE d.api_key_id = p_keys[i] AND d.day = p_day
              AND (p_key_caps[i] IS NOT NULL OR (p_key_cost_caps[i] IS NOT NULL AND p_want_cost > 0));
        END LOOP;
        UPDATE daily_usage d SET reserved = d.reserved + CASE WHEN user_t THEN g_tokens ELSE 0 END,
            cost_reserved = d.cost_reserved + CASE WHEN user_c THEN g_cost ELSE 0 END
        WHERE d.user_id = p_user AND d.day = p_day AND (user_t OR user_c);
    END IF;
    INSERT INTO quota_leases AS q (id, instance_id, user_id, api_key_id, day, user_tokens, key_tokens, user_cost,
                                   key_cost)
    VALUES (p_lease, p_instance, p_user, p_key, p_day, CASE WHEN user_t THEN g_tokens ELSE 0 END,
            CASE WHEN key_t THEN g_tokens ELSE 0 END, CASE WHEN user_c THEN g_cost ELSE 0 END,
            CASE WHEN key_c THEN g_cost ELSE 0 END)
    ON CONFLICT (id) DO UPDATE SET user_tokens = q.user_tokens + EXCLUDED.user_tokens,
        key_tokens = q.key_tokens + EXCLUDED.key_tokens, user_cost = q.user_cost + EXCLUDED.user_cost,
        key_cost = q.key_cost + EXCLUDED.key_cost;
    g_streams := coalesce(g_streams, '{}');
END
$$;

-- Give back a slice's unused part: p_tokens / p_cost off its row and off the day rows that hold
-- it (each capped key of the chain, then the user: admission's order), window slots p_requests
-- off the windows of p_window, and the stream leases p_streams. Clamped at what the row still
-- holds, so a slice never gives back more than it took. Deletes the row once it holds nothing.
CREATE FUNCTION gateway_return_quota(p_lease uuid, p_tokens bigint, p_cost numeric, p_window timestamptz,
                                     p_subjects text[], p_requests integer, p_streams uuid[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    q quota_leases%ROWTYPE;
BEGIN
    UPDATE quota_leases SET open = false WHERE id = p_lease;
    IF cardinality(p_streams) > 0 THEN PERFORM gateway_release_leases(p_streams); END IF;
    IF p_requests > 0 THEN
        UPDATE rate_windows w SET count = greatest(w.count - p_requests, 0)
        WHERE w.subject = ANY(p_subjects) AND w.window_start = p_window;
    END IF;
    SELECT * INTO q FROM quota_leases WHERE id = p_lease;
    IF NOT FOUND THEN RETURN; END IF;
    PERFORM gateway_release_quota_row(q, LEAST(p_tokens, greatest(q.user_tokens, q.key_tokens)),
                                      LEAST(p_cost, greatest(q.user_cost, q.key_cost)));
END
$$;

-- Release `p_tokens` / `p_cost` of a slice's row from the day rows that hold it, and from the row.
CREATE FUNCTION gateway_release_quota_row(q quota_leases, p_tokens bigint, p_cost numeric)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t bigint;
    c numeric;
BEGIN
    IF q.key_tokens > 0 OR q.key_cost > 0 THEN
        t := LEAST(p_tokens, q.key_tokens);
        c := LEAST(p_cost, q.key_cost);
        WITH chain AS (
            SELECT x.id, x.pos FROM api_keys k, unnest(k.id || k.ancestors) WITH ORDINALITY AS x (id, pos)
            WHERE k.id = q.api_key_id
        ), held AS (
            SELECT d.api_key_id, m.limits ->> 'daily_tokens' IS NOT NULL AS tk,
                   m.limits ->> 'daily_cost_usd' IS NOT NULL AS ck
            FROM key_daily_usage d JOIN chain ON chain.id = d.api_key_id JOIN api_keys m ON m.id = d.api_key_id
            WHERE d.day = q.day ORDER BY chain.pos FOR UPDATE OF d
        )
        UPDATE key_daily_usage d SET reserved = CASE WHEN held.tk THEN greatest(d.reserved - t, 0) ELSE d.reserved END,
            cost_reserved = CASE WHEN held.ck THEN greatest(d.cost_reserved - c, 0) ELSE d.cost_reserved END
        FROM held WHERE d.api_key_id = held.api_key_id AND d.day = q.day;
    END IF;
    IF q.user_tokens > 0 OR q.user_cost > 0 THEN
        UPDATE daily_usage d SET reserved = greatest(d.reserved - LEAST(p_tokens, q.user_tokens), 0),
            cost_reserved = greatest(d.cost_reserved - LEAST(p_cost, q.user_cost), 0)
        WHERE d.user_id = q.user_id AND d.day = q.day;
    END IF;
    UPDATE quota_leases l SET user_tokens = greatest(l.user_tokens - p_tokens, 0),
        key_tokens = greatest(l.key_tokens - p_tokens, 0), user_cost = greatest(l.user_cost - p_cost, 0),
        key_cost = greatest(l.key_cost - p_cost, 0)
    WHERE l.id = q.id;
    DELETE FROM quota_leases l WHERE l.id = q.id AND l.user_tokens = 0 AND l.key_tokens = 0
        AND l.user_cost = 0 AND l.key_cost = 0;
END
$$;

-- A dead instance's slices: everything their rows still hold goes back (the sweep, after it has
-- settled the instance's live replies, whose records took their own shares off the rows).
CREATE FUNCTION gateway_reclaim_quota(p_instance uuid) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    q quota_leases%ROWTYPE;
    n integer := 0;
BEGIN
    FOR q IN SELECT * FROM quota_leases WHERE instance_id = p_instance ORDER BY id FOR UPDATE LOOP
        PERFORM gateway_release_quota_row(q, greatest(q.user_tokens, q.key_tokens), greatest(q.user_cost, q.key_cost));
        DELETE FROM quota_leases WHERE id = q.id;
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
