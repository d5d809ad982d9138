"""This process among its peers on one database.

Each instance has an id and holds a session-level advisory lock on it for its whole life, on
a connection of its own: PostgreSQL releases the lock when the process dies, so "can I take
that instance's lock?" is an exact liveness test with no heartbeat table. The same connection
LISTENs for requests addressed to whichever instance runs a generation (cancel), and for API
key revocations, which every instance drops from its key cache.

A periodic sweep marks the live rows of dead instances `interrupted` (crash recovery) and
replays the finish journal once the database answers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Callable

import asyncpg

from .journal import FinishJournal
from .store.keys import REVOKED_CHANNEL as KEY_REVOKED_CHANNEL

log = logging.getLogger(__name__)

CANCEL_CHANNEL = "gateway_cancel"

# The sweeper's mark carries {"swept": true}: if the owner was only cut off from the database
# (not dead), its own finish write may still replace the mark with the real outcome.
_INTERRUPT_DEAD = """
UPDATE messages SET status = 'interrupted', finished_at = clock_timestamp(),
    metadata = metadata || '{"swept": true, "finish_reason": "interrupted"}'
WHERE instance_id = $1 AND status IN ('pending', 'streaming')
"""


def lock_key(instance_id: uuid.UUID) -> int:
    # a signed 64-bit advisory lock key from the id
    return int.from_bytes(instance_id.bytes[:8], "big", signed=True)


class Instance:
    def __init__(self, url: str, pool: asyncpg.Pool, journal: FinishJournal,
                 on_cancel: Callable[[uuid.UUID], None], sweep_s: float = 15.0, *,
                 on_key_revoked: Callable[[bytes], None] | None = None,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        self.id = uuid.uuid4()
        self._url = url
        self._pool = pool
        self._journal = journal
        self._on_cancel = on_cancel
        self._on_key_revoked = on_key_revoked
        self._on_reconnect = on_reconnect  # notifications sent while we were cut off are lost
        self._sweep_s = sweep_s
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._connect()
        await self.sweep()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="instance-sweeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()

    async def notify_cancel(self, message_id: uuid.UUID) -> None:
        await self._pool.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, str(message_id))

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._url)
        await conn.execute("SELECT pg_advisory_lock($1)", lock_key(self.id))
        await conn.add_listener(CANCEL_CHANNEL, self._notified)
        if self._on_key_revoked is not None:
            await conn.add_listener(KEY_REVOKED_CHANNEL, self._key_revoked)
        self._conn = conn

    async def _ensure_connection(self) -> None:
        """If the database dropped our connection (a restart), our lock went with it: take it
        back at once, before a peer's sweep takes us for dead."""
        if self._conn is not None and not self._conn.is_closed():
            try:
                await self._conn.fetchval("SELECT 1")
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self._conn.terminate()
        await self._connect()
        if self._on_reconnect is not None:
            self._on_reconnect()

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            self._on_cancel(uuid.UUID(payload))
        except ValueError:
            log.warning("ignored a malformed %s notification", channel)

    def _key_revoked(self, conn: object, pid: int, channel: str, payload: str) -> None:
        assert self._on_key_revoked is not None
        try:
            self._on_key_revoked(bytes.fromhex(payload))
        except ValueError:
            log.warning("ignored a malformed %s notification", channel)

    async def sweep(self) -> None:
        """Interrupt the live rows of instances that are gone; replay the journal."""
        owners = await self._pool.fetch(
            "SELECT DISTINCT instance_id FROM messages WHERE status IN ('pending', 'streaming') "
            "AND instance_id IS DISTINCT FROM $1", self.id)
        for row in owners:
            owner = row["instance_id"]
            if owner is None:
                continue
            await self._interrupt_if_dead(owner)
        if self._journal.pending():
            await self._journal.replay(self._pool)

    async def _interrupt_if_dead(self, owner: uuid.UUID) -> None:
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(owner)):
                return  # alive: it holds its own lock
            try:
                swept = await conn.execute(_INTERRUPT_DEAD, owner)
                log.warning("instance %s is gone: %s", owner, swept)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", lock_key(owner))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            try:
                await self._ensure_connection()
                await self.sweep()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("instance sweep failed: %s", type(e).__name__)

