"""The adapters' lean HTTP client (gateway/providers/http.py) against raw local
TCP servers that write exactly the bytes each case needs: keep-alive reuse, a stale pooled
connection, truncation mid-chunk, malformed chunks, the idle timeout, error bodies (gzip,
Retry-After), bodies framed by the connection's end, and what follows [DONE]."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway.config import Settings
from gateway.providers.base import (
    ChatRequest,
    Finish,
    TextDelta,
    UpstreamConnectionError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UsageReport,
)
from gateway.providers.http import Connection, Upstream
from gateway.providers.openai import OpenAIProvider
from tests.support.fakes import openai_stream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
HELLO = openai_stream(["Hel", "lo"])


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)


class RawServer:
    """A loopback server whose `handler(reader, writer, connection_number)` writes raw bytes."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and Content-Length body), or None at the connection's end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def make(handler: Handler) -> RawServer:
        servers.append(await RawServer(handler).start())
        return servers[-1]

    yield make
    for s in servers:
        assert s.server is not None
        s.server.close()


def provider_and_model(url: str, config_file: Callable[[str], str], **model: float) -> tuple[Any, Any]:
    extra = "".join(f"{k} = {v}\n" for k, v in model.items())
    settings = Settings.from_env({"GATEWAY_CONFIG": config_file(
        f'[providers.up]\nkind = "openai"\nbase_url = "{url}"\napi_key = "sk-raw"\n'
        f'[models.m]\nprovider = "up"\nupstream = "up-m"\n{extra}')})
    return settings.providers["up"], settings.models["m"]


async def stream(provider: OpenAIProvider, model: Any) -> tuple[list[Any], Exception | None]:
    events: list[Any] = []
    try:
        async for batch in provider.stream(model, ChatRequest([{"role": "user", "content": "hi"}])):
            events.extend(batch)
    except Exception as e:
        return events, e
    return events, None


HELLO_EVENTS = [TextDelta("Hel"), TextDelta("lo"), Finish("stop"), UsageReport(9, 2)]


async def test_sequential_streams_reuse_one_keep_alive_connection(raw, config_file):
    async def serve(reader, writer, n):
        while await server.read_request(reader) is not None:
            writer.write(SSE_HEAD + chunked(*HELLO) + b"0\r\n\r\n")

    server = await raw(serve)
    config, model = provider_and_model(server.url, config_file)
    async with aiohttp.ClientSession() as session:
        provider = OpenAIProvider(config, session)
        for _ in range(3):
            assert await stream(provider, model) == (HELLO_EVENTS, None)
        provider.close()
    assert (server.connections, len(server.requests)) == (1, 3)
    head = server.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert b"Authorization: Bearer sk-raw" in head
    assert b"Host: " + server.url.split("/")[2].encode() in head


async def test_a_stale_pooled_connection_is_retried_once_on_a_new_one(raw, config_file):
    async def serve(reader, writer, n):
        await server.read_request(reader)
        if n == 1:
            writer.write(SSE_HEAD + chunked(*HELLO) + b"0\r\n\r\n")
            await writer.drain()
            await server.read_request(reader)  # the second request on this connection: hung up on, unanswered
            return
        writer.write(SSE_HEAD + chunked(*HELLO) + b"0\r\n\r\n")
        await writer.drain()

    server = await raw(serve)
    config, model = provider_and_model(server.url, config_file)
    provider = OpenAIProvider(config, None)  # type: ignore[arg-type]
    assert await stream(provider, model) == (HELLO_EVENTS, None)
    assert await stream(provider, model) == (HELLO_EVENTS, None)
    provider.close()
    assert (server.connections, len(server.requests)) == (2, 3)


async def test_a_connection_closed_mid_chunk_fails_after_what_came(raw, config_file):
    async def serve(reader, writer, n):
        await server.read_request(reader)
        writer.write(SSE_HEAD + chunked(HELLO[0], HELLO[1]) + b"40\r\ndata: {\"cho")  # 64 bytes announced, 14 sent
        await writer.drain()

    server = await raw(serve)
    config, model = provider_and_model(server.url, config_file)
    events, error = await stream(OpenAIProvider(config, None), model)  # type: ignore[arg-type]
    assert events == [TextDelta("Hel")]
    assert isinstance(error, UpstreamConnectionError)
    assert error.message == "upstream connection failed: the upstream closed the connection before the answer's end"


async def test_a_malformed_chunk_size_is_a_connection_error(raw, config_file):
    async def serve(reader, writer, n):
        await server.read_request(reader)
        writer.write(SSE_HEAD + chunked(HELLO[0]) + b"zz\r\nnonsense\r\n")
        await asyncio.sleep(1)

    server = await raw(serve)
    config, model = provider_and_model(server.url, config_file)
    events, error = await stream(OpenAIProvider(config, None), model)  # type: ignore[arg-type]
    assert events == []  # the role chunk carries no content
    assert isinstance(error, UpstreamConnectionError) and error.message.startswith(
        "upstream connection failed: malformed HTTP answer")


async def test_silence_past_the_idle_timeout_is_an_idle_timeout(raw, config_file):
    async def serve(reader, writer, n):
        await server.read_request(reader)
        writer.write(SSE_HEAD + chunked(HELLO[0], HELLO[1]))
        await asyncio.sleep(5)

    server = await raw(serve)
    config, model = provider_and_model(server.url, config_file, idle_timeout_s=0.3)
    started = asyncio.get_running_loop().time()
    events, error = await stream(OpenAIProvider(config, None), model)  # type: ignore[arg-type]
    assert events == [TextDelta("Hel")]
    assert isinstance(error, UpstreamTimeout) and error.phase == "idle"
    assert 0.3 <= asyncio.get_running_loop().time() - started < 1.5


async def test_an_error_body_is_read_gzipped_with_its_retry_after(raw, config_file):
    body = gzip.compress(b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit"}}')

    async def serve(reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                     b"Retry-After: 7\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await server.read_request(reader)  # kept alive: the next request comes on this connection

    server = await raw(serve)
    config, model = provider_and_model(server.url, config_file)
    provider = OpenAIProvider(config, None)  # type: ignore[arg-type]
    events, error = await stream(provider, model)
    assert events == []
    assert isinstance(error, UpstreamHTTPError)
    assert (error.status, error.retry_after, error.message) == (429, 7.0, "upstream answered 429: Rate limit reached")
    assert provider._upstream._idle and server.connections == 1  # the connection went back to the pool
    provider.close()


async def test_a_body_framed_by_the_connections_end_is_read_to_it(raw, config_file):
    async def serve(reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                     + b"".join(HELLO))
        await writer.drain()

    server = await raw(serve)
    config, model = provider_and_model(server.url, config_file)
    provider = OpenAIProvider(config, None)  # type: ignore[arg-type]
    assert await stream(provider, model) == (HELLO_EVENTS, None)
    assert not provider._upstream._idle  # not reusable: its end was the connection's


async def test_an_upstream_talking_on_after_done_loses_its_connection(raw, config_file):
    async def serve(reader, writer, n):
        while await server.read_request(reader) is not None:
            writer.write(SSE_HEAD + chunked(*HELLO))
            if n == 1:  # 100 KB of junk after [DONE], once the client has it: past the drain's 64 KB
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(chunked(*[b": junk" * 1000] * 17) + b"0\r\n\r\n")
            else:
                writer.write(b"0\r\n\r\n")
            await writer.drain()

    server = await raw(serve)
    config, model = provider_and_model(server.url, config_file)
    provider = OpenAIProvider(config, None)  # type: ignore[arg-type]
    assert await stream(provider, model) == (HELLO_EVENTS, None)
    await asyncio.sleep(0.3)
    assert await stream(provider, model) == (HELLO_EVENTS, None)
    await asyncio.sleep(0.1)
    assert await stream(provider, model) == (HELLO_EVENTS, None)
    provider.close()
    assert (server.connections, len(server.requests)) == (2, 3)  # the second connection served two


async def test_an_interim_answer_is_skipped_for_the_real_one(raw, config_file):
    async def serve(reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + SSE_HEAD
                     + chunked(*HELLO) + b"0\r\n\r\n")
        await writer.drain()

    server = await raw(serve)
    config, model = provider_and_model(server.url, config_file)
    assert await stream(OpenAIProvider(config, None), model) == (HELLO_EVENTS, None)  # type: ignore[arg-type]


async def test_an_encoding_not_asked_for_is_a_protocol_error(raw, config_file):
    async def serve(reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\r\nxxxx")
        await writer.drain()

    server = await raw(serve)
    config, model = provider_and_model(server.url, config_file)
    _, error = await stream(OpenAIProvider(config, None), model)  # type: ignore[arg-type]
    assert isinstance(error, UpstreamProtocolError) and "encoding" in error.message


def test_a_header_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        Upstream("http://127.0.0.1:1/v1").request("/x", {"X-Evil": "a\r\nHost: b"}, b"")


def test_the_request_line_and_host_follow_the_base_url() -> None:
    assert Upstream("https://api.example.com/openai/v1/").request("/chat/completions", {}, b"{}") == (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 2\r\n"
        b"Accept-Encoding: identity\r\nUser-Agent: chat-gateway\r\n\r\n{}")
    upstream = Upstream("https://[::1]:8443")
    assert (upstream.host, upstream.port, upstream.tls, upstream.host_header) == ("::1", 8443, True, "[::1]:8443")
    assert Connection.__slots__  # a held stream's object has no __dict__
