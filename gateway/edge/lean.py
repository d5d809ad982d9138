"""The lean connection: aiohttp's handler and middleware, without aiohttp's connection machinery.

Every connection of a gateway app's server starts on a `LeanConnection` (installed by
`serve_lean`). It reads a request's head with httptools, and when the request is a plain one to
one of the app's static GET or POST routes (HTTP/1.1, a Content-Length body within the app's
limit, no Transfer-Encoding, Expect or Upgrade, a head within aiohttp's smallest limit) it serves
it itself: the body read whole, a real `web.Request` made by the app's request factory, the app's
middleware and the route's handler, the response prepared and ended, the access line written,
the connection kept alive. Anything else — and every request after it on that connection — is
handed, with the bytes read so far, to aiohttp's own `RequestHandler`, at a request boundary:
aiohttp answers it exactly as it always has (its errors, limits, 100-continue, chunked bodies).

Why: a held stream keeps what its connection keeps for its whole life, and thousands are held
at once. aiohttp's handler keeps a parser, two tasks and four coroutine frames per connection
(about 4 KB a held stream); this one keeps one task, two frames (middleware and handler), and no
parser once the head is read. It also skips the router and the middleware chain's assembly on
every request. What a request and its response look like to the middleware, the handler and the
access log is unchanged: they are aiohttp's own objects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion11, StreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_log import AccessLogger
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from gateway import compat

log = logging.getLogger(__name__)

# aiohttp's smallest default limit (a request line, a header field): a head within it is within all
MAX_HEAD = 8190
# what a connection reads ahead while a request is answered (pipelined requests), before it pauses
MAX_PENDING = 1 << 16
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Route:
    """One static route the lean path serves: the request's URL and its match, shared (both are
    immutable once frozen), and the app's request handling from the match on."""

    __slots__ = ("url", "match_info", "handle")

    def __init__(self, url: URL, match_info: web.UrlMappingMatchInfo, handle: Handler) -> None:
        self.url, self.match_info, self.handle = url, match_info, handle


def lean_routes(app: web.Application) -> dict[tuple[bytes, bytes], Route]:
    """(method, path) -> Route for every static GET and POST route of the frozen `app`."""
    middlewares = app.middlewares
    routes: dict[tuple[bytes, bytes], Route] = {}
    for resource in app.router.resources():
        if not isinstance(resource, web.PlainResource):
            continue
        path = resource.canonical
        for route in resource:
            if route.method not in ("GET", "POST") or not path.isascii() or "%" in path:
                continue
            match_info = compat.match_info(route, app)
            # one middleware (the edge) is called as aiohttp's chain would call it; several (tracing
            # keeps them apart) go through aiohttp's own chain
            handle = _through(middlewares[0], route.handler) if len(middlewares) == 1 else compat.app_handle(app)
            routes[route.method.encode(), path.encode()] = Route(URL.build(path=path, encoded=True), match_info,
                                                                 handle)
    return routes


def _through(middleware: Any, handler: Handler) -> Handler:
    def handle(request: web.Request) -> Awaitable[web.StreamResponse]:
        # not a coroutine: the middleware's is what the request's task awaits (one frame less)
        result: Awaitable[web.StreamResponse] = middleware(request, handler)
        return result

    return handle


class LeanServer(web.Server):
    """aiohttp's low-level server, whose connections start on a LeanConnection."""

    routes: dict[tuple[bytes, bytes], Route]
    settings: _Settings

    def __call__(self) -> LeanConnection:  # type: ignore[override]
        return LeanConnection(self)

    def aiohttp_handler(self) -> asyncio.Protocol:
        return web.Server.__call__(self)


class _Settings:
    """The connection options aiohttp's handler would take from the server's keyword arguments."""

    __slots__ = ("keepalive_timeout", "tcp_keepalive", "access_logger", "max_body")

    def __init__(self, kwargs: dict[str, Any], max_body: int) -> None:
        self.keepalive_timeout: float = kwargs.get("keepalive_timeout", 3630)
        self.tcp_keepalive: bool = kwargs.get("tcp_keepalive", True)
        access_log = kwargs.get("access_log", logging.getLogger("aiohttp.access"))
        self.access_logger = None
        if access_log:
            cls = kwargs.get("access_log_class", AccessLogger)
            self.access_logger = cls(access_log, kwargs.get("access_log_format", AccessLogger.LOG_FORMAT))
        self.max_body = max_body


def serve_lean(app: web.Application) -> None:
    """Every server of `app` (run_app's, a test's) puts LeanConnection in front of aiohttp's."""

    def lean(server: web.Server) -> web.Server:
        server.__class__ = LeanServer
        assert isinstance(server, LeanServer)
        server.routes = lean_routes(app)
        server.settings = _Settings(compat.server_kwargs(server), compat.client_max_size(app))
        return server

    compat.wrap_make_handler(app, lean)


class _Head:
    """httptools' callbacks for one request head."""

    __slots__ = ("url", "headers", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


class LeanConnection(BaseProtocol):
    """One client connection (see the module docstring)."""

    __slots__ = ("_server", "_received", "_task_handler", "_current_request", "_keepalive_handle", "_closing",
                 "_handed", "_waiting", "_reading_held")

    def __init__(self, server: LeanServer) -> None:
        super().__init__(compat.server_loop(server))
        self._server = server
        self._received = bytearray()
        self._task_handler: asyncio.Task[None] | None = None
        self._current_request: web.BaseRequest | None = None
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._closing = False  # no request after the current one (shutdown, Connection: close)
        self._handed = False
        self._reading_held = False  # reading paused while pipelined requests wait (MAX_PENDING)
        # a complete head not yet served: (route, message, head length, body length)
        self._waiting: tuple[Route, RawRequestMessage, int, int] | None = None

    # -- what aiohttp's objects read off their protocol (BaseRequest, StreamWriter, hold_open) --

    @property
    def ssl_context(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("sslcontext")

    @property
    def peername(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("peername")

    @property
    def sockname(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("sockname")

    def keep_alive(self, val: bool) -> None:
        """As aiohttp's: the idle timer is off while a response is open (hold_open)."""
        self._cancel_idle_timer()

    # -- the connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        if self._server.settings.tcp_keepalive:
            tcp_keepalive(self.transport)
        self._server.connection_made(self, self.transport)  # type: ignore[arg-type]
        self._arm_idle_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._handed:
            return
        self._server.connection_lost(self, exc)  # type: ignore[arg-type]
        super().connection_lost(exc)
        self._cancel_idle_timer()
        self._received = bytearray()
        request, task = self._current_request, self._task_handler
        if request is not None:
            compat.cancel_request(request, exc or ConnectionResetError("Connection lost"))
        if task is not None and self._server.handler_cancellation:
            task.cancel()
        self._task_handler = None

    def eof_received(self) -> None:
        pass  # the transport closes itself, as under aiohttp's handler

    def data_received(self, data: bytes) -> None:
        if self._handed or self.transport is None:
            return
        self._received += data
        if self._task_handler is None:
            self._next()
        elif len(self._received) > MAX_PENDING and not self._reading_held and self.transport is not None:
            self._reading_held = True  # pipelined requests pile up: read more once this one is answered
            self.transport.pause_reading()

    def _next(self) -> None:
        """Serve what the buffer holds once it holds a whole request, or hand the connection over."""
        buffer = self._received
        if self._waiting is None:
            if not buffer:
                return
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._hand_over()  # aiohttp's own answer to an oversized head
                return
            self._waiting = self._read_head(bytes(buffer[:end + 4]))
            if self._waiting is None:
                self._hand_over()
                return
            self._cancel_idle_timer()  # a request is under way: a slow body is not an idle connection
        route, message, head, length = self._waiting
        if len(buffer) < head + length:
            return
        self._waiting = None
        body = bytes(buffer[head:head + length])
        # what follows (pipelined), in a buffer of its own size: a held stream keeps no request's bytes
        self._received = buffer[head + length:]
        if message.should_close:
            self._closing = True
        self._task_handler = self._loop.create_task(self._serve(route, message, body))

    def _read_head(self, head: bytes) -> tuple[Route, RawRequestMessage, int, int] | None:
        """The request of a head the lean path serves, or None (aiohttp's to answer)."""
        callbacks = _Head()
        parser = httptools.HttpRequestParser(callbacks)
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # a protocol switch is aiohttp's too
            return None
        if not callbacks.complete or parser.get_http_version() != "1.1" or parser.should_upgrade():
            return None
        route = self._server.routes.get((parser.get_method(), callbacks.url))
        if route is None:
            return None
        length = 0
        has_length = should_close = False
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in callbacks.headers:
            lower = name.lower()
            if lower in _HANDED_OVER:
                return None
            if lower == b"content-length":
                if has_length or not value.isdigit():
                    return None
                has_length, length = True, int(value)
            elif lower == b"connection":  # (httptools forgets it once a bodiless message is complete)
                should_close = should_close or b"close" in (t.strip() for t in value.lower().split(b","))
            headers.add(_name(name), value.decode("utf-8", "surrogateescape"))
        if length > self._server.settings.max_body:
            return None  # aiohttp's 413, through the app's middleware
        message = RawRequestMessage(
            route.match_info.route.method, route.url.path, HttpVersion11, CIMultiDictProxy(headers),
            (),  # nothing reads a lean request's raw headers: their bytes are not kept for a held stream
            should_close, None, False, False, route.url)
        return route, message, len(head), length

    def _hand_over(self) -> None:
        """Give the connection, with what it sent so far, to aiohttp's own handler, for good."""
        self._handed = True
        self._cancel_idle_timer()
        transport, data = self.transport, bytes(self._received)
        self._received = bytearray()
        self._server.connection_lost(self, None)  # type: ignore[arg-type]
        self._resume_reading()
        self.transport = None
        if transport is None or transport.is_closing():
            return
        handler = self._server.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)

    # -- one request ------------------------------------------------------------------------------

    async def _serve(self, route: Route, message: RawRequestMessage, body: bytes) -> None:
        loop, settings = self._loop, self._server.settings
        payload = StreamReader(self, max(2**16, len(body)), loop=loop)
        if body:
            payload.feed_data(body)
        payload.feed_eof()
        del body
        writer = StreamWriter(self, loop)
        request: web.Request = self._server.request_factory(  # type: ignore[assignment]
            message, payload, self, writer, asyncio.current_task())  # type: ignore[arg-type]
        compat.set_match_info(request, route.match_info)
        # asked per request, not once per server: a logger's level may change while it runs
        access_logger = settings.access_logger if settings.access_logger and settings.access_logger.enabled else None
        start = loop.time() if access_logger is not None else 0.0
        self._current_request = request
        self._server.requests_count += 1
        closed = False
        try:
            try:
                response = await route.handle(request)
            except web.HTTPException as e:  # what the middleware passes on (a redirect): sent as aiohttp sends it
                response = e
            finally:
                self._current_request = None
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                closed = True
            if access_logger is not None:
                access_logger.log(request, response, loop.time() - start)
        except asyncio.CancelledError:
            closed = True  # the client left (handler cancellation) or the server is shutting down
        except Exception:  # the middleware answers a handler's errors: this is a failure to answer at all
            log.exception("unhandled error answering %s %s", message.method, message.path)
            closed = True
        finally:
            compat.forget_task(request)  # as aiohttp: no cycle through the task
            self._task_handler = None
        transport = self.transport
        if transport is None:
            return
        if closed or self._closing or not response.keep_alive:
            transport.close()
            return
        self._arm_idle_timer()
        self._resume_reading()
        self._next()  # a request the client sent meanwhile (pipelined)

    def _resume_reading(self) -> None:
        if self._reading_held:
            self._reading_held = False
            if self.transport is not None:
                self.transport.resume_reading()

    # -- idle connections and shutdown ------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        timeout = self._server.settings.keepalive_timeout
        if timeout > 0:
            self._keepalive_handle = self._loop.call_later(timeout, self._idle)

    def _cancel_idle_timer(self) -> None:
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None

    def _idle(self) -> None:
        self._keepalive_handle = None
        if self._task_handler is None and self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        """No request after the current one (aiohttp's `Server.pre_shutdown`)."""
        self._closing = True
        if self._task_handler is None and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """As aiohttp's handler: let the current request end within `timeout`, then cancel it."""
        self._closing = True
        self._cancel_idle_timer()
        task = self._task_handler
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
        if self.transport is not None:
            self.transport.close()


# headers that make a request aiohttp's to answer (a chunked body, 100-continue, a protocol switch)
_HANDED_OVER = frozenset({b"transfer-encoding", b"expect", b"upgrade"})

# Header names as every request shares them: an istr carries its case-folded form, so a multidict
# keyed by one makes no folded copy of its own (~0.9 KB less for a request with six headers). The
# names are the clients' choice, so only the first few hundred are kept.
_NAMES: dict[bytes, istr] = {}
_MAX_NAMES = 256


def _name(raw: bytes) -> istr:
    name = _NAMES.get(raw)
    if name is None:
        name = istr(raw.decode("utf-8", "surrogateescape"))
        if len(_NAMES) < _MAX_NAMES:
            _NAMES[raw] = name
    return name
