-- Daily cost caps (per user and per key) and concurrency caps that hold across instances, both
-- taken in the one atomic admission call, gateway_admit_full below (gateway_admit_chain of
-- sql/0008_key_tree.sql plus the two). Its SQLSTATEs extend 0007's table:
--
--   SQLSTATE  limit                                  resets
--   GW4C1     user daily cost (USD)                  at the next UTC midnight
--   GW4C2     key daily cost (USD)                   at the next UTC midnight
--   GW4S1     user concurrent streams                when one of them finishes
--   GW4S2     key concurrent streams                 when one of them finishes
--
-- The Python side reads them in one place: gateway/store/limits.py (SQLSTATES).

-- A cost reservation is a token reservation in dollars: the worst case (prompt tokens x input
-- price + max_tokens x output price) held on the day's row until the finish settles it to the
-- real cost (gateway/store/usage.py). last_cost_grant plays last_grant's part (see 0003).
ALTER TABLE daily_usage
    ADD COLUMN cost_reserved   numeric(16, 8) NOT NULL DEFAULT 0,
    ADD COLUMN last_cost_grant numeric(16, 8) NOT NULL DEFAULT 0;
ALTER TABLE key_daily_usage
    ADD COLUMN cost_reserved   numeric(16, 8) NOT NULL DEFAULT 0,
    ADD COLUMN last_cost_grant numeric(16, 8) NOT NULL DEFAULT 0;

-- Streams running now, per subject ('u:<user id>' or 'k:<key id>': a key counts the streams of
-- its whole subtree, as its other limits do). A counter row is the lock that serialises
-- admissions of one subject, so a cap holds under any concurrency, on any number of instances.
CREATE TABLE stream_counts (
    subject text PRIMARY KEY,
    streams integer NOT NULL CHECK (streams >= 0)
);

-- One row per admitted stream that counts against a cap: which counters it took (given back,
-- exactly once, by deleting the row: at the finish write, by a release, or by the sweep when
-- `instance_id` died with it).
CREATE TABLE stream_leases (
    id          uuid PRIMARY KEY,
    instance_id uuid NOT NULL,
    subjects    text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stream_leases_instance ON stream_leases (instance_id);

-- the sweep deletes windows older than a few minutes (gateway/store/limits.py, sweep_windows)
CREATE INDEX rate_windows_start ON rate_windows (window_start);

-- Give back a set of leases: delete them, and take each counter they hold down by one. The
-- counters are locked in subject order, as gateway_admit_full takes them, so a release and an
-- admission never deadlock. Deleting is what makes it exactly once: a lease already gone gives
-- nothing back. Returns how many leases were released.
CREATE FUNCTION gateway_release_leases(p_leases uuid[]) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH gone AS (DELETE FROM stream_leases WHERE id = ANY(p_leases) RETURNING subjects),
    taken AS (SELECT subject, count(*)::integer AS k FROM gone, unnest(gone.subjects) AS subject GROUP BY subject),
    locked AS (SELECT c.subject FROM stream_counts c JOIN taken USING (subject) ORDER BY c.subject FOR UPDATE OF c),
    dec AS (UPDATE stream_counts c SET streams = greatest(c.streams - taken.k, 0) FROM taken
            WHERE c.subject = taken.subject AND (SELECT count(*) FROM locked) >= 0 RETURNING 1)
    SELECT (SELECT count(*) FROM gone) + 0 * (SELECT count(*) FROM dec) INTO n;
    RETURN n;
END
$$;

-- gateway_admit_chain (0008), plus daily cost caps and concurrency leases: one call, all or
-- nothing. New parameters:
--   p_want_cost        the request's worst-case cost in USD (0: a free model, no cost cap applies)
--   p_user_cost_cap    the user's daily cost cap (NULL: none)
--   p_key_cost_caps    each key's daily cost cap, position for position with p_keys (NULL: none)
--   p_lease            the lease's id (NULL: no concurrency cap applies)
--   p_instance         the admitting instance: its leases die with it (the sweep)
--   p_user_streams     the user's concurrent-stream cap (NULL: none)
--   p_key_streams      each key's concurrent-stream cap, position for position (NULL: none)
-- Returns the tokens and the cost reserved (each cap of a kind reserves the same amount).
-- Lock order: windows, then stream counters in subject order, then the day rows as 0008 takes
-- them (keys leaf to root, then the user; a day row's cost is reserved right after its tokens).
CREATE FUNCTION gateway_admit_full(p_user uuid, p_keys uuid[], p_day date, p_window timestamptz,
                                   p_user_rpm integer, p_key_rpms integer[], p_want bigint,
                                   p_user_cap bigint, p_key_caps bigint[], p_share integer,
                                   p_want_cost numeric, p_user_cost_cap numeric, p_key_cost_caps numeric[],
                                   p_lease uuid, p_instance uuid, p_user_streams integer, p_key_streams integer[],
                                   OUT granted bigint, OUT granted_cost numeric)
LANGUAGE plpgsql AS $$
DECLARE
    n       integer := coalesce(cardinality(p_keys), 0);
    g       bigint;
    c       numeric;
    grants  bigint[] := '{}';
    cgrants numeric[] := '{}';
    s       record;
    taken   text[] := '{}';
    k       integer;
BEGIN
    granted := p_want;
    granted_cost := p_want_cost;
    IF p_user_rpm IS NOT NULL THEN
        PERFORM gateway_take_window('u:' || p_user, p_window, p_user_rpm, 'GW4R1', 'user_requests_per_minute');
    END IF;
    FOR i IN 1 .. n LOOP
        IF p_key_rpms[i] IS NOT NULL THEN
            PERFORM gateway_take_window('k:' || p_keys[i], p_window, p_key_rpms[i], 'GW4R2',
                                        'key_requests_per_minute');
        END IF;
    END LOOP;
    IF p_lease IS NOT NULL THEN
        FOR s IN
            SELECT x.subject, x.cap, x.code, x.name FROM (
                SELECT 'u:' || p_user AS subject, p_user_streams AS cap, 'GW4S1' AS code,
                       'user_concurrent_streams' AS name
                UNION ALL
                SELECT 'k:' || t.id, t.cap, 'GW4S2', 'key_concurrent_streams'
                FROM unnest(p_keys, p_key_streams) AS t (id, cap)
            ) x WHERE x.cap IS NOT NULL ORDER BY x.subject
        LOOP
            k := NULL;
            INSERT INTO stream_counts AS sc (subject, streams) VALUES (s.subject, 1)
            ON CONFLICT (subject) DO UPDATE SET streams = sc.streams + 1 WHERE sc.streams < s.cap
            RETURNING streams INTO k;
            IF k IS NULL THEN RAISE EXCEPTION '%', s.name USING ERRCODE = s.code; END IF;
            taken := taken || s.subject;
        END LOOP;
        IF cardinality(taken) > 0 THEN
            INSERT INTO stream_leases (id, instance_id, subjects) VALUES (p_lease, p_instance, taken);
        END IF;
    END IF;
    FOR i IN 1 .. n LOOP
        g := NULL;
        IF p_key_caps[i] IS NOT NULL THEN
            INSERT INTO key_daily_usage AS d (api_key_id, day, reserved, last_grant)
            VALUES (p_keys[i], p_day, LEAST(granted, p_key_caps[i] / p_share), LEAST(granted, p_key_caps[i] / p_share))
            ON CONFLICT (api_key_id, day) DO UPDATE
                SET reserved = d.reserved + LEAST(granted, (p_key_caps[i] - d.tokens - d.reserved) / p_share),
                    last_grant = LEAST(granted, (p_key_caps[i] - d.tokens - d.reserved) / p_share)
                WHERE (p_key_caps[i] - d.tokens - d.reserved) / p_share > 0
            RETURNING last_grant INTO g;
            IF g IS NULL OR g <= 0 THEN RAISE EXCEPTION 'key_daily_tokens' USING ERRCODE = 'GW4D2'; END IF;
            granted := g;
        END IF;
        grants := grants || g;
        c := NULL;
        IF p_key_cost_caps[i] IS NOT NULL AND p_want_cost > 0 THEN
            INSERT INTO key_daily_usage AS d (api_key_id, day, cost_reserved, last_cost_grant)
            VALUES (p_keys[i], p_day, LEAST(granted_cost, p_key_cost_caps[i] / p_share),
                    LEAST(granted_cost, p_key_cost_caps[i] / p_share))
            ON CONFLICT (api_key_id, day) DO UPDATE
                SET cost_reserved = d.cost_reserved
                        + LEAST(granted_cost, (p_key_cost_caps[i] - d.cost_usd - d.cost_reserved) / p_share),
                    last_cost_grant = LEAST(granted_cost, (p_key_cost_caps[i] - d.cost_usd - d.cost_reserved) / p_share)
                WHERE (p_key_cost_caps[i] - d.cost_usd - d.cost_reserved) / p_share > 0
            RETURNING last_cost_grant INTO c;
            IF c IS NULL OR c <= 0 THEN RAISE EXCEPTION 'key_daily_cost' USING ERRCODE = 'GW4C2'; END IF;
            granted_cost := c;
        END IF;
        cgrants := cgrants || c;
    END LOOP;
    IF p_user_cap IS NOT NULL THEN
        g := NULL;
        INSERT INTO daily_usage AS d (user_id, day, reserved, last_grant)
        VALUES (p_user, p_day, LEAST(granted, p_user_cap / p_share), LEAST(granted, p_user_cap / p_share))
        ON CONFLICT (user_id, day) DO UPDATE
            SET reserved = d.reserved + LEAST(granted, (p_user_cap - d.tokens - d.reserved) / p_share),
                last_grant = LEAST(granted, (p_user_cap - d.tokens - d.reserved) / p_share)
            WHERE (p_user_cap - d.tokens - d.reserved) / p_share > 0
        RETURNING last_grant INTO g;
        IF g IS NULL OR g <= 0 THEN RAISE EXCEPTION 'user_daily_tokens' USING ERRCODE = 'GW4D1'; END IF;
        granted := g;
    END IF;
    IF p_user_cost_cap IS NOT NULL AND p_want_cost > 0 THEN
        c := NULL;
        INSERT INTO daily_usage AS d (user_id, day, cost_reserved, last_cost_grant)
        VALUES (p_user, p_day, LEAST(granted_cost, p_user_cost_cap / p_share), LEAST(granted_cost, p_user_cost_cap / p_share))
        ON CONFLICT (user_id, day) DO UPDATE
            SET cost_reserved = d.cost_reserved + LEAST(granted_cost, (p_user_cost_cap - d.cost_usd - d.cost_reserved) / p_share),
                last_cost_grant = LEAST(granted_cost, (p_user_cost_cap - d.cost_usd - d.cost_reserved) / p_share)
            WHERE (p_user_cost_cap - d.cost_usd - d.cost_reserved) / p_share > 0
        RETURNING last_cost_grant INTO c;
        IF c IS NULL OR c <= 0 THEN RAISE EXCEPTION 'user_daily_cost' USING ERRCODE = 'GW4C1'; END IF;
        granted_cost := c;
    END IF;
    -- rows this call already locked: every cap that granted more than the last hands the excess back
    UPDATE key_daily_usage d SET reserved = d.reserved - (t.g - granted)
    FROM unnest(p_keys, grants) AS t (id, g)
    WHERE d.api_key_id = t.id AND d.day = p_day AND t.g > granted;
    UPDATE key_daily_usage d SET cost_reserved = d.cost_reserved - (t.c - granted_cost)
    FROM unnest(p_keys, cgrants) AS t (id, c)
    WHERE d.api_key_id = t.id AND d.day = p_day AND t.c > granted_cost;
END
$$;
