"""The library internals gateway/compat.py relies on, pinned: a release of aiohttp, aiohttp-sse or
asyncpg that changes one fails here, by name, not somewhere in a held stream.

And compat.py is the only module that touches them."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections import deque
from importlib.metadata import version
from pathlib import Path

import aiohttp
import asyncpg
import asyncpg.connect_utils
import pytest
from aiohttp import streams as aiohttp_streams
from aiohttp import web, web_protocol
from aiohttp_sse import EventSourceResponse
from asyncpg.exceptions import _base as asyncpg_base

import gateway
from gateway import compat
from gateway.store.failures import Failure, classify, while_connecting

ROOT = Path(gateway.__file__).resolve().parent


def methods_called(module: object, attribute: str) -> set[str]:
    """The methods the library's own code calls on `self.<attribute>`."""
    source = inspect.getsource(module)  # type: ignore[arg-type]
    return set(re.findall(rf"self\.{attribute}\.(\w+)\(", source))


# -- aiohttp: the queues a held stream lightens ---------------------------------------------------

def test_aiohttp_keeps_its_pipelined_requests_and_body_chunks_in_the_attributes_compat_names():
    assert compat.PIPELINED_REQUESTS in web_protocol.RequestHandler.__slots__
    # StreamReader sets its buffer in __init__ (a plain class): read it off a real one
    reader = aiohttp_streams.StreamReader(protocol=object(), limit=2**16, loop=asyncio.new_event_loop())  # type: ignore[arg-type]
    try:
        assert type(getattr(reader, compat.BODY_CHUNKS)) is deque
    finally:
        reader._loop.close()


def test_a_light_queue_has_every_method_aiohttp_calls_on_those_queues():
    called = methods_called(web_protocol, "_messages") | methods_called(aiohttp_streams, "_buffer")
    assert called, "aiohttp no longer calls anything on _messages/_buffer: compat's names are stale"
    missing = sorted(m for m in called if not hasattr(compat._Queue, m))
    assert missing == [], f"aiohttp calls {missing} on a queue compat._Queue stands in for"


async def test_a_held_request_s_queues_are_empty_deques_that_compat_lightens(aiohttp_client):
    seen: list[tuple[type, type, type, type]] = []

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        def queues() -> tuple[type, type]:
            return (type(getattr(request.protocol, compat.PIPELINED_REQUESTS)),
                    type(getattr(request.content, compat.BODY_CHUNKS)))

        before = queues()
        compat.lighten_request_queues(request)
        seen.append(before + queues())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", handler)
    client = await aiohttp_client(app)
    for _ in range(2):  # the same connection again: aiohttp reads its next request through the light queue
        resp = await client.post("/", data=b"x" * 100)
        assert (resp.status, await resp.text()) == (200, "ok")
    light = compat._Queue
    assert seen == [(deque, deque, light, light), (light, deque, light, light)]


# -- aiohttp: the answer to a malformed request ------------------------------------------------------

def test_aiohttp_builds_its_parse_error_answer_in_handle_error_with_the_signature_compat_calls():
    assert aiohttp.__version__.split(".")[0] == "3"
    handle_error = web_protocol.RequestHandler.handle_error
    params = list(inspect.signature(compat.AIOHTTP_HANDLE_ERROR).parameters)
    assert params == ["self", "request", "status", "exc", "message"]
    # the server calls it by that name: replacing the attribute is what reaches a parse error
    assert "self.handle_error(" in inspect.getsource(web_protocol.RequestHandler)
    assert handle_error is compat.AIOHTTP_HANDLE_ERROR or handle_error.__module__ == "gateway.edge.malformed"


# -- aiohttp: the lean connection ---------------------------------------------------------------------

async def test_aiohttp_has_the_internals_the_lean_connection_uses(aiohttp_client, aiohttp_server):
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application(client_max_size=4321)
    app.router.add_post("/hello", hello)
    made: list[web.Server] = []
    compat.wrap_make_handler(app, lambda server: made.append(server) or server)
    client = await aiohttp_client(await aiohttp_server(app, keepalive_timeout=7))
    assert made == [client.server.runner.server]  # every runner makes its server through it
    server = made[0]
    assert compat.server_kwargs(server)["keepalive_timeout"] == 7
    assert compat.server_loop(server) is asyncio.get_running_loop()
    assert compat.client_max_size(app) == 4321
    assert compat.app_handle(app) == app._handle

    [route] = [r for r in app.router.routes() if r.method == "POST"]
    info = compat.match_info(route, app)
    assert (info.handler, info.route, info.apps, info.current_app, dict(info)) == (hello, route, (app,), app, {})
    # what the router sets on a request once matched, and what a connection's loss calls
    assert "request._match_info = match_info" in inspect.getsource(web.Application._handle)
    assert "._cancel(" in inspect.getsource(web_protocol.RequestHandler.connection_lost)
    assert "request._task = None" in inspect.getsource(web_protocol.RequestHandler.start)
    assert list(inspect.signature(web.BaseRequest._cancel).parameters) == ["self", "exc"]
    assert (await client.post("/hello")).status == 200


# -- aiohttp: a stream's head with its first write -----------------------------------------------------

async def test_a_head_with_first_write_stream_sends_nothing_until_its_first_write_then_both_in_one(aiohttp_server):
    assert "if self._send_headers_immediately:" in inspect.getsource(web.StreamResponse._write_headers)
    assert web.StreamResponse._send_headers_immediately and not compat.HeadWithFirstWrite._send_headers_immediately
    written = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = compat.HeadWithFirstWrite(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(0.3)
        written.set()
        await resp.write(b"data: 1\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/s", stream)
    server = await aiohttp_server(app)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.read(65536), 5)
        assert written.is_set()  # nothing arrived before the first write
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\n\r\n9\r\ndata: 1\n\n\r\n" in first
    finally:
        writer.close()


# -- aiohttp-sse: the keep-alive task -----------------------------------------------------------------

async def test_aiohttp_sse_keeps_its_keep_alive_task_where_compat_reads_and_forgets_it(aiohttp_client):
    assert version("aiohttp-sse").split(".")[0] == "3"
    found: list[object] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await stream(request)
        except BaseException as e:
            found.append(e)
            raise

    async def stream(request: web.Request) -> web.StreamResponse:
        response = EventSourceResponse(ping_interval=30)
        assert compat.ping_task(response) is None  # before prepare
        await response.prepare(request)
        task = compat.ping_task(response)
        assert isinstance(task, asyncio.Task) and not task.done()
        response.stop_streaming()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        compat.forget_ping_task(response, task)
        found.append(compat.ping_task(response))
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    assert await resp.read() == b""  # the handler ran to its end (no ping within 30 s)
    assert found == [None]


# -- asyncpg ------------------------------------------------------------------------------------------

def test_asyncpg_s_client_side_data_error_is_a_private_class_apart_from_the_public_one():
    assert compat.ASYNCPG_CLIENT_DATA_ERROR is asyncpg_base.DataError
    assert issubclass(asyncpg_base.DataError, asyncpg.InterfaceError)
    assert asyncpg_base.DataError is not asyncpg.exceptions.DataError  # that one is SQLSTATE class 22
    assert issubclass(asyncpg.exceptions.DataError, asyncpg.PostgresError)
    assert classify(asyncpg_base.DataError("value out of int32 range")) is Failure.PERMANENT


async def test_asyncpg_opens_its_connections_in_the_module_compat_names():
    assert asyncpg.connect_utils.__name__ == compat.ASYNCPG_CONNECTING_MODULE
    with pytest.raises(OSError) as caught:  # nothing listens on port 1 of loopback
        await asyncpg.connect(host="127.0.0.1", port=1, user="x", database="x", timeout=5)
    assert while_connecting(caught.value)
    assert classify(caught.value) is Failure.TRANSIENT


# -- contained ------------------------------------------------------------------------------------------

PRIVATE_USES = re.compile(r"\._messages\b|\._buffer\b|[\"']_messages[\"']|[\"']_buffer[\"']|\._ping_task\b"
                          r"|exceptions\._base|exceptions import _base"
                          r"|\.handle_error\s*=|[\"']asyncpg\.connect_utils"
                          r"|\._make_handler\b|\._client_max_size\b|\._kwargs\b|\._match_info\s*=|\._cancel\("
                          r"|request\._task\b|_send_headers_immediately")


def test_only_compat_touches_a_library_s_internals():
    found = []
    for path in ROOT.rglob("*.py"):
        if path.name == "compat.py" and path.parent == ROOT:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if PRIVATE_USES.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == [], "\n".join(found)
