"""SQL for admission: per-minute request windows and daily token reservations (per user, per key).

`admit` is one call to `gateway_admit` (sql/0003_policy.sql, redefined in sql/0007_admit_codes.sql):
it takes the request's rate-window slots and reserves its worst case atomically, or changes
nothing and raises `LimitReached` naming the limit, read from the function's SQLSTATE.
"""

from __future__ import annotations

import uuid
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


async def admit(pool: asyncpg.Pool, *, user_id: uuid.UUID, api_key_id: uuid.UUID | None, day: date,
                window: datetime, user_rpm: int | None, key_rpm: int | None, want: int,
                user_cap: int | None, key_cap: int | None, share: int) -> int:
    """Take one slot in each per-minute window and reserve up to `want` tokens against each daily
    cap (a None limit is skipped); returns the tokens reserved (`want` when no cap applies)."""
    try:
        granted: int = await pool.fetchval(
            "SELECT gateway_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", user_id, api_key_id, day, window,
            user_rpm, key_rpm, want, user_cap, key_cap, share)
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


async def release(pool: asyncpg.Pool, *, user_id: uuid.UUID, api_key_id: uuid.UUID | None, day: date,
                  user_tokens: int, key_tokens: int) -> None:
    """Hand back reservations of a request that never ran (both caps in one transaction)."""
    if not user_tokens and not (key_tokens and api_key_id is not None):
        return
    async with pool.acquire() as conn, conn.transaction():
        if user_tokens:
            await conn.execute("UPDATE daily_usage SET reserved = greatest(reserved - $3, 0) "
                               "WHERE user_id = $1 AND day = $2", user_id, day, user_tokens)
        if key_tokens and api_key_id is not None:
            await conn.execute("UPDATE key_daily_usage SET reserved = greatest(reserved - $3, 0) "
                               "WHERE api_key_id = $1 AND day = $2", api_key_id, day, key_tokens)
