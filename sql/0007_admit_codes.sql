-- gateway_admit tells which limit refused by its SQLSTATE, one per limit, instead of one shared
-- code (GW429) with the limit's name in the message text. Callers branch on the code; the message
-- still names the limit, for people reading logs.
--
--   SQLSTATE  limit                                  resets
--   GW4R1     user requests per minute               at the next minute
--   GW4R2     key requests per minute                at the next minute
--   GW4D1     user daily tokens                      at the next UTC midnight
--   GW4D2     key daily tokens                       at the next UTC midnight
--
-- The Python side reads them in one place: gateway/store/limits.py (SQLSTATES).
-- Everything else is as 0003 defined it: the same parameters, the same order of checks, and the
-- same atomicity (a refusal rolls the whole call back; the day row's lock serialises reservations).

DROP FUNCTION gateway_take_window(text, timestamptz, integer, text);

-- One fixed-window counter: takes a slot in the subject's current minute, or refuses with
-- p_sqlstate (the limit's name as the message) when the window is full.
CREATE FUNCTION gateway_take_window(p_subject text, p_window timestamptz, p_limit integer,
                                    p_sqlstate text, p_name text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    INSERT INTO rate_windows AS w (subject, window_start, count) VALUES (p_subject, p_window, 1)
    ON CONFLICT (subject, window_start) DO UPDATE SET count = w.count + 1 WHERE w.count < p_limit
    RETURNING count INTO n;
    IF n IS NULL THEN RAISE EXCEPTION '%', p_name USING ERRCODE = p_sqlstate; END IF;
END
$$;

-- See 0003 for how a daily reservation is taken (one conditional upsert per cap, p_share, last_grant).
CREATE OR REPLACE FUNCTION gateway_admit(p_user uuid, p_key uuid, p_day date, p_window timestamptz,
                                         p_user_rpm integer, p_key_rpm integer, p_want bigint,
                                         p_user_cap bigint, p_key_cap bigint, p_share integer)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    granted bigint := p_want;
    g       bigint;
BEGIN
    IF p_user_rpm IS NOT NULL THEN
        PERFORM gateway_take_window('u:' || p_user, p_window, p_user_rpm, 'GW4R1', 'user_requests_per_minute');
    END IF;
    IF p_key_rpm IS NOT NULL AND p_key IS NOT NULL THEN
        PERFORM gateway_take_window('k:' || p_key, p_window, p_key_rpm, 'GW4R2', 'key_requests_per_minute');
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
        IF g IS NULL OR g <= 0 THEN RAISE EXCEPTION 'key_daily_tokens' USING ERRCODE = 'GW4D2'; END IF;
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
        IF g IS NULL OR g <= 0 THEN RAISE EXCEPTION 'user_daily_tokens' USING ERRCODE = 'GW4D1'; END IF;
        IF g < granted AND p_key_cap IS NOT NULL AND p_key IS NOT NULL THEN
            -- the user had less left than the key: hand the key's excess back
            UPDATE key_daily_usage SET reserved = reserved - (granted - g) WHERE api_key_id = p_key AND day = p_day;
        END IF;
        granted := g;
    END IF;
    RETURN granted;
END
$$;
