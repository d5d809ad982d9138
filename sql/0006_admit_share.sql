-- gateway_admit with a share: a request that is one of several admitted together (the arena's
-- two slots) takes at most 1/p_share of what remains today, so the first slot cannot take the
-- whole budget and leave the second refused.

DROP FUNCTION gateway_admit(uuid, uuid, date, timestamptz, integer, integer, bigint, bigint, bigint);

CREATE FUNCTION gateway_admit(p_user uuid, p_key uuid, p_day date, p_window timestamptz,
                              p_user_rpm integer, p_key_rpm integer, p_want bigint,
                              p_user_cap bigint, p_key_cap bigint, p_share integer)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n       integer;
    granted bigint := p_want;
    g       bigint;
BEGIN
    IF p_user_rpm IS NOT NULL THEN
        n := NULL;
        INSERT INTO rate_windows AS w (subject, window_start, count) VALUES ('u:' || p_user, p_window, 1)
        ON CONFLICT (subject, window_start) DO UPDATE SET count = w.count + 1 WHERE w.count < p_user_rpm
        RETURNING count INTO n;
        IF n IS NULL THEN RAISE EXCEPTION 'user_requests_per_minute' USING ERRCODE = 'GW429'; END IF;
    END IF;
    IF p_key_rpm IS NOT NULL AND p_key IS NOT NULL THEN
        n := NULL;
        INSERT INTO rate_windows AS w (subject, window_start, count) VALUES ('k:' || p_key, p_window, 1)
        ON CONFLICT (subject, window_start) DO UPDATE SET count = w.count + 1 WHERE w.count < p_key_rpm
        RETURNING count INTO n;
        IF n IS NULL THEN RAISE EXCEPTION 'key_requests_per_minute' USING ERRCODE = 'GW429'; END IF;
    END IF;
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
