"""A lean HTTP/1.1 client for the adapters' upstream calls.

One `asyncio.Protocol` per connection, httptools' parser (llhttp, in C) for the status line, the
headers and the chunked framing, and a small pool of keep-alive connections per upstream origin.
aiohttp's client keeps a `ClientResponse`, a `ResponseHandler`, a response parser, a
`StreamReader`, a connection and a read timer per call: about 12 KB of each held stream's 35.
Here a held stream is one `Connection` (slots), its parser and its transport, and the waiting
read is a bare future on it.

Failures are the provider errors the chain understands:

    refused, reset, DNS, TLS handshake          UpstreamConnectionError
    no connection within connect_timeout_s      UpstreamTimeout("connect")
    no byte for idle_timeout_s while waiting    UpstreamTimeout("idle") (the answer's head included)
    closed before the body's end (mid-chunk)    UpstreamConnectionError
    malformed status line, headers or chunks    UpstreamConnectionError
    a compressed body we cannot decode          UpstreamProtocolError

The idle check is lazy and shared: a waiting read puts one entry on the loop's coarse deadline
slots (providers/deadlines.py) at the last byte's time plus the idle timeout, re-armed from
there when bytes came meanwhile, so a chunk costs a clock read, not a timer. A reused
connection the upstream closed before it answered (a stale keep-alive) is retried once on a
new one: the upstream never saw that request. No proxy: the aiohttp session
this replaces never read the proxy environment either (trust_env off).
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

from gateway.providers.base import UpstreamConnectionError, UpstreamProtocolError, UpstreamTimeout
from gateway.providers.deadlines import deadlines

# unread body bytes past which the socket stops being read, until the reader catches up
HIGH_WATER = 1 << 18
MAX_IDLE = 16  # keep-alive connections kept per origin
KEEPALIVE_S = 30.0  # an idle connection is closed after this (before the upstream's own timeout, mostly)
DRAIN_BYTES = 1 << 16  # read after the stream's end marker to reuse the connection; past it, closed
DRAIN_S = 0.25
_INFLATE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

_tls: ssl.SSLContext | None = None


def tls_context() -> ssl.SSLContext:
    """The system's trust store, hostname checks on: one context for every https upstream."""
    global _tls
    if _tls is None:
        _tls = ssl.create_default_context()
    return _tls


def failed(what: str) -> UpstreamConnectionError:
    return UpstreamConnectionError(f"upstream connection failed: {what}")


class Connection(asyncio.Protocol):
    """One connection to an upstream, and the answer being read on it (one at a time).

    `status` and `retry_after` (the header's raw value) are set once `Upstream.post` returns
    (the other headers are not kept: a held stream carries none of them); `take()`/`read()` give
    the body piece by piece, b"" at its end.
    """

    __slots__ = ("_pool", "_loop", "_transport", "_parser", "_chunks", "_buffered", "_paused", "_waiter",
                 "_error", "_head", "_done", "_keep", "_got", "_last", "_idle_s", "_slots", "_slot", "_timer",
                 "_drain", "_inflate", "_framed", "_encoding", "status", "retry_after")

    def __init__(self, pool: Upstream, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._head = False  # the answer's status line and headers are in
        self._done = False  # ... and its body's end
        self._keep = False  # ... and the connection may carry the next request (read at the end: llhttp forgets)
        self._got = False  # any byte of the answer arrived
        self._last = 0.0  # loop time of the last byte (or of the request)
        self._idle_s = 0.0
        self._slots = deadlines()
        self._slot = 0  # the idle check's slot while one is armed
        self._timer: asyncio.TimerHandle | None = None  # the keep-alive or drain timer
        self._drain = -1  # >= 0: the caller is done, the rest of the body (at most this much) is dropped
        self._inflate: zlib._Decompress | None = None
        self._framed = False  # Content-Length or Transfer-Encoding: the body does not end with the connection
        self._encoding = "identity"
        self.status = 0
        self.retry_after: str | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # an idle connection has nothing to say: its framing is lost
            self.close()
            return
        self._got = True
        self._last = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(failed("unexpected protocol upgrade"))
        except httptools.HttpParserError as e:
            self._fail(failed(f"malformed HTTP answer ({e})"))
        self._wake()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost sorts out what that means

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._parser is None:  # idle in the pool
            self._pool.forget(self)
            self._cancel_timer()
            return
        if self._head and not self._done and not self._framed:
            self._done = True  # a body without framing ends with the connection
        elif not self._done and self._error is None:
            self._error = failed("the upstream closed the connection before the answer's end")
        if self._drain >= 0:
            self._cancel_timer()
        self._cancel_idle()
        self._wake()

    def pause_writing(self) -> None:  # requests are small: nothing waits on the write buffer
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"transfer-encoding" or name == b"content-length":
            self._framed = True
        elif name == b"retry-after":
            self.retry_after = value.decode("latin-1").strip()
        elif name == b"content-encoding":
            self._encoding = value.decode("latin-1").strip().lower()

    def on_headers_complete(self) -> None:
        if self._parser is None:  # failed meanwhile
            return
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (103 Early Hints): the real one follows
            return
        self.status = status
        self._head = True
        encoding = self._encoding
        if encoding in _INFLATE:
            self._inflate = zlib.decompressobj(_INFLATE[encoding])
        elif encoding != "identity":
            self._fail(UpstreamProtocolError(f"upstream sent a body in an encoding we did not ask for: {encoding}"))

    def on_body(self, body: bytes) -> None:
        if self._error is not None:
            return
        if self._inflate is not None:
            try:
                body = self._inflate.decompress(body)
            except zlib.error:
                self._fail(UpstreamProtocolError("upstream sent a compressed body that does not decompress"))
                return
        if self._drain >= 0:
            self._drain -= len(body)
            if self._drain < 0:
                self.close()  # an upstream that keeps talking after its end marker loses its connection
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._parser is None:  # failed meanwhile
            return
        if not self._head:  # the end of an interim answer: forget its headers
            self._framed = False
            self._encoding = "identity"
            self.retry_after = None
            return
        self._done = True
        self._keep = self._parser.should_keep_alive()
        if self._drain >= 0:
            self._release()

    # -- the caller's side -----------------------------------------------------------------------

    def send(self, request: bytes, idle_s: float) -> None:
        """Start an answer: write the request and parse what comes back."""
        assert self._transport is not None
        self._cancel_timer()  # the keep-alive timer of an idle connection
        self._slots = deadlines()  # the running loop's (a pooled connection outlives no loop, but be exact)
        self._parser = httptools.HttpResponseParser(self)
        self._idle_s = idle_s
        self._last = self._loop.time()
        self._transport.write(request)

    async def head(self) -> None:
        while not self._head:
            if self._error is not None:
                raise self._error
            if self._done:  # closed before a status line
                raise failed("the upstream closed the connection without an answer")
            await self.readable()

    def take(self) -> bytes | None:
        """The body bytes that arrived since the last take, b"" at the body's end, or None when
        nothing has yet (then `await conn.readable()`). Raises the connection's failure."""
        if self._chunks:
            chunks = self._chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._chunks = []
            self._buffered = 0
            if self._paused and self._transport is not None:
                self._paused = False
                self._transport.resume_reading()
            return data
        if self._error is not None:
            raise self._error
        if self._done:
            if self._inflate is not None:
                rest, self._inflate = self._inflate.flush(), None
                if rest:
                    return rest
            return b""
        return None

    def readable(self) -> asyncio.Future[None]:
        """A future done once `take()` has something to say (bytes, the end or a failure).
        Awaited bare, it costs a held stream no coroutine frame; the idle check is armed."""
        waiter = self._waiter = self._loop.create_future()
        if not self._slot:
            self._slot = self._slots.at(self._last + self._idle_s, self, self._idle_check)
        return waiter

    async def read(self) -> bytes:
        """The body's next bytes, b"" at its end."""
        while (data := self.take()) is None:
            await self.readable()
        return data

    async def read_at_most(self, limit: int) -> bytes:
        """The body's first `limit` bytes (all of it when shorter)."""
        body = b""
        while len(body) < limit:
            chunk = await self.read()
            if not chunk:
                break
            body += chunk
        return body[:limit]

    def finish(self) -> None:
        """The caller has what it wanted: the connection goes back to the pool once the body
        ends (at most DRAIN_BYTES and DRAIN_S later), else it is closed. Never blocks."""
        self._chunks = []
        if self._error is not None or self._transport is None:
            self.close()
        elif self._done:
            self._release()
        else:
            self._cancel_idle()  # a lazy idle check still pending
            self._drain = DRAIN_BYTES
            if self._paused:
                self._paused = False
                self._transport.resume_reading()
            self._timer = self._loop.call_later(DRAIN_S, self.close)

    def close(self) -> None:
        self._cancel_timer()
        self._cancel_idle()
        self._parser = None
        self._pool.forget(self)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- internals -------------------------------------------------------------------------------

    def _idle_check(self) -> None:
        self._slot = 0
        if self._waiter is None or self._waiter.done():
            return  # not waiting: the next wait arms the check again
        due = self._last + self._idle_s
        if self._loop.time() < due:  # bytes came meanwhile
            self._slot = self._slots.at(due, self, self._idle_check)
            return
        self._error = UpstreamTimeout("idle")
        self.close()
        self._waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (self._chunks or self._done or self._error or self._head):
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self.close()

    def _cancel_idle(self) -> None:
        if self._slot:
            self._slots.cancel(self._slot, self)
            self._slot = 0

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release(self) -> None:
        parser = self._parser
        self._cancel_timer()
        self._cancel_idle()
        if parser is None or self._transport is None or not self._keep or self._error is not None:
            self.close()
            return
        self._parser = None
        self._waiter = None
        self._chunks = []
        self._buffered = 0
        self._head = self._done = self._keep = self._got = False
        self._drain = -1
        self._inflate = None
        self._framed = False
        self._encoding = "identity"
        self.status = 0
        self.retry_after = None
        self._pool.keep(self)


class Upstream:
    """The keep-alive connections to one origin (scheme, host, port), and the requests made on them."""

    def __init__(self, base_url: str, *, max_idle: int = MAX_IDLE, keepalive_s: float = KEEPALIVE_S) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.tls = url.scheme == "https"
        self.port = url.port or (443 if self.tls else 80)
        default_port = url.port is None or url.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.prefix = url.path.rstrip("/")
        self.max_idle = max_idle
        self.keepalive_s = keepalive_s
        self._idle: list[Connection] = []

    def request(self, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
        """A POST's bytes: head and body, ready for one write."""
        lines = [f"POST {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {len(body)}",
                 "Accept-Encoding: identity", "User-Agent: chat-gateway"]
        for name, value in headers.items():
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value or ":" in name:
                raise ValueError(f"header {name!r} has a line break or colon in it")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def post(self, path: str, headers: Mapping[str, str], body: bytes, *, connect_timeout_s: float,
                   idle_timeout_s: float) -> Connection:
        """Send a POST and wait for the answer's head; read the body on the connection returned,
        then `finish()` it (back to the pool) or `close()` it."""
        request = self.request(path, headers, body)
        while self._idle:
            conn = self._idle.pop()
            if conn._transport is None or conn._transport.is_closing():
                continue
            conn.send(request, idle_timeout_s)
            try:
                await conn.head()
                return conn
            except UpstreamConnectionError:
                conn.close()
                if conn._got:
                    raise
                # a stale keep-alive connection: closed by the upstream before it read the request
            except BaseException:
                conn.close()
                raise
        conn = await self._connect(connect_timeout_s)
        conn.send(request, idle_timeout_s)
        try:
            await conn.head()
        except BaseException:
            conn.close()
            raise
        return conn

    async def _connect(self, timeout_s: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, loop), self.host, self.port,
                    ssl=tls_context() if self.tls else None, server_hostname=self.host if self.tls else None)
        except TimeoutError:
            raise UpstreamTimeout("connect") from None
        except (OSError, ssl.SSLError) as e:  # refused, unreachable, DNS (gaierror), certificate
            raise failed(type(e).__name__) from None
        return conn

    def keep(self, conn: Connection) -> None:
        if len(self._idle) >= self.max_idle:
            conn.close()
            return
        self._idle.append(conn)
        conn._timer = conn._loop.call_later(self.keepalive_s, conn.close)

    def forget(self, conn: Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        """Close the idle connections (the ones in use close with their callers)."""
        for conn in list(self._idle):
            conn.close()
