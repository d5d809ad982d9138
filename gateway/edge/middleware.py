"""The edge: request ids, errors as JSON, CORS, and an access log that never shows a secret."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware

from gateway.errors import GatewayError, ServiceUnavailable, TooManyRequests
from gateway.observability.logs import direct_handler, escape_controls, has_secret, redact
from gateway.observability.metrics import Metrics, Timings, route_of
from gateway.state import ACCESS_LOGGED, REQUEST_ID, RESPONSE, TIMINGS, TRACE_ID, USER_ID
from gateway.store.failures import database_unavailable

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def error_body(status: int, type_: str, message: str, request_id: str, **extra: Any) -> web.Response:
    body = {"error": {"type": type_, "message": message, "request_id": request_id, **extra}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


# A handler may answer its errors in a shape of its own (the OpenAI routes: OpenAI's error body):
# it carries a function under this attribute, which the error middleware calls instead of
# wrapping the handler in a try block of its own (one coroutine frame less per held stream).
ERROR_SHAPE = "__gateway_error_shape__"
ErrorShape = Callable[[GatewayError], web.StreamResponse]


def error_shape(shape: ErrorShape) -> Callable[[Handler], Handler]:
    """Decorator: the handler's GatewayErrors are answered by `shape` (the handler is not wrapped)."""

    def mark(handler: Handler) -> Handler:
        setattr(handler, ERROR_SHAPE, shape)
        return handler

    return mark


def answer_error(request: web.Request, request_id: str, e: Exception) -> web.StreamResponse | None:
    """The JSON answer to what the handler raised, or None when it must propagate (a redirect, a
    client that is gone)."""
    if isinstance(e, GatewayError):
        shape: ErrorShape | None = getattr(request.match_info.handler, ERROR_SHAPE, None)
        if shape is not None:
            answer = shape(e)
            if isinstance(e, ServiceUnavailable):
                answer.headers.update(e.headers())
            return answer
        if isinstance(e, TooManyRequests):
            resp = error_body(e.status, e.type, e.message, request_id, retry_after=e.retry_after,
                              reset_at=e.reset_at)
            resp.headers.update(e.headers())
            return resp
        if isinstance(e, ServiceUnavailable):
            return unavailable(e, request_id)
        return error_body(e.status, e.type, e.message, request_id)
    if isinstance(e, web.HTTPException):
        if e.status < 400:
            return None
        type_ = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(e.status, "http_error")
        resp = error_body(e.status, type_, e.reason, request_id)
        if e.status == 405 and "Allow" in e.headers:
            resp.headers["Allow"] = e.headers["Allow"]
        return resp
    if database_unavailable(e):
        # lost, refused or not allowed to connect (failures.classify): the outage passes, the request
        # may be retried
        log.warning("database unavailable during %s %s: %s", request.method, escape_controls(request.path),
                    type(e).__name__)
        return unavailable(ServiceUnavailable("database unavailable"), request_id)
    if isinstance(e, ConnectionResetError):
        return None  # the client is gone: nobody to answer
    log.exception("unhandled error in %s %s", request.method, escape_controls(request.path))
    return error_body(500, "internal_error", "internal error", request_id)


def unavailable(e: ServiceUnavailable, request_id: str) -> web.Response:
    resp = error_body(e.status, e.type, e.message, request_id)
    resp.headers.update(e.headers())
    return resp


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-Id when it is a safe token, else a new one; kept on the request."""
    incoming = request.headers.get("X-Request-Id", "")
    request_id = request[REQUEST_ID] = incoming if _SAFE_ID.fullmatch(incoming) else uuid.uuid4().hex
    return request_id


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id, and turn every failure into a JSON error carrying it."""
    request_id = request_id_of(request)
    try:
        response = await handler(request)
        if response.prepared and client_gone(request):
            # aiohttp would not log it: re-preparing an SSE response to a client that left raises
            # CancelledError (aiohttp-sse's liveness check) before its access line
            log_abandoned(request)
        return response
    except asyncio.CancelledError:
        if client_gone(request):
            log_abandoned(request)
        raise
    except Exception as e:
        answer = answer_error(request, request_id, e)
        if answer is None:
            raise
        return answer


def edge(metrics: Metrics, cors: Cors) -> Middleware:
    """The main app's one middleware: what `observe` (metrics.py), `errors` and `Cors.preflight` do,
    in that order, in one coroutine frame rather than three (a held stream suspends in every frame
    of its handler chain, and each costs it a few hundred bytes). With tracing on, the app keeps the
    three apart instead: the request's span sits between the first and the second."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        timings = request[TIMINGS] = Timings()
        request_id = request_id_of(request)
        status = 500
        try:
            response: web.StreamResponse | None = cors.answer_preflight(request)
            if response is None:
                response = await handler(request)
                if response.prepared and client_gone(request):
                    log_abandoned(request)  # as in `errors`
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away before an answer (nginx's "client closed request")
            if client_gone(request):
                log_abandoned(request)
            raise
        except Exception as e:
            answer = answer_error(request, request_id, e)
            if answer is None:
                status = e.status if isinstance(e, web.HTTPException) else 500
                raise
            status = answer.status
            return answer
        finally:
            timings.open = False
            if timings.stream:
                metrics.active_streams.dec()
            # a prepared response's status is what the client got, whatever happened after
            metrics.request_done(route_of(request), request.method, timings.status or status,
                                 monotonic() - timings.start)

    return middleware


class Cors:
    """CORS for browser clients on other origins.

    Listed origins get their own origin echoed and credentials allowed; `*` is honoured only
    when configured explicitly, and then without credentials (browsers forbid both at once).
    """

    MAX_AGE = "600"

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.wildcard = "*" in origins
        self.origins = frozenset(o.rstrip("/") for o in origins if o != "*")

    def allow(self, origin: str) -> tuple[str, bool] | None:
        """(Access-Control-Allow-Origin value, credentials allowed), or None to refuse."""
        if origin in self.origins:
            return origin, True
        if self.wildcard:
            return "*", False
        return None

    def answer_preflight(self, request: web.Request) -> web.Response | None:
        """The answer to a CORS preflight request, or None for any other request."""
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        origin = request.headers.get("Origin", "")
        allowed = self.allow(origin)
        if allowed is None:
            return error_body(403, "forbidden", "origin not allowed", request.get(REQUEST_ID, ""))
        resp = web.Response(status=204)
        resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        resp.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Authorization, Content-Type, Last-Event-ID")
        resp.headers["Access-Control-Max-Age"] = self.MAX_AGE
        return resp

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        answer = self.answer_preflight(request)  # not `or`: an empty response is falsy (a mapping)
        return answer if answer is not None else await handler(request)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if not origin:
            return
        allowed = self.allow(origin)
        if allowed is None:
            return
        value, credentials = allowed
        response.headers["Access-Control-Allow-Origin"] = value
        if credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
        if value != "*":
            response.headers.add("Vary", "Origin")


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # a signal, not middleware: streamed responses send their headers before a middleware returns
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]
    request[RESPONSE] = response


def client_gone(request: web.BaseRequest) -> bool:
    """Whether the client's connection is closed (or closing): it left before the response ended."""
    transport = request.transport
    return transport is None or transport.is_closing()


# nginx's status for a request whose client left before any response was sent
CLIENT_CLOSED_REQUEST = 499


def log_abandoned(request: web.Request) -> None:
    """The access line of a request whose client left mid-response, which aiohttp never writes (it
    cancels the handler, with handler_cancellation on, or the response's end raises
    CancelledError): the status that went out, or 499 if none did. Written once."""
    if not _ABANDONED.enabled or request.get(ACCESS_LOGGED):
        return
    response = request.get(RESPONSE) or web.Response(status=CLIENT_CLOSED_REQUEST)
    _ABANDONED.log(request, response, 0.0)


_REDACT = re.compile(r"((?:token|key|access_token)=)[^&]*", re.I)


class AccessLogger(AbstractAccessLogger):
    """One line per request: id, method, path (secrets in the query redacted, control characters
    escaped: logs.escape_controls), status, total time,
    where the time went (auth, persist, first_token: ms since arrival), user, and `client_closed`
    when the client left before the response ended (an abandoned stream).

    The same facts ride on the record as fields (`request_id`, `route`, `ms`, `auth_ms`, ...), so
    LOG_FORMAT=json writes them as keys rather than as text to parse."""

    @property
    def enabled(self) -> bool:  # aiohttp skips the call (and its timing) when nobody would read it
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.get(ACCESS_LOGGED):
            return  # an abandoned stream's line, written by the middleware
        request[ACCESS_LOGGED] = True
        path = request.path
        if request.query_string:
            path += "?" + _REDACT.sub(r"\1[redacted]", request.query_string)
        path = escape_controls(path)  # decoded: a %0A in it would end the line and forge the next
        timings = request.get(TIMINGS)
        phases = timings.phases if timings is not None else {}
        # our own clock when we can: aiohttp's `time` follows loop.time(), whole milliseconds under uvloop
        ms = round((monotonic() - timings.start if timings is not None else time) * 1000, 2)
        request_id, user_id = request.get(REQUEST_ID, "-"), request.get(USER_ID)
        closed = client_gone(request)
        trace_id = request.get(TRACE_ID)
        method, status = request.method, response.status
        breakdown = "".join(f" {phase}={value:.1f}ms" for phase, value in phases.items())
        message = (f"{request_id} {method} {path} {status} {ms:.1f}ms{breakdown} user={user_id or '-'}"
                   f"{' client_closed' if closed else ''}{'' if trace_id is None else ' trace=' + trace_id}")
        handler = direct_handler(self.logger)
        fields: dict[str, Any] | None = None
        if handler is None or handler.json:
            fields = {"request_id": request_id, "method": method, "path": path, "route": route_of(request),
                      "status": status, "user_id": user_id, "ms": ms, "client_closed": closed}
            fields.update((f"{phase}_ms", value) for phase, value in phases.items())
            if trace_id is not None:  # traced (tracing.py): the line leads to the trace
                fields["trace_id"] = trace_id
        if handler is None:  # through logging: the redaction filter runs on the record
            self.logger.info("%s", message, extra=fields)
            return
        # what the redaction filter would do: request id, method and path are what a client sent (the
        # path's query already has its `token=`/`key=` values masked); the rest is ours
        if has_secret(message):
            message = redact(message)
            if fields is not None:
                fields = {name: redact(value) if type(value) is str else value for name, value in fields.items()}
        if not message.isprintable():
            message = escape_controls(message)
        handler.write_line(self.logger.name, message, fields)


# aiohttp's access logger is the server's; the middleware's own copy writes to the same logger
_ABANDONED = AccessLogger(logging.getLogger("aiohttp.access"), "")
