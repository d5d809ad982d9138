"""SQL for admission: per-minute request windows and daily token reservations (per user, per key).

`admit` is one call to `gateway_admit_chain` (sql/0008_key_tree.sql; gateway_admit of
sql/0003_policy.sql and sql/0007_admit_codes.sql for a whole key tree): it takes the request's
rate-window slots and reserves its worst case atomically, for the user and for the caller's key
and every ancestor of it that has limits, or changes nothing and raises `LimitReached` naming
the limit, read from the function's SQLSTATE.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum

import asyncpg


class Limit(StrEnum):
    """A limit `gateway_admit` enforces; the value is the name its error message carries."""

    USER_REQUESTS_PER_MINUTE = "user_requests_per_minute"
    KEY_REQUESTS_PER_MINUTE = "key_requests_per_minute"
    USER_DAILY_TOKENS = "user_daily_tokens"
    KEY_DAILY_TOKENS = "key_daily_tokens"

    @property
    def per_minute(self) -> bool:
        return self in (Limit.USER_REQUESTS_PER_MINUTE, Limit.KEY_REQUESTS_PER_MINUTE)


# the one mapping from gateway_admit's SQLSTATEs to limits (the table in sql/0007_admit_codes.sql)
SQLSTATES: dict[str, Limit] = {
    "GW4R1": Limit.USER_REQUESTS_PER_MINUTE,
    "GW4R2": Limit.KEY_REQUESTS_PER_MINUTE,
    "GW4D1": Limit.USER_DAILY_TOKENS,
    "GW4D2": Limit.KEY_DAILY_TOKENS,
}


class LimitReached(Exception):
    """`gateway_admit` refused: `limit` is full. Nothing was taken or reserved."""

    def __init__(self, limit: Limit) -> None:
        super().__init__(limit.value)
        self.limit = limit


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyCap:
    """One key's limits in an admission: the caller's key, or one of its ancestors."""

    key_id: uuid.UUID
    rpm: int | None  # requests per minute (None: no limit)
    daily: int | None  # tokens per UTC day (None: no cap)


async def admit(pool: asyncpg.Pool, *, user_id: uuid.UUID, keys: Sequence[KeyCap], day: date, window: datetime,
                user_rpm: int | None, want: int, user_cap: int | None, share: int) -> int:
    """Take one slot in each per-minute window and reserve up to `want` tokens against each daily
    cap (a None limit is skipped), the user's and those of `keys` (the caller's key first, then
    its ancestors, root last); returns the tokens reserved (`want` when no cap applies). Every
    capped key reserves the same amount, the one returned."""
    try:
        granted: int = await pool.fetchval(
            "SELECT gateway_admit_chain($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", user_id,
            [k.key_id for k in keys], day, window, user_rpm, [k.rpm for k in keys], want, user_cap,
            [k.daily for k in keys], share)
    except asyncpg.PostgresError as e:
        limit = SQLSTATES.get(getattr(e, "sqlstate", None) or "")
        if limit is None:
            raise
        raise LimitReached(limit) from None
    return granted


async def user_day_committed(pool: asyncpg.Pool, user_id: uuid.UUID, day: date) -> int:
    """The user's tokens for `day`: spent plus reserved by replies still running."""
    used: int | None = await pool.fetchval(
        "SELECT tokens + reserved FROM daily_usage WHERE user_id = $1 AND day = $2", user_id, day)
    return used or 0


# The keys that hold a request's key reservation: its key and each ancestor with a daily cap (the
# same rule as the settlement in store/usage.py). Locked leaf first, then released: the order
# gateway_admit_chain locks them in, so a release never deadlocks with an admission.
_RELEASE_KEYS = """
WITH chain AS (
    SELECT c.id, c.pos FROM api_keys k, unnest(k.id || k.ancestors) WITH ORDINALITY AS c (id, pos)
    WHERE k.id = $1
),
held AS (
    SELECT d.api_key_id FROM key_daily_usage d JOIN chain ON chain.id = d.api_key_id
    JOIN api_keys m ON m.id = d.api_key_id
    WHERE d.day = $2 AND m.limits ->> 'daily_tokens' IS NOT NULL
    ORDER BY chain.pos FOR UPDATE OF d
)
UPDATE key_daily_usage d SET reserved = greatest(d.reserved - $3, 0)
FROM held WHERE d.api_key_id = held.api_key_id AND d.day = $2"""


async def release(pool: asyncpg.Pool, *, user_id: uuid.UUID, api_key_id: uuid.UUID | None, day: date,
                  user_tokens: int, key_tokens: int) -> None:
    """Hand back reservations of a request that never ran: the user's, and those of its key and of
    each ancestor that has a daily cap (all in one transaction, keys before the user, as admitted)."""
    if not user_tokens and not (key_tokens and api_key_id is not None):
        return
    async with pool.acquire() as conn, conn.transaction():
        if key_tokens and api_key_id is not None:
            await conn.execute(_RELEASE_KEYS, api_key_id, day, key_tokens)
        if user_tokens:
            await conn.execute("UPDATE daily_usage SET reserved = greatest(reserved - $3, 0) "
                               "WHERE user_id = $1 AND day = $2", user_id, day, user_tokens)


async def headroom(pool: asyncpg.Pool, *, subjects: Sequence[str], window: datetime, user_id: uuid.UUID,
                   day: date, keys: Sequence[uuid.UUID]) -> tuple[list[int], int, list[int]]:
    """What is taken now: requests in each subject's current window ('u:<user>' / 'k:<key>'), the
    user's tokens today (spent + reserved) and each key's. For the rate-limit headers of a request
    just admitted (api/ratelimits.py); read-only."""
    row = await pool.fetchrow("""
        SELECT ARRAY(SELECT coalesce((SELECT w.count FROM rate_windows w
                                      WHERE w.subject = s.subject AND w.window_start = $2), 0)
                     FROM unnest($1::text[]) WITH ORDINALITY AS s (subject, pos) ORDER BY s.pos) AS windows,
               coalesce((SELECT tokens + reserved FROM daily_usage WHERE user_id = $3 AND day = $4), 0) AS user_day,
               ARRAY(SELECT coalesce((SELECT d.tokens + d.reserved FROM key_daily_usage d
                                      WHERE d.api_key_id = k.id AND d.day = $4), 0)
                     FROM unnest($5::uuid[]) WITH ORDINALITY AS k (id, pos) ORDER BY k.pos) AS key_days""",
        list(subjects), window, user_id, day, list(keys))
    return list(row["windows"]), int(row["user_day"]), [int(v) for v in row["key_days"]]
