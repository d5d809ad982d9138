"""A held stream lets go of what nothing reads any more (gateway/edge/held.py), and its connection
carries on as before: the stream's bytes are whole, and a request that arrives on the same
connection while the stream is held (pipelined) is answered after it. On both kinds of connection:
the lean one (gateway/edge/lean.py) and aiohttp's own, which a request only aiohttp answers hands
the connection to."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp.web_protocol import RequestHandler

from gateway.compat import _Queue
from gateway.edge.lean import LeanConnection
from gateway.state import RESPONSE
from tests.support.common import User
from tests.support.fakes import FakeUpstream, Reply, openai_stream, parse_sse


def dechunk(raw: bytes) -> tuple[bytes, bytes]:
    """A chunked body's bytes, and what follows its last chunk."""
    body = b""
    while True:
        size_line, _, raw = raw.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return body, raw.removeprefix(b"\r\n")
        body, raw = body + raw[:size], raw[size + 2:]


async def read_until(reader: asyncio.StreamReader, got: bytes, marker: bytes) -> bytes:
    while marker not in got:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, f"the connection closed before {marker!r}: {got!r}"
        got += chunk
    return got


@pytest.mark.parametrize("handed_over", [False, True], ids=["lean", "aiohttp"])
async def test_held_stream_drops_its_headers_timer_and_queues_and_its_connection_serves_the_next_request(
        make_client: Any, upstream: FakeUpstream, user: User, handed_over: bool):
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-up", OPENAI_MODEL="fake")
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["Hel", "lo"]), hold_at=2, release=release))
    body = orjson.dumps({"model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        if handed_over:  # a query string is aiohttp's to parse: the connection is its from here on
            writer.write(b"GET /healthz?probe=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
            first = await read_until(reader, b"", b'{"status":"ok"}')
            assert first.startswith(b"HTTP/1.1 200 OK\r\n")
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + user.key.encode() + b"\r\nX-Request-Id: held-1\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = await read_until(reader, b"", b'"Hel"')  # held: the upstream waits for `release`

        [protocol] = client.server.runner.server.connections
        assert type(protocol) is (RequestHandler if handed_over else LeanConnection)
        request = protocol._current_request
        response = request[RESPONSE]
        assert response.status == 200 and len(response.headers) == 0  # sent, then let go
        assert protocol._keepalive_handle is None  # no idle timer while the request is answered
        assert type(request.content._buffer) is _Queue
        if handed_over:
            assert type(protocol._messages) is _Queue

        # a second request on the same connection while the stream is held: queued, answered after it
        pipelined = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
        writer.write(pipelined)
        await asyncio.sleep(0.05)
        if handed_over:
            assert len(protocol._messages) == 1
        else:
            assert bytes(protocol._received) == pipelined  # read, waiting for the stream to end
        release.set()
        got = await read_until(reader, got, b'{"status":"ok"}')
    finally:
        writer.close()

    head, _, rest = got.partition(b"\r\n\r\n")
    head += b"\r\n"
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/event-stream\r\n" in head and b"\r\nX-Request-Id: held-1\r\n" in head
    stream, after = dechunk(rest)
    events = parse_sse(stream)
    assert events[-1].data == "[DONE]"
    chunks = [orjson.loads(e.data) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert after.startswith(b"HTTP/1.1 200 OK\r\n") and after.endswith(b'\r\n\r\n{"status":"ok"}')
    # and the idle timer is armed again once the stream has ended (the connection is kept alive)
    assert protocol._keepalive_handle is not None


def test_the_stand_in_queue_is_first_in_first_out():
    queue = _Queue()
    queue.append(1)
    queue.append(2)
    queue.appendleft(0)
    assert [queue.popleft(), queue.popleft(), len(queue), bool(queue)] == [0, 1, 1, True]
    assert queue.popleft() == 2 and not queue
