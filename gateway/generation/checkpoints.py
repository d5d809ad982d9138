"""Checkpoints of live replies: their partial content saved every few seconds, so a crash (kill -9,
a lost machine) loses at most that window of a reply, never all of it. A checkpoint holds what a
replay needs to number the events as the live stream did: the text's chunk boundaries and the
reasoning events' seqs (gateway/generation/replay.py).

One task per app writes every live reply that grew since its last checkpoint in one statement,
every `interval_s`, or sooner when a reply has `max_chunks` unsaved chunks. The generations pay
only an integer compare per upstream read; an idle gateway writes nothing. A checkpoint that
fails (the database away) is skipped: the next one carries the newer content anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from gateway.store.failures import Failure, classify
from gateway.store.messages import Checkpoint


class Live(Protocol):
    """A live reply as the checkpointer reads it (the generation task is one)."""

    @property
    def parts(self) -> Sequence[str]: ...

    @property
    def reasoning(self) -> Sequence[list[Any]]: ...

    @property
    def finished(self) -> bool: ...


def progress(generation: Live) -> int:
    """The seq of a live reply's newest event between its metadata and its closing events: one per
    text chunk, one per reasoning event (the reasoning takes seqs among the deltas)."""
    return len(generation.parts) + len(generation.reasoning)


log = logging.getLogger(__name__)

Write = Callable[[list[Checkpoint]], Awaitable[int]]


class Checkpointer:
    def __init__(self, live: Mapping[uuid.UUID, Live], write: Write, *, interval_s: float = 2.0,
                 max_chunks: int = 256) -> None:
        self._live = live
        self._write = write
        self.interval_s = interval_s
        self.max_chunks = max_chunks
        self._saved: dict[uuid.UUID, int] = {}  # the progress saved per live reply (see `progress`)
        self._nudged = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.written = 0

    def nudge(self) -> None:
        """A reply has max_chunks unsaved events: checkpoint now rather than at the next tick."""
        self._nudged.set()

    def saved(self, message_id: uuid.UUID) -> int:
        return self._saved.get(message_id, 0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="checkpointer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # a tick, or a nudge: either way, checkpoint now
                await asyncio.wait_for(self._nudged.wait(), self.interval_s)
            self._nudged.clear()
            try:
                await self.checkpoint()
            except Exception as e:  # never let the loop die: the next tick tries again
                level = logging.WARNING if classify(e) is Failure.TRANSIENT else logging.ERROR
                log.log(level, "checkpoint failed: %s: %s", type(e).__name__, e)

    async def checkpoint(self) -> int:
        """Write every live reply that grew since its last checkpoint; returns how many were written."""
        batch: list[Checkpoint] = []
        for message_id, generation in self._live.items():
            seq = progress(generation)
            if seq > self._saved.get(message_id, 0) and not generation.finished:
                # taken without an await in between: each snapshot is one consistent point of its reply,
                # its reasoning events' seqs included (without them a replay would renumber the deltas)
                parts = generation.parts
                batch.append(Checkpoint(message_id=message_id, content="".join(parts),
                                        chunks=[len(p) for p in parts], seq=seq,
                                        reasoning=list(generation.reasoning)))
        for gone in [m for m in self._saved if m not in self._live]:
            del self._saved[gone]
        if not batch:
            return 0
        await self._write(batch)
        for c in batch:
            if c.message_id in self._live:
                self._saved[c.message_id] = c.seq
        self.written += len(batch)
        return len(batch)
