"""The lean connection (gateway/edge/lean.py) over a real socket: what it serves answers byte for
byte as aiohttp's own handler does, what it does not serve is handed to aiohttp with the bytes
read so far, and a connection keeps alive, pipelines, closes and times out as under aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from aiohttp.web_protocol import RequestHandler

from gateway.app import create_app
from gateway.config import Settings
from gateway.edge.lean import MAX_HEAD, MAX_PENDING, LeanConnection, serve_lean
from tests.support.common import User
from tests.support.fakes import FakeUpstream, Reply, openai_stream


class Conn:
    """One raw HTTP/1.1 connection to the test server."""

    def __init__(self, server: BaseTestServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server, self.reader, self.writer = server, reader, writer

    @classmethod
    async def open(cls, to: TestClient | BaseTestServer) -> Conn:
        server = to.server if isinstance(to, TestClient) else to
        reader, writer = await asyncio.open_connection(server.host, server.port)
        return cls(server, reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, head_only: bool = False) -> bytes:
        """One whole response: its head, then its body by Content-Length or chunked."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        fields = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        if head_only or lines[0].split(" ")[1] in ("100", "204", "304"):
            return head
        if fields.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), 10)
                chunk = await asyncio.wait_for(self.reader.readexactly(int(size_line, 16) + 2), 10)
                body += size_line + chunk
                if int(size_line, 16) == 0:
                    return head + body
        return head + await asyncio.wait_for(self.reader.readexactly(int(fields.get("content-length", "0"))), 10)

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    def protocols(self) -> list[Any]:
        """The protocols serving the server's connections (a test opens one at a time)."""
        assert self.server.runner is not None
        return self.server.runner.server.connections  # type: ignore[union-attr]

    def protocol(self) -> Any:
        [protocol] = self.protocols()
        return protocol

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def connected(to: TestClient | BaseTestServer) -> AsyncIterator[Conn]:
    conn = await Conn.open(to)
    try:
        yield conn
    finally:
        conn.close()


def without_date(response: bytes) -> bytes:
    return b"\r\n".join(line for line in response.split(b"\r\n") if not line.startswith(b"Date: "))


def post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nX-Request-Id: same\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"Content-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Request-Id: same\r\n\r\n"
HAND_OVER = b"GET /healthz?probe=1 HTTP/1.1\r\nHost: gw\r\n\r\n"  # a query string is aiohttp's to parse


async def test_what_the_lean_path_serves_is_byte_for_byte_what_aiohttp_sends(client: TestClient, user: User):
    auth = b"Authorization: Bearer " + user.key.encode()
    requests = [HEALTH,
                post(b"/v1/chat/completions", b'{"model": "x"'),  # no credentials: 401, OpenAI's shape
                post(b"/v1/chat/completions", b'{"model": "x"', auth),  # not JSON: 400
                post(b"/v1/chat/completions", orjson.dumps({"model": "nope", "messages": [{"role": "user",
                                                                                      "content": "hi"}]}), auth),
                post(b"/api/threads", b"[]", auth)]  # the native API's shape
    lean, handed = await Conn.open(client), None
    try:
        answers = []
        for request in requests:
            await lean.send(request)
            answers.append(await lean.response())
        assert type(lean.protocol()) is LeanConnection
        lean.close()
        await asyncio.sleep(0.05)
        handed = await Conn.open(client)
        await handed.send(HAND_OVER)
        assert (await handed.response()).startswith(b"HTTP/1.1 200 OK\r\n")
        assert type(handed.protocol()) is RequestHandler
        for request, answer in zip(requests, answers, strict=True):
            await handed.send(request)
            assert without_date(await handed.response()) == without_date(answer)
    finally:
        lean.close()
        if handed is not None:
            handed.close()
    statuses = [answer.split(b"\r\n", 1)[0] for answer in answers]
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 400 Bad Request",
                        b"HTTP/1.1 404 Not Found", b"HTTP/1.1 400 Bad Request"]
    assert b"\r\nX-Request-Id: same\r\n" in answers[1] and b'"code":"invalid_api_key"' in answers[1]


@pytest.mark.parametrize("request_bytes, status", [
    # a chunked body, a protocol switch, 100-continue, HTTP/1.0, a query string
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
     b"401"),
    (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", b"200"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
     b"100"),
    (b"GET /healthz HTTP/1.0\r\nHost: gw\r\n\r\n", b"200"),
    (b"GET /healthz?x=1 HTTP/1.1\r\nHost: gw\r\n\r\n", b"200"),
    (b"HEAD /healthz HTTP/1.1\r\nHost: gw\r\n\r\n", b"200"),
    (b"GET /v1/models/demo HTTP/1.1\r\nHost: gw\r\n\r\n", b"401"),  # a route with a parameter
    # malformed: aiohttp's (and the gateway's) 400 in JSON
    (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n", b"400"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}", b"400"),
], ids=["chunked", "upgrade", "expect", "http10", "query", "head", "parameter", "malformed", "two-lengths"])
async def test_a_request_the_lean_path_does_not_serve_is_aiohttps_with_its_bytes(
        client: TestClient, request_bytes: bytes, status: bytes):
    async with connected(client) as conn:
        await conn.send(request_bytes)
        answer = await conn.response(head_only=request_bytes.startswith(b"HEAD "))
        assert answer.split(b" ")[1] == status
        if b" HTTP/1.0\r\n" in request_bytes:  # answered in its own version: the lean path only speaks 1.1
            assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
        # aiohttp's, or closed by it (HTTP/1.0, a malformed request)
        assert [type(p) for p in conn.protocols()] in ([RequestHandler], [])


async def test_a_head_past_the_limit_and_a_body_past_the_limit_are_aiohttps_answers(make_client: Any, user: User):
    client = await make_client(MAX_BODY_BYTES="2000")
    async with connected(client) as conn:
        await conn.send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Long: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n")
        answer = await conn.response()
        assert answer.split(b" ")[1] in (b"400", b"431") and b'"error"' in answer
    async with connected(client) as conn:
        await conn.send(post(b"/v1/chat/completions", b"x" * 2001, b"Authorization: Bearer " + user.key.encode()))
        answer = await conn.response()
        assert answer.startswith(b"HTTP/1.1 413 ") and b'"type":"payload_too_large"' in answer
        assert type(conn.protocol()) is RequestHandler


async def test_a_request_sent_a_byte_at_a_time_is_served_on_the_lean_path(client: TestClient):
    async with connected(client) as conn:
        request = post(b"/v1/chat/completions", b'{"model": "x", "messages": []}')
        for i in range(len(request)):
            await conn.send(request[i:i + 1])
            await asyncio.sleep(0.001)
        answer = await conn.response()
        assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
        assert type(conn.protocol()) is LeanConnection


async def test_pipelined_requests_are_answered_in_order_and_a_later_one_can_be_handed_over(client: TestClient):
    async with connected(client) as conn:
        await conn.send(HEALTH + post(b"/v1/chat/completions", b"{}") + HEALTH + HAND_OVER + HEALTH)
        answers = [await conn.response() for _ in range(5)]
        assert [a.split(b"\r\n", 1)[0] for a in answers] == [
            b"HTTP/1.1 200 OK", b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK",
            b"HTTP/1.1 200 OK"]
        assert all(a.endswith(b'{"status":"ok"}') for i, a in enumerate(answers) if i != 1)
        assert type(conn.protocol()) is RequestHandler  # from the fourth request on


async def test_connection_close_is_answered_and_honoured(client: TestClient):
    async with connected(client) as conn:
        await conn.send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        answer = await conn.response()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in answer
        assert await conn.closed()


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(aiohttp_server: Any,
                                                                        make_settings: Any):
    settings: Settings = make_settings()
    server = await aiohttp_server(create_app(settings), keepalive_timeout=0.3)
    silent, used = await Conn.open(server), await Conn.open(server)
    try:
        await used.send(HEALTH)
        assert (await used.response()).startswith(b"HTTP/1.1 200 OK\r\n")
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await used.closed() and await silent.closed()  # one that never sent a request too
        assert 0.2 < loop.time() - started < 5
    finally:
        silent.close()
        used.close()


async def test_a_body_slower_than_the_keep_alive_timeout_is_still_read_and_answered(aiohttp_server: Any,
                                                                                    make_settings: Any):
    server = await aiohttp_server(create_app(make_settings()), keepalive_timeout=0.3)
    request = post(b"/v1/chat/completions", b'{"model": "x", "messages": []}')
    head, body = request.split(b"\r\n\r\n", 1)
    async with connected(server) as conn:
        await conn.send(head + b"\r\n\r\n")
        await asyncio.sleep(0.6)  # twice the idle timeout: a request under way is not an idle connection
        await conn.send(body)
        assert (await conn.response()).startswith(b"HTTP/1.1 401 Unauthorized\r\n")
        assert type(conn.protocol()) is LeanConnection


async def test_shutdown_closes_an_idle_connection_at_once_and_cancels_a_held_stream_after_its_grace(
        make_client: Any, upstream: FakeUpstream, user: User):
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-up", OPENAI_MODEL="fake")
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["Hel", "lo"]), hold_at=2, release=release))
    stream = orjson.dumps({"model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    async with connected(client) as held, connected(client) as idle:
        await held.send(post(b"/v1/chat/completions", stream, b"Authorization: Bearer " + user.key.encode()))
        await asyncio.wait_for(held.reader.readuntil(b'"Hel"'), 10)
        await idle.send(HEALTH)
        assert (await idle.response()).startswith(b"HTTP/1.1 200 OK\r\n")
        protocols = held.protocols()
        assert [type(p) for p in protocols] == [LeanConnection, LeanConnection]
        server = client.server.runner.server  # type: ignore[union-attr]

        server.pre_shutdown()  # what a runner's cleanup does first: no request after the current one
        assert await idle.closed()
        assert [p._task_handler is not None for p in held.protocols()] == [True]  # the stream goes on

        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.shutdown(0.3)  # its grace: then the stream is cancelled and its socket closed
        assert 0.25 < loop.time() - started < 5
        rest = await asyncio.wait_for(held.reader.read(), 10)
        assert b"[DONE]" not in rest
        assert all(p.transport is None for p in protocols)
    release.set()


async def test_a_redirect_a_handler_raises_is_sent_as_aiohttp_sends_it():
    async def go(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/elsewhere")

    @web.middleware
    async def passing(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request)

    app = web.Application(middlewares=[passing])
    app.router.add_get("/go", go)
    serve_lean(app)
    answers = []
    async with TestServer(app) as server:
        for first in (b"", HAND_OVER.replace(b"/healthz", b"/go")):
            async with connected(server) as conn:
                if first:  # aiohttp's own handler from here on
                    await conn.send(first)
                    await conn.response()
                await conn.send(b"GET /go HTTP/1.1\r\nHost: gw\r\n\r\n")
                answers.append(without_date(await conn.response()))
                assert type(conn.protocol()) is (RequestHandler if first else LeanConnection)
    assert answers[0] == answers[1] and answers[0].startswith(b"HTTP/1.1 302 Found\r\n")
    assert b"\r\nLocation: /elsewhere\r\n" in answers[0]


async def test_a_connection_stops_reading_while_pipelined_requests_pile_up_behind_a_held_stream(
        make_client: Any, upstream: FakeUpstream, user: User):
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-up", OPENAI_MODEL="fake")
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["Hel", "lo"]), hold_at=2, release=release))
    stream = orjson.dumps({"model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    async with connected(client) as conn:
        await conn.send(post(b"/v1/chat/completions", stream, b"Authorization: Bearer " + user.key.encode()))
        head = await asyncio.wait_for(conn.reader.readuntil(b'"Hel"'), 10)  # held: the upstream waits
        protocol = conn.protocol()
        pipelined = post(b"/v1/chat/completions", b" " * (12 * MAX_PENDING))  # no credentials: a 401
        conn.writer.write(pipelined)
        for _ in range(100):
            if protocol._reading_held:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert protocol._reading_held and MAX_PENDING < len(protocol._received) < len(pipelined)  # not all read
        release.set()
        rest = await asyncio.wait_for(conn.reader.readuntil(b"0\r\n\r\n"), 10)
        assert (head + rest).endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        assert (await conn.response()).startswith(b"HTTP/1.1 401 Unauthorized\r\n")
        assert type(protocol) is LeanConnection and not protocol._reading_held and not protocol._received
