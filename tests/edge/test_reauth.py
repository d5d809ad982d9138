"""Open connections live only as long as the credential that opened them.

A WebSocket checks its credential on every frame and is watched in between: a revoked key
closes it with 4003, an expired JWT with 4001, each after a final error frame, and a frame sent
after the revocation writes nothing. An SSE stream of a revoked key ends with an `error` event
(no id) and `[DONE]` while the generation runs on and is saved. A stream token dies with the key
that asked for it.

Everything runs against the real app and PostgreSQL; "closed within a second" waits on the
close itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import jwt
import orjson
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from gateway.fleet.instance import lock_key
from gateway.state import INSTANCE
from gateway.store.keys import create_key, hash_key
from tests.support.arena import two_upstreams_toml
from tests.support.chat import (
    DONE,
    RETRY,
    TEXTS,
    MakeUpstream,
    frame,
    gated_client,
    stream_path,
    usage_rows,
    wait_finished,
)
from tests.support.common import MakeClient, User
from tests.support.fakes import FakeUpstream, Reply, openai_stream

JWT_SECRET = "gateway-reauth-test-jwt-secret-with-more-than-32-bytes"
JWT_ISSUER = "https://abcdefgh.supabase.co/auth/v1"
Socket = aiohttp.ClientWebSocketResponse


def closing_frame(message: str) -> dict[str, Any]:
    """The last frame of a socket whose credential lapsed (gateway/api/native/ws.py docstring)."""
    return {"event": "error", "data": {"type": "unauthorized", "message": message}}


def sse_lapse(message: str) -> bytes:
    """The end of an SSE stream whose credential lapsed: an error event without an id, then [DONE]."""
    return (b'event: error\ndata: {"type":"unauthorized","message":"%s","retryable":false}\n\n' % message.encode()
            + DONE)


async def key_id_of(db: asyncpg.Pool, user: User) -> uuid.UUID:
    """The id of the key the user's headers carry (the user may have others)."""
    return await db.fetchval("SELECT id FROM api_keys WHERE key_hash = $1", hash_key(user.key))


async def another_key(db: asyncpg.Pool, user: User, name: str) -> dict[str, str]:
    """Headers with a second key of the same user (made as the CLI would: only admin keys mint keys)."""
    _, key = await create_key(db, user.id, name, ["chat", "arena"])
    return {"Authorization": f"Bearer {key}"}


async def revoke(client: TestClient, user: User, db: asyncpg.Pool) -> None:
    """The key revokes itself over the API (a key may)."""
    resp = await client.delete(f"/api/keys/{await key_id_of(db, user)}", headers=user.headers)
    assert resp.status == 204, await resp.text()


async def message_count(db: asyncpg.Pool, user: User) -> int:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id)


async def one_turn(ws: Socket, content: str) -> list[dict[str, Any]]:
    """A chat frame and every frame up to its end: the socket works."""
    await ws.send_str(orjson.dumps({"type": "chat", "content": content}).decode())
    frames = [orjson.loads((await ws.receive(timeout=5)).data)]
    while frames[-1].get("event") != "end":
        frames.append(orjson.loads((await ws.receive(timeout=5)).data))
    return frames


async def expect_expulsion(ws: Socket, message: str, code: int, timeout: float = 5.0) -> None:
    """The final error frame, then the close with `code`: nothing else."""
    last = await ws.receive(timeout=timeout)
    assert last.type is WSMsgType.TEXT, last
    assert orjson.loads(last.data) == closing_frame(message)
    closed = await ws.receive(timeout=timeout)
    assert closed.type is WSMsgType.CLOSE, closed
    assert ws.close_code == code
    assert closed.extra == message


def jwt_for(user_id: uuid.UUID, exp: int) -> str:
    return jwt.encode({"sub": str(user_id), "email": "reauth@example.com", "aud": "authenticated",
                       "iss": JWT_ISSUER, "exp": exp}, JWT_SECRET, algorithm="HS256")


# -- WebSocket -------------------------------------------------------------------------------------

async def test_a_chat_frame_after_revocation_writes_nothing_and_the_socket_closes_4003(
        client: TestClient, user: User, db: asyncpg.Pool):
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        frames = await one_turn(ws, "before the revocation")
        assert frames[-2]["event"] == "done"
        await wait_finished(db, frames[0]["assistant_message_id"])
        before = await message_count(db, user)
        assert before == 2

        await revoke(client, user, db)
        await ws.send_str(orjson.dumps({"type": "chat", "content": "after", "client_message_id": "late"}).decode())
        await expect_expulsion(ws, "API key revoked", 4003)
    assert await message_count(db, user) == before
    assert await db.fetchval("SELECT count(*) FROM messages WHERE client_message_id = 'late'") == 0


async def test_each_frame_rechecks_the_key_even_when_no_revocation_was_heard(
        make_client: MakeClient, user: User, db: asyncpg.Pool):
    # no cache and no notification: only the per-frame check can see this revocation
    client = await make_client(KEY_CACHE_TTL_S="0")
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await one_turn(ws, "works")
        before = await message_count(db, user)
        await db.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1", user.id)
        await ws.send_str(orjson.dumps({"type": "chat", "content": "refused"}).decode())
        await expect_expulsion(ws, "API key revoked", 4003)
    assert await message_count(db, user) == before


async def test_an_idle_socket_closes_within_a_second_of_a_revocation_on_another_instance(
        make_client: MakeClient, user: User, db: asyncpg.Pool):
    a = await make_client(KEY_CACHE_TTL_S="3600")
    b = await make_client(KEY_CACHE_TTL_S="3600")
    async with a.ws_connect("/ws", headers=user.headers) as ws:
        await one_turn(ws, "then idle")
        await revoke(b, user, db)  # a hears it only through the NOTIFY
        await expect_expulsion(ws, "API key revoked", 4003, timeout=1.0)


async def test_an_idle_socket_of_a_revoked_key_waits_for_the_clients_close_frame(
        make_client: MakeClient, user: User, db: asyncpg.Pool):
    """The close handshake completes with 4003 however late the client answers the close frame
    (a client under load): the server does not drop the connection right after sending its own."""
    a = await make_client(KEY_CACHE_TTL_S="3600")
    b = await make_client(KEY_CACHE_TTL_S="3600")
    async with a.ws_connect("/ws", headers=user.headers, autoclose=False) as ws:
        await one_turn(ws, "then idle")
        await revoke(b, user, db)
        last = await ws.receive(timeout=5)
        assert last.type is WSMsgType.TEXT and orjson.loads(last.data) == closing_frame("API key revoked")
        closed = await ws.receive(timeout=5)
        assert (closed.type, closed.data, closed.extra) == (WSMsgType.CLOSE, 4003, "API key revoked")
        await asyncio.sleep(0.5)  # the client answers late: the connection is still there to answer on
        await ws.close()
        assert ws.exception() is None
        assert ws.close_code == 4003


async def test_a_revocation_missed_while_the_listener_was_down_closes_the_socket_on_reconnect(
        make_client: MakeClient, user: User, db: asyncpg.Pool):
    client = await make_client(KEY_CACHE_TTL_S="3600", SWEEP_S="0.05")
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await one_turn(ws, "then idle")
        # cut the instance's LISTEN connection, then revoke while nobody listens (see test_keys)
        unsigned = lock_key(client.app[INSTANCE].id) & 0xFFFF_FFFF_FFFF_FFFF
        pid = await db.fetchval("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid "
                                "AND objid = $2::oid AND objsubid = 1 AND granted", unsigned >> 32,
                                unsigned & 0xFFFF_FFFF)
        await db.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1", user.id)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        await expect_expulsion(ws, "API key revoked", 4003)


async def test_a_jwt_socket_closes_with_4001_at_exp(make_client: MakeClient, db: asyncpg.Pool):
    client = await make_client(JWT_SECRET=JWT_SECRET, JWT_ISSUER=JWT_ISSUER, JWT_LEEWAY_S="0")
    user_id = uuid.uuid4()
    exp = int(time.time()) + 3
    async with client.ws_connect("/ws", params={"token": jwt_for(user_id, exp)}) as ws:
        frames = await one_turn(ws, "before exp")
        assert frames[-2]["event"] == "done"
        # then idle, heartbeats and all: the timer at exp ends it
        await expect_expulsion(ws, "token expired", 4001, timeout=10.0)
        assert time.time() >= exp
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user_id) == 2


async def test_a_socket_of_a_key_closes_with_4001_when_the_key_expires(
        client: TestClient, user: User, db: asyncpg.Pool):
    expires = datetime.now(UTC) + timedelta(seconds=2)
    await db.execute("UPDATE api_keys SET expires_at = $2 WHERE user_id = $1", user.id, expires)
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await expect_expulsion(ws, "API key expired", 4001, timeout=10.0)
        assert datetime.now(UTC) >= expires


async def test_other_keys_sockets_stay_open(client: TestClient, user: User, db: asyncpg.Pool):
    second = await another_key(db, user, "second")
    async with client.ws_connect("/ws", headers=user.headers) as revoked, \
            client.ws_connect("/ws", headers=second) as kept:
        await revoke(client, user, db)
        await expect_expulsion(revoked, "API key revoked", 4003)
        frames = await one_turn(kept, "still here")
        assert frames[-2]["event"] == "done"


# -- SSE ---------------------------------------------------------------------------------------------

async def test_an_sse_stream_of_a_revoked_key_ends_with_an_error_event_and_the_reply_is_saved(
        make_client: MakeClient, gated: MakeUpstream, user: User, db: asyncpg.Pool):
    up = await gated(TEXTS, hold_at=2)
    client = await gated_client(make_client, up)
    resp = await client.post("/api/chat", json={"content": "held"}, headers=user.headers)
    accepted = await resp.json()
    mid = accepted["assistant_message_id"]
    other = await another_key(db, user, "other")

    by_header = await client.get(stream_path(mid), headers=user.headers)
    by_token = await client.get(accepted["stream_url"])
    by_other_key = await client.get(stream_path(mid), headers=other)
    seen = frame(mid, 2, {"delta": TEXTS[1]})
    for listener in (by_header, by_token, by_other_key):
        assert listener.status == 200
        head = await asyncio.wait_for(listener.content.readuntil(seen), 5)
        assert head.startswith(RETRY) and head.endswith(frame(mid, 1, {"delta": TEXTS[0]}) + seen)

    await revoke(client, user, db)
    for listener in (by_header, by_token):
        assert await asyncio.wait_for(listener.read(), 5) == sse_lapse("API key revoked")
    saved = await db.fetchrow("SELECT status FROM messages WHERE id = $1", uuid.UUID(mid))
    assert saved["status"] == "streaming"  # the relays ended, not the generation

    up.release()
    rest = await asyncio.wait_for(by_other_key.read(), 5)  # another key's stream runs to the end
    assert frame(mid, len(TEXTS), {"delta": TEXTS[-1]}) in rest and rest.endswith(DONE)
    saved = await wait_finished(db, mid)
    assert (saved["status"], saved["content"]) == ("complete", "".join(TEXTS))
    assert len(await usage_rows(db, mid)) == 1


async def test_an_sse_stream_of_a_jwt_ends_at_exp_and_the_reply_is_saved(
        make_client: MakeClient, gated: MakeUpstream, db: asyncpg.Pool):
    up = await gated(TEXTS, hold_at=2)
    client = await gated_client(make_client, up, JWT_SECRET=JWT_SECRET, JWT_ISSUER=JWT_ISSUER, JWT_LEEWAY_S="0")
    exp = int(time.time()) + 3
    headers = {"Authorization": f"Bearer {jwt_for(uuid.uuid4(), exp)}"}
    resp = await client.post("/api/chat", json={"content": "held past exp", "stream": True}, headers=headers)
    assert resp.status == 200
    head = await asyncio.wait_for(resp.content.readuntil(b'data: {"delta":"upon "}\n\n'), 5)
    mid = head.split(b"id: ")[1].split(b":")[0].decode()  # the metadata event's id names the message
    assert await asyncio.wait_for(resp.read(), 10) == sse_lapse("token expired")
    assert time.time() >= exp
    up.release()
    saved = await wait_finished(db, mid)
    assert (saved["status"], saved["content"]) == ("complete", "".join(TEXTS))


async def test_an_arena_stream_of_a_revoked_key_ends_with_an_error_event_and_both_slots_finish(
        make_client: MakeClient, config_file: Any, upstream: FakeUpstream, upstream_b: FakeUpstream,
        user: User, db: asyncpg.Pool):
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["A"]), on_request=lambda _: release.wait()))
    upstream_b.queue(Reply(openai_stream(["B"]), on_request=lambda _: release.wait()))
    client = await make_client(GATEWAY_CONFIG=config_file(two_upstreams_toml(upstream.base_url,
                                                                              upstream_b.base_url)))
    resp = await client.post("/api/arena", headers=user.headers,
                             json={"content": "held", "models": ["alpha", "beta"], "stream": True})
    assert resp.status == 200  # the headers are out; the retry line waits for the first event
    await revoke(client, user, db)
    assert await asyncio.wait_for(resp.read(), 5) == RETRY + sse_lapse("API key revoked")

    release.set()
    rows = await db.fetch("SELECT id FROM messages WHERE user_id = $1 AND role = 'assistant'", user.id)
    assert len(rows) == 2
    for r in rows:
        assert (await wait_finished(db, r["id"]))["status"] == "complete"


# -- stream tokens ------------------------------------------------------------------------------------

async def test_a_stream_token_issued_before_a_revocation_is_refused_after_it(
        client: TestClient, user: User, db: asyncpg.Pool):
    resp = await client.post("/api/chat", json={"content": "token"}, headers=user.headers)
    accepted = await resp.json()
    await wait_finished(db, accepted["assistant_message_id"])
    ok = await client.get(accepted["stream_url"])
    assert ok.status == 200 and (await ok.read()).endswith(DONE)

    await revoke(client, user, db)
    refused = await client.get(accepted["stream_url"])
    assert refused.status == 401
    body = await refused.json()
    assert (body["error"]["type"], body["error"]["message"]) == ("unauthorized", "API key revoked")


async def test_a_stream_token_names_its_key_and_never_outlives_it(client: TestClient, user: User,
                                                                  db: asyncpg.Pool):
    expires = datetime.now(UTC) + timedelta(seconds=60)
    await db.execute("UPDATE api_keys SET expires_at = $2 WHERE user_id = $1", user.id, expires)
    resp = await client.post("/api/chat", json={"content": "short-lived key"}, headers=user.headers)
    token = (await resp.json())["stream_url"].partition("?token=")[2]
    user_hex, key_hex, until, _ = token.split(".")
    assert (user_hex, key_hex) == (user.id.hex, (await key_id_of(db, user)).hex)
    assert int(until) == int(expires.timestamp())  # not the 600 s TTL: the key's own end


async def test_a_stream_token_of_a_jwt_names_no_key_and_works(make_client: MakeClient, db: asyncpg.Pool):
    client = await make_client(JWT_SECRET=JWT_SECRET, JWT_ISSUER=JWT_ISSUER)
    user_id = uuid.uuid4()
    headers = {"Authorization": f"Bearer {jwt_for(user_id, int(time.time()) + 3600)}"}
    resp = await client.post("/api/chat", json={"content": "jwt token"}, headers=headers)
    accepted = await resp.json()
    token = accepted["stream_url"].partition("?token=")[2]
    assert token.split(".")[:2] == [user_id.hex, ""]
    await wait_finished(db, accepted["assistant_message_id"])
    ok = await client.get(accepted["stream_url"])
    assert ok.status == 200 and (await ok.read()).endswith(DONE)
