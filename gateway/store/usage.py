"""SQL for usage: one row per reply (primary key = the reply's id) and the running daily totals."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date

import asyncpg

# CTEs shared by every writer of usage: parameters $1..$12 are one array per UsageRecord field
# (a single finish passes arrays of one). A usage row is inserted only if absent, and the daily
# totals (per user and per key, summed per day) move only by the rows that were new: replaying
# records changes nothing. The same step settles each reply's reservation: the worst case
# reserved at admission is released and the real usage counted instead, on the admission day.
# Set-based, so a batch costs the database one statement and one upsert per (user, day).
USAGE_CTES = """
r AS (
    SELECT DISTINCT ON (message_id) * FROM unnest(
        $1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::integer[], $7::integer[],
        $8::boolean[], $9::numeric[], $10::date[], $11::bigint[], $12::bigint[])
    AS r(message_id, user_id, api_key_id, model, provider, prompt_tokens, completion_tokens, estimated,
         cost_usd, day, user_reserved, key_reserved)
),
u AS (
    INSERT INTO usage (message_id, user_id, api_key_id, model, provider, prompt_tokens, completion_tokens,
                       total_tokens, estimated, cost_usd)
    SELECT message_id, user_id, api_key_id, model, provider, prompt_tokens, completion_tokens,
           prompt_tokens + completion_tokens, estimated, cost_usd FROM r
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
),
new AS (SELECT r.* FROM r JOIN u USING (message_id)),
d AS (
    -- `reserved` carries the amount to release; a reservation always made its day's row first,
    -- so a row created here has nothing reserved (the amount is 0)
    INSERT INTO daily_usage AS d (user_id, day, tokens, requests, cost_usd, reserved)
    SELECT user_id, day, sum(prompt_tokens + completion_tokens), count(*), sum(cost_usd), sum(user_reserved)
    FROM new GROUP BY user_id, day
    ON CONFLICT (user_id, day) DO UPDATE SET tokens = d.tokens + EXCLUDED.tokens,
        requests = d.requests + EXCLUDED.requests, cost_usd = d.cost_usd + EXCLUDED.cost_usd,
        reserved = greatest(d.reserved - EXCLUDED.reserved, 0)
),
k AS (
    INSERT INTO key_daily_usage AS k (api_key_id, day, tokens, requests, cost_usd, reserved)
    SELECT api_key_id, day, sum(prompt_tokens + completion_tokens), count(*), sum(cost_usd), sum(key_reserved)
    FROM new WHERE api_key_id IS NOT NULL GROUP BY api_key_id, day
    ON CONFLICT (api_key_id, day) DO UPDATE SET tokens = k.tokens + EXCLUDED.tokens,
        requests = k.requests + EXCLUDED.requests, cost_usd = k.cost_usd + EXCLUDED.cost_usd,
        reserved = greatest(k.reserved - EXCLUDED.reserved, 0)
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
    key_reserved: int = 0

    def params(self) -> tuple[object, ...]:
        # by hand: dataclasses.astuple deep-copies every field, far too slow for a batch
        return (self.message_id, self.user_id, self.api_key_id, self.model, self.provider, self.prompt_tokens,
                self.completion_tokens, self.estimated, self.cost_usd, self.day, self.user_reserved,
                self.key_reserved)


def usage_arrays(records: list[UsageRecord]) -> list[list[object]]:
    """The records as one array per field: the parameters of USAGE_CTES."""
    return [list(column) for column in zip(*(r.params() for r in records))]


async def record_usage_many(pool: asyncpg.Pool | asyncpg.Connection, records: list[UsageRecord]) -> int:
    """A whole batch in one statement; returns how many usage rows were new."""
    return await pool.fetchval(_RECORD, *usage_arrays(records))


async def day_totals(pool: asyncpg.Pool, user_id: uuid.UUID, day: date) -> dict[str, object]:
    row = await pool.fetchrow("SELECT tokens, reserved, requests, cost_usd::float8 AS cost_usd FROM daily_usage "
                              "WHERE user_id = $1 AND day = $2", user_id, day)
    return dict(row) if row else {"tokens": 0, "reserved": 0, "requests": 0, "cost_usd": 0.0}


HIDDEN_MODEL = "(anonymous arena reply, vote pending)"
_REPORT = {
    # the two groupings differ only in their key; both read the usage rows of the range. By
    # model, a reply of an anonymous comparison not yet voted on must not give its model away.
    "day": "(u.created_at AT TIME ZONE 'UTC')::date",
    "model": f"""CASE WHEN EXISTS (SELECT 1 FROM comparisons c WHERE c.anonymous AND c.winner IS NULL
                                   AND c.message_a = u.message_id)
                   OR EXISTS (SELECT 1 FROM comparisons c WHERE c.anonymous AND c.winner IS NULL
                                   AND c.message_b = u.message_id)
                 THEN '{HIDDEN_MODEL}' ELSE u.model END""",
}


async def usage_report(pool: asyncpg.Pool, user_id: uuid.UUID, start: date, end: date,
                       group_by: str) -> list[dict[str, object]]:
    """Tokens, cost and requests per day or per model over [start, end] (UTC days)."""
    key = _REPORT[group_by]  # one of two fixed expressions, never caller text
    rows = await pool.fetch(f"""
        SELECT {key} AS {group_by}, sum(u.prompt_tokens)::bigint AS prompt_tokens,
               sum(u.completion_tokens)::bigint AS completion_tokens, sum(u.total_tokens)::bigint AS total_tokens,
               sum(u.cost_usd)::float8 AS cost_usd, count(*) AS requests
        FROM usage u
        WHERE u.user_id = $1 AND u.created_at >= ($2::date)::timestamp AT TIME ZONE 'UTC'
          AND u.created_at < ($3::date + 1)::timestamp AT TIME ZONE 'UTC'
        GROUP BY 1 ORDER BY 1""", user_id, start, end)
    return [dict(r) for r in rows]
