"""One conversation per WebSocket: turns without a thread_id continue the socket's first
thread; a turn may name another; a new socket starts a new conversation."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp.test_utils import TestClient

from tests.support.common import MakeClient, User
from tests.support.fakes import FakeUpstream

Socket = aiohttp.ClientWebSocketResponse


async def fake_client(make_client: MakeClient, upstream: FakeUpstream) -> TestClient:
    return await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_MODEL="fake")


async def send(ws: Socket, **frame: Any) -> None:
    await ws.send_str(orjson.dumps(frame).decode())


async def frames_until_ended(ws: Socket, turns: int) -> list[dict[str, Any]]:
    """Every frame until `turns` messages have sent their `end` (or a refused frame its error)."""
    frames, ended = [], 0
    while ended < turns:
        frame = orjson.loads(await ws.receive_str(timeout=10))
        frames.append(frame)
        if frame.get("event") == "end" or (frame.get("event") == "error" and "id" not in frame):
            ended += 1
    return frames


def accepted(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("event") == "accepted"]


async def thread_contents(db: asyncpg.Pool, thread_id: str) -> list[tuple[str, str]]:
    rows = await db.fetch("SELECT role, content FROM messages WHERE thread_id = $1 ORDER BY seq", uuid.UUID(thread_id))
    return [(r["role"], r["content"]) for r in rows]


async def test_turns_without_a_thread_id_continue_the_sockets_first_thread(make_client, upstream, user: User, db):
    client = await fake_client(make_client, upstream)
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="first")
        [one] = accepted(await frames_until_ended(ws, 1))
        await send(ws, type="chat", content="second")
        [two] = accepted(await frames_until_ended(ws, 1))
    assert two["thread_id"] == one["thread_id"]
    assert await thread_contents(db, one["thread_id"]) == [
        ("user", "first"), ("assistant", "Hello"), ("user", "second"), ("assistant", "Hello")]
    # the second turn's upstream call carries the conversation so far
    assert [(m["role"], m["content"]) for m in upstream.requests[1]["messages"]] == [
        ("user", "first"), ("assistant", "Hello"), ("user", "second")]
    assert await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", user.id) == 1


async def test_turns_sent_at_once_wait_for_the_first_and_share_its_thread(make_client, upstream, user: User, db):
    client = await fake_client(make_client, upstream)
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        for n in range(4):
            await send(ws, type="chat", content=f"turn {n}", client_message_id=f"burst-{n}")
        frames = await frames_until_ended(ws, 4)
    threads = {a["thread_id"] for a in accepted(frames)}
    assert len(accepted(frames)) == 4 and len(threads) == 1
    assert await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", user.id) == 1
    contents = await thread_contents(db, threads.pop())
    assert sorted(c for role, c in contents if role == "user") == [f"turn {n}" for n in range(4)]
    assert contents[0] == ("user", "turn 0")  # the first frame made the conversation


async def test_a_refused_first_turn_leaves_the_next_to_make_the_conversation(make_client, upstream, user, db):
    client = await fake_client(make_client, upstream)
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="into the void", thread_id=str(uuid.uuid4()), client_message_id="x")
        [refused] = await frames_until_ended(ws, 1)
        assert refused == {"event": "error", "data": {"type": "not_found", "message": "thread not found"},
                           "client_message_id": "x"}
        await send(ws, type="chat", content="made here")
        [one] = accepted(await frames_until_ended(ws, 1))
        await send(ws, type="chat", content="and continued")
        [two] = accepted(await frames_until_ended(ws, 1))
    assert one["thread_id"] == two["thread_id"]
    assert [c for _, c in await thread_contents(db, one["thread_id"])] == [
        "made here", "Hello", "and continued", "Hello"]


async def test_a_turn_may_name_another_thread_and_a_new_socket_starts_a_new_conversation(
        make_client, upstream, user: User, db):
    client = await fake_client(make_client, upstream)
    other = (await (await client.post("/api/threads", headers=user.headers, json={"title": "other"})).json())["id"]
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="mine")
        [first] = accepted(await frames_until_ended(ws, 1))
        await send(ws, type="chat", content="elsewhere", thread_id=other)
        [named] = accepted(await frames_until_ended(ws, 1))
        await send(ws, type="chat", content="back home")
        [back] = accepted(await frames_until_ended(ws, 1))
    assert named["thread_id"] == other and first["thread_id"] != other
    assert back["thread_id"] == first["thread_id"]
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="a new socket")
        [fresh] = accepted(await frames_until_ended(ws, 1))
    assert fresh["thread_id"] not in (first["thread_id"], other)
    assert [c for _, c in await thread_contents(db, other)] == ["elsewhere", "Hello"]


async def test_a_socket_whose_first_turn_names_a_thread_continues_that_one(make_client, upstream, user: User, db):
    client = await fake_client(make_client, upstream)
    named = (await (await client.post("/api/threads", headers=user.headers, json={})).json())["id"]
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="here", thread_id=named)
        await send(ws, type="chat", content="still here")
        frames = await frames_until_ended(ws, 2)
    assert {a["thread_id"] for a in accepted(frames)} == {named}
    assert await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", user.id) == 1
