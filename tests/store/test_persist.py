"""The persist step's group commit: many turns in one statement, each with its own outcome."""

from __future__ import annotations

import asyncio
import functools
import uuid

from gateway.errors import NotFound
from gateway.store.background import GroupCommit
from gateway.store.messages import StoredTurn, TurnRequest, persist_turns
from gateway.store.threads import create_thread
from tests.support.common import wait_for


async def thread_count(db, user_id: uuid.UUID) -> int:
    return await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", user_id)


async def test_one_batch_sorts_out_new_duplicate_foreign_and_existing_turns(db, make_user):
    alice, bob = await make_user(), await make_user()
    instance = uuid.uuid4()
    existing = await create_thread(db, alice.id, "old")
    bobs = await create_thread(db, bob.id, "bob's")
    turn = functools.partial(TurnRequest, user_id=alice.id, instance_id=instance)
    turns = [
        turn(content="first", client_message_id="same-id", thread_id=None),
        turn(content="retry of first", client_message_id="same-id", thread_id=None),  # duplicate in the same batch
        turn(content="into bob's thread", client_message_id=None, thread_id=bobs["id"]),
        turn(content="into my thread", client_message_id=None, thread_id=existing["id"]),
        turn(content="plain", client_message_id=None, thread_id=None),
    ]
    first, duplicate, foreign, in_thread, plain = await persist_turns(db, turns)
    assert isinstance(first, StoredTurn) and not first.duplicate
    assert isinstance(duplicate, StoredTurn) and duplicate.duplicate
    assert (duplicate.user_message["id"], duplicate.assistant_message_id, duplicate.thread_id) == (
        first.user_message["id"], first.assistant_message_id, first.thread_id)
    assert duplicate.user_message["content"] == "first"  # the stored message, not the retry's text
    assert isinstance(foreign, NotFound)
    assert isinstance(in_thread, StoredTurn) and in_thread.thread_id == existing["id"]
    assert isinstance(plain, StoredTurn) and plain.thread_id not in (first.thread_id, existing["id"])
    # threads: the old one, first's, plain's; the duplicate's would-be thread was removed
    assert await thread_count(db, alice.id) == 3
    assert await db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", bobs["id"]) == 0
    for turn in (first, in_thread, plain):  # in each thread: the user message, then its placeholder
        rows = await db.fetch("SELECT id, role, status, reply_to, instance_id FROM messages WHERE thread_id = $1 "
                              "ORDER BY seq", turn.thread_id)
        assert [(r["role"], r["status"]) for r in rows] == [("user", "complete"), ("assistant", "streaming")]
        assert (rows[1]["id"], rows[1]["reply_to"], rows[1]["instance_id"]) == (
            turn.assistant_message_id, turn.user_message["id"], instance)


async def test_concurrent_submissions_group_into_few_statements(db, make_user):
    user = await make_user()
    batches: list[int] = []

    async def flush(batch: list[TurnRequest]):
        batches.append(len(batch))
        return await persist_turns(db, batch)

    turns: GroupCommit[TurnRequest, StoredTurn | Exception] = GroupCommit(flush)
    results = await asyncio.gather(*(turns.submit(TurnRequest(user_id=user.id, content=f"m{i}", client_message_id=None,
                                                              thread_id=None, instance_id=uuid.uuid4()))
                                     for i in range(30)))
    assert len({r.user_message["id"] for r in results}) == 30
    assert [r.user_message["content"] for r in results] == [f"m{i}" for i in range(30)]
    assert batches == [30]  # arrived together: one statement for all of them
    assert await thread_count(db, user.id) == 30


async def test_a_failed_flush_fails_every_caller_of_that_batch_and_the_next_batch_runs():
    calls: list[list[int]] = []
    first_in_flight, fail_first = asyncio.Event(), asyncio.Event()

    async def flush(batch: list[int]):
        calls.append(batch)
        if len(calls) == 1:
            first_in_flight.set()
            await fail_first.wait()  # held in flight until the next two have arrived
            raise ConnectionResetError("database went away")
        return [x * 10 for x in batch]

    group: GroupCommit[int, int] = GroupCommit(flush)
    first = asyncio.ensure_future(group.submit(1))
    await asyncio.wait_for(first_in_flight.wait(), 5)
    rest = [asyncio.ensure_future(group.submit(x)) for x in (2, 3)]

    async def both_waiting() -> bool:  # queued behind the flush in flight (GroupCommit has no public depth)
        return [item for item, _ in group._pending] == [2, 3] and len(calls) == 1

    await wait_for(both_waiting)
    fail_first.set()
    done = await asyncio.gather(first, *rest, return_exceptions=True)
    assert isinstance(done[0], ConnectionResetError) and str(done[0]) == "database went away"
    assert done[1:] == [20, 30] and calls == [[1], [2, 3]]
