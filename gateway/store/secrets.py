"""SQL for gateway_secrets: named keys every instance shares (e.g. the stream-token signing key)."""

from __future__ import annotations

import asyncpg


async def shared_secret(pool: asyncpg.Pool, name: str, candidate: bytes) -> bytes:
    """The secret called `name`: `candidate` if this call stored it first, else the one already stored.

    Two statements, not one: a single INSERT ... ON CONFLICT + SELECT reads one snapshot, which
    may not show a row another instance committed while this one waited on the conflict.
    """
    await pool.execute("INSERT INTO gateway_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                       name, candidate)
    value: bytes = await pool.fetchval("SELECT value FROM gateway_secrets WHERE name = $1", name)
    return value
