"""GET /ws: WebSocket chat against the real app — auth before the upgrade, the event frames and
their SSE ids, concurrent turns, idempotency, refused frames, dropped sockets, resume, cancel,
heartbeats.

Expected frames come from the protocol (gateway/api/native/ws.py docstring) and from the SSE stream of
the same message, never from the gateway's own WS encoder.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from typing import Any

import aiohttp
import asyncpg
import jwt
import orjson
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from gateway.providers.demo import demo_reply
from gateway.state import GENERATIONS
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream, Reply, openai_stream, parse_sse
from tests.support.ws import Socket, end, receive, receive_raw, send, until_ends

DEMO_CHUNKS = 12  # the `client` fixture's demo reply length
JWT_SECRET = "gateway-ws-test-jwt-secret-with-more-than-32-bytes"
JWT_ISSUER = "https://abcdefgh.supabase.co/auth/v1"


class GatedUpstream(FakeUpstream):
    """An OpenAI-compatible upstream that streams `texts` but holds back from piece `hold_at`
    until `release` is set: a reply caught mid-stream for as long as the test needs."""

    def __init__(self, texts: list[str], hold_at: int) -> None:
        super().__init__()
        self.pieces = openai_stream(texts)
        self.hold_at = hold_at
        self.release = asyncio.Event()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, piece in enumerate(self.pieces):
            if i == self.hold_at:
                await self.release.wait()
            await resp.write(piece)
        await resp.write_eof()
        return resp


TEXTS = ["Hel", "lo", " wor", "ld"]


@pytest.fixture
async def gated(aiohttp_server: Any) -> GatedUpstream:
    """Sends the role chunk and "Hel", then holds the rest until released."""
    fake = GatedUpstream(TEXTS, hold_at=2)
    fake.server = await aiohttp_server(fake.app)
    yield fake
    fake.release.set()  # never leave a generation hanging past the test


# -- helpers -------------------------------------------------------------------------------------

async def fake_client(make_client: MakeClient, upstream: FakeUpstream, **env: str) -> TestClient:
    return await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_MODEL="fake", **env)


async def until_event(ws: Socket, mid: str, event: str) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1].get("event") != event or frames[-1].get("id", "").rpartition(":")[0] != mid:
        frames.append(await receive(ws))
    return frames


def of_message(frames: list[dict[str, Any]], mid: str) -> list[dict[str, Any]]:
    """One message's event frames (with ids), in the order they arrived."""
    return [f for f in frames if f.get("id", "").rpartition(":")[0] == mid]


def assert_consecutive(events: list[dict[str, Any]], mid: str) -> None:
    assert [e["id"] for e in events] == [f"{mid}:{i}" for i in range(len(events))]


async def sse_events(client: TestClient, user: User, mid: str) -> list[dict[str, Any]]:
    """The message's events as the SSE endpoint gives them, in the WS frame shape."""
    resp = await client.get(f"/api/messages/{mid}/stream", headers=user.headers)
    assert resp.status == 200, await resp.text()
    return [{"id": e.id, "event": "delta" if e.event == "message" else e.event, "data": orjson.loads(e.data)}
            for e in parse_sse(await resp.read()) if e.data != "[DONE]"]


async def message_row(db: asyncpg.Pool, mid: str) -> asyncpg.Record:
    return await db.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(mid))


async def finished_row(db: asyncpg.Pool, mid: str) -> asyncpg.Record:
    async def finished() -> bool:
        return (await message_row(db, mid))["status"] not in ("pending", "streaming")

    await wait_for(finished)
    return await message_row(db, mid)


async def handshake_status(client: TestClient, url: str, headers: dict[str, str] | None = None) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(url, headers=headers)
    return refused.value.status


def upgrade_headers() -> dict[str, str]:
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}


# -- auth --------------------------------------------------------------------------------------------

async def test_one_turn_streams_accepted_events_and_end_with_the_sse_ids(client: TestClient, user: User,
                                                                          db: asyncpg.Pool):
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="Hello over a socket", client_message_id="ws-one")
        accepted = await receive(ws)
        raws = [await receive_raw(ws) for _ in range(DEMO_CHUNKS + 3)]  # metadata, deltas, usage, done
        assert await receive(ws) == end(accepted["assistant_message_id"])

    mid = accepted["assistant_message_id"]
    user_row = await db.fetchrow("SELECT * FROM messages WHERE user_id = $1 AND role = 'user'", user.id)
    assert accepted["event"] == "accepted" and accepted["duplicate"] is False
    assert accepted["thread_id"] == str(user_row["thread_id"])
    assert accepted["message"]["id"] == str(user_row["id"])
    assert accepted["message"]["content"] == "Hello over a socket"
    assert accepted["message"]["client_message_id"] == "ws-one"

    events = [orjson.loads(r) for r in raws]
    assert_consecutive(events, mid)
    assert [e["event"] for e in events] == ["metadata"] + ["delta"] * DEMO_CHUNKS + ["usage", "done"]
    deltas = [e["data"]["delta"] for e in events if e["event"] == "delta"]
    assert deltas == demo_reply("Hello over a socket", DEMO_CHUNKS)
    saved = await finished_row(db, mid)
    assert (saved["status"], saved["content"]) == ("complete", "".join(deltas))
    assert events[-1]["data"]["finish_reason"] == "stop"

    # the same events, ids and data as the SSE stream of that message; a delta frame's exact text
    sse = await sse_events(client, user, mid)
    assert events == sse
    assert raws[1] == '{"id":"%s:1","event":"delta","data":{"delta":%s}}' % (mid, orjson.dumps(deltas[0]).decode())


async def test_token_query_parameter_authenticates_an_api_key(client: TestClient, user: User, db: asyncpg.Pool):
    async with client.ws_connect(f"/ws?token={user.key}") as ws:
        await send(ws, type="chat", content="key in the query")
        frames = await until_ends(ws)
    mid = frames[0]["assistant_message_id"]
    assert frames[-2]["event"] == "done" and frames[-1] == end(mid)
    assert (await message_row(db, mid))["user_id"] == user.id


async def test_token_query_parameter_authenticates_a_jwt(make_client: MakeClient, db: asyncpg.Pool):
    client = await make_client(JWT_SECRET=JWT_SECRET, JWT_ISSUER=JWT_ISSUER)
    user_id = uuid.uuid4()
    token = jwt.encode({"sub": str(user_id), "email": "ws@example.com", "aud": "authenticated",
                        "iss": JWT_ISSUER, "exp": int(time.time()) + 3600}, JWT_SECRET, algorithm="HS256")
    async with client.ws_connect("/ws", params={"token": token}) as ws:
        await send(ws, type="chat", content="jwt in the query")
        frames = await until_ends(ws)
    mid = frames[0]["assistant_message_id"]
    assert frames[-1] == end(mid)
    assert (await message_row(db, mid))["user_id"] == user_id


async def test_missing_or_bad_credential_is_refused_before_the_upgrade(client: TestClient, make_user: Any):
    assert await handshake_status(client, "/ws") == 401
    assert await handshake_status(client, "/ws?token=gwk_" + "x" * 43) == 401
    assert await handshake_status(client, "/ws?token=") == 401
    assert await handshake_status(client, "/ws", {"Authorization": "Bearer gwk_" + "x" * 43}) == 401
    arena_only = await make_user(scopes=("arena",))
    assert await handshake_status(client, f"/ws?token={arena_only.key}") == 403

    # the refusal is the usual JSON error, not a socket
    resp = await client.get("/ws", headers=upgrade_headers())
    body = await resp.json()
    assert resp.status == 401
    assert body == {"error": {"type": "unauthorized",
                              "message": "missing bearer credential (Authorization: Bearer <key or JWT>)",
                              "request_id": resp.headers["X-Request-Id"]}}


async def test_plain_get_without_upgrade_is_a_json_400(client: TestClient, user: User):
    resp = await client.get("/ws", headers=user.headers)
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == "expected a WebSocket upgrade"


# -- turns ------------------------------------------------------------------------------------------

async def test_two_turns_run_concurrently_on_one_socket(make_client: MakeClient, upstream: FakeUpstream,
                                                         user: User, db: asyncpg.Pool):
    gate = asyncio.Event()

    async def held(_: dict[str, Any]) -> None:
        await gate.wait()

    upstream.queue(Reply(openai_stream(["a1", "a2"]), on_request=held),
                   Reply(openai_stream(["b1", "b2", "b3"]), on_request=held))
    client = await fake_client(make_client, upstream)
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="first", client_message_id="ws-c1")
        await send(ws, type="chat", content="second", client_message_id="ws-c2")
        # both accepted while neither reply has a byte: the second turn did not wait for the first
        accepted = {f["message"]["client_message_id"]: f for f in [await receive(ws), await receive(ws)]}

        async def both_at_the_upstream() -> bool:  # two replies in flight at once, both held
            return len(upstream.requests) == 2

        await wait_for(both_at_the_upstream)
        gate.set()
        frames = await until_ends(ws, 2)

    assert sorted(accepted) == ["ws-c1", "ws-c2"]
    assert len(upstream.requests) == 2
    for cmid in accepted:
        mid = accepted[cmid]["assistant_message_id"]
        events = of_message(frames, mid)
        assert_consecutive(events, mid)
        assert [e["event"] for e in events][-2:] == ["usage", "done"]
        assert end(mid) in frames and frames.index(end(mid)) > frames.index(events[-1])
        saved = await finished_row(db, mid)
        assert saved["status"] == "complete"
        assert "".join(e["data"]["delta"] for e in events if e["event"] == "delta") == saved["content"]
    contents = {(await message_row(db, a["assistant_message_id"]))["content"] for a in accepted.values()}
    assert contents == {"a1a2", "b1b2b3"}


async def test_duplicate_client_message_id_on_another_socket_starts_no_second_generation(
        make_client: MakeClient, upstream: FakeUpstream, user: User, db: asyncpg.Pool):
    client = await fake_client(make_client, upstream)
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="only once", client_message_id="ws-dup")
        first = await until_ends(ws)
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="only once", client_message_id="ws-dup")
        second = await until_ends(ws)

    mid = first[0]["assistant_message_id"]
    assert first[0]["duplicate"] is False and second[0]["duplicate"] is True
    assert second[0]["assistant_message_id"] == mid
    assert second[0]["message"]["id"] == first[0]["message"]["id"]
    assert second[1:] == first[1:]  # the same events, replayed, and the same end
    assert len(upstream.requests) == 1
    counts = await db.fetchrow("SELECT count(*) FILTER (WHERE role = 'user') AS u, "
                               "count(*) FILTER (WHERE role = 'assistant') AS a FROM messages WHERE user_id = $1",
                               user.id)
    assert (counts["u"], counts["a"]) == (1, 1)


async def test_bad_frames_get_error_frames_and_the_socket_keeps_working(client: TestClient, user: User,
                                                                         db: asyncpg.Pool):
    def refused(message: str, type_: str = "invalid_request", **context: Any) -> dict[str, Any]:
        return {"event": "error", "data": {"type": type_, "message": message}, **context}

    async def http_error(body: dict[str, Any]) -> dict[str, Any]:
        resp = await client.post("/api/chat", json=body, headers=user.headers)
        assert resp.status in (400, 404), await resp.text()
        error = (await resp.json())["error"]
        return refused(error["message"], error["type"])

    chats = [{}, {"content": ""}, {"content": 5}, {"content": "hi", "model": "no-such-model"},
             {"content": "hi", "thread_id": "not-a-uuid"}, {"content": "hi", "thread_id": str(uuid.uuid4())},
             {"content": "hi", "max_tokens": 0}, {"content": "hi", "temperature": "hot"}]
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await ws.send_str("not json")
        assert await receive(ws) == refused("frame is not valid JSON")
        await ws.send_str("[1, 2]")
        assert await receive(ws) == refused("frame must be a JSON object")
        await ws.send_bytes(b'{"type": "chat", "content": "binary"}')
        assert await receive(ws) == refused("frames must be JSON text")
        await send(ws, type="dance")
        assert await receive(ws) == refused("unknown frame type 'dance'; expected chat, resume or cancel")
        for body in chats:  # the same errors as POST /api/chat gives for the same body
            await send(ws, type="chat", **body)
            assert await receive(ws) == await http_error(body), body
        await send(ws, type="chat", content="hi", model="no-such-model", client_message_id="ws-bad")
        assert await receive(ws) == refused("unknown model 'no-such-model'", client_message_id="ws-bad")
        await send(ws, type="resume")
        assert await receive(ws) == refused("message_id must be a UUID string")
        unknown = str(uuid.uuid4())
        await send(ws, type="resume", message_id=unknown)
        assert await receive(ws) == refused("message not found", "not_found", message_id=unknown)
        await send(ws, type="resume", message_id=unknown, last_event_id=3)
        assert await receive(ws) == refused("last_event_id must be a string", message_id=unknown)

        await send(ws, type="chat", content="still here")
        frames = await until_ends(ws)
    assert frames[0]["event"] == "accepted" and frames[-2]["event"] == "done"
    # nothing but the one good turn was written
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 2


# -- the socket going away, resume, cancel -------------------------------------------------------------

async def test_closing_the_socket_mid_reply_leaves_the_generation_running(make_client: MakeClient,
                                                                           gated: GatedUpstream, user: User,
                                                                           db: asyncpg.Pool):
    client = await fake_client(make_client, gated)
    ws = await client.ws_connect("/ws", headers=user.headers)
    await send(ws, type="chat", content="keep going without me")
    mid = (await receive(ws))["assistant_message_id"]
    assert [f["event"] for f in await until_event(ws, mid, "delta")] == ["metadata", "delta"]
    await ws.close()

    assert uuid.UUID(mid) in client.server.app[GENERATIONS].live
    assert (await message_row(db, mid))["status"] == "streaming"
    gated.release.set()
    saved = await finished_row(db, mid)
    assert (saved["status"], saved["content"]) == ("complete", "".join(TEXTS))
    assert await db.fetchval("SELECT count(*) FROM usage WHERE message_id = $1", uuid.UUID(mid)) == 1


async def test_resume_of_a_finished_message_replays_exactly_the_rest(client: TestClient, user: User):
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="resume me later")
        first = await until_ends(ws)
    mid = first[0]["assistant_message_id"]
    events = first[1:-1]

    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="resume", message_id=mid, last_event_id=f"{mid}:5")
        assert await until_ends(ws) == [*events[6:], end(mid)]
        await send(ws, type="resume", message_id=mid)
        assert await until_ends(ws) == [*events, end(mid)]
        await send(ws, type="resume", message_id=mid, last_event_id=events[-1]["id"])
        assert await receive(ws) == end(mid)  # nothing left: just the end


async def test_resume_of_a_live_message_follows_it_from_the_last_event(make_client: MakeClient,
                                                                        gated: GatedUpstream, user: User):
    client = await fake_client(make_client, gated)
    async with client.ws_connect("/ws", headers=user.headers) as first, \
            client.ws_connect("/ws", headers=user.headers) as second:
        await send(first, type="chat", content="follow me")
        mid = (await receive(first))["assistant_message_id"]
        seen = await until_event(first, mid, "delta")
        await send(second, type="resume", message_id=mid, last_event_id=seen[-1]["id"])
        gated.release.set()
        rest = await until_ends(first)
        resumed = await until_ends(second)
    assert [f["id"] for f in seen] == [f"{mid}:0", f"{mid}:1"]
    assert resumed == rest
    assert [f.get("event") for f in rest] == ["delta"] * 3 + ["usage", "done", "end"]


async def test_cancel_frame_stops_the_reply_and_answers_with_the_saved_row(make_client: MakeClient,
                                                                           gated: GatedUpstream, user: User,
                                                                           db: asyncpg.Pool):
    client = await fake_client(make_client, gated)
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await send(ws, type="chat", content="stop me")
        mid = (await receive(ws))["assistant_message_id"]
        await until_event(ws, mid, "delta")
        await send(ws, type="cancel", message_id=mid)
        frames = [await receive(ws) for _ in range(4)]  # usage, done, end and the answer, in some order

    answer = next(f for f in frames if f["event"] == "cancelled")
    stream = [f for f in frames if f is not answer]
    assert [f["event"] for f in stream] == ["usage", "done", "end"]
    assert stream[1]["data"]["finish_reason"] == "cancelled"
    assert (answer["message"]["id"], answer["message"]["status"], answer["message"]["content"]) == (
        mid, "cancelled", "Hel")
    saved = await message_row(db, mid)
    assert (saved["status"], saved["content"]) == ("cancelled", "Hel")


# -- keep-alive ------------------------------------------------------------------------------------------

async def test_server_pings_on_the_heartbeat_and_answers_pings(make_client: MakeClient, user: User):
    client = await make_client(SSE_PING_S="0.2")
    async with client.ws_connect("/ws", headers=user.headers, autoping=False) as ws:
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.PING  # the server's heartbeat
        await ws.pong(msg.data)
        await ws.ping(b"are you there")
        msg = await ws.receive(timeout=5)
        while msg.type is WSMsgType.PING:  # a heartbeat may come first
            await ws.pong(msg.data)
            msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"are you there")
        await send(ws, type="chat", content="alive")
        frames = []
        while not frames or frames[-1].get("event") != "end":
            msg = await ws.receive(timeout=5)
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            else:
                frames.append(orjson.loads(msg.data))
    assert frames[-2]["event"] == "done"
