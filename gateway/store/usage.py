"""SQL for usage: one row per reply (primary key = the reply's id) and the running daily totals."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any, TypedDict

import asyncpg
import orjson

# CTEs shared by every writer of usage: parameters $1..$15 are one array per column of
# UsageRecord.params() (a single finish passes arrays of one): its fields, except that what the
# admission reserved travels as one JSON object ($11, `held`) and its stream lease as $12; the
# prompt's cached and cache-write parts and the reasoning part of the completion are $13..$15. A usage
# row is inserted only if absent, and the daily totals (per user, and per key for the reply's key
# and each of its ancestors: a key's totals include its descendants', see sql/0008_key_tree.sql)
# move only by the rows that were new: replaying records changes nothing. The same step settles
# each reply's reservation: the worst case reserved at admission (tokens and cost) is released and
# the real usage counted instead, on the admission day, and the reply's stream lease is given back.
# Set-based, so a batch costs the database one statement and one upsert per (user, day) and per
# (key, day). Rows are locked in admission's order (the quota slices' rows first, then stream
# counters, then keys leaf first, then users: sql/0016_slice_release.sql), so a settlement never
# deadlocks with an admission, a lease or a slice's return. A reply served from a quota slice
# releases its share from the day rows only as far as the slice's row still holds it (and takes
# the same off that row): what the row no longer holds was released already (the sweep reclaimed
# the slice), and a slice never releases more than it reserved.
USAGE_CTES = """
r AS (
    SELECT DISTINCT ON (message_id) message_id, user_id, api_key_id, model, provider, prompt_tokens,
           completion_tokens, estimated, cost_usd, day,
           coalesce((held ->> 'user_tokens')::bigint, 0) AS user_reserved,
           coalesce((held ->> 'key_tokens')::bigint, 0) AS key_reserved,
           coalesce((held ->> 'user_cost')::numeric, 0) AS user_cost_reserved,
           coalesce((held ->> 'key_cost')::numeric, 0) AS key_cost_reserved, lease,
           (held ->> 'quota')::uuid AS quota, cached_tokens, cache_write_tokens, reasoning_tokens
    FROM unnest(
        $1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::integer[], $7::integer[],
        $8::boolean[], $9::numeric[], $10::date[], $11::jsonb[], $12::uuid[], $13::integer[], $14::integer[],
        $15::integer[])
    AS r(message_id, user_id, api_key_id, model, provider, prompt_tokens, completion_tokens, estimated,
         cost_usd, day, held, lease, cached_tokens, cache_write_tokens, reasoning_tokens)
),
u AS (
    INSERT INTO usage (message_id, user_id, api_key_id, model, provider, prompt_tokens, completion_tokens,
                       total_tokens, estimated, cost_usd, cached_tokens, cache_write_tokens, reasoning_tokens)
    SELECT message_id, user_id, api_key_id, model, provider, prompt_tokens, completion_tokens,
           prompt_tokens + completion_tokens, estimated, cost_usd, cached_tokens, cache_write_tokens,
           reasoning_tokens FROM r
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
),
-- the quota slices the replies' shares came from: their rows are locked before anything else
s AS (
    SELECT sl.id, sl.user_tokens, sl.key_tokens, sl.user_cost, sl.key_cost FROM quota_leases sl
    WHERE sl.id IN (SELECT quota FROM r WHERE quota IS NOT NULL) ORDER BY sl.id FOR UPDATE
),
-- the replies' stream leases, given back next: their counters are locked before any day row, in
-- admission's order (sql/0010). A lease already given back (a replayed record) gives nothing.
l AS (SELECT gateway_release_leases(array_agg(lease)) AS released FROM r
      WHERE lease IS NOT NULL AND (SELECT count(*) FROM s) >= 0),
n AS (
    SELECT r.*, s.user_tokens AS slice_ut, s.key_tokens AS slice_kt, s.user_cost AS slice_uc,
           s.key_cost AS slice_kc,
           -- what the slice's earlier replies in this batch take before this one
           (sum(r.user_reserved) OVER w)::bigint - r.user_reserved AS ut_before,
           (sum(r.key_reserved) OVER w)::bigint - r.key_reserved AS kt_before,
           sum(r.user_cost_reserved) OVER w - r.user_cost_reserved AS uc_before,
           sum(r.key_cost_reserved) OVER w - r.key_cost_reserved AS kc_before
    FROM r JOIN u USING (message_id) LEFT JOIN s ON s.id = r.quota
    WHERE (SELECT count(*) FROM l) >= 0
    WINDOW w AS (PARTITION BY r.quota ORDER BY r.message_id)
),
new AS (
    -- a share served from a slice: at most what the slice's row still holds (none when it is gone)
    SELECT message_id, user_id, api_key_id, model, provider, prompt_tokens, completion_tokens, estimated, cost_usd,
           day, lease, quota,
           CASE WHEN quota IS NULL THEN user_reserved
                ELSE LEAST(user_reserved, greatest(slice_ut - ut_before, 0)) END AS user_reserved,
           CASE WHEN quota IS NULL THEN key_reserved
                ELSE LEAST(key_reserved, greatest(slice_kt - kt_before, 0)) END AS key_reserved,
           CASE WHEN quota IS NULL THEN user_cost_reserved
                ELSE LEAST(user_cost_reserved, greatest(slice_uc - uc_before, 0)) END AS user_cost_reserved,
           CASE WHEN quota IS NULL THEN key_cost_reserved
                ELSE LEAST(key_cost_reserved, greatest(slice_kc - kc_before, 0)) END AS key_cost_reserved
    FROM n
),
chain AS (
    -- each new row once per key of its chain (its key, then the ancestors); only keys with a daily
    -- cap reserved at admission (gateway_admit_chain), so only theirs is released. `depth` orders
    -- the upsert below leaf first.
    SELECT c.key_id, new.day, new.prompt_tokens + new.completion_tokens AS tokens, new.cost_usd,
           CASE WHEN m.limits ->> 'daily_tokens' IS NOT NULL THEN new.key_reserved ELSE 0 END AS reserved,
           CASE WHEN m.limits ->> 'daily_cost_usd' IS NOT NULL THEN new.key_cost_reserved ELSE 0 END
               AS cost_reserved,
           cardinality(h.ids) - c.pos AS depth, new.key_reserved AS held_tokens,
           new.key_cost_reserved AS held_cost, m.limits
    FROM new
    CROSS JOIN LATERAL (SELECT new.api_key_id || coalesce(
        (SELECT a.ancestors FROM api_keys a WHERE a.id = new.api_key_id), '{}'::uuid[]) AS ids) h
    CROSS JOIN LATERAL unnest(h.ids) WITH ORDINALITY AS c (key_id, pos)
    LEFT JOIN api_keys m ON m.id = c.key_id
    WHERE new.api_key_id IS NOT NULL
),
kx AS (
    SELECT key_id, day, sum(tokens) AS tokens, count(*) AS requests, sum(cost_usd) AS cost_usd,
           sum(reserved) AS reserved, sum(cost_reserved) AS cost_reserved, max(depth) AS depth
    FROM chain GROUP BY key_id, day
),
k AS (
    -- `reserved` is the amount to release, taken off a row that exists; a row made here held
    -- nothing (its key had no cap when admitted), so it starts at 0 (the column's default)
    INSERT INTO key_daily_usage AS k (api_key_id, day, tokens, requests, cost_usd)
    SELECT key_id, day, tokens, requests, cost_usd FROM kx ORDER BY depth DESC, key_id
    ON CONFLICT (api_key_id, day) DO UPDATE SET tokens = k.tokens + EXCLUDED.tokens,
        requests = k.requests + EXCLUDED.requests, cost_usd = k.cost_usd + EXCLUDED.cost_usd,
        reserved = greatest(k.reserved - (SELECT kx.reserved FROM kx
                                          WHERE kx.key_id = EXCLUDED.api_key_id AND kx.day = EXCLUDED.day), 0),
        cost_reserved = greatest(k.cost_reserved - (SELECT kx.cost_reserved FROM kx
                                                    WHERE kx.key_id = EXCLUDED.api_key_id AND kx.day = EXCLUDED.day), 0)
    RETURNING 1
),
dx AS (
    SELECT user_id, day, sum(prompt_tokens + completion_tokens) AS tokens, count(*) AS requests,
           sum(cost_usd) AS cost_usd, sum(user_reserved) AS reserved, sum(user_cost_reserved) AS cost_reserved
    FROM new GROUP BY user_id, day
),
d AS (
    -- the same for users (a user without a daily cap has no day row until the first settlement,
    -- which holds nothing); it reads k, so k (and its locks) come first
    INSERT INTO daily_usage AS d (user_id, day, tokens, requests, cost_usd)
    SELECT user_id, day, tokens, requests, cost_usd FROM dx WHERE (SELECT count(*) FROM k) >= 0
    ON CONFLICT (user_id, day) DO UPDATE SET tokens = d.tokens + EXCLUDED.tokens,
        requests = d.requests + EXCLUDED.requests, cost_usd = d.cost_usd + EXCLUDED.cost_usd,
        reserved = greatest(d.reserved - (SELECT dx.reserved FROM dx
                                          WHERE dx.user_id = EXCLUDED.user_id AND dx.day = EXCLUDED.day), 0),
        cost_reserved = greatest(d.cost_reserved - (SELECT dx.cost_reserved FROM dx
                                                    WHERE dx.user_id = EXCLUDED.user_id AND dx.day = EXCLUDED.day), 0)
    RETURNING 1
),
bx AS (
    -- the month and lifetime rows (sql/0018), after the day rows: each key of the chain (leaf first,
    -- its month before its total) releases what it held where its limits name that budget; then
    -- the user's (a user row without a budget holds nothing, and the release is floored at 0)
    SELECT subject, period, sum(tokens) AS tokens, count(*) AS requests, sum(cost_usd) AS cost_usd,
           sum(reserved) AS reserved, sum(cost_reserved) AS cost_reserved, max(ord) AS ord, max(w) AS w FROM (
        SELECT 'k:' || chain.key_id AS subject, p.period, chain.tokens, chain.cost_usd, chain.depth AS ord, p.w,
               CASE WHEN chain.limits ->> p.tkey IS NOT NULL THEN chain.held_tokens ELSE 0 END AS reserved,
               CASE WHEN chain.limits ->> p.ckey IS NOT NULL THEN chain.held_cost ELSE 0 END AS cost_reserved
        FROM chain CROSS JOIN LATERAL (
            VALUES (to_char(chain.day, 'YYYY-MM'), 'monthly_tokens', 'monthly_cost_usd', 0),
                   ('total', 'total_tokens', 'total_cost_usd', 1)) AS p (period, tkey, ckey, w)
        UNION ALL
        SELECT 'u:' || new.user_id, p.period, new.prompt_tokens + new.completion_tokens, new.cost_usd, -1, p.w,
               new.user_reserved, new.user_cost_reserved
        FROM new CROSS JOIN LATERAL (VALUES (to_char(new.day, 'YYYY-MM'), 0), ('total', 1)) AS p (period, w)
    ) x GROUP BY subject, period
),
b AS (
    -- a row made here held nothing (admission makes the rows of the budgets it reserves on), so it
    -- starts at 0; an existing row gives back what the replies held on it
    INSERT INTO budget_usage AS b (subject, period, tokens, requests, cost_usd)
    SELECT subject, period, tokens, requests, cost_usd FROM bx WHERE (SELECT count(*) FROM d) >= 0
    ORDER BY ord DESC, subject, w
    ON CONFLICT (subject, period) DO UPDATE SET tokens = b.tokens + EXCLUDED.tokens,
        requests = b.requests + EXCLUDED.requests, cost_usd = b.cost_usd + EXCLUDED.cost_usd,
        reserved = greatest(b.reserved - (SELECT bx.reserved FROM bx
                                          WHERE bx.subject = EXCLUDED.subject AND bx.period = EXCLUDED.period), 0),
        cost_reserved = greatest(b.cost_reserved - (
            SELECT bx.cost_reserved FROM bx WHERE bx.subject = EXCLUDED.subject AND bx.period = EXCLUDED.period), 0),
        -- the lifetime row says when its subject last spent (sql/0023: the webhook worker's scan)
        settled_at = CASE WHEN b.period = 'total' THEN now() ELSE b.settled_at END
),
q AS (
    -- a reply served from a quota lease (sql/0013): what it released comes off the lease's row too
    UPDATE quota_leases ql SET user_tokens = greatest(ql.user_tokens - x.ut, 0),
        key_tokens = greatest(ql.key_tokens - x.kt, 0), user_cost = greatest(ql.user_cost - x.uc, 0),
        key_cost = greatest(ql.key_cost - x.kc, 0)
    FROM (SELECT quota, sum(user_reserved) AS ut, sum(key_reserved) AS kt, sum(user_cost_reserved) AS uc,
                 sum(key_cost_reserved) AS kc FROM new WHERE quota IS NOT NULL GROUP BY quota) x
    WHERE ql.id = x.quota
)"""

_RECORD = "WITH " + USAGE_CTES + "\nSELECT (SELECT count(*) FROM u) AS usage"


@dataclass(slots=True, kw_only=True)
class UsageRecord:
    message_id: uuid.UUID  # the reply's id: an assistant message, or an OpenAI-route completion
    user_id: uuid.UUID
    api_key_id: uuid.UUID | None
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    estimated: bool
    cost_usd: float
    day: date  # the UTC day the request was admitted on: its usage counts there
    user_reserved: int = 0  # the admission's reservations, released by this record
    key_reserved: int = 0  # reserved on the key and on each ancestor with a daily cap (the same amount)
    user_cost_reserved: float = 0.0  # USD, against the daily cost caps, the same way
    key_cost_reserved: float = 0.0
    lease_id: uuid.UUID | None = None  # the admission's stream lease (concurrency caps), given back here
    quota_id: uuid.UUID | None = None  # the quota lease the reservations came from (policy.QuotaLeases)
    cached_tokens: int = 0  # of prompt_tokens: read from a prompt cache
    cache_write_tokens: int = 0  # of prompt_tokens: written to a prompt cache
    reasoning_tokens: int = 0  # of completion_tokens

    def least(self) -> UsageRecord | None:
        """The least that can be written in a record's place when the database refuses it for good:
        no tokens, no cost, flagged estimated, still settling what its admission holds. None for a
        record that is that already."""
        if self.estimated and not (self.prompt_tokens or self.completion_tokens or self.cost_usd):
            return None
        return replace(self, prompt_tokens=0, completion_tokens=0, cost_usd=0.0, estimated=True, cached_tokens=0,
                       cache_write_tokens=0, reasoning_tokens=0)

    def held(self) -> dict[str, Any] | None:
        """What the admission reserved, as the settlement reads it ($11)."""
        if not (self.user_reserved or self.key_reserved or self.user_cost_reserved or self.key_cost_reserved):
            return None
        held: dict[str, Any] = {"user_tokens": self.user_reserved, "key_tokens": self.key_reserved,
                                "user_cost": self.user_cost_reserved, "key_cost": self.key_cost_reserved}
        if self.quota_id is not None:
            held["quota"] = str(self.quota_id)
        return held

    def params(self) -> tuple[object, ...]:
        # by hand: dataclasses.astuple deep-copies every field, far too slow for a batch
        return (self.message_id, self.user_id, self.api_key_id, self.model, self.provider, self.prompt_tokens,
                self.completion_tokens, self.estimated, self.cost_usd, self.day, self.held(), self.lease_id,
                self.cached_tokens, self.cache_write_tokens, self.reasoning_tokens)


def usage_arrays(records: list[UsageRecord]) -> list[list[object]]:
    """The records as one array per field: the parameters of USAGE_CTES."""
    return [list(column) for column in zip(*(r.params() for r in records), strict=True)]


async def record_usage_many(pool: asyncpg.Pool | asyncpg.Connection, records: list[UsageRecord]) -> int:
    """A whole batch in one statement; returns how many usage rows were new."""
    new: int = await pool.fetchval(_RECORD, *usage_arrays(records))
    return new


class DayTotals(TypedDict):
    tokens: int
    reserved: int
    requests: int
    cost_usd: float


async def day_totals(pool: asyncpg.Pool, user_id: uuid.UUID, day: date) -> DayTotals:
    row = await pool.fetchrow("SELECT tokens, reserved, requests, cost_usd::float8 AS cost_usd FROM daily_usage "
                              "WHERE user_id = $1 AND day = $2", user_id, day)
    if row is None:
        return DayTotals(tokens=0, reserved=0, requests=0, cost_usd=0.0)
    return DayTotals(tokens=row["tokens"], reserved=row["reserved"], requests=row["requests"],
                     cost_usd=row["cost_usd"])


async def streams_running(pool: asyncpg.Pool, user_id: uuid.UUID) -> int:
    """The user's streams running now on every instance, as the stream cap counts them (stream_counts
    holds a row only for subjects whose cap is configured)."""
    streams: int | None = await pool.fetchval("SELECT streams FROM stream_counts WHERE subject = $1",
                                              f"u:{user_id}")
    return streams or 0


HIDDEN_MODEL = "(anonymous arena reply, vote pending)"
_REPORT = {
    # the two groupings differ only in their key; both read the usage rows of the range. By
    # model, a reply of an anonymous comparison not yet voted on must not give its model away.
    "day": "(u.created_at AT TIME ZONE 'UTC')::date",
    "key": "u.api_key_id",  # the reply's own key (null: a signed-in user's, without a key)
    "model": f"""CASE WHEN EXISTS (SELECT 1 FROM comparisons c WHERE c.anonymous AND c.winner IS NULL
                                   AND c.message_a = u.message_id)
                   OR EXISTS (SELECT 1 FROM comparisons c WHERE c.anonymous AND c.winner IS NULL
                                   AND c.message_b = u.message_id)
                 THEN '{HIDDEN_MODEL}' ELSE u.model END""",
}


async def usage_report(pool: asyncpg.Pool, user_id: uuid.UUID | None, start: date, end: date,
                       group_by: str) -> list[dict[str, Any]]:
    """Tokens, cost and requests per day, per model, per key, or per day and model or key ("day,model",
    "day,key") over
    [start, end] (UTC days) of one user (None: everybody, for the operator's CLI); each row's key
    columns are named by `group_by`, the others are prompt_tokens (split into input_tokens,
    cached_tokens and cache_write_tokens), completion_tokens (of which reasoning_tokens),
    total_tokens, cost_usd (float) and requests (int)."""
    names = group_by.split(",")
    # fixed expressions and names, never caller text
    keys = ", ".join(f"{_REPORT[name]} AS {name}" for name in names)
    order = ", ".join(str(i + 1) for i in range(len(names)))
    rows = await pool.fetch(f"""
        SELECT {keys}, sum(u.prompt_tokens)::bigint AS prompt_tokens,
               sum(u.completion_tokens)::bigint AS completion_tokens, sum(u.total_tokens)::bigint AS total_tokens,
               sum(u.input_tokens)::bigint AS input_tokens, sum(u.cached_tokens)::bigint AS cached_tokens,
               sum(u.cache_write_tokens)::bigint AS cache_write_tokens,
               sum(u.reasoning_tokens)::bigint AS reasoning_tokens,
               sum(u.cost_usd)::float8 AS cost_usd, sum(u.requests)::bigint AS requests
        FROM (SELECT message_id, created_at, api_key_id, model, prompt_tokens, completion_tokens, total_tokens,
                     input_tokens, cached_tokens, cache_write_tokens, reasoning_tokens, cost_usd, 1 AS requests
              FROM usage
              WHERE ($1::uuid IS NULL OR user_id = $1) AND created_at >= ($2::date)::timestamp AT TIME ZONE 'UTC'
                AND created_at < ($3::date + 1)::timestamp AT TIME ZONE 'UTC'
              UNION ALL  -- everybody's report: erased users' usage, as totals naming nobody
              SELECT NULL, day::timestamp AT TIME ZONE 'UTC', NULL, model, prompt_tokens, completion_tokens,
                     total_tokens, prompt_tokens - cached_tokens - cache_write_tokens, cached_tokens,
                     cache_write_tokens, reasoning_tokens, cost_usd, requests
              FROM erased_usage
              WHERE $1::uuid IS NULL AND day BETWEEN $2 AND $3) u
        GROUP BY {order} ORDER BY {order}""", user_id, start, end)
    return [dict(r) for r in rows]


async def key_spend(pool: asyncpg.Pool, key_ids: list[uuid.UUID], user_id: uuid.UUID | None,
                    day: date) -> dict[uuid.UUID, dict[str, dict[str, Any]]]:
    """What each key (of `user_id`; None: anybody's, for the operator) has spent: on `day`, in its
    UTC month and in its whole life, in tokens and USD. A key's totals include its descendants'
    (sql/0008_key_tree.sql); what replies still running hold is not counted."""
    rows = await pool.fetch("""
        SELECT k.id, coalesce(d.tokens, 0) AS day_tokens, coalesce(d.cost_usd, 0)::float8 AS day_cost,
               coalesce(m.tokens, 0) AS month_tokens, coalesce(m.cost_usd, 0)::float8 AS month_cost,
               coalesce(t.tokens, 0) AS total_tokens, coalesce(t.cost_usd, 0)::float8 AS total_cost
        FROM api_keys k
        LEFT JOIN key_daily_usage d ON d.api_key_id = k.id AND d.day = $3
        LEFT JOIN budget_usage m ON m.subject = 'k:' || k.id AND m.period = $4
        LEFT JOIN budget_usage t ON t.subject = 'k:' || k.id AND t.period = 'total'
        WHERE k.id = ANY($1::uuid[]) AND ($2::uuid IS NULL OR k.user_id = $2)""",
        key_ids, user_id, day, f"{day.year:04d}-{day.month:02d}")
    return {r["id"]: {"today": {"tokens": r["day_tokens"], "cost_usd": r["day_cost"]},
                      "month": {"tokens": r["month_tokens"], "cost_usd": r["month_cost"]},
                      "total": {"tokens": r["total_tokens"], "cost_usd": r["total_cost"]}} for r in rows}


# one line per reply, in this order (GET /api/usage/export, `python -m gateway usage export`)
EXPORT_COLUMNS = ("message_id", "created_at", "user_id", "api_key_id", "model", "provider", "prompt_tokens",
                  "input_tokens", "cached_tokens", "cache_write_tokens", "completion_tokens", "reasoning_tokens",
                  "total_tokens", "estimated", "cost_usd")
EXPORT_BATCH = 500


async def export_usage(pool: asyncpg.Pool, user_id: uuid.UUID | None, start: date, end: date, *,
                       hide_pending: bool) -> AsyncGenerator[list[asyncpg.Record], None]:
    """The usage rows of [start, end] (UTC days) of one user (None: everybody), oldest first, in
    batches read from a cursor, so an export of any size holds one batch in memory. `hide_pending`:
    a reply of an anonymous comparison not yet voted on does not give its model away (as
    usage_report by model). Close the iterator (contextlib.aclosing) to end early."""
    model = _REPORT["model"] if hide_pending else "u.model"
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        cursor = await conn.cursor(f"""
            SELECT u.message_id, u.created_at, u.user_id, u.api_key_id, {model} AS model, u.provider,
                   u.prompt_tokens, u.input_tokens, u.cached_tokens, u.cache_write_tokens, u.completion_tokens,
                   u.reasoning_tokens, u.total_tokens, u.estimated, u.cost_usd::float8 AS cost_usd
            FROM usage u
            WHERE ($1::uuid IS NULL OR u.user_id = $1) AND u.created_at >= ($2::date)::timestamp AT TIME ZONE 'UTC'
              AND u.created_at < ($3::date + 1)::timestamp AT TIME ZONE 'UTC'
            ORDER BY u.created_at, u.message_id""", user_id, start, end)
        while rows := await cursor.fetch(EXPORT_BATCH):
            yield rows


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def export_lines(rows: list[dict[str, object]], fmt: str, *, header: bool = False) -> bytes:
    """Usage rows as CSV (with the header line first when `header`) or as one JSON object per line."""
    if fmt == "ndjson":
        return b"".join(orjson.dumps(row) + b"\n" for row in rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(EXPORT_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in EXPORT_COLUMNS])
    return out.getvalue().encode()
