"""A generation outlives its listeners: resume by event id, fan-out to many listeners, the
`stream_url` token, cancel ("stop but finish"), crash recovery and peers on one database.

Upstreams here hold their reply at a chosen chunk until the test releases it, so "while it is
still generating" is a fact of the test, not a race. Expected streams are built from the SSE
protocol in DESIGN.md and compared byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.edge.middleware import AccessLogger
from gateway.providers.base import estimate_tokens
from gateway.state import DB, GENERATIONS, INSTANCE, STREAM_TOKENS
from gateway.store import messages as message_store
from tests.support.chat import (
    DONE,
    RETRY,
    TEXTS,
    accept,
    complete_frames,
    frame,
    gated_client,
    open_listeners,
    read_blocks,
    row,
    stopped_frames,
    stream_path,
    usage_json,
    usage_rows,
    wait_finished,
    wire,
)
from tests.support.common import FakeClock, User, wait_for
from tests.support.fakes import parse_sse

# -- a fake upstream that holds its reply until the test lets it go -------------------------------


# -- building the expected wire bytes -----------------------------------------------------------


# -- reading streams ----------------------------------------------------------------------------


# -- 1. resume after a cut -------------------------------------------------------------------------

# (where the client lost the connection, how it says what it saw, where the upstream holds, blocks read)
CUTS = [
    pytest.param("before_metadata", None, 0, 0, id="before-metadata"),  # only the headers arrived: no id seen
    pytest.param("mid_deltas", "header", 3, 3, id="mid-deltas-header"),  # retry + metadata, 2 deltas
    pytest.param("mid_deltas", "query", 3, 3, id="mid-deltas-query"),
    pytest.param("before_done", "header", None, 1 + len(TEXTS) + 1, id="before-done-header"),  # ... usage
    pytest.param("before_done", "query", None, 1 + len(TEXTS) + 1, id="before-done-query"),
]


def resume_args(user: User, via: str | None, last_id: str | None) -> dict[str, Any]:
    if via == "header":
        return {"headers": {**user.headers, "Last-Event-ID": last_id}}
    if via == "query":
        return {"headers": user.headers, "params": {"lastEventId": last_id}}
    return {"headers": user.headers}


@pytest.mark.parametrize("cut, via, hold_at, blocks", CUTS)
async def test_resume_after_a_cut_continues_exactly_after_the_last_event_seen(
        cut, via, hold_at, blocks, gated, make_client, user, db):
    up = await gated(TEXTS, hold_at)
    client = await gated_client(make_client, up)
    resp = await client.post("/api/chat", json={"content": "tell me a story", "stream": True}, headers=user.headers)
    seen = await read_blocks(resp, blocks)
    resp.close()  # the connection drops here
    assert not seen or seen[0].startswith(RETRY + b"id: ")  # retry rides in the first event's block
    mid = str(await db.fetchval("SELECT id FROM messages WHERE user_id = $1 AND role = 'assistant'", user.id))
    seen_events = parse_sse(b"".join(seen))
    last_id = seen_events[-1].id if seen_events else None
    assert last_id == {"before_metadata": None, "mid_deltas": f"{mid}:2",
                       "before_done": f"{mid}:{len(TEXTS) + 1}"}[cut]

    resumed_resp = await client.get(stream_path(mid), **resume_args(user, via, last_id))
    assert resumed_resp.status == 200
    up.release()  # where the upstream holds, the resumed listener is attached before the rest exists
    resumed = await resumed_resp.read()

    saved = await wait_finished(db, mid)
    assert (saved["status"], saved["content"]) == ("complete", "".join(TEXTS))
    full = complete_frames(saved, TEXTS)
    # what arrived before the cut and after it is the whole stream, each event exactly once
    assert resumed.startswith(RETRY) and resumed.endswith(DONE)
    assert b"".join(seen) + (resumed[len(RETRY):] if seen else resumed) == wire(full)
    events = parse_sse(b"".join(seen) + resumed)
    assert [e.id for e in events] == [f"{mid}:{i}" for i in range(len(full))] + [None]
    deltas = [orjson.loads(e.data)["delta"] for e in events if e.event == "message" and e.id]
    assert "".join(deltas) == saved["content"]

    # once finished, the same resume is replayed from the database with the same bytes
    assert up.requests == 1 and client.app[GENERATIONS].get(uuid.UUID(mid)) is None
    replayed = await client.get(stream_path(mid), **resume_args(user, via, last_id))
    assert await replayed.read() == resumed


async def test_resume_after_the_last_event_answers_204(gated, make_client, user, db):
    up = await gated(TEXTS)
    client = await gated_client(make_client, up)
    answer = await accept(client, user, "all of it")
    mid = answer["assistant_message_id"]
    saved = await wait_finished(db, mid)
    last = f"{mid}:{len(complete_frames(saved, TEXTS)) - 1}"
    for args in (resume_args(user, "header", last), resume_args(user, "query", last)):
        resp = await client.get(stream_path(mid), **args)
        assert (resp.status, await resp.read()) == (204, b"")


async def test_duplicate_post_attaches_to_the_live_generation(gated, make_client, user, db):
    up = await gated(TEXTS, hold_at=2)
    client = await gated_client(make_client, up)
    first = await accept(client, user, "only once", client_message_id="attach-1")
    again = await client.post("/api/chat", json={"content": "only once", "client_message_id": "attach-1",
                                                 "stream": True}, headers=user.headers)
    assert again.status == 200
    up.release()
    body = await again.read()
    saved = await wait_finished(db, first["assistant_message_id"])
    assert body == wire(complete_frames(saved, TEXTS))
    assert up.requests == 1
    assert len(await db.fetch("SELECT id FROM messages WHERE reply_to = $1", saved["reply_to"])) == 1


# -- 2. fan-out ------------------------------------------------------------------------------------

async def test_hundred_listeners_on_one_live_generation_get_identical_complete_streams(gated, make_client, user,
                                                                                        db):
    up = await gated(TEXTS, hold_at=2)
    client = await gated_client(make_client, up)
    mid = (await accept(client, user, "for everyone"))["assistant_message_id"]
    listeners = await open_listeners(client, user, mid, 100)
    up.release()
    bodies = await asyncio.gather(*(r.read() for r in listeners))
    saved = await wait_finished(db, mid)
    assert set(bodies) == {wire(complete_frames(saved, TEXTS))}
    assert up.requests == 1
    assert len(await usage_rows(db, mid)) == 1


async def raw_listener(client: TestClient, user: User, mid: str) -> tuple[socket.socket, bytes]:
    """A listener that reads its response headers (so it is attached) and then nothing more, with
    a tiny receive window so the gateway's writes to it back up at once. HTTP/1.0: the body comes
    unchunked until the server closes. Returns the socket and what it read so far."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (client.host, client.port))
    await loop.sock_sendall(sock, f"GET {stream_path(mid)} HTTP/1.0\r\nHost: gw\r\n"
                                  f"Authorization: Bearer {user.key}\r\n\r\n".encode())
    got = b""
    while b"\r\n\r\n" not in got:
        got += await loop.sock_recv(sock, 1)
    return sock, got


async def read_to_eof(sock: socket.socket) -> bytes:
    loop, chunks = asyncio.get_running_loop(), []
    while chunk := await loop.sock_recv(sock, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_listener_that_never_reads_holds_up_neither_the_others_nor_the_generation(gated, make_client,
                                                                                          user, db):
    # 6 MB of reply: far more than the socket buffers between the gateway and the stuck listener
    texts = [f"{i:04d}" + "x" * (64 * 1024 - 4) for i in range(96)]
    up = await gated(texts, hold_at=1)
    client = await gated_client(make_client, up)
    mid = (await accept(client, user, "a long one"))["assistant_message_id"]
    stuck, stuck_head = await raw_listener(client, user, mid)
    try:
        reader = (await open_listeners(client, user, mid, 1))[0]
        up.release()
        async with asyncio.timeout(20):
            body = await reader.read()
            saved = await wait_finished(db, mid)  # while `stuck` still reads nothing
        expected = wire(complete_frames(saved, texts))
        assert body == expected
        assert (saved["status"], saved["content"]) == ("complete", "".join(texts))
        # the stuck listener was only behind: reading now, it gets the same complete stream
        async with asyncio.timeout(20):
            raw = stuck_head + await read_to_eof(stuck)
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] in (b"HTTP/1.0 200 OK", b"HTTP/1.1 200 OK"), head
        assert rest == expected
    finally:
        stuck.close()


async def test_long_reply_resumes_from_an_early_id_exactly_live_and_after_finish(gated, make_client, user, db):
    texts = [f"w{i} " for i in range(400)]
    up = await gated(texts, hold_at=300)  # held with 301 events in the log: 128 kept as bytes
    client = await gated_client(make_client, up)
    resp = await client.post("/api/chat", json={"content": "go long", "stream": True}, headers=user.headers)
    seen = await read_blocks(resp, 1 + 300)  # retry + metadata, 300 deltas: the log is held there
    mid = parse_sse(seen[0])[0].id.rpartition(":")[0]
    generation = client.app[GENERATIONS].get(uuid.UUID(mid))
    assert generation is not None and generation.events.count == 301

    live = await client.get(stream_path(mid), headers={**user.headers, "Last-Event-ID": f"{mid}:5"})
    live_head = await read_blocks(live, 301 - 6)  # seq 6..300 out of the held log (retry on the first)
    up.release()
    body = b"".join(seen) + await resp.read()
    live_body = b"".join(live_head) + await live.read()

    saved = await wait_finished(db, mid)
    full = complete_frames(saved, texts)
    assert body == wire(full)
    assert live_body == wire(full[6:])
    # after the finish: the same tail out of the finished log (old deltas re-encoded) ...
    assert generation.finished and generation.events.count == len(full)
    assert [e.sse async for batch in generation.follow(5) for e in batch] == full[6:]
    # ... and from the database
    replayed = await client.get(stream_path(mid), headers={**user.headers, "Last-Event-ID": f"{mid}:5"})
    assert await replayed.read() == wire(full[6:])


# -- 3. stream_url: a short-lived token in the URL ----------------------------------------------

async def test_stream_url_streams_to_an_eventsource_without_authorization(gated, make_client, user, db):
    up = await gated(TEXTS, hold_at=2)
    client = await gated_client(make_client, up)
    answer = await accept(client, user, "browser please")
    mid = answer["assistant_message_id"]
    url = answer["stream_url"]
    assert url.startswith(f"/api/messages/{mid}/stream?token=")
    live = await client.get(url)  # no Authorization header, as an EventSource sends it
    assert live.status == 200 and live.headers["Content-Type"] == "text/event-stream"
    up.release()
    saved = await wait_finished(db, mid)
    full = complete_frames(saved, TEXTS)
    assert await live.read() == wire(full)
    # an EventSource reconnects to the same URL with Last-Event-ID
    resumed = await client.get(url, headers={"Last-Event-ID": f"{mid}:4"})
    assert await resumed.read() == wire(full[5:])


async def expect_unauthorized(client: TestClient, path: str, **params: str) -> None:
    resp = await client.get(path, params=params)
    assert resp.status == 401, await resp.text()
    assert (await resp.json())["error"]["type"] == "unauthorized"


async def test_stream_token_for_another_message_or_user_or_garbage_is_refused(client, make_user, user, db):
    first = await accept(client, user, "one")
    second = await accept(client, user, "two")
    stranger = await make_user()
    theirs = await accept(client, stranger, "three")
    for answer in (first, second, theirs):
        await wait_finished(db, answer["assistant_message_id"])
    token_of = {a["assistant_message_id"]: a["stream_url"].partition("?token=")[2] for a in (first, second, theirs)}
    target = stream_path(first["assistant_message_id"])

    # a token is bound to its message: the owner's token for another message, a stranger's token
    await expect_unauthorized(client, target, token=token_of[second["assistant_message_id"]])
    await expect_unauthorized(client, target, token=token_of[theirs["assistant_message_id"]])
    # forged, mangled, empty
    genuine = token_of[first["assistant_message_id"]]
    user_hex, key_hex, expires, signature = genuine.split(".")
    mangled = signature[:-1] + ("B" if signature[-1] == "A" else "A")
    for bad in ("garbage", "a.b.c", "a.b.c.d", "", f"{stranger.id.hex}.{key_hex}.{expires}.{signature}",
                f"{user_hex}.{int(expires) + 3600}.{signature}",
                f"{user_hex}.{key_hex}.{int(expires) + 3600}.{signature}",
                f"{user_hex}..{expires}.{signature}", f"{user_hex}.{key_hex}.{expires}.{mangled}"):
        await expect_unauthorized(client, target, token=bad)
    # a genuine token signed for a stranger and this message does not make it theirs
    minted = client.app[STREAM_TOKENS].issue(stranger.id, uuid.UUID(first["assistant_message_id"]))
    resp = await client.get(target, params={"token": minted})
    assert resp.status == 404
    # the genuine token still works
    resp = await client.get(target, params={"token": genuine})
    assert resp.status == 200 and (await resp.read()).endswith(DONE)


async def test_expired_stream_token_is_refused(make_client, user, db, monkeypatch):
    client = await make_client(STREAM_TOKEN_TTL_S="2")
    # create_app takes no clock: the app's StreamTokens gets a hand-set one (issue and verify both read it)
    clock = FakeClock(1_700_000_000.5)
    monkeypatch.setattr(client.app[STREAM_TOKENS], "_clock", clock)
    answer = await accept(client, user, "quick")
    mid = answer["assistant_message_id"]
    await wait_finished(db, mid)
    token = answer["stream_url"].partition("?token=")[2]
    expires = 1_700_000_003  # issued at .5 with a 2 s TTL, rounded up to the whole second
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    assert token.split(".")[:3] == [user.id.hex, key_id.hex, str(expires)]

    clock.now = expires - 0.001  # its last moment: still good
    resp = await client.get(answer["stream_url"])
    assert resp.status == 200 and (await resp.read()).endswith(DONE)

    clock.now = expires
    resp = await client.get(stream_path(mid), params={"token": token})
    assert resp.status == 401
    assert (await resp.json())["error"] == {"type": "unauthorized", "message": "stream token expired",
                                            "request_id": resp.headers["X-Request-Id"]}


async def test_stream_token_never_reaches_the_access_log(aiohttp_server, aiohttp_client, make_settings, user, db,
                                                         caplog):
    # the real app behind the access logger `python -m gateway serve` installs
    client = await aiohttp_client(await aiohttp_server(create_app(make_settings()), access_log_class=AccessLogger))
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    answer = await accept(client, user, "log me not")
    await wait_finished(db, answer["assistant_message_id"])
    token = answer["stream_url"].partition("?token=")[2]
    resp = await client.get(answer["stream_url"])
    await resp.read()
    resp = await client.get(stream_path(answer["assistant_message_id"]), params={"token": "garbage", "x": "1"})
    assert resp.status == 401

    async def logged() -> bool:
        return sum("/stream?" in r.getMessage() for r in caplog.records if r.name == "aiohttp.access") == 2

    await wait_for(logged)
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert not any(token in line or "garbage" in line for line in lines)
    stream_lines = [line for line in lines if "/stream?" in line]
    mid = answer["assistant_message_id"]
    assert f"GET /api/messages/{mid}/stream?token=[redacted] 200" in stream_lines[0]
    assert stream_lines[0].endswith(f"user={user.id}")
    assert f"GET /api/messages/{mid}/stream?token=[redacted]&x=1 401" in stream_lines[1]


# -- 4. cancel: stop but finish ----------------------------------------------------------------------

async def test_cancel_stops_the_upstream_saves_the_partial_reply_and_ends_every_listener(gated, make_client,
                                                                                         user, db):
    up = await gated(TEXTS, hold_at=3)
    client = await gated_client(make_client, up)
    prompt = "stop me midway"
    mid = (await accept(client, user, prompt))["assistant_message_id"]
    listeners = await open_listeners(client, user, mid, 3)
    heads = [await read_blocks(r, 1 + 3) for r in listeners]  # retry + metadata, the 3 deltas out so far

    resp = await client.post(f"/api/messages/{mid}/cancel", headers=user.headers)
    assert resp.status == 200
    answer = await resp.json()
    saved = await row(db, mid)
    partial = TEXTS[:3]
    assert (answer["id"], answer["status"], answer["content"]) == (mid, "cancelled", "".join(partial))
    assert (saved["status"], saved["content"], saved["error"]) == ("cancelled", "".join(partial), None)
    assert saved["metadata"]["finish_reason"] == "cancelled"

    expected = wire(stopped_frames(saved, prompt, partial, "cancelled"))
    for head, listener in zip(heads, listeners, strict=True):
        assert b"".join(head) + await listener.read() == expected
    prompt_tokens, completion_tokens = estimate_tokens(prompt), estimate_tokens("".join(partial))
    assert [(u["prompt_tokens"], u["completion_tokens"], u["estimated"]) for u in await usage_rows(db, mid)] == [
        (prompt_tokens, completion_tokens, True)]
    assert (saved["prompt_tokens"], saved["completion_tokens"]) == (prompt_tokens, completion_tokens)

    # the upstream was hung up on: released now, its very next write fails
    up.release()
    await asyncio.wait_for(up.hung_up.wait(), 5)
    assert up.sent == 1 + 3 < len(up.pieces)

    # cancelling again changes nothing
    again = await client.post(f"/api/messages/{mid}/cancel", headers=user.headers)
    assert again.status == 200 and await again.json() == answer
    assert dict(await row(db, mid)) == dict(saved)
    assert len(await usage_rows(db, mid)) == 1


async def test_cancel_of_a_finished_message_leaves_it_unchanged(client, user, db):
    mid = (await accept(client, user, "done already"))["assistant_message_id"]
    before = await wait_finished(db, mid)
    assert before["status"] == "complete"
    resp = await client.post(f"/api/messages/{mid}/cancel", headers=user.headers)
    assert resp.status == 200
    got = await resp.json()
    assert (got["id"], got["status"], got["content"]) == (mid, "complete", before["content"])
    assert dict(await row(db, mid)) == dict(before)
    assert len(await usage_rows(db, mid)) == 1


async def test_cancel_of_another_users_message_is_not_found(gated, make_client, make_user, user, db):
    up = await gated(TEXTS, hold_at=2)
    client = await gated_client(make_client, up)
    mid = (await accept(client, user, "mine"))["assistant_message_id"]
    stranger = await make_user()
    resp = await client.post(f"/api/messages/{mid}/cancel", headers=stranger.headers)
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "not_found"
    assert (await row(db, mid))["status"] == "streaming"
    up.release()
    saved = await wait_finished(db, mid)
    assert (saved["status"], saved["content"]) == ("complete", "".join(TEXTS))


# -- 5. crash recovery -------------------------------------------------------------------------------

async def insert_live_reply(db: asyncpg.Pool, user: User, instance_id: uuid.UUID) -> uuid.UUID:
    """A turn as an instance leaves it mid-generation: the user message, and its reply streaming."""
    async with db.acquire() as conn, conn.transaction():
        thread_id = await conn.fetchval("INSERT INTO threads (user_id, title) VALUES ($1, 'crash') RETURNING id",
                                        user.id)
        user_message = await conn.fetchval(
            "INSERT INTO messages (thread_id, user_id, role, content, status) "
            "VALUES ($1, $2, 'user', 'hello?', 'complete') RETURNING id", thread_id, user.id)
        return await conn.fetchval(
            "INSERT INTO messages (thread_id, user_id, role, content, status, reply_to, instance_id, metadata) "
            "VALUES ($1, $2, 'assistant', 'half a rep', 'streaming', $3, $4, '{\"category\": \"general\"}') "
            "RETURNING id", thread_id, user.id, user_message, instance_id)


async def test_reply_left_streaming_by_a_dead_instance_is_interrupted_at_start(make_client, user, db):
    mid = await insert_live_reply(db, user, uuid.uuid4())  # nobody holds that instance's lock
    client = await make_client(SWEEP_S="1000")
    saved = await row(db, mid)
    assert (saved["status"], saved["content"]) == ("interrupted", "half a rep")
    assert saved["metadata"] == {"category": "general", "swept": True, "finish_reason": "interrupted",
                                 "estimated": True}
    assert saved["finished_at"] is not None
    # settled once, to an estimate of what it consumed (this row was made with no reservation: no prompt)
    completion = estimate_tokens("half a rep")
    assert [(u["prompt_tokens"], u["completion_tokens"], u["estimated"]) for u in await usage_rows(db, mid)] == [
        (0, completion, True)]
    assert (saved["prompt_tokens"], saved["completion_tokens"]) == (0, completion)
    # a listener gets the interrupted reply and its end, not a wait
    resp = await client.get(stream_path(mid), headers=user.headers)
    assert resp.status == 200
    meta = {"thread_id": saved["thread_id"], "user_message_id": saved["reply_to"], "message_id": mid,
            "model": None, "provider": None, "category": "general", "auto": False, "fallback_from": None}
    assert await resp.read() == wire([
        frame(mid, 0, meta, "metadata"), frame(mid, 1, {"delta": "half a rep"}),
        frame(mid, 2, usage_json(0, completion, True), "usage"),
        frame(mid, 3, {"finish_reason": "interrupted", "message_id": mid, "attempts": []}, "done")])


async def test_reply_of_a_live_instance_is_left_alone_by_another_instances_sweep(make_client, user, db):
    owner = await make_client(SWEEP_S="1000")
    mid = await insert_live_reply(db, user, owner.app[INSTANCE].id)
    other = await make_client(SWEEP_S="1000")  # sweeps at start
    await other.app[INSTANCE].sweep()
    assert (await row(db, mid))["status"] == "streaming"
    # once the owner is gone, the same sweep takes its row for dead
    await owner.close()
    await other.app[INSTANCE].sweep()
    assert (await row(db, mid))["status"] == "interrupted"


# -- 6. peers on one database --------------------------------------------------------------------------

async def test_stream_on_another_instance_waits_then_replays_from_the_database(gated, make_client, user, db,
                                                                            monkeypatch):
    up = await gated(TEXTS, hold_at=2)
    a = await gated_client(make_client, up, SWEEP_S="1000")
    b = await gated_client(make_client, up, SWEEP_S="1000")
    mid = (await accept(a, user, "over there"))["assistant_message_id"]
    on_a = (await open_listeners(a, user, mid, 1))[0]
    # every read of the row by b, and the status it found: b's wait is seen, not slept through
    seen_by_b: list[str] = []
    get_message = message_store.get_message

    async def spy(pool: asyncpg.Pool, *args: Any) -> dict[str, Any]:
        message = await get_message(pool, *args)
        if pool is b.app[DB].pool:
            seen_by_b.append(message["status"])
        return message

    monkeypatch.setattr(message_store, "get_message", spy)
    on_b = asyncio.create_task(b.get(stream_path(mid), headers=user.headers))

    async def b_polled_twice() -> bool:  # found it streaming, waited a poll interval, found it streaming again
        return len(seen_by_b) >= 2

    await wait_for(b_polled_twice)
    assert seen_by_b[:2] == ["streaming", "streaming"]
    # b answered at once (headers, retry, then pings: no 503, however long it takes) but sent no event
    resp_b = await on_b
    assert resp_b.status == 200 and not resp_b.content.at_eof()
    assert (await row(db, mid))["status"] == "streaming"
    up.release()
    async with asyncio.timeout(10):
        body_b = await resp_b.read()
    saved = await wait_finished(db, mid)
    expected = wire(complete_frames(saved, TEXTS))
    assert await on_a.read() == expected
    assert (resp_b.status, body_b) == (200, expected)
    assert b.app[GENERATIONS].get(uuid.UUID(mid)) is None and up.requests == 1


async def test_cancel_sent_to_another_instance_reaches_the_owner(gated, make_client, user, db):
    up = await gated(TEXTS, hold_at=3)
    a = await gated_client(make_client, up, SWEEP_S="1000")
    b = await gated_client(make_client, up, SWEEP_S="1000")
    prompt = "cancel from afar"
    mid = (await accept(a, user, prompt))["assistant_message_id"]
    on_a = (await open_listeners(a, user, mid, 1))[0]
    head = await read_blocks(on_a, 1 + 3)  # retry + metadata, 3 deltas
    async with asyncio.timeout(10):
        resp = await b.post(f"/api/messages/{mid}/cancel", headers=user.headers)
        answer = await resp.json()
    assert resp.status == 200
    assert (answer["id"], answer["status"], answer["content"]) == (mid, "cancelled", "".join(TEXTS[:3]))
    saved = await row(db, mid)
    assert b"".join(head) + await on_a.read() == wire(stopped_frames(saved, prompt, TEXTS[:3], "cancelled"))
    assert len(await usage_rows(db, mid)) == 1
    up.release()
    await asyncio.wait_for(up.hung_up.wait(), 5)
