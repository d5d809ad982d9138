"""Writes that can wait, batched off the request path.

A `BatchWriter` takes items without blocking (`add`), and one task flushes them in batches:
as soon as a batch fills, or `interval_s` after the first waiting item. A failed flush is
retried with backoff, keeping the items; `close` drains what is left. The queue is bounded:
past `max_queue` an item is dropped and counted, never allowed to grow memory without end.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchWriter(Generic[T]):
    def __init__(self, name: str, flush: Callable[[list[T]], Awaitable[None]], *, max_batch: int = 500,
                 interval_s: float = 0.05, max_queue: int = 100_000, max_backoff_s: float = 5.0) -> None:
        self.name = name
        self._flush = flush
        self._max_batch = max_batch
        self._interval = interval_s
        self._max_queue = max_queue
        self._max_backoff = max_backoff_s
        self._items: list[T] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.dropped = 0
        self.written = 0

    @property
    def depth(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        if len(self._items) >= self._max_queue:
            self.dropped += 1
            log.error("%s queue full: dropped an item (%d so far)", self.name, self.dropped)
            return
        self._items.append(item)
        if len(self._items) == 1 or len(self._items) >= self._max_batch:
            self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batch-writer:{self.name}")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Flush everything queued (bounded by timeout_s), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except asyncio.TimeoutError:
                log.error("%s: %d items not written at shutdown", self.name, len(self._items))

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self._items:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._items) < self._max_batch and not self._closing:
                # let a batch gather; a full batch or close() cuts the wait short (shutdown is not delayed)
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self._interval)
                except TimeoutError:
                    pass
            batch = self._items[:self._max_batch]
            try:
                await self._flush(batch)
            except Exception as e:  # the database blinked: keep the items and try again
                log.warning("%s: flush of %d failed (%s), retrying in %.1fs", self.name, len(batch),
                            type(e).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = 0.1
            del self._items[:len(batch)]
            self.written += len(batch)


class GroupCommit(Generic[T, R]):
    """Writes the caller waits for, batched only when they pile up (group commit).

    A write arriving while none is in flight is flushed at once, alone: no added latency. Writes
    arriving while a flush is in flight wait for it and then go together in the next one. So
    under load the database sees one statement (and one commit) for many writes, and when idle
    it sees exactly what it would without batching.

    `flush` returns one result per item (an Exception instance is raised to that item's caller
    alone), or None when there is nothing to return; if it raises, every caller in the batch
    gets the exception.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[Sequence[R | Exception] | None]],
                 max_batch: int = 200) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R | None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R | None:
        future: asyncio.Future[R | None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self._max_batch]
                del self._pending[:len(batch)]
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as e:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for i, (_, future) in enumerate(batch):
                    result = results[i] if results is not None else None
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._task = None
