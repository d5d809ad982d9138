-- The counts a quota slice was leased against (issue 17 item 1): gateway_lease_quota also returns
-- what the limits it looked at hold right after its grant, so the rate-limit headers of a request
-- served from the slice come from memory (gateway/api/ratelimits.py) instead of a read per request:
--   g_windows   each window's count in this minute (the user's, then each key's with a limit, in
--               p_keys order; empty when p_requests is NULL)
--   g_user_day  the user's tokens + reserved today (NULL when no user token cap applies)
--   g_key_days  the same per key of p_keys (NULL where that key has no token cap)
-- Otherwise the function is 0013's, unchanged. (gateway_return_quota below: a lock-order fix.)
DROP FUNCTION gateway_lease_quota(uuid, uuid, uuid, uuid, uuid[], date, timestamptz, integer, integer[], integer,
                                  bigint, bigint, bigint, bigint[], numeric, numeric, numeric, numeric[], integer,
                                  integer[], integer);

CREATE FUNCTION gateway_lease_quota(p_lease uuid, p_instance uuid, p_user uuid, p_key uuid, p_keys uuid[],
                                    p_day date, p_window timestamptz, p_user_rpm integer, p_key_rpms integer[],
                                    p_requests integer, p_want bigint, p_min bigint, p_user_cap bigint,
                                    p_key_caps bigint[], p_want_cost numeric, p_min_cost numeric,
                                    p_user_cost_cap numeric, p_key_cost_caps numeric[], p_user_streams integer,
                                    p_key_streams integer[], p_streams integer,
                                    OUT g_requests integer, OUT g_tokens bigint, OUT g_cost numeric, OUT g_streams uuid[],
                                    OUT g_windows bigint[], OUT g_user_day bigint, OUT g_key_days bigint[])
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
    g_windows := '{}';
    g_key_days := array_fill(NULL::bigint, ARRAY[n]);
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
            g_windows := g_windows || c;
            IF g_requests <= 0 THEN RAISE EXCEPTION 'no slice' USING ERRCODE = 'GW4L0'; END IF;
            subjects := subjects || s.subject;
        END LOOP;
        UPDATE rate_windows w SET count = w.count + g_requests
        WHERE w.subject = ANY(subjects) AND w.window_start = p_window;
        SELECT array_agg(u.v + g_requests ORDER BY u.pos) INTO g_windows FROM unnest(g_windows) WITH ORDINALITY AS u (v, pos);
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
                g_key_days[i] := c;
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
        IF user_t THEN g_user_day := c; END IF;
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
    -- what the day rows hold after this grant (NULL where no token cap applies)
    g_user_day := g_user_day + CASE WHEN user_t THEN g_tokens ELSE 0 END;
    SELECT array_agg(u.v + g_tokens ORDER BY u.pos) INTO g_key_days FROM unnest(g_key_days) WITH ORDINALITY AS u (v, pos);
    g_key_days := coalesce(g_key_days, '{}');
END
$$;

-- Give back a slice's unused part, taking its locks in admission's order (windows, user first then
-- the keys as p_subjects lists them; stream counters; day rows; the slice's own row last), as
-- gateway_admit_full, gateway_lease_quota and the usage settlement do. 0013's version locked the slice's row first and the stream counters
-- before the windows, and deadlocked against a concurrent lease or admission of the same user on
-- another instance (seen once in ~14 runs of the fifty-concurrent test): PostgreSQL aborted the
-- return, and the slice's unused part stayed reserved until the sweep. Same effect otherwise.
CREATE OR REPLACE FUNCTION gateway_return_quota(p_lease uuid, p_tokens bigint, p_cost numeric, p_window timestamptz,
                                                p_subjects text[], p_requests integer, p_streams uuid[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    q quota_leases%ROWTYPE;
BEGIN
    IF p_requests > 0 THEN
        UPDATE rate_windows w SET count = greatest(w.count - p_requests, 0)
        FROM (SELECT r.subject FROM rate_windows r
              WHERE r.subject = ANY(p_subjects) AND r.window_start = p_window
              ORDER BY array_position(p_subjects, r.subject) FOR UPDATE) AS locked
        WHERE w.subject = locked.subject AND w.window_start = p_window;
    END IF;
    IF cardinality(p_streams) > 0 THEN PERFORM gateway_release_leases(p_streams); END IF;
    SELECT * INTO q FROM quota_leases WHERE id = p_lease;
    IF FOUND THEN
        -- day rows, then the slice's row (gateway_release_quota_row); the amounts it takes off the
        -- row are relative, so a settlement that took its share meanwhile is kept
        PERFORM gateway_release_quota_row(q, LEAST(p_tokens, greatest(q.user_tokens, q.key_tokens)),
                                          LEAST(p_cost, greatest(q.user_cost, q.key_cost)));
    END IF;
    UPDATE quota_leases SET open = false WHERE id = p_lease;
END
$$;
