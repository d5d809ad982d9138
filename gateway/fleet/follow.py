"""The reading side: a reply generating on another instance, followed live by this one's listeners.

One `Feed` per (instance, message), started by its first listener and stopped with its last:
however many clients of this instance follow a remote reply, Redis sees one reader. The feed
collects the reply's events in seq order and every listener reads them from its own position, so
each one gets exactly the bytes the generating instance's own listeners get.

Where the events come from, in order of preference:
1. Redis (`XREAD BLOCK` from the feed's position). Each time a read times out with nothing new, the
   row is looked at: a reply whose instance died is swept to `interrupted` by a surviving
   instance, and the feed ends it from the row, so a listener never waits on a dead publisher.
2. The database, while Redis is away (or not configured): the row is polled; once the listener
   has the reply's head, the checkpointed partial content goes out as the events it was (deltas,
   and the reasoning among them, with their live seqs); when the row has finished, the rest is
   replayed from it (byte-identical: gateway/generation/replay.py). Redis is tried again on every
   poll, and the feed goes back to it from where it stands.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import asyncpg

from gateway.fleet.wire import after_id, event_of, stream_key
from gateway.generation.events import Event, EventMaker
from gateway.generation.replay import body_events, replay_events
from gateway.store import messages as message_store
from gateway.vocabulary import LIVE_STATUSES

if TYPE_CHECKING:  # redis is an optional extra: only an instance with REDIS_URL imports it
    from gateway.fleet.link import RedisLink

log = logging.getLogger(__name__)

Entries = list[tuple[bytes, dict[bytes, bytes]]]


class Feed:
    """One remote reply as this instance sees it: its events so far (seq = index) and its end."""

    def __init__(self, pool: asyncpg.Pool, link: RedisLink | None, user_id: uuid.UUID, row: dict[str, Any],
                 poll_s: float) -> None:
        self._pool = pool
        self._link = link
        self.message_id: uuid.UUID = row["id"]
        self._user_id = user_id
        self._message = str(self.message_id).encode()
        self._poll_s = poll_s
        self.events: list[Event] = []
        self.final_row: dict[str, Any] | None = None  # when the end came from the database
        self.finished = False
        self.listeners = 0
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def follow(self, after: int) -> AsyncIterator[list[Event]]:
        pos = after + 1
        while True:
            count = len(self.events)
            if pos < count:
                batch, pos = self.events[pos:count], count
                yield batch
            elif self.finished:
                if self.final_row is not None and pos > count:
                    # the client saw more of it live than this feed got (a swept reply's checkpoint
                    # lags): its closing events, numbered after the client's position
                    closing = replay_events(self.final_row, pos - 1)
                    if closing:
                        yield closing
                return
            else:
                await self._changed.wait()

    def _extend(self, events: list[Event]) -> None:
        if events:
            self.events.extend(events)
            self._changed.set()
            self._changed.clear()

    def _end(self, row: dict[str, Any] | None = None) -> None:
        self.final_row = row
        self.finished = True
        self._changed.set()

    async def run(self) -> None:
        try:
            while not self.finished:
                if self._link is not None:
                    try:
                        await self._from_redis(self._link)
                        continue
                    except self._link.DOWN as e:
                        self._link.failed(e)
                await self._from_database()
        except Exception:
            # a bug: end the listeners' wait from the row rather than leave them hanging
            log.exception("following reply %s failed", self.message_id)
            self._end()
        finally:
            self._changed.set()

    async def _from_redis(self, link: RedisLink) -> None:
        """Read until the reply's terminal event; returns early (to the database) on a gap."""
        key = stream_key(self.message_id)
        while not self.finished:
            got = await self._read(link, key, link.block_ms)
            link.worked()
            if got:
                if not self._take(got):
                    return  # a gap (trimmed, or an empty stream refilled from later): the database bridges it
                continue
            row = await self._row()
            if row["status"] in LIVE_STATUSES:
                continue
            # finished: its closing events may still be on their way through Redis; else the row has them
            got = await self._read(link, key, None)
            if not (got and self._take(got) and self.finished):
                self._extend(replay_events(row, len(self.events) - 1))
                self._end(row)

    async def _read(self, link: RedisLink, key: str, block_ms: int | None) -> Entries:
        """The stream's entries after the feed's position (RESP2: [[key, entries]], or none)."""
        got = await (await link.ready()).xread({key: after_id(len(self.events) - 1)}, count=1000, block=block_ms)
        return cast(Entries, got[0][1]) if got else []

    def _take(self, entries: Entries) -> bool:
        """Append entries that continue the feed; False when they do not."""
        events = [event_of(self._message, fields) for _, fields in entries]
        if not events or events[0].seq != len(self.events):
            return False
        self._extend(events)
        if events[-1].terminal:
            self._end()
        return True

    async def _from_database(self) -> None:
        """One poll of the row: its end, or (past the head) its checkpointed content; then a pause."""
        row = await self._row()
        if row["status"] not in LIVE_STATUSES:
            self._extend(replay_events(row, len(self.events) - 1))
            self._end(row)
            return
        if self.events:  # the head (seq 0) went out: checkpointed chunks are the deltas that follow it
            self._extend(checkpointed_events(row, len(self.events)))
        await asyncio.sleep(self._poll_s)

    async def _row(self) -> dict[str, Any]:
        return await message_store.get_message(self._pool, self._user_id, self.message_id)


def checkpointed_events(row: dict[str, Any], start: int) -> list[Event]:
    """The events with seq >= `start` in a live row's last checkpoint: its deltas, and the reasoning
    events among them, numbered as the live stream numbered them."""
    meta = row["metadata"]
    chunks: list[int] = meta.get("chunks") or []
    reasoning: list[list[Any]] = meta.get("reasoning") or []
    if len(chunks) + len(reasoning) < start:
        return []
    return body_events(EventMaker(row["id"], row["slot"]), row["content"] or "", chunks, reasoning, start - 1)


class RemoteStreams:
    """The feeds of this instance, by message id. One per app (`state.REMOTE`)."""

    POLL_S = 0.25  # the database's pace, while Redis is away or not configured

    def __init__(self, pool: asyncpg.Pool, link: RedisLink | None) -> None:
        self._pool = pool
        self._link = link
        self.feeds: dict[uuid.UUID, Feed] = {}

    async def follow(self, user_id: uuid.UUID, row: dict[str, Any], after: int) -> AsyncIterator[list[Event]]:
        """The events after seq `after` of `row`'s reply (this user's, live when read), generating elsewhere."""
        message_id = row["id"]
        feed = self.feeds.get(message_id)
        if feed is None:
            feed = Feed(self._pool, self._link, user_id, row, self.POLL_S)
            self.feeds[message_id] = feed
            feed.task = asyncio.get_running_loop().create_task(feed.run(), name=f"feed-{message_id}")
        feed.listeners += 1
        try:
            async for batch in feed.follow(after):
                yield batch
        finally:
            feed.listeners -= 1
            if not feed.listeners:
                if self.feeds.get(message_id) is feed:
                    del self.feeds[message_id]
                if feed.task is not None:
                    feed.task.cancel()

    async def close(self) -> None:
        tasks = [f.task for f in self.feeds.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
