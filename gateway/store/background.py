"""Writes that can wait, batched off the request path; and writes the caller waits for, grouped.

A `BatchWriter` takes items without blocking (`add`), and one task flushes them in batches:
as soon as a batch fills, or `interval_s` after the first waiting item. What a failed flush
means is decided by `failures.classify`:
- transient (the database is away): the items are kept and the flush retried with backoff;
- permanent (the database refused the data): the batch is split in halves and each half
  written on its own, down to single records, so the good records are written and each bad
  one fails alone; that one goes to the quarantine and the writer moves on. One poison record
  never blocks the queue and is never retried forever.
`close` drains what is left; `flush` waits for what is queued. The queue is bounded: past
`max_queue` an item is dropped and counted, never allowed to grow memory without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from gateway.store.failures import Failure, Quarantine, classify

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchWriter(Generic[T]):
    def __init__(self, name: str, flush: Callable[[list[T]], Awaitable[object]], *, max_batch: int = 500,
                 interval_s: float = 0.05, max_queue: int = 100_000, max_backoff_s: float = 5.0,
                 quarantine: Quarantine | None = None, to_json: Callable[[T], dict[str, Any]] | None = None,
                 lesser: Callable[[T], T | None] | None = None) -> None:
        self.name = name
        self._write = flush
        self._max_batch = max_batch
        self._interval = interval_s
        self._max_queue = max_queue
        self._max_backoff = max_backoff_s
        self._quarantine = quarantine
        # what must still be written of an item the database refused for good (e.g. a usage record
        # settles the reservations its request holds): a smaller form, tried in its place once the
        # item is quarantined; None when there is nothing smaller
        self._lesser = lesser
        self._to_json = to_json
        self._items: list[T] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._added = 0  # items ever queued (not counting dropped ones)
        self._settled = 0  # items ever taken off the queue: written or quarantined
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # flush() calls: (target, future)
        self.dropped = 0
        self.written = 0
        self.quarantined = 0

    @property
    def depth(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        if len(self._items) >= self._max_queue:
            self.dropped += 1
            log.error("%s queue full: dropped an item (%d so far)", self.name, self.dropped)
            return
        self._items.append(item)
        self._added += 1
        if len(self._items) == 1 or len(self._items) >= self._max_batch:
            self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batch-writer:{self.name}")

    async def flush(self) -> None:
        """Return once every item queued before this call is written (or quarantined)."""
        target = self._added
        if self._settled >= target:
            return
        if self._task is None or self._task.done():
            raise RuntimeError(f"{self.name} writer is not running")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        self._wakeup.set()  # a waiting flush does not wait out the batching interval
        await future

    async def close(self, timeout_s: float = 10.0) -> None:
        """Flush everything queued (bounded by timeout_s), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except TimeoutError:
                log.error("%s: %d items not written at shutdown", self.name, len(self._items))

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:  # stopped (closed, or cut short at shutdown): nobody may wait for it forever
            for _, future in self._waiters:
                if not future.done():
                    future.set_exception(RuntimeError(f"{self.name} writer stopped"))
            self._waiters = []

    async def _loop(self) -> None:
        backoff = 0.1
        while True:
            if not self._items:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._items) < self._max_batch and not self._closing and not self._waiters:
                # let a batch gather; a full batch, flush() or close() cuts the wait short
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):  # the interval is up: write what has gathered
                    await asyncio.wait_for(self._wakeup.wait(), self._interval)
            batch = self._items[:self._max_batch]
            try:
                await self._write_or_split(batch)
            except Exception as e:  # transient: the database blinked; what is left of the batch is kept
                log.warning("%s: flush of %d failed (%s), retrying in %.1fs", self.name, len(batch),
                            type(e).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = 0.1

    async def _write_or_split(self, chunk: list[T]) -> None:
        """Write `chunk` (the head of the queue), splitting it on a permanent failure; raises only
        a transient failure. Settled items leave the queue at once, so a retry never rewrites them."""
        try:
            await self._write(chunk)
        except Exception as e:
            if classify(e) is Failure.TRANSIENT:
                raise
            if len(chunk) == 1:
                await self._set_aside(chunk[0], e)
                smaller = self._lesser(chunk[0]) if self._lesser is not None else None
                if smaller is not None:  # it takes the refused item's place at the head of the queue
                    self._items[0] = smaller
                    await self._write_or_split([smaller])
                    return
                self._settle(1, written=False)
                return
            middle = len(chunk) // 2
            await self._write_or_split(chunk[:middle])
            await self._write_or_split(chunk[middle:])
            return
        self._settle(len(chunk), written=True)

    async def _set_aside(self, item: T, error: Exception) -> None:
        self.quarantined += 1
        if self._quarantine is None:
            log.error("%s: dropped a record the database refused (%s: %s)", self.name, type(error).__name__, error)
            return
        try:
            record = self._to_json(item) if self._to_json is not None else {"item": item}
            await self._quarantine.put(self.name, record, error)
        except Exception:  # the disk failed us too: say so, and do not let it stop the queue
            log.exception("%s: could not quarantine a refused record (%s)", self.name, type(error).__name__)

    def _settle(self, n: int, *, written: bool) -> None:
        del self._items[:n]
        self._settled += n
        if written:
            self.written += n
        if self._waiters:
            still = []
            for target, future in self._waiters:
                if self._settled >= target:
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((target, future))
            self._waiters = still


class GroupCommit(Generic[T, R]):
    """Writes the caller waits for, batched only when they pile up (group commit).

    A write arriving while none is in flight is flushed at once, alone: no added latency. Writes
    arriving while a flush is in flight wait for it and then go together in the next one. So
    under load the database sees one statement (and one commit) for many writes, and when idle
    it sees exactly what it would without batching.

    `flush` returns one result per item (an Exception instance is raised to that item's caller
    alone), or None when there is nothing to return. If it raises a transient failure, every
    caller in the batch gets the exception (and may retry); if it raises a permanent one, each
    item is flushed again on its own, so only the callers whose own item is refused get an error.
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
                    if len(batch) > 1 and classify(e) is Failure.PERMANENT:
                        for one in batch:
                            await self._flush_alone(one)
                    else:
                        for _, future in batch:
                            _resolve(future, e)
                    continue
                for i, (_, future) in enumerate(batch):
                    _resolve(future, results[i] if results is not None else None)
        finally:
            self._task = None

    async def _flush_alone(self, entry: tuple[T, asyncio.Future[R | None]]) -> None:
        item, future = entry
        try:
            results = await self._flush([item])
        except Exception as e:
            _resolve(future, e)
            return
        _resolve(future, results[0] if results is not None else None)


def _resolve(future: asyncio.Future[Any], result: object) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
