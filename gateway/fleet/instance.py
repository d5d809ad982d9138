"""This process among its peers on one database.

Each instance has an id and holds a session-level advisory lock on it for its whole life, on
a connection of its own: PostgreSQL releases the lock when the process dies, so "can I take
that instance's lock?" is an exact liveness test with no heartbeat table. The same connection
LISTENs for requests addressed to whichever instance runs a generation (cancel), for API key
revocations, which every instance drops from its key cache, and for quota recalls (a peer needs
a user's quota that this instance's slices hold: gateway/policy/quota.py).

A periodic sweep marks the live rows of dead instances `interrupted` (crash recovery), gives
back the stream leases and the quota slices they held (caps hold across instances), replays the finish
journal once the database answers, and deletes rate windows past their minute. The sweep loop never dies: whatever a
round raises (but cancellation) is classified, logged, and the next round comes sooner after
a transient failure, backing off while it lasts. Neither a sweep nor the journal can keep the
instance from starting.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from gateway.providers.base import estimate_tokens
from gateway.store import instances as sql
from gateway.store import limits as limits_sql
from gateway.store.failures import Failure, classify
from gateway.store.instances import CANCEL_CHANNEL, lock_key
from gateway.store.keys import REVOKED_CHANNEL as KEY_REVOKED_CHANNEL
from gateway.store.usage import UsageRecord, record_usage_many

log = logging.getLogger(__name__)

__all__ = ["CANCEL_CHANNEL", "Instance", "lock_key"]  # where callers found them before the SQL moved


class Instance:
    RETRY_S = 0.5  # the first retry after a failed sweep; doubles up to the sweep interval

    def __init__(self, url: str, pool: asyncpg.Pool, replay: Callable[[], Awaitable[object]],
                 on_cancel: Callable[[uuid.UUID], object], sweep_s: float = 15.0, *,
                 on_key_revoked: Callable[[bytes], None] | None = None,
                 on_reconnect: Callable[[], None] | None = None,
                 on_quota_recall: Callable[[uuid.UUID], None] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.id = uuid.uuid4()
        self._clock = clock  # for the rate windows' age
        self._url = url
        self._pool = pool
        self._replay = replay  # re-applies the finish journal
        self._on_cancel = on_cancel
        self._on_key_revoked = on_key_revoked
        self._on_reconnect = on_reconnect  # notifications sent while we were cut off are lost
        self._on_quota_recall = on_quota_recall  # a peer needs a user's quota our slices hold (gateway/policy/quota.py)
        self._sweep_s = sweep_s
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._connect()
        await self._round(reconnect=False)  # a failure is logged: the loop tries again
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="instance-sweeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()

    async def notify_cancel(self, message_id: uuid.UUID) -> None:
        await sql.notify_cancel(self._pool, message_id)

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._url)
        try:
            await sql.hold_lock(conn, self.id)
            await conn.add_listener(CANCEL_CHANNEL, self._notified)
            if self._on_key_revoked is not None:
                await conn.add_listener(KEY_REVOKED_CHANNEL, self._key_revoked)
            if self._on_quota_recall is not None:
                await conn.add_listener(limits_sql.QUOTA_RECALL_CHANNEL, self._quota_recalled)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    async def _ensure_connection(self) -> None:
        """If the database dropped our connection (a restart), our lock went with it: take it
        back at once, before a peer's sweep takes us for dead."""
        if self._conn is not None and not self._conn.is_closed():
            try:
                await sql.ping(self._conn)
                return
            except Exception as e:
                if classify(e) is Failure.PERMANENT:
                    raise
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

    def _quota_recalled(self, conn: object, pid: int, channel: str, payload: str) -> None:
        assert self._on_quota_recall is not None
        try:
            self._on_quota_recall(uuid.UUID(payload))
        except ValueError:
            log.warning("ignored a malformed %s notification", channel)

    async def sweep(self) -> None:
        """Interrupt the live rows and give back the stream leases of instances that are gone; replay
        the journal; delete old rate windows."""
        owners = dict.fromkeys([*await sql.live_owners(self._pool, self.id),
                                *await limits_sql.lease_owners(self._pool, self.id),
                                *await limits_sql.quota_owners(self._pool, self.id)])
        for owner in owners:
            await self._interrupt_if_dead(owner)
        await self._replay()
        await limits_sql.sweep_windows(self._pool, self._clock())

    async def _interrupt_if_dead(self, owner: uuid.UUID) -> None:
        """A dead instance's live replies: interrupted with their last checkpoint, and their usage
        settled to an estimate (flagged) — which also hands back what their admission reserved —
        in one transaction, exactly once (the usage row's key)."""
        async with self._pool.acquire() as conn, conn.transaction():
            # the owner's lock for this transaction only: a session lock would need one server session
            if not await sql.try_lock(conn, owner):
                return  # alive: it holds its own lock
            # leases first: their counters are locked before any day row, as admission does
            leases = await limits_sql.release_instance(conn, owner)
            swept = await sql.interrupt_dead(conn, owner)
            records = [settled_usage(row) for row in swept]
            if records:
                await record_usage_many(conn, records)
                await sql.set_estimated_usage(
                    conn, [(r.message_id, r.prompt_tokens, r.completion_tokens) for r in records])
            # last: the settlements above took their shares off the slices' rows; the rest goes back
            slices = await limits_sql.reclaim_quota(conn, owner)
        log.warning("instance %s is gone: %d live replies interrupted", owner, len(swept))
        if leases:
            log.warning("instance %s is gone: %d stream leases given back", owner, leases)
        if slices:
            log.warning("instance %s is gone: %d quota slices given back", owner, slices)

    async def _round(self, *, reconnect: bool = True) -> Failure | None:
        """One sweep (after making sure our lock is held): None, or how it failed (logged)."""
        try:
            if reconnect:
                await self._ensure_connection()
            await self.sweep()
            return None
        except Exception as e:  # never CancelledError: that one stops the loop, as it should
            failure = classify(e)
            if failure is Failure.TRANSIENT:
                log.warning("instance sweep failed: %s", type(e).__name__)
            else:
                log.exception("instance sweep failed")
            return failure

    async def _loop(self) -> None:
        delay, backoff = self._sweep_s, self.RETRY_S
        while True:
            await asyncio.sleep(delay)
            failure = await self._round()
            if failure is Failure.TRANSIENT:
                # the database is away: try again soon (our lock may need retaking), then less often
                delay, backoff = min(backoff, self._sweep_s), backoff * 2
            else:  # done, or a bug that the next round will meet again: the usual interval
                delay, backoff = self._sweep_s, self.RETRY_S


def settled_usage(row: Mapping[str, Any]) -> UsageRecord:
    """A swept reply's usage, estimated from its reservation (the prompt) and its checkpointed
    content; its reservations are released by the same record."""
    res = row["reservation"] or {}
    completion = estimate_tokens(row["content"] or "")
    # as a finished reply's estimate: a reply that got no content consumed nothing
    prompt = int(res.get("prompt_tokens") or 0) if row["content"] else 0
    cost = (prompt * float(res.get("input_price_per_mtok") or 0)
            + completion * float(res.get("output_price_per_mtok") or 0)) / 1_000_000
    key = res.get("api_key_id")
    quota = res.get("quota")
    return UsageRecord(
        message_id=row["id"], user_id=row["user_id"], api_key_id=uuid.UUID(key) if key else None,
        model=res.get("model") or "unknown", provider=res.get("provider") or "unknown", prompt_tokens=prompt,
        completion_tokens=completion, estimated=True, cost_usd=cost,
        day=date.fromisoformat(res["day"]) if res.get("day") else datetime.now(UTC).date(),
        user_reserved=int(res.get("user_reserved") or 0), key_reserved=int(res.get("key_reserved") or 0),
        user_cost_reserved=float(res.get("user_cost_reserved") or 0),
        key_cost_reserved=float(res.get("key_cost_reserved") or 0), quota_id=uuid.UUID(quota) if quota else None)
