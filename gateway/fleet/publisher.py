"""The generating side: every live reply's events, XADDed to its Redis Stream off the hot path.

A generation calls `changed(generation)` once per upstream read (a dict store and an event set);
one task per app writes every reply that changed in one pipeline, from where its stream ends to
the reply's newest event, read from the reply's own `EventLog`. So a burst of replies costs one
round trip, a slow Redis only makes the batches bigger, and a Redis that was away (or restarted
empty) is caught up from the log once it answers again: the publisher forgets what it believed
was published and asks each stream where it ends. A finished reply's stream expires `ttl_s`
after its last event; a live one is kept `LIVE_TTL_S` past its latest event (a reply whose
instance died mid-way leaves a stream that expires by itself).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

from gateway.fleet.link import CLUSTER_DOWN, REDIS_DOWN, RedisLink
from gateway.fleet.wire import entry, entry_id, stream_key

if TYPE_CHECKING:
    from gateway.generation.task import Generation

log = logging.getLogger(__name__)


class StreamPublisher:
    LIVE_TTL_S = 3600
    MAXLEN = 100_000  # entries per stream (approximate trim): far above any reply's event count
    RETRY_S = 0.2  # first retry after Redis failed; doubles up to MAX_RETRY_S
    MAX_RETRY_S = 2.0

    def __init__(self, link: RedisLink, ttl_s: float = 600.0) -> None:
        self._link = link
        self._ttl_s = max(1, round(ttl_s))
        self._dirty: dict[uuid.UUID, Generation] = {}
        self._published: dict[uuid.UUID, int] = {}  # events in Redis per live reply; absent: ask Redis
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def changed(self, generation: Generation) -> None:
        """The hook (per event batch of a generation): O(1), no I/O."""
        self._dirty[generation.spec.message_id] = generation
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stream-publisher")

    async def close(self) -> None:
        """Publish what is pending (briefly: Redis may be away), then stop."""
        if self._task is None:
            return
        if self._dirty and self._link.up:
            try:
                async with asyncio.timeout(2):
                    await self.flush()
            except (*REDIS_DOWN, ResponseError):
                pass
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        backoff = self.RETRY_S
        while True:
            await self._wake.wait()
            try:
                await self.flush()
                backoff = self.RETRY_S
            except REDIS_DOWN as e:
                self._link.failed(e)
                await asyncio.sleep(backoff)  # then try again: the replies' logs still hold every event
                backoff = min(backoff * 2, self.MAX_RETRY_S)
                self._wake.set()
            except Exception:  # a bug: logged; the replies stay dirty and are tried again on their next event
                log.exception("publishing reply events failed")

    async def flush(self) -> None:
        """One pipeline for every reply that changed since the last flush."""
        self._wake.clear()
        batch, self._dirty = self._dirty, {}
        if not batch:
            return
        try:
            await self._publish(batch)
        except BaseException:
            for message_id, generation in batch.items():  # nothing of this batch is known to be there
                self._dirty.setdefault(message_id, generation)
            # nor of any other reply: a Redis that restarted has lost them all; each asks again
            self._published.clear()
            raise
        self._link.worked()

    async def _publish(self, batch: dict[uuid.UUID, Generation]) -> None:
        client = await self._link.ready()
        unknown = [m for m in batch if m not in self._published]
        if unknown:  # new replies, or Redis was away: where does each stream end?
            pipe = client.pipeline(transaction=False)
            for message_id in unknown:
                pipe.xrevrange(stream_key(message_id), count=1)
            for message_id, top in zip(unknown, await pipe.execute(), strict=True):
                self._published[message_id] = int(top[0][1][b"s"]) + 1 if top else 0
        pipe = client.pipeline(transaction=False)
        plan: list[tuple[uuid.UUID, int, bool]] = []  # per reply: events written up to, finished
        for message_id, generation in batch.items():
            finished = generation.finished  # read first: once finished, the count below is final
            start, end = self._published[message_id], generation.events.count
            key = stream_key(message_id)
            for event in generation.events.between(start, end):
                pipe.xadd(key, entry(event), id=entry_id(event.seq), maxlen=self.MAXLEN, approximate=True)
            if end > start or finished:
                pipe.expire(key, self._ttl_s if finished else self.LIVE_TTL_S)
            plan.append((message_id, end, finished))
        results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, CLUSTER_DOWN) or (isinstance(result, REDIS_DOWN)
                                                    and not isinstance(result, ResponseError)):
                raise result
        refused = {str(r) for r in results if isinstance(r, ResponseError)}
        for message_id, end, finished in plan:
            self._published[message_id] = end
            if finished:
                del self._published[message_id]
        if refused:
            # an id below the stream's top (a stream another writer touched) or a key of another type:
            # these replies ask Redis where their stream ends on their next event
            log.warning("redis refused reply events: %s", "; ".join(sorted(refused)))
            for message_id, _, _ in plan:
                self._published.pop(message_id, None)
