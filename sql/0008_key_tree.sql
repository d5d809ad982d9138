-- Keys form trees: a key created by another key (POST /api/keys with an API key) is its child.
-- A child never outranks its ancestors: its usage counts against every ancestor's limits
-- (gateway_admit_chain below, and the usage settlement in gateway/store/usage.py), and revoking a
-- key revokes its descendants in the same statement (gateway/store/keys.py).
--
-- `ancestors` is the whole chain above a key, parent first and root last, so one row answers "whose
-- limits apply to me" and a GIN index answers "who is below me". It is written once, with the key:
-- a trigger refuses any change, so the tree cannot be re-parented under a running admission.

ALTER TABLE api_keys
    ADD COLUMN parent_id uuid REFERENCES api_keys (id) ON DELETE CASCADE,
    ADD COLUMN ancestors uuid[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT api_keys_chain CHECK (
        CASE WHEN parent_id IS NULL THEN cardinality(ancestors) = 0 ELSE ancestors[1] = parent_id END);

CREATE INDEX api_keys_ancestors ON api_keys USING gin (ancestors);  -- descendants: ancestors @> ARRAY[id]

CREATE FUNCTION gateway_key_chain_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a key''s parent and ancestors never change' USING ERRCODE = 'check_violation';
END
$$;

CREATE TRIGGER api_keys_chain_immutable BEFORE UPDATE OF parent_id, ancestors ON api_keys FOR EACH ROW
    WHEN (OLD.parent_id IS DISTINCT FROM NEW.parent_id OR OLD.ancestors IS DISTINCT FROM NEW.ancestors)
    EXECUTE FUNCTION gateway_key_chain_immutable();

-- gateway_admit for a key and its ancestors: the same guarantees (one call, all or nothing, the
-- day rows' locks serialise reservations) and the same SQLSTATEs (0007), a refusal by any key of
-- the chain being a key's: GW4R2 / GW4D2. gateway_admit stays, for callers with one key.
--
-- p_keys is the chain, the caller's key first and its root last; p_key_rpms and p_key_caps are
-- its limits, position for position (NULL: that key has none). Every lock is taken in one order
-- (the user's window, the keys' windows leaf to root, the keys' days leaf to root, the user's
-- day): two chains share only a common top, in the same order, so concurrent calls cannot
-- deadlock. Each cap reserves at most what the caps before it granted; at the end every cap that
-- granted more than the last one hands its excess back, so each reserves exactly what is returned.
CREATE FUNCTION gateway_admit_chain(p_user uuid, p_keys uuid[], p_day date, p_window timestamptz,
                                    p_user_rpm integer, p_key_rpms integer[], p_want bigint,
                                    p_user_cap bigint, p_key_caps bigint[], p_share integer)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n       integer := coalesce(cardinality(p_keys), 0);
    granted bigint := p_want;
    g       bigint;
    grants  bigint[] := '{}';  -- what each key's cap reserved (NULL: no cap)
BEGIN
    IF p_user_rpm IS NOT NULL THEN
        PERFORM gateway_take_window('u:' || p_user, p_window, p_user_rpm, 'GW4R1', 'user_requests_per_minute');
    END IF;
    FOR i IN 1 .. n LOOP
        IF p_key_rpms[i] IS NOT NULL THEN
            PERFORM gateway_take_window('k:' || p_keys[i], p_window, p_key_rpms[i], 'GW4R2',
                                        'key_requests_per_minute');
        END IF;
    END LOOP;
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
    -- rows this call already locked: no new lock, no new order
    UPDATE key_daily_usage d SET reserved = d.reserved - (t.g - granted)
    FROM unnest(p_keys, grants) AS t (id, g)
    WHERE d.api_key_id = t.id AND d.day = p_day AND t.g > granted;
    RETURN granted;
END
$$;
