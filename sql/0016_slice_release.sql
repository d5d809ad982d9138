-- A quota slice never releases more than it reserved (sql/0013_quota_leases.sql).
--
-- A slice's row says what the slice still holds on the day rows: its unused part plus the shares
-- of the requests it served that are not settled yet. Every release of a slice's tokens or dollars
-- from the day rows now takes the same amount off that row, at most what the row holds, under the
-- row's lock: the owner's return (gateway_return_quota), the sweep's reclaim of a dead instance's
-- slices (gateway_reclaim_quota, unchanged), a request's settlement (USAGE_CTES, gateway/store/
-- usage.py) and the release of a request that never ran (gateway/store/limits.py, release). So a
-- share the sweep released already (it took the instance for dead, then the instance's records
-- arrived after all, or were replayed from its journal) is released by nobody a second time, and a
-- return that meets a row the settlements emptied meanwhile releases only what is left.
--
-- For that, every statement that touches a slice's row locks it first, before the windows, the
-- stream counters and the day rows; the order is then, everywhere:
--     slice rows (by id) -> rate windows -> stream counters (by subject) -> key day rows (leaf first)
--     -> user day rows
-- gateway_admit_full takes no slice row, so it keeps its order. 0014's return took the row last
-- and read it unlocked: a settlement that took its share meanwhile left the return releasing from
-- the day rows what the row no longer held.

-- The owner gives back a slice's unused part: as 0014's, but the row is locked (and read) first.
CREATE OR REPLACE FUNCTION gateway_return_quota(p_lease uuid, p_tokens bigint, p_cost numeric, p_window timestamptz,
                                                p_subjects text[], p_requests integer, p_streams uuid[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    q quota_leases%ROWTYPE;
BEGIN
    SELECT * INTO q FROM quota_leases WHERE id = p_lease FOR UPDATE;
    IF p_requests > 0 THEN
        UPDATE rate_windows w SET count = greatest(w.count - p_requests, 0)
        FROM (SELECT r.subject FROM rate_windows r
              WHERE r.subject = ANY(p_subjects) AND r.window_start = p_window
              ORDER BY array_position(p_subjects, r.subject) FOR UPDATE) AS locked
        WHERE w.subject = locked.subject AND w.window_start = p_window;
    END IF;
    IF cardinality(p_streams) > 0 THEN PERFORM gateway_release_leases(p_streams); END IF;
    IF q.id IS NOT NULL THEN
        -- at most what the row holds (it may hold less than the unused part only if the sweep
        -- reclaimed the slice meanwhile: then it is gone, and nothing is released twice)
        PERFORM gateway_release_quota_row(q, LEAST(p_tokens, greatest(q.user_tokens, q.key_tokens)),
                                          LEAST(p_cost, greatest(q.user_cost, q.key_cost)));
        UPDATE quota_leases SET open = false WHERE id = p_lease;
    END IF;
END
$$;

-- A lease (or a renewal) locks the slice's row first too: 0014's function, unchanged, does the rest.
ALTER FUNCTION gateway_lease_quota(uuid, uuid, uuid, uuid, uuid[], date, timestamptz, integer, integer[], integer,
                                   bigint, bigint, bigint, bigint[], numeric, numeric, numeric, numeric[], integer,
                                   integer[], integer)
    RENAME TO gateway_lease_quota_grant;

CREATE FUNCTION gateway_lease_quota(p_lease uuid, p_instance uuid, p_user uuid, p_key uuid, p_keys uuid[],
                                    p_day date, p_window timestamptz, p_user_rpm integer, p_key_rpms integer[],
                                    p_requests integer, p_want bigint, p_min bigint, p_user_cap bigint,
                                    p_key_caps bigint[], p_want_cost numeric, p_min_cost numeric,
                                    p_user_cost_cap numeric, p_key_cost_caps numeric[], p_user_streams integer,
                                    p_key_streams integer[], p_streams integer,
                                    OUT g_requests integer, OUT g_tokens bigint, OUT g_cost numeric, OUT g_streams uuid[],
                                    OUT g_windows bigint[], OUT g_user_day bigint, OUT g_key_days bigint[])
LANGUAGE plpgsql AS $$
BEGIN
    -- a first lease has no row yet: nobody else can name the slice before this statement commits
    PERFORM 1 FROM quota_leases WHERE id = p_lease FOR UPDATE;
    SELECT * INTO g_requests, g_tokens, g_cost, g_streams, g_windows, g_user_day, g_key_days
    FROM gateway_lease_quota_grant(p_lease, p_instance, p_user, p_key, p_keys, p_day, p_window, p_user_rpm,
                                   p_key_rpms, p_requests, p_want, p_min, p_user_cap, p_key_caps, p_want_cost,
                                   p_min_cost, p_user_cost_cap, p_key_cost_caps, p_user_streams, p_key_streams,
                                   p_streams);
END
$$;

-- A request served from a slice is released (never ran, or settled) by at most what the slice's row
-- still holds of it: takes that off the row, under the row's lock, and returns it. The caller then
-- releases exactly the returned amounts from the day rows, in the same transaction. No row (the sweep
-- reclaimed the slice, its shares with it): nothing, all zero.
CREATE FUNCTION gateway_take_from_slice(p_lease uuid, p_user_tokens bigint, p_key_tokens bigint,
                                        p_user_cost numeric, p_key_cost numeric,
                                        OUT user_tokens bigint, OUT key_tokens bigint,
                                        OUT user_cost numeric, OUT key_cost numeric)
LANGUAGE plpgsql AS $$
DECLARE
    q quota_leases%ROWTYPE;
BEGIN
    user_tokens := 0;
    key_tokens := 0;
    user_cost := 0;
    key_cost := 0;
    SELECT * INTO q FROM quota_leases l WHERE l.id = p_lease FOR UPDATE;
    IF q.id IS NULL THEN RETURN; END IF;
    user_tokens := LEAST(p_user_tokens, q.user_tokens);
    key_tokens := LEAST(p_key_tokens, q.key_tokens);
    user_cost := LEAST(p_user_cost, q.user_cost);
    key_cost := LEAST(p_key_cost, q.key_cost);
    UPDATE quota_leases l SET user_tokens = l.user_tokens - gateway_take_from_slice.user_tokens,
        key_tokens = l.key_tokens - gateway_take_from_slice.key_tokens,
        user_cost = l.user_cost - gateway_take_from_slice.user_cost,
        key_cost = l.key_cost - gateway_take_from_slice.key_cost
    WHERE l.id = p_lease;
END
$$;
