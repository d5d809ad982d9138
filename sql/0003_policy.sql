-- Policy: per-minute request windows, daily token reservations (per user and per key), and the
-- admission function that applies them atomically in one round trip.

ALTER TABLE daily_usage
    ADD COLUMN reserved   bigint NOT NULL DEFAULT 0,  -- worst cases of replies still running
    ADD COLUMN last_grant bigint NOT NULL DEFAULT 0;  -- what the latest reservation got (see below)

CREATE TABLE key_daily_usage (
    api_key_id uuid NOT NULL,
    day        date NOT NULL,
    tokens     bigint NOT NULL DEFAULT 0,
    requests   integer NOT NULL DEFAULT 0,
    cost_usd   numeric(16, 8) NOT NULL DEFAULT 0,
    reserved   bigint NOT NULL DEFAULT 0,
    last_grant bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (api_key_id, day)
);

-- fixed one-minute windows, per subject ('u:<user id>' or 'k:<key id>'); old ones are swept
CREATE TABLE rate_windows (
    subject      text NOT NULL,
    window_start timestamptz NOT NULL,
    count        integer NOT NULL,
    PRIMARY KEY (subject, window_start)
);

-- One fixed-window counter: takes a slot in the subject's current minute, or refuses (SQLSTATE
-- GW429, the limit's name as the message) when the window is full.
CREATE FUNCTION gateway_take_window(p_subject text, p_window timestamptz, p_limit integer, p_name text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    INSERT INTO rate_windows AS w (subject, window_start, count) VALUES (p_subject, p_window, 1)
    ON CONFLICT (subject, window_start) DO UPDATE SET count = w.count + 1 WHERE w.count < p_limit
    RETURNING count INTO n;
    IF n IS NULL THEN RAISE EXCEPTION '%', p_name USING ERRCODE = 'GW429'; END IF;
END
$$;

-- Admit one request or refuse it, changing nothing on refusal (the exception rolls the whole
-- call back). Each limit is skipped when its parameter is NULL. A daily reservation is one
-- conditional upsert on the day's row: it takes min(want, what remains / p_share), only while
-- something remains; the row lock serialises concurrent callers, so the cap holds under any
-- concurrency. p_share > 1 is for a request admitted with others (the arena's slot a takes at
-- most half of what remains, so slot b is not starved). In an UPDATE every SET expression sees
-- the old row, so last_grant records exactly what this call added to reserved.
CREATE FUNCTION gateway_admit(p_user uuid, p_key uuid, p_day date, p_window timestamptz,
                              p_user_rpm integer, p_key_rpm integer, p_want bigint,
                              p_user_cap bigint, p_key_cap bigint, p_share integer)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    granted bigint := p_want;
    g       bigint;
BEGIN
    IF p_user_rpm IS NOT NULL THEN
        PERFORM gateway_take_window('u:' || p_user, p_window, p_user_rpm, 'user_requests_per_minute');
    END IF;
    IF p_key_rpm IS NOT NULL AND p_key IS NOT NULL THEN
        PERFORM gateway_take_window('k:' || p_key, p_window, p_key_rpm, 'key_requests_per_minute');
    END IF;
    -- the two daily caps live in two tables (per key, per user): the same upsert on each
    IF p_key_cap IS NOT NULL AND p_key IS NOT NULL THEN
        g := NULL;
        INSERT INTO key_daily_usage AS d (api_key_id, day, reserved, last_grant)
        VALUES (p_key, p_day, LEAST(granted, p_key_cap / p_share), LEAST(granted, p_key_cap / p_share))
        ON CONFLICT (api_key_id, day) DO UPDATE
            SET reserved = d.reserved + LEAST(granted, (p_key_cap - d.tokens - d.reserved) / p_share),
                last_grant = LEAST(granted, (p_key_cap - d.tokens - d.reserved) / p_share)
            WHERE (p_key_cap - d.tokens - d.reserved) / p_share > 0
        RETURNING last_grant INTO g;
        IF g IS NULL OR g <= 0 THEN RAISE EXCEPTION 'key_daily_tokens' USING ERRCODE = 'GW429'; END IF;
        granted := g;
    END IF;
    IF p_user_cap IS NOT NULL THEN
        g := NULL;
        INSERT INTO daily_usage AS d (user_id, day, reserved, last_grant)
        VALUES (p_user, p_day, LEAST(granted, p_user_cap / p_share), LEAST(granted, p_user_cap / p_share))
        ON CONFLICT (user_id, day) DO UPDATE
            SET reserved = d.reserved + LEAST(granted, (p_user_cap - d.tokens - d.reserved) / p_share),
                last_grant = LEAST(granted, (p_user_cap - d.tokens - d.reserved) / p_share)
            WHERE (p_user_cap - d.tokens - d.reserved) / p_share > 0
        RETURNING last_grant INTO g;
        IF g IS NULL OR g <= 0 THEN RAISE EXCEPTION 'user_daily_tokens' USING ERRCODE = 'GW429'; END IF;
        IF g < granted AND p_key_cap IS NOT NULL AND p_key IS NOT NULL THEN
            -- the user had less left than the key: hand the key's excess back
            UPDATE key_daily_usage SET reserved = reserved - (granted - g) WHERE api_key_id = p_key AND day = p_day;
        END IF;
        granted := g;
    END IF;
    RETURN granted;
END
$$;
