"""SQL for retention: threads untouched for `[retention] threads_days` are deleted, a batch at a time.

A thread goes with its messages and comparisons (their votes too: the foreign keys cascade), oldest
activity first. Usage rows stay: they name no thread and are what was billed. A thread with a reply
still live (pending or streaming) is kept, however old its activity, and so is one a concurrent
statement holds (`SKIP LOCKED`: a new turn touching it wins, the thread is seen again next round).
Only one instance prunes at a time: each batch runs under a transaction-level advisory lock that
the others try and skip (a transaction lock: it works through a pooler in transaction mode).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from gateway.vocabulary import LIVE_STATUSES

log = logging.getLogger(__name__)

RETENTION_LOCK = 0x67617465_72657400  # pg_try_advisory_xact_lock key ("gateret")

_LIVE = sorted(LIVE_STATUSES)

_PRUNE = """
WITH old AS (
    SELECT t.id FROM threads t
    WHERE t.updated_at < clock_timestamp() - make_interval(days => $1)
      AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.thread_id = t.id AND m.status = ANY($3::text[]))
    ORDER BY t.updated_at
    LIMIT $2
    FOR UPDATE OF t SKIP LOCKED
)
DELETE FROM threads WHERE id IN (SELECT id FROM old)
"""


async def prune_batch(pool: asyncpg.Pool, threads_days: int, batch: int) -> int:
    """Delete up to `batch` threads untouched for `threads_days` days; how many went (0 also when
    another instance holds the lock)."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RETENTION_LOCK):
            return 0
        status = await conn.execute(_PRUNE, threads_days, batch, _LIVE)
    return int(status.split()[-1])


class Pruner:
    """The background task: every `interval_s`, batches until a batch comes back short (or the
    task is closed); a failed round is logged and the next one tries again."""

    def __init__(self, pool: asyncpg.Pool, threads_days: int | None, *, batch: int = 500,
                 interval_s: float = 60.0) -> None:
        self._pool = pool
        self._days = threads_days
        self._batch = batch
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self.pruned = 0  # threads this instance deleted

    def start(self) -> None:
        if self._days is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="retention")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def prune(self) -> int:
        """One round: batches until one is short; the threads deleted."""
        assert self._days is not None
        total = 0
        while True:
            done = await prune_batch(self._pool, self._days, self._batch)
            total += done
            self.pruned += done
            if done < self._batch:
                return total

    async def _run(self) -> None:
        while True:
            try:
                pruned = await self.prune()
                if pruned:
                    log.info("retention: deleted %d threads untouched for %d days", pruned, self._days)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention: a round failed; the next one tries again")
            await asyncio.sleep(self._interval)
