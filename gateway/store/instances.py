"""SQL for instances among their peers: cancel notifications, who owns live rows, and the
advisory locks that tell a live instance from a dead one (see gateway/fleet/instance.py)."""

from __future__ import annotations

import uuid

import asyncpg

from gateway.vocabulary import LIVE_STATUSES, MessageStatus

CANCEL_CHANNEL = "gateway_cancel"

# as text[]: the statuses are parameters, never SQL text. (The planner still uses the partial
# index messages_live: the parameter's value is known when it plans, and a generic plan that
# could not use the index would cost far more, so it keeps planning per call.)
_LIVE = sorted(LIVE_STATUSES)

# The sweeper's mark carries {"swept": true}: if the owner was only cut off from the database
# (not dead), its own finish write may still replace the mark with the real outcome.
_SWEPT = {"swept": True, "finish_reason": MessageStatus.INTERRUPTED}
_INTERRUPT_DEAD = """
UPDATE messages SET status = $2, finished_at = clock_timestamp(), metadata = metadata || $3::jsonb
WHERE instance_id = $1 AND status = ANY($4::text[])
RETURNING id, user_id, content, metadata -> 'reservation' AS reservation
"""
# what a swept reply consumed, estimated: shown by its replayed `usage` event (flagged estimated)
_SET_USAGE = """
UPDATE messages m SET prompt_tokens = x.prompt, completion_tokens = x.completion,
    metadata = m.metadata - 'reservation' || '{"estimated": true}'
FROM unnest($1::uuid[], $2::integer[], $3::integer[]) AS x(id, prompt, completion)
WHERE m.id = x.id
"""


def lock_key(instance_id: uuid.UUID) -> int:
    # a signed 64-bit advisory lock key from the id
    return int.from_bytes(instance_id.bytes[:8], "big", signed=True)


async def notify_cancel(pool: asyncpg.Pool, message_id: uuid.UUID) -> None:
    """Ask whichever instance runs the reply to cancel it (it LISTENs on CANCEL_CHANNEL)."""
    await pool.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, str(message_id))


async def live_owners(pool: asyncpg.Pool, exclude: uuid.UUID) -> list[uuid.UUID]:
    """The instances, other than `exclude`, that own live (pending or streaming) messages."""
    rows = await pool.fetch("SELECT DISTINCT instance_id FROM messages WHERE status = ANY($2::text[]) "
                            "AND instance_id IS NOT NULL AND instance_id <> $1", exclude, _LIVE)
    return [row["instance_id"] for row in rows]


async def interrupt_dead(conn: asyncpg.Connection, owner: uuid.UUID) -> list[asyncpg.Record]:
    """Mark `owner`'s live messages interrupted (swept); returns them (id, user_id, content as last
    checkpointed, and the reservation their admission made)."""
    return list(await conn.fetch(_INTERRUPT_DEAD, owner, MessageStatus.INTERRUPTED, _SWEPT, _LIVE))


async def set_estimated_usage(conn: asyncpg.Connection, usage: list[tuple[uuid.UUID, int, int]]) -> None:
    """(message id, prompt tokens, completion tokens) of swept replies, estimated."""
    await conn.execute(_SET_USAGE, [u[0] for u in usage], [u[1] for u in usage], [u[2] for u in usage])


async def hold_lock(conn: asyncpg.Connection, instance_id: uuid.UUID) -> None:
    """Take the instance's session lock on `conn` (waits): held for the life of that connection."""
    await conn.execute("SELECT pg_advisory_lock($1)", lock_key(instance_id))


async def try_lock(conn: asyncpg.Connection, instance_id: uuid.UUID) -> bool:
    """Inside a transaction: take the instance's lock until it ends, if nobody holds it — true means
    its owner is gone. A transaction lock, so a pooler in transaction pooling may carry it."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", lock_key(instance_id)))


async def ping(conn: asyncpg.Connection) -> None:
    await conn.fetchval("SELECT 1")
