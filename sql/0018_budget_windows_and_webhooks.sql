-- Budgets by calendar month (UTC) and for life, per user and per key, taken in the same one
-- atomic admission call as the daily caps (gateway_admit_budget below: gateway_admit_full of
-- sql/0010 plus these windows). Its SQLSTATEs extend 0010's table:
--
--   SQLSTATE  limit                                  resets
--   GW4M1     user monthly tokens                    at the next UTC month
--   GW4M2     key monthly tokens                     at the next UTC month
--   GW4N1     user monthly cost (USD)                at the next UTC month
--   GW4N2     key monthly cost (USD)                 at the next UTC month
--   GW4T1     user lifetime tokens                   never
--   GW4T2     key lifetime tokens                    never
--   GW4U1     user lifetime cost (USD)               never
--   GW4U2     key lifetime cost (USD)                never
--
-- The Python side reads them in one place: gateway/store/limits.py (SQLSTATES).

-- One row per subject ('u:<user id>' or 'k:<key id>': a key's totals include its descendants', as
-- its daily ones do) and period ('YYYY-MM' for a UTC month, 'total' for its whole life). The usage
-- settlement (gateway/store/usage.py) adds every reply's tokens and cost to its user's rows and to
-- those of its key and each ancestor, capped or not, so a budget set later counts what was spent
-- before it, and GET /api/keys reads a key's month and lifetime spend from here. `reserved` and
-- `cost_reserved` hold the worst cases of replies still running, as on the day rows (0003, 0010).
CREATE TABLE budget_usage (
    subject       text NOT NULL,
    period        text NOT NULL CHECK (period = 'total' OR period ~ '^[0-9]{4}-[0-9]{2}$'),
    tokens        bigint NOT NULL DEFAULT 0,
    requests      bigint NOT NULL DEFAULT 0,
    cost_usd      numeric(20, 8) NOT NULL DEFAULT 0,
    reserved      bigint NOT NULL DEFAULT 0,
    cost_reserved numeric(20, 8) NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, period)
);

-- What was spent before this table existed, per user and per key (a key's row counts its subtree).
INSERT INTO budget_usage (subject, period, tokens, requests, cost_usd)
SELECT 'u:' || u.user_id, p.period, sum(u.total_tokens), count(*), sum(u.cost_usd)
FROM usage u CROSS JOIN LATERAL (VALUES (to_char(u.created_at AT TIME ZONE 'UTC', 'YYYY-MM')), ('total')) p (period)
GROUP BY 1, 2;
INSERT INTO budget_usage (subject, period, tokens, requests, cost_usd)
SELECT 'k:' || c.id, p.period, sum(u.total_tokens), count(*), sum(u.cost_usd)
FROM usage u JOIN api_keys k ON k.id = u.api_key_id
CROSS JOIN LATERAL unnest(k.id || k.ancestors) AS c (id)
CROSS JOIN LATERAL (VALUES (to_char(u.created_at AT TIME ZONE 'UTC', 'YYYY-MM')), ('total')) p (period)
GROUP BY 1, 2;

-- gateway_admit_full (0010), then the month and lifetime budgets, in the same call: all or
-- nothing (a refusal by a budget rolls back what gateway_admit_full took). New parameters:
--   p_month                          the admission day's month, 'YYYY-MM'
--   p_user_month / p_user_total      the user's token budgets (NULL: none)
--   p_user_month_cost / _total_cost  the user's USD budgets (NULL: none; skipped when p_want_cost is 0)
--   p_key_months, p_key_totals, p_key_month_costs, p_key_total_costs: the same per key of p_keys
-- A budget row grants at most what is left of it (divided by p_share, as the day rows do); every
-- capped row, day or budget, then holds the least any cap granted (the day rows give back what
-- they reserved beyond it), so a reply's reservation is one amount per kind, as before.
-- Lock order: what gateway_admit_full locks (windows, stream counters, key day rows leaf first, the
-- user's day row), then budget rows: keys leaf first (each key's month, then its total), then the
-- user's month and total. The settlement and the release take them in the same order.
CREATE FUNCTION gateway_admit_budget(p_user uuid, p_keys uuid[], p_day date, p_window timestamptz,
                                     p_user_rpm integer, p_key_rpms integer[], p_want bigint,
                                     p_user_cap bigint, p_key_caps bigint[], p_share integer,
                                     p_want_cost numeric, p_user_cost_cap numeric, p_key_cost_caps numeric[],
                                     p_lease uuid, p_instance uuid, p_user_streams integer, p_key_streams integer[],
                                     p_month text, p_user_month bigint, p_user_total bigint,
                                     p_user_month_cost numeric, p_user_total_cost numeric, p_key_months bigint[],
                                     p_key_totals bigint[], p_key_month_costs numeric[], p_key_total_costs numeric[],
                                     OUT granted bigint, OUT granted_cost numeric)
LANGUAGE plpgsql AS $$
DECLARE
    n       integer := coalesce(cardinality(p_keys), 0);
    first_t bigint;
    first_c numeric;
    used_t  bigint;
    used_c  numeric;
    b       record;
    t_subj  text[] := '{}';
    t_per   text[] := '{}';
    c_subj  text[] := '{}';
    c_per   text[] := '{}';
BEGIN
    SELECT f.granted, f.granted_cost INTO granted, granted_cost
    FROM gateway_admit_full(p_user, p_keys, p_day, p_window, p_user_rpm, p_key_rpms, p_want, p_user_cap, p_key_caps,
                            p_share, p_want_cost, p_user_cost_cap, p_key_cost_caps, p_lease, p_instance,
                            p_user_streams, p_key_streams) f;
    first_t := granted;
    first_c := granted_cost;
    FOR b IN
        SELECT x.subject, x.period, x.cap, x.cost_cap, x.tcode, x.tname, x.ccode, x.cname FROM (
            SELECT t.pos, 0 AS w, 'k:' || t.id AS subject, p_month AS period, t.cap, t.cost_cap,
                   'GW4M2' AS tcode, 'key_monthly_tokens' AS tname, 'GW4N2' AS ccode, 'key_monthly_cost' AS cname
            FROM unnest(p_keys, p_key_months, p_key_month_costs) WITH ORDINALITY AS t (id, cap, cost_cap, pos)
            UNION ALL
            SELECT t.pos, 1, 'k:' || t.id, 'total', t.cap, t.cost_cap,
                   'GW4T2', 'key_total_tokens', 'GW4U2', 'key_total_cost'
            FROM unnest(p_keys, p_key_totals, p_key_total_costs) WITH ORDINALITY AS t (id, cap, cost_cap, pos)
            UNION ALL
            SELECT n + 1, 0, 'u:' || p_user, p_month, p_user_month, p_user_month_cost,
                   'GW4M1', 'user_monthly_tokens', 'GW4N1', 'user_monthly_cost'
            UNION ALL
            SELECT n + 1, 1, 'u:' || p_user, 'total', p_user_total, p_user_total_cost,
                   'GW4T1', 'user_total_tokens', 'GW4U1', 'user_total_cost'
        ) x WHERE x.cap IS NOT NULL OR (x.cost_cap IS NOT NULL AND p_want_cost > 0)
        ORDER BY x.pos, x.w
    LOOP
        INSERT INTO budget_usage (subject, period) VALUES (b.subject, b.period) ON CONFLICT DO NOTHING;
        SELECT u.tokens + u.reserved, u.cost_usd + u.cost_reserved INTO used_t, used_c
        FROM budget_usage u WHERE u.subject = b.subject AND u.period = b.period FOR UPDATE;
        IF b.cap IS NOT NULL THEN
            IF (b.cap - used_t) / p_share <= 0 THEN RAISE EXCEPTION '%', b.tname USING ERRCODE = b.tcode; END IF;
            granted := LEAST(granted, (b.cap - used_t) / p_share);
            t_subj := t_subj || b.subject;
            t_per := t_per || b.period;
        END IF;
        IF b.cost_cap IS NOT NULL AND p_want_cost > 0 THEN
            IF trunc((b.cost_cap - used_c) / p_share, 8) <= 0 THEN
                RAISE EXCEPTION '%', b.cname USING ERRCODE = b.ccode;
            END IF;
            granted_cost := LEAST(granted_cost, trunc((b.cost_cap - used_c) / p_share, 8));
            c_subj := c_subj || b.subject;
            c_per := c_per || b.period;
        END IF;
    END LOOP;
    -- rows this call already locked: no new lock, no new order
    UPDATE budget_usage u SET reserved = u.reserved + granted
    FROM unnest(t_subj, t_per) AS t (subject, period) WHERE u.subject = t.subject AND u.period = t.period;
    UPDATE budget_usage u SET cost_reserved = u.cost_reserved + granted_cost
    FROM unnest(c_subj, c_per) AS t (subject, period) WHERE u.subject = t.subject AND u.period = t.period;
    IF granted < first_t THEN
        UPDATE key_daily_usage d SET reserved = d.reserved - (first_t - granted)
        FROM unnest(p_keys, p_key_caps) AS t (id, cap)
        WHERE d.api_key_id = t.id AND d.day = p_day AND t.cap IS NOT NULL;
        IF p_user_cap IS NOT NULL THEN
            UPDATE daily_usage d SET reserved = d.reserved - (first_t - granted) WHERE d.user_id = p_user AND d.day = p_day;
        END IF;
    END IF;
    IF granted_cost < first_c AND p_want_cost > 0 THEN
        UPDATE key_daily_usage d SET cost_reserved = d.cost_reserved - (first_c - granted_cost)
        FROM unnest(p_keys, p_key_cost_caps) AS t (id, cap)
        WHERE d.api_key_id = t.id AND d.day = p_day AND t.cap IS NOT NULL;
        IF p_user_cost_cap IS NOT NULL THEN
            UPDATE daily_usage d SET cost_reserved = d.cost_reserved - (first_c - granted_cost)
            WHERE d.user_id = p_user AND d.day = p_day;
        END IF;
    END IF;
END
$$;

-- Webhooks: a durable outbox (gateway/webhooks/). One row per event and endpoint; a background
-- worker on every instance claims due rows (FOR UPDATE SKIP LOCKED, then a claim that outlives the
-- claiming transaction: `claimed_until`), so one instance at a time delivers a row, and a row
-- whose instance died mid-delivery is taken up again once its claim runs out. Delivered at least
-- once: `delivered_at` on a 2xx answer; otherwise retried with backoff (`next_attempt_at`) until
-- the endpoint's retry period has passed, then dead-lettered (`dead_at`), kept for people to see.
-- `dedupe` makes an event happen once per endpoint across the fleet (a budget threshold crossed
-- this month, a key created): the unique index refuses its second insert.
CREATE TABLE webhook_outbox (
    id              text PRIMARY KEY,              -- the webhook-id header: msg_<uuid hex>
    endpoint        text NOT NULL,                 -- the configured url it goes to
    event           text NOT NULL,
    payload         jsonb NOT NULL,                -- {"type", "timestamp", "data"}
    dedupe          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_until   timestamptz,
    last_error      text,
    delivered_at    timestamptz,
    dead_at         timestamptz
);
CREATE UNIQUE INDEX webhook_outbox_once ON webhook_outbox (endpoint, dedupe);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
