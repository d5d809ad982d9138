"""The SSE `retry:` field rides in the first event's block.

A block of its own (`retry: 3000\\n\\n`) dispatches nothing in a browser, but httpx-sse and the
SDKs built on it deliver it as an empty message event before the metadata. These tests read the
native and the arena streams with httpx-sse, over a real socket, and check the exact bytes.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_sse import aconnect_sse

from tests.support.arena import demo_models_toml
from tests.support.common import MakeClient, User
from tests.support.fakes import Reply, openai_stream

RETRY = b"retry: 3000\n"


async def read_events(client: Any, user: User, method: str, path: str, **kwargs: Any) -> list[Any]:
    http = httpx.AsyncClient(base_url=str(client.make_url("")), headers=user.headers, timeout=10)
    async with http, aconnect_sse(http, method, path, **kwargs) as source:
        assert source.response.status_code == 200
        return [event async for event in source.aiter_sse()]


async def test_httpx_sse_gets_the_metadata_first_with_the_retry_and_no_empty_event(make_client: MakeClient,
                                                                                   user: User):
    client = await make_client()
    events = await read_events(client, user, "POST", "/api/chat", json={"content": "Hello!", "stream": True})
    assert [e.event for e in events][:2] == ["metadata", "message"]
    assert events[0].retry == 3000 and all(e.retry is None for e in events[1:])
    assert all(e.data for e in events)  # no empty message event anywhere
    assert [e.event for e in events][-3:] == ["usage", "done", "message"] and events[-1].data == "[DONE]"


async def test_the_retry_line_opens_the_first_block_on_the_wire(make_client: MakeClient, user: User):
    client = await make_client()
    resp = await client.post("/api/chat", json={"content": "Hello!", "stream": True}, headers=user.headers)
    body = await resp.read()
    first, _, rest = body.partition(b"\n\n")
    mid = orjson.loads(first.rpartition(b"data: ")[2])["message_id"]
    assert first.startswith(b"retry: 3000\nid: %s:0\nevent: metadata\ndata: {" % mid.encode())
    assert b"retry:" not in rest  # once per response


async def test_a_resumed_stream_carries_the_retry_on_its_first_replayed_event(make_client: MakeClient,
                                                                              user: User):
    client = await make_client()
    resp = await client.post("/api/chat", json={"content": "Hello!", "stream": True}, headers=user.headers)
    mid = orjson.loads((await resp.read()).partition(b"\n\n")[0].rpartition(b"data: ")[2])["message_id"]
    resp = await client.get(f"/api/messages/{mid}/stream", headers={**user.headers, "Last-Event-ID": f"{mid}:3"})
    assert (await resp.read()).startswith(b'retry: 3000\nid: %s:4\ndata: {"delta":' % mid.encode())
    events = await read_events(client, user, "GET", f"/api/messages/{mid}/stream",
                               headers={"Last-Event-ID": f"{mid}:3"})
    assert events[0].id == f"{mid}:4" and events[0].retry == 3000 and events[0].data
    assert all(e.data for e in events)


async def test_the_arena_stream_has_no_empty_first_event(make_client: MakeClient, config_file: Any, user: User):
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml("left", "right")))
    events = await read_events(client, user, "POST", "/api/arena",
                               json={"content": "duel", "models": ["left", "right"], "stream": True})
    assert events[0].event == "metadata" and events[0].retry == 3000 and events[0].data
    assert all(e.data for e in events) and all(e.retry is None for e in events[1:])
    assert sorted(orjson.loads(e.data)["slot"] for e in events if e.event == "metadata") == ["a", "b"]


async def test_pings_before_the_first_event_leave_the_retry_for_it(make_client: MakeClient, upstream: Any,
                                                                   user: User):
    release = asyncio.Event()  # the upstream is silent until the client has had two pings
    upstream.queue(Reply(openai_stream(["Hi"], prompt_tokens=2), on_request=lambda _: release.wait()))
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-up", OPENAI_MODEL="fake",
                               SSE_PING_S="0.05")
    resp = await client.post("/api/chat", json={"content": "slow", "stream": True}, headers=user.headers)
    async with asyncio.timeout(10):
        pings = [await resp.content.readuntil(b"\n\n") for _ in range(2)]
    release.set()
    rest = (await resp.read()).replace(b": ping\n\n", b"")
    assert pings == [b": ping\n\n"] * 2
    mid = uuid.UUID(orjson.loads(rest.partition(b"\n\n")[0].rpartition(b"data: ")[2])["message_id"])
    assert rest.startswith(RETRY + b"id: %s:0\nevent: metadata\n" % str(mid).encode())


async def test_a_finished_native_stream_is_freed_without_the_cyclic_garbage_collector(make_client: MakeClient,
                                                                                      user: User):
    """The keep-alive task, cancelled at the stream's end, kept its response alive through a reference
    cycle (task -> CancelledError -> traceback -> frame -> response -> task) that only the cyclic
    collector freed: ~13 objects per stream, collected a thousand streams at a time in one 7-9 ms
    pause of the loop. With the collector off, every finished stream's response must be gone."""
    import gc

    from gateway.edge.sse import NativeStream

    client = await make_client()
    gc.collect()
    gc.disable()
    try:
        # a connection per request: aiohttp's connection loop keeps its last response until the next
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(3):
                async with http.post(client.make_url("/api/chat"), json={"content": "Hello!", "stream": True},
                                     headers=user.headers) as resp:
                    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        await asyncio.sleep(0.1)  # the keep-alive tasks' cancellations run
        assert [o for o in gc.get_objects() if type(o) is NativeStream] == []
    finally:
        gc.enable()
