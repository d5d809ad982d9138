"""A turn is stored only in a thread its own user owns: in any batch, and by the schema itself."""

from __future__ import annotations

import asyncio
import functools
import shutil
import uuid
from importlib.resources import files
from pathlib import Path

import asyncpg
import pytest

from gateway.errors import NotFound
from gateway.store.db import migrate
from gateway.store.messages import StoredTurn, TurnRequest, persist_turns
from gateway.store.threads import create_thread
from tests.support.common import with_database


async def test_a_strangers_turn_batched_with_the_owners_is_refused(db, make_user):
    # the owner's turn and the stranger's name the same thread in one persist statement: the
    # owner's touches the thread (its ownership check), which must not vouch for the stranger's
    alice, bob = await make_user(), await make_user()
    thread = await create_thread(db, alice.id, "alice's")
    turn = functools.partial(TurnRequest, client_message_id=None, thread_id=thread["id"], instance_id=uuid.uuid4())
    owners, strangers = await persist_turns(db, [turn(user_id=alice.id, content="mine"),
                                                 turn(user_id=bob.id, content="bob's secret")])
    assert isinstance(owners, StoredTurn) and owners.thread_id == thread["id"]
    assert isinstance(strangers, NotFound)
    rows = await db.fetch("SELECT user_id, role, content FROM messages WHERE thread_id = $1 ORDER BY seq",
                          thread["id"])
    assert [(r["user_id"], r["role"], r["content"]) for r in rows] == [
        (alice.id, "user", "mine"), (alice.id, "assistant", "")]
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", bob.id) == 0


async def test_forty_strangers_racing_forty_owners_get_404_and_write_nothing(make_client, make_user, db):
    # the reported attack: 40 turns of the owner and 40 of a stranger at once into the owner's
    # thread, on one instance (so they group-commit together)
    client = await make_client()
    alice, bob = await make_user(), await make_user()
    created = await client.post("/api/threads", json={"title": "alice's"}, headers=alice.headers)
    assert created.status == 201, await created.text()
    thread_id = (await created.json())["id"]

    async def send(user, i: int) -> int:
        resp = await client.post("/api/chat", json={"thread_id": thread_id, "content": f"{user.id} {i}",
                                                    "stream": False}, headers=user.headers)
        body = await resp.json()
        if user is bob:
            error = {k: body["error"][k] for k in ("type", "message")}
            assert error == {"type": "not_found", "message": "thread not found"}, body
        return resp.status

    for who in (alice, bob):  # both keys known to the instance: their turns reach the persist step together
        assert (await client.get("/api/me", headers=who.headers)).status == 200
    sends = [send(alice, i) for i in range(40)] + [send(bob, i) for i in range(40)]
    order = [s for pair in zip(sends[:40], sends[40:], strict=True) for s in pair]  # interleaved
    statuses = await asyncio.gather(*order)
    assert statuses[0::2] == [202] * 40
    assert statuses[1::2] == [404] * 40
    # nothing of the stranger's anywhere: no message, no thread
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", bob.id) == 0
    assert await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", bob.id) == 0
    # the owner's thread shows the owner's 40 turns and nothing else
    resp = await client.get(f"/api/threads/{thread_id}", headers=alice.headers)
    assert resp.status == 200
    messages = (await resp.json())["messages"]
    users = [m for m in messages if m["role"] == "user"]
    assert len(users) == 40
    assert sorted(m["content"] for m in users) == sorted(f"{alice.id} {i}" for i in range(40))
    assert not any(str(bob.id) in (m["content"] or "") for m in messages)
    # and the stranger cannot read it either
    assert (await client.get(f"/api/threads/{thread_id}", headers=bob.headers)).status == 404


async def test_the_schema_refuses_a_message_or_comparison_in_a_strangers_thread(db, make_user):
    alice, bob = await make_user(), await make_user()
    thread = await create_thread(db, alice.id, "alice's")
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="messages_thread_owner"):
        await db.execute("INSERT INTO messages (thread_id, user_id, role, content, status) "
                         "VALUES ($1, $2, 'user', 'x', 'complete')", thread["id"], bob.id)
    own = await db.fetchval("INSERT INTO messages (thread_id, user_id, role, content, status) "
                            "VALUES ($1, $2, 'user', 'x', 'complete') RETURNING id", thread["id"], alice.id)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="comparisons_thread_owner"):
        await db.execute("INSERT INTO comparisons (user_id, thread_id, user_message_id, message_a, message_b, "
                         "model_a, model_b, anonymous) VALUES ($1, $2, $3, $3, $3, 'a', 'b', false)",
                         bob.id, thread["id"], own)
    # moving a message into a stranger's thread is refused too
    bobs = await create_thread(db, bob.id, "bob's")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute("UPDATE messages SET thread_id = $1 WHERE id = $2", bobs["id"], own)
    # the owner's thread still cascades its messages away
    await db.execute("DELETE FROM threads WHERE id = $1", thread["id"])
    assert await db.fetchval("SELECT count(*) FROM messages WHERE id = $1", own) == 0


async def test_the_migration_gives_crossed_rows_back_to_their_own_user(pg_server_url, tmp_path: Path):
    # a database that the old persist statement left with a stranger's turn in a thread
    name = f"gw_crossed_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(with_database(pg_server_url, name))
        try:
            every = sorted(Path(str(files("gateway.sql"))).glob("*.sql"))
            before = tmp_path / "before"
            before.mkdir()
            for path in every:
                if path.name < "0015":
                    shutil.copy(path, before / path.name)
            await migrate(conn, before)
            alice, bob = uuid.uuid4(), uuid.uuid4()
            await conn.execute("INSERT INTO users (id) VALUES ($1), ($2)", alice, bob)
            thread = await conn.fetchval("INSERT INTO threads (user_id, title) VALUES ($1, 'plans') RETURNING id",
                                         alice)
            for user, text in ((alice, "alice 1"), (bob, "bob 1"), (alice, "alice 2"), (bob, "bob 2")):
                await conn.execute("INSERT INTO messages (thread_id, user_id, role, content, status) "
                                   "VALUES ($1, $2, 'user', $3, 'complete')", thread, user, text)
            applied = await migrate(conn)
            assert "0015_thread_owner.sql" in applied
            rows = await conn.fetch("SELECT m.content, m.user_id, t.user_id AS owner, t.title, "
                                    "m.thread_id = $1 AS kept FROM messages m JOIN threads t ON t.id = m.thread_id "
                                    "ORDER BY m.seq", thread)
            assert [(r["content"], r["user_id"], r["owner"], r["title"], r["kept"]) for r in rows] == [
                ("alice 1", alice, alice, "plans", True), ("bob 1", bob, bob, "plans", False),
                ("alice 2", alice, alice, "plans", True), ("bob 2", bob, bob, "plans", False)]
            assert await conn.fetchval("SELECT count(DISTINCT thread_id) FROM messages WHERE user_id = $1", bob) == 1
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
