"""Every use of a library's private internals, in one place.

Each shim below names what it relies on, and tests/test_compat.py pins that shape, so that a
library release that changes it fails there, loudly, rather than somewhere in a stream. Where
the gateway relies on internals, pyproject.toml bounds the library to the major version they
were checked on.

    aiohttp       `RequestHandler._messages` and `StreamReader._buffer` (held streams' empty queues);
                  `RequestHandler.handle_error` (the answer to a malformed request);
                  `Application._make_handler`, `_handle` and `_client_max_size`, `Server._kwargs`
                  and `_loop`, `Request._match_info`, `_cancel` and `_task` (the lean connection:
                  gateway/edge/lean.py); `StreamResponse._send_headers_immediately` (a stream's
                  head sent with its first write)
    aiohttp-sse   `EventSourceResponse._ping_task` (the keep-alive task a stopped stream lets go of)
    asyncpg       `asyncpg.exceptions._base.DataError` (the client-side error for a value it cannot
                  encode, not the SQLSTATE 22 class of the same name); `asyncpg.connect_utils`,
                  the module every connection is opened in
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp_sse import EventSourceResponse
from asyncpg.exceptions import _base as asyncpg_base

# -- aiohttp: the empty queues a held stream keeps ---------------------------------------------

# the connection's queue of pipelined requests, and the request body's buffer of chunks
PIPELINED_REQUESTS = "_messages"  # on RequestHandler
BODY_CHUNKS = "_buffer"  # on StreamReader (request.content)


class _Queue(list[Any]):
    """A FIFO as a list: 56 bytes empty where a deque is ~760. The queues it stands in for hold
    at most a few items (pipelined requests; a body's chunks), so pop(0) costs nothing."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def lighten_queue(owner: object, name: str) -> bool:
    """Replace `owner.<name>` by a `_Queue` while it is exactly an empty deque (so an aiohttp that
    changes it costs memory again, never correctness); whether it did."""
    queue = getattr(owner, name, None)
    if type(queue) is deque and not queue:
        setattr(owner, name, _Queue())
        return True
    return False


def lighten_request_queues(request: web.Request) -> None:
    """A held stream's connection queue, and its body buffer once the body was read to its end."""
    if request.protocol is not None:
        lighten_queue(request.protocol, PIPELINED_REQUESTS)
    if request.content.at_eof():  # nothing is ever added to its buffer again
        lighten_queue(request.content, BODY_CHUNKS)


# -- aiohttp: the answer to a request it could not parse ----------------------------------------

HandleError = Callable[..., web.StreamResponse]
AIOHTTP_HANDLE_ERROR: HandleError = RequestHandler.handle_error  # aiohttp's own, called first by ours


def replace_handle_error(replacement: HandleError) -> None:
    """Make `replacement` the `RequestHandler.handle_error` of every aiohttp server of this process
    (aiohttp has no hook for it: `web.Server` builds its RequestHandler itself)."""
    RequestHandler.handle_error = replacement  # type: ignore[method-assign]


# -- aiohttp: the lean connection (gateway/edge/lean.py) ------------------------------------------

def wrap_make_handler(app: web.Application, wrap: Callable[[web.Server], web.Server]) -> None:
    """Every low-level server made for `app` (by any runner: run_app's, a test's) passes through
    `wrap` (aiohttp has no hook for the server's protocol: `Server.__call__` builds it)."""
    make = app._make_handler

    def make_handler(**kwargs: Any) -> web.Server:
        return wrap(make(**kwargs))

    app._make_handler = make_handler  # type: ignore[method-assign]


def server_kwargs(server: web.Server) -> dict[str, Any]:
    """The keyword arguments `server` gives each aiohttp RequestHandler it makes."""
    kwargs: dict[str, Any] = server._kwargs
    return kwargs


def client_max_size(app: web.Application) -> int:
    """The largest request body `app`'s requests may read."""
    size: int = app._client_max_size
    return size


def match_info(route: web.AbstractRoute, app: web.Application) -> web.UrlMappingMatchInfo:
    """A frozen match of `route` (a static one: no path parameters) in `app`, as its router makes."""
    info = web.UrlMappingMatchInfo({}, route)
    info.add_app(app)
    info.freeze()
    return info


def set_match_info(request: web.Request, info: web.UrlMappingMatchInfo) -> None:
    """What `Application._handle` sets once its router has matched the request."""
    request._match_info = info


def server_loop(server: web.Server) -> asyncio.AbstractEventLoop:
    """The loop `server` was made on."""
    loop: asyncio.AbstractEventLoop = server._loop
    return loop


def cancel_request(request: web.BaseRequest, exc: BaseException) -> None:
    """What aiohttp's handler does to a request whose connection is lost: its body and its
    disconnection waiters fail with `exc`."""
    request._cancel(exc)


def forget_task(request: web.BaseRequest) -> None:
    """What aiohttp's handler does once a request is answered: the request no longer refers to its
    task (a reference cycle through a traceback otherwise)."""
    request._task = None  # type: ignore[assignment]


def app_handle(app: web.Application) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The app's request handling from routing on: the router, then the middleware chain."""
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]] = app._handle
    return handle


# -- aiohttp: a stream's head with its first write ----------------------------------------------------

class HeadWithFirstWrite(web.StreamResponse):
    """A StreamResponse whose head goes out with its first write, as `web.Response` sends its head
    with its body: one socket write where StreamResponse makes two (`_send_headers_immediately`).
    For a stream whose first write follows its prepare at once (the doors' SSE answers: they prepare
    once the first events are in hand). The bytes on the wire are the same; `write_eof` sends a
    head nothing was written after."""

    _send_headers_immediately = False


# -- aiohttp-sse: the keep-alive task --------------------------------------------------------------

def ping_task(response: EventSourceResponse) -> asyncio.Task[None] | None:
    """The response's keep-alive task (None once it is let go of)."""
    task: asyncio.Task[None] | None = response._ping_task
    return task


def forget_ping_task(response: EventSourceResponse, task: asyncio.Task[None]) -> None:
    """Drop the response's reference to its (ended) keep-alive task, unless it started another."""
    if response._ping_task is task:
        response._ping_task = None


# -- asyncpg ------------------------------------------------------------------------------------------

# the client-side DataError (an InterfaceError: a value asyncpg cannot encode); the public
# `asyncpg.exceptions.DataError` is the server's SQLSTATE class 22, another class
ASYNCPG_CLIENT_DATA_ERROR: type[Exception] = asyncpg_base.DataError
ASYNCPG_CONNECTING_MODULE = "asyncpg.connect_utils"  # the module asyncpg opens every connection in
