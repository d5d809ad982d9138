"""Live streams across instances: two apps on one database and one Redis.

A reply generating on instance A is followed from instance B live — B's listeners get each event
while A is still generating, byte for byte what A's own listeners get — through one reader task
per (instance, message). Without Redis, B waits with pings while the row is live, then replays.
Redis away or restarted mid-stream: A's listeners never notice, B's fall back to the database
(checkpointed content, then the finished row) and come back to Redis; nothing is lost.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway.fleet.wire import stream_key
from gateway.state import GENERATIONS, REDIS, REMOTE
from tests.support.arena import demo_models_toml, unique
from tests.support.chat import DONE, RETRY, accept, complete_frames, read_blocks, row, stream_path, wait_finished, wire
from tests.support.common import MakeClient, User, wait_for
from tests.support.fleet import PING, RedisServer, SteppedUpstream, read_events, without_pings

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

TEXTS = ["Once ", "upon ", "a ", "time ", "there ", "was ", "a ", "stream."]


async def pair(make_client: MakeClient, up: SteppedUpstream, **env: str) -> tuple[TestClient, TestClient]:
    """Two instances on one database (and one Redis when env has REDIS_URL), `fake` served by `up`."""
    env = {"OPENAI_BASE_URL": up.base_url, "OPENAI_MODEL": "fake", "SWEEP_S": "1000", **env}
    return await make_client(**env), await make_client(**env)


async def test_reply_generating_on_a_streams_live_from_b_byte_identical_through_one_reader(
        stepped, make_client, redis_url, user, db):
    up = await stepped(TEXTS, holds=(4,))  # the role chunk and 3 texts go out, then it holds
    a, b = await pair(make_client, up, REDIS_URL=redis_url)
    mid = (await accept(a, user, "tell me"))["assistant_message_id"]
    on_a = await a.get(stream_path(mid), headers=user.headers)
    on_b = [await b.get(stream_path(mid), headers=user.headers) for _ in range(3)]
    # while A is still generating, every B listener has the head (retry line + metadata) and the three deltas
    heads = [await read_events(r, 1 + 3) for r in on_b]
    assert (await row(db, mid))["status"] == "streaming"
    assert heads[0] == heads[1] == heads[2]
    assert heads[0][0].startswith(RETRY + f"id: {mid}:0\nevent: metadata\n".encode())
    # one reader on B for the message, whatever the number of its listeners
    feeds = b.app[REMOTE].feeds
    assert list(feeds) == [uuid.UUID(mid)] and feeds[uuid.UUID(mid)].listeners == 3
    assert b.app[GENERATIONS].get(uuid.UUID(mid)) is None
    # a reconnect to B from Last-Event-ID gets exactly the events after it, live, the retry line on the first
    resumed = await b.get(stream_path(mid), headers={**user.headers, "Last-Event-ID": f"{mid}:1"})
    assert await read_events(resumed, 2) == [RETRY + heads[0][2], heads[0][3]]
    assert feeds[uuid.UUID(mid)].listeners == 4

    up.release()
    body_a = without_pings(await on_a.read())
    saved = await wait_finished(db, mid)
    frames = complete_frames(saved, TEXTS)
    assert body_a == wire(frames)
    for head, resp in zip(heads, on_b, strict=True):
        assert b"".join(head) + without_pings(await resp.read()) == body_a
    assert without_pings(await resumed.read()) == b"".join(frames[4:]) + DONE
    await wait_for(lambda: _async(not feeds))  # the reader went with its last listener

    # the stream holds every event, seq in the entry and in its id, and expires (10 min after the finish)
    redis = aioredis.Redis.from_url(redis_url)
    entries = await redis.xrange(stream_key(mid))
    assert [(i, f[b"s"]) for i, f in entries] == [(b"%d-1" % k, b"%d" % k) for k in range(len(frames))]
    assert 0 < await redis.ttl(stream_key(mid)) <= 600
    await redis.aclose()


async def _async(value: bool) -> bool:
    return value


async def test_finished_reply_resumed_on_b_replays_from_the_database_with_the_same_bytes(
        stepped, make_client, redis_url, user, db):
    up = await stepped(TEXTS)
    a, b = await pair(make_client, up, REDIS_URL=redis_url)
    mid = (await accept(a, user, "done soon"))["assistant_message_id"]
    saved = await wait_finished(db, mid)
    resp = await b.get(stream_path(mid), headers={**user.headers, "Last-Event-ID": f"{mid}:5"})
    assert await resp.read() == RETRY + b"".join(complete_frames(saved, TEXTS)[6:]) + DONE
    assert not b.app[REMOTE].feeds


async def test_without_redis_b_pings_while_the_reply_is_live_then_replays_it(stepped, make_client, user, db):
    up = await stepped(TEXTS, holds=(2,))
    a, b = await pair(make_client, up, SSE_PING_S="0.05")
    assert b.app[REDIS] is None
    mid = (await accept(a, user, "no redis"))["assistant_message_id"]
    on_b = await b.get(stream_path(mid), headers=user.headers)
    assert on_b.status == 200
    # waiting, and saying so: pings, without the retry line (it waits for the first event's block)
    assert await read_blocks(on_b, 2) == [PING, PING]
    up.release()
    body = await on_b.read()
    saved = await wait_finished(db, mid)
    assert without_pings(body) == wire(complete_frames(saved, TEXTS))  # the retry line once, on the metadata


async def test_b_pinging_before_the_first_event_keeps_the_retry_line_for_it_also_when_resumed(
        stepped, make_client, redis_url, user, db):
    """Pings that go out on B before any event leave the retry line pending: it opens the first
    event's block, once, on a listener from the start and on one resumed from Last-Event-ID."""
    up = await stepped(TEXTS, holds=(0, 2))  # silent at first; then the role chunk and one text, held again
    a, b = await pair(make_client, up, REDIS_URL=redis_url, SSE_PING_S="0.05")
    mid = (await accept(a, user, "slow start"))["assistant_message_id"]
    fresh = await b.get(stream_path(mid), headers=user.headers)
    assert await read_blocks(fresh, 2) == [PING, PING]  # no event yet (no metadata before the upstream answers)
    up.step(0)
    head = await read_events(fresh, 2)  # retry + metadata, delta 1
    assert head[0].startswith(RETRY + f"id: {mid}:0\nevent: metadata\n".encode())
    resumed = await b.get(stream_path(mid), headers={**user.headers, "Last-Event-ID": f"{mid}:1"})
    assert await read_blocks(resumed, 2) == [PING, PING]  # nothing after seq 1 yet
    up.release()
    rest, resumed_body = without_pings(await fresh.read()), await resumed.read()
    saved = await wait_finished(db, mid)
    frames = complete_frames(saved, TEXTS)
    assert b"".join(head) + rest == wire(frames)
    assert without_pings(resumed_body) == RETRY + b"".join(frames[2:]) + DONE
    assert b.app[GENERATIONS].get(uuid.UUID(mid)) is None  # followed from A, not generated on B


async def test_redis_stopped_mid_stream_b_follows_the_checkpoints_and_a_is_unaffected(
        stepped, make_client, private_redis: RedisServer, user, db):
    up = await stepped(TEXTS, holds=(3, 6))
    a, b = await pair(make_client, up, REDIS_URL=private_redis.url, CHECKPOINT_S="0.05")
    mid = (await accept(a, user, "redis goes"))["assistant_message_id"]
    on_a = await a.get(stream_path(mid), headers=user.headers)
    on_b = await b.get(stream_path(mid), headers=user.headers)
    head_a, head_b = await read_events(on_a, 3), await read_events(on_b, 3)  # retry + metadata, 2 deltas
    assert head_a == head_b

    private_redis.stop()
    ready = await b.get("/readyz")
    assert (ready.status, await ready.json()) == (200, {"status": "ok", "redis": "degraded"})
    up.step(3)  # texts 3..5 go out while Redis is away: A streams them, B reads them from the checkpoints
    more_a, more_b = await read_events(on_a, 3), await read_events(on_b, 3)
    assert more_a == more_b
    assert (await row(db, mid))["status"] == "streaming"

    private_redis.start()  # back, and empty: A's publisher rebuilds the stream, B returns to it
    ready = await b.get("/readyz")
    assert (ready.status, await ready.json()) == (200, {"status": "ok", "redis": "ok"})
    up.step(6)
    rest_a, rest_b = without_pings(await on_a.read()), without_pings(await on_b.read())
    saved = await wait_finished(db, mid)
    expected = wire(complete_frames(saved, TEXTS))
    assert b"".join(head_a + more_a) + rest_a == expected
    assert b"".join(head_b + more_b) + rest_b == expected
    redis = aioredis.Redis.from_url(private_redis.url)
    assert await redis.xlen(stream_key(mid)) == len(complete_frames(saved, TEXTS))
    await redis.aclose()


async def test_reply_finishing_while_redis_is_away_ends_on_b_from_the_row(
        stepped, make_client, private_redis: RedisServer, user, db):
    up = await stepped(TEXTS, holds=(3,))
    a, b = await pair(make_client, up, REDIS_URL=private_redis.url)
    mid = (await accept(a, user, "finish without redis"))["assistant_message_id"]
    on_b = await b.get(stream_path(mid), headers=user.headers)
    head = await read_events(on_b, 3)  # retry + metadata, 2 deltas
    private_redis.stop()
    up.release()
    rest = without_pings(await on_b.read())
    saved = await wait_finished(db, mid)
    assert b"".join(head) + rest == wire(complete_frames(saved, TEXTS))


async def test_cancel_on_b_stops_the_reply_generating_on_a(stepped, make_client, redis_url, user, db):
    up = await stepped(TEXTS, holds=(3,))
    a, b = await pair(make_client, up, REDIS_URL=redis_url)
    mid = (await accept(a, user, "stop it"))["assistant_message_id"]
    on_b = await b.get(stream_path(mid), headers=user.headers)
    await read_events(on_b, 3)  # retry + metadata, 2 deltas: A is generating
    async with asyncio.timeout(10):
        resp = await b.post(f"/api/messages/{mid}/cancel", headers=user.headers)
        answer = await resp.json()
    assert (resp.status, answer["status"], answer["content"]) == (200, "cancelled", "".join(TEXTS[:2]))
    tail = parse_tail(await on_b.read())
    assert tail[-2:] == [("done", {"finish_reason": "cancelled"}), ("[DONE]", None)]
    up.release()


def parse_tail(raw: bytes) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for block in raw.split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"data" not in lines:
            continue
        if lines[b"data"] == b"[DONE]":
            out.append(("[DONE]", None))
            continue
        data = orjson.loads(lines[b"data"])
        out.append((lines.get(b"event", b"message").decode(), {"finish_reason": data.get("finish_reason")}))
    return out


async def test_arena_comparison_followed_from_b_gets_each_slots_events_as_a_does(
        make_client, config_file, redis_url, user, db):
    alpha, beta = unique("alpha"), unique("beta")
    env = {"GATEWAY_CONFIG": config_file(demo_models_toml(alpha, beta)), "REDIS_URL": redis_url,
           "DEMO_DELAY_MS": "40", "DEMO_CHUNKS": "10", "SWEEP_S": "1000"}
    a, b = await make_client(**env), await make_client(**env)
    resp = await a.post("/api/arena", json={"content": "compare", "models": [alpha, beta]}, headers=user.headers)
    assert resp.status == 202, await resp.text()
    cid = (await resp.json())["comparison_id"]
    on_a = await a.get(f"/api/comparisons/{cid}/stream", headers=user.headers)
    on_b = await b.get(f"/api/comparisons/{cid}/stream", headers=user.headers)
    first_b = await read_events(on_b, 2)  # retry + a first metadata, and another event while both slots generate
    statuses = await db.fetch("SELECT status FROM messages WHERE id IN "
                              "(SELECT unnest(ARRAY[message_a, message_b]) FROM comparisons WHERE id = $1)",
                              uuid.UUID(cid))
    assert "streaming" in {r["status"] for r in statuses}
    body_a, body_b = await on_a.read(), b"".join(first_b) + await on_b.read()
    assert per_slot(body_a) == per_slot(body_b) and len(per_slot(body_a)["a"]) == 1 + 10 + 2
    for body in (body_a, body_b):  # the retry line once, at the start of the first event's block
        assert without_pings(body).startswith(RETRY + b"id: ") and body.count(b"retry: ") == 1
        assert body.endswith(DONE)


def per_slot(raw: bytes) -> dict[str, list[bytes]]:
    """Each slot's events without their ids (which interleave as they arrive): event line and data."""
    slots: dict[str, list[bytes]] = {"a": [], "b": []}
    for block in raw.split(b"\n\n"):
        lines = [line for line in block.split(b"\n") if not line.startswith((b"id: ", b":", b"retry"))]
        data = next((line for line in lines if line.startswith(b"data: {")), None)
        if data is not None:
            slots[orjson.loads(data[6:])["slot"]].append(b"\n".join(lines))
    return slots


async def test_ws_resume_on_b_follows_a_reply_generating_on_a(stepped, make_client, redis_url, user: User, db):
    up = await stepped(TEXTS, holds=(3,))
    a, b = await pair(make_client, up, REDIS_URL=redis_url)
    mid = (await accept(a, user, "ws"))["assistant_message_id"]
    ws = await b.ws_connect("/ws", headers=user.headers)
    await ws.send_json({"type": "resume", "message_id": mid, "last_event_id": f"{mid}:0"})
    first = [orjson.loads(await ws.receive_str()) for _ in range(2)]
    assert [f["id"] for f in first] == [f"{mid}:1", f"{mid}:2"]
    assert (await row(db, mid))["status"] == "streaming"
    up.release()
    rest = []
    while True:
        frame = orjson.loads(await ws.receive_str())
        rest.append(frame)
        if frame["event"] == "end":
            break
    await ws.close()
    saved = await wait_finished(db, mid)
    deltas = [f["data"]["delta"] for f in first + rest if f.get("event") == "delta"]
    assert "".join(deltas) == saved["content"]  # every delta: seq 0 was the metadata
    assert [f.get("event") for f in rest[-3:]] == ["usage", "done", "end"]
