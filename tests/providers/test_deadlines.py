"""The shared coarse deadlines (gateway/providers/deadlines.py): a stream's idle check and its
max_stream_s bound without a timer each."""

from __future__ import annotations

import asyncio

import pytest

from gateway.providers.deadlines import RESOLUTION, Timeout, deadlines


async def test_a_timeout_cancels_the_block_and_raises_timeout_error_on_time():
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        async with Timeout(start + 0.2):
            await asyncio.sleep(5)
    assert 0.2 <= loop.time() - start < 0.2 + RESOLUTION + 0.1


async def test_a_block_that_ends_in_time_leaves_no_deadline_behind():
    slots = deadlines()
    async with Timeout(asyncio.get_running_loop().time() + 600):
        await asyncio.sleep(0)
    assert slots._slots == {} and slots._timers == {}  # the slot and its loop timer are gone


async def test_a_cancellation_from_elsewhere_stays_a_cancellation():
    async def held() -> None:
        async with Timeout(asyncio.get_running_loop().time() + 600):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(held())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_many_deadlines_share_one_timer_per_slot():
    slots, loop = deadlines(), asyncio.get_running_loop()
    fired: list[int] = []
    when = loop.time() + 0.05
    owners = [object() for _ in range(100)]
    for i, owner in enumerate(owners):
        slots.at(when, owner, lambda i=i: fired.append(i))
    slots.cancel(slots.at(when, owners[7], lambda: fired.append(-1)), owners[7])  # the owner's one entry, gone
    assert len(slots._timers) == 1
    await asyncio.sleep(0.05 + RESOLUTION + 0.05)
    assert sorted(fired) == [i for i in range(100) if i != 7]
