"""A real reverse proxy: Debian's nginx, round-robin in front of two instances on one database and
one Redis. SSE passes through unbuffered (the gateway sends X-Accel-Buffering:
no; nginx keeps its default `proxy_buffering on`), an EventSource reconnect that lands on the
other instance resumes live and byte-identical, and WebSockets upgrade."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.state import GENERATIONS, REMOTE
from tests.support.chat import DONE, RETRY, complete_frames, wait_finished, wire
from tests.support.common import MakeClient, User
from tests.support.fleet import Nginx, SteppedUpstream, read_events, without_pings

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

TEXTS = ["Once ", "upon ", "a ", "time ", "there ", "was ", "a ", "stream."]


@dataclass
class Fleet:
    nginx: Nginx
    instances: list[TestClient]
    up: SteppedUpstream
    http: aiohttp.ClientSession

    def generating(self, mid: str) -> int:
        """Which instance runs the reply."""
        found = [i for i, c in enumerate(self.instances) if c.app[GENERATIONS].get(uuid.UUID(mid)) is not None]
        assert len(found) == 1
        return found[0]


@pytest.fixture
async def fleet(tmp_path: Path, stepped, make_client: MakeClient, redis_url: str) -> AsyncIterator[Fleet]:
    up = await stepped(TEXTS, holds=(3,))  # the role chunk and two texts go out, then it holds
    env = {"OPENAI_BASE_URL": up.base_url, "OPENAI_MODEL": "fake", "SWEEP_S": "1000", "REDIS_URL": redis_url}
    instances = [await make_client(**env), await make_client(**env)]
    nginx = Nginx(tmp_path / "nginx", [c.server.port for c in instances])
    try:
        async with aiohttp.ClientSession() as http:
            yield Fleet(nginx, instances, up, http)
    finally:
        up.release()
        nginx.stop()


async def test_streamed_reply_arrives_chunk_by_chunk_through_nginx(fleet: Fleet, user: User, db):
    resp = await fleet.http.post(fleet.nginx.url + "/api/chat", json={"content": "through nginx", "stream": True},
                                 headers=user.headers)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    # the upstream holds after two texts: what nginx passed on so far is the head and both deltas
    head = await read_events(resp, 1 + 2)  # retry + metadata, 2 deltas
    assert head[0].startswith(RETRY + b"id: ") and head[0].split(b"\n")[2] == b"event: metadata"
    mid = head[0].split(b"\n")[1][4:].decode().rsplit(":", 1)[0]
    assert (await db.fetchval("SELECT status FROM messages WHERE id = $1", uuid.UUID(mid))) == "streaming"
    fleet.up.release()
    rest = without_pings(await resp.read())
    saved = await wait_finished(db, mid)
    assert b"".join(head) + rest == wire(complete_frames(saved, TEXTS))


async def test_eventsource_reconnect_landing_on_the_other_instance_resumes_live_and_identical(
        fleet: Fleet, user: User, db):
    accepted = await fleet.http.post(fleet.nginx.url + "/api/chat", json={"content": "reconnect"},
                                     headers=user.headers)
    assert accepted.status == 202
    body = await accepted.json()
    mid, stream_url = body["assistant_message_id"], body["stream_url"]
    owner = fleet.generating(mid)
    other = fleet.instances[1 - owner]
    # as a browser's EventSource reconnects (the stream_url's token, Last-Event-ID), twice: round-robin
    # sends the two reconnects to different instances, so one of them is served by the one not generating
    resumed = [await fleet.http.get(fleet.nginx.url + stream_url, headers={"Last-Event-ID": f"{mid}:1"})
               for _ in range(2)]
    heads = [await read_events(r, 1) for r in resumed]  # retry + delta 2, while the reply is held
    assert heads[0] == heads[1] and heads[0][0].startswith(RETRY + f"id: {mid}:2\n".encode())
    assert other.app[REMOTE].feeds[uuid.UUID(mid)].listeners == 1
    fleet.up.release()
    tails = [without_pings(await r.read()) for r in resumed]
    saved = await wait_finished(db, mid)
    expected = RETRY + b"".join(complete_frames(saved, TEXTS)[2:]) + DONE
    assert [b"".join(h) + t for h, t in zip(heads, tails, strict=True)] == [expected, expected]


async def test_websocket_upgrades_through_nginx(fleet: Fleet, user: User, db):
    fleet.up.release()
    async with fleet.http.ws_connect(fleet.nginx.url + "/ws", headers=user.headers) as ws:
        await ws.send_json({"type": "chat", "content": "over a socket"})
        frames = []
        while not frames or frames[-1]["event"] != "end":
            frames.append(orjson.loads(await ws.receive_str()))
    assert frames[0]["event"] == "accepted"
    mid = frames[0]["assistant_message_id"]
    saved = await wait_finished(db, mid)
    assert "".join(f["data"]["delta"] for f in frames if f["event"] == "delta") == saved["content"] == "".join(TEXTS)
    assert [f["event"] for f in frames[-3:]] == ["usage", "done", "end"]


async def test_every_sse_door_says_x_accel_buffering_no(make_client: MakeClient, config_file, user: User):
    """What keeps a buffering proxy (nginx's default `proxy_buffering on`) from holding frames back."""
    client = await make_client(GATEWAY_CONFIG=config_file('[models.alpha]\nprovider = "demo"\n\n'
                                                          '[models.beta]\nprovider = "demo"\n'))
    auth = user.headers
    doors = [
        ("/api/chat", {"content": "hi", "stream": True}, auth),
        ("/api/arena", {"content": "hi", "stream": True, "models": ["alpha", "beta"]}, auth),
        ("/v1/chat/completions", {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
         auth),
        ("/v1/responses", {"model": "demo", "stream": True, "input": "hi"}, auth),
        ("/v1/messages", {"model": "demo", "stream": True, "max_tokens": 50,
                          "messages": [{"role": "user", "content": "hi"}]},
         {"x-api-key": user.key, "anthropic-version": "2023-06-01"}),
    ]
    for path, body, headers in doors:
        resp = await client.post(path, json=body, headers=headers)
        assert (path, resp.status, resp.headers.get("X-Accel-Buffering")) == (path, 200, "no")
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        await resp.read()
    mid = (await (await client.post("/api/chat", json={"content": "later"}, headers=auth)).json())[
        "assistant_message_id"]
    resp = await client.get(f"/api/messages/{mid}/stream", headers=auth)
    assert (resp.status, resp.headers.get("X-Accel-Buffering")) == (200, "no")
    await resp.read()
