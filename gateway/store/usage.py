"""SQL for usage: one row per reply (primary key = the reply's id) and the running daily totals."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date

import asyncpg

# CTEs shared by every writer of usage, parameters $1..$12 in UsageRecord order. The usage row
# is inserted only if absent, and the daily totals (per user, per key) move only when it was:
# replaying the same record changes nothing. The same step settles the reply's reservation:
# the worst case reserved at admission is released and the real usage counted instead, on the
# day the reservation was made.
USAGE_CTES = """
u AS (
    INSERT INTO usage (message_id, user_id, api_key_id, model, provider, prompt_tokens, completion_tokens,
                       total_tokens, estimated, cost_usd)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $6::integer + $7::integer, $8, $9)
    ON CONFLICT (message_id) DO NOTHING
    RETURNING user_id, api_key_id, total_tokens, cost_usd
),
d AS (
    INSERT INTO daily_usage AS d (user_id, day, tokens, requests, cost_usd)
    SELECT user_id, $10::date, total_tokens, 1, cost_usd FROM u
    ON CONFLICT (user_id, day) DO UPDATE SET tokens = d.tokens + EXCLUDED.tokens,
        requests = d.requests + 1, cost_usd = d.cost_usd + EXCLUDED.cost_usd,
        reserved = greatest(d.reserved - $11::bigint, 0)
),
k AS (
    INSERT INTO key_daily_usage AS k (api_key_id, day, tokens, requests, cost_usd)
    SELECT api_key_id, $10::date, total_tokens, 1, cost_usd FROM u WHERE api_key_id IS NOT NULL
    ON CONFLICT (api_key_id, day) DO UPDATE SET tokens = k.tokens + EXCLUDED.tokens,
        requests = k.requests + 1, cost_usd = k.cost_usd + EXCLUDED.cost_usd,
        reserved = greatest(k.reserved - $12::bigint, 0)
)"""

_RECORD = "WITH " + USAGE_CTES + "\nSELECT (SELECT count(*) FROM u) AS usage"


@dataclass(slots=True)
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
        return (self.message_id, self.user_id, self.api_key_id, self.model, self.provider, self.prompt_tokens,
                self.completion_tokens, self.estimated, self.cost_usd, self.day, self.user_reserved,
                self.key_reserved)


async def record_usage_many(pool: asyncpg.Pool, records: list[UsageRecord]) -> None:
    """A batch in one transaction, pipelined (asyncpg executemany): one round trip for many rows."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(_RECORD, [r.params() for r in records])


async def day_totals(pool: asyncpg.Pool, user_id: uuid.UUID, day: date) -> dict[str, object]:
    row = await pool.fetchrow("SELECT tokens, reserved, requests, cost_usd::float8 AS cost_usd FROM daily_usage "
                              "WHERE user_id = $1 AND day = $2", user_id, day)
    return dict(row) if row else {"tokens": 0, "reserved": 0, "requests": 0, "cost_usd": 0.0}


_REPORT = {
    # the two groupings differ only in their key; both read the usage rows of the range
    "day": "(created_at AT TIME ZONE 'UTC')::date",
    "model": "model",
}


async def usage_report(pool: asyncpg.Pool, user_id: uuid.UUID, start: date, end: date,
                       group_by: str) -> list[dict[str, object]]:
    """Tokens, cost and requests per day or per model over [start, end] (UTC days)."""
    key = _REPORT[group_by]  # one of two fixed expressions, never caller text
    rows = await pool.fetch(f"""
        SELECT {key} AS {group_by}, sum(prompt_tokens)::bigint AS prompt_tokens,
               sum(completion_tokens)::bigint AS completion_tokens, sum(total_tokens)::bigint AS total_tokens,
               sum(cost_usd)::float8 AS cost_usd, count(*) AS requests
        FROM usage
        WHERE user_id = $1 AND created_at >= ($2::date)::timestamp AT TIME ZONE 'UTC'
          AND created_at < ($3::date + 1)::timestamp AT TIME ZONE 'UTC'
        GROUP BY 1 ORDER BY 1""", user_id, start, end)
    return [dict(r) for r in rows]
