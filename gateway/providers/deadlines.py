"""Coarse deadlines for many held streams on few timers.

A held stream used to carry two timers of its own: the upstream read's idle timeout and the
chain's `max_stream_s` (`asyncio.timeout_at`). Under uvloop a timer handle costs ~550 B and the
timeout ~800 B with it, for deadlines that almost never fire. Here deadlines are grouped in
slots of `RESOLUTION` seconds: one loop timer per non-empty slot, a list entry per deadline. A
deadline fires at or after its time, at most RESOLUTION late, unless cancelled first (a stream
that ends takes its deadlines with it: nothing is kept alive until a far slot fires).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from types import TracebackType

RESOLUTION = 0.1  # s: how late a deadline may fire; the timeouts it serves are seconds long


class Deadlines:
    """The slots of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._slots: dict[int, dict[object, Callable[[], None]]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def at(self, when: float, owner: object, callback: Callable[[], None]) -> int:
        """Call `callback` once, at or shortly after loop time `when`, unless `cancel(slot, owner)`
        comes first (an owner has one deadline per slot). Returns the slot."""
        slot = math.ceil(when / RESOLUTION)
        entries = self._slots.get(slot)
        if entries is None:
            entries = self._slots[slot] = {}
            self._timers[slot] = self.loop.call_at(slot * RESOLUTION, self._fire, slot)
        entries[owner] = callback
        return slot

    def cancel(self, slot: int, owner: object) -> None:
        entries = self._slots.get(slot)
        if entries is not None and entries.pop(owner, None) is not None and not entries:
            del self._slots[slot]
            self._timers.pop(slot).cancel()

    def _fire(self, slot: int) -> None:
        self._timers.pop(slot, None)
        for callback in self._slots.pop(slot, {}).values():
            callback()


_current: Deadlines | None = None


def deadlines() -> Deadlines:
    """The running loop's slots (made on first use; a process runs one loop at a time, so the
    last one's are dropped, never kept alive, when another loop asks)."""
    global _current
    loop = asyncio.get_running_loop()
    if _current is None or _current.loop is not loop:
        _current = Deadlines(loop)
    return _current


class Timeout:
    """`async with Timeout(when):` as `asyncio.timeout_at(when)` (the task is cancelled at `when`
    and the block raises TimeoutError), on a shared slot instead of a timer of its own."""

    __slots__ = ("_when", "_task", "_slots", "_slot", "_expired", "_cancelling")

    def __init__(self, when: float) -> None:
        self._when = when
        self._task: asyncio.Task[object] | None = None
        self._slots: Deadlines | None = None
        self._slot = 0
        self._expired = False  # the task was cancelled by this timeout
        self._cancelling = 0  # the task's pending cancellations when the block began

    async def __aenter__(self) -> Timeout:
        self._task = asyncio.current_task()
        assert self._task is not None
        self._cancelling = self._task.cancelling()
        self._slots = deadlines()
        self._slot = self._slots.at(self._when, self, self._expire)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._slots is not None and self._task is not None
        task, self._task = self._task, None
        if not self._expired:
            self._slots.cancel(self._slot, self)
        # as asyncio.Timeout: our cancellation is taken back whatever ended the block, and becomes a
        # TimeoutError only when it is what ended it and nobody else cancelled the task meanwhile
        elif task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from error

    def _expire(self) -> None:
        assert self._slots is not None
        if self._task is None:
            return
        if self._slots.loop.time() < self._when:  # a loop may run a timer a hair early
            self._slot = self._slots.at(self._when, self, self._expire)
            return
        self._expired = True
        self._task.cancel()
