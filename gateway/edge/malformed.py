"""Malformed HTTP requests get our JSON error, never their own bytes back.

aiohttp answers a request it cannot parse (a control character in a header, a bare CR, obs-fold,
`HTTP/9.9`, a line over 8 KB) inside its protocol handler, below the app: no middleware or
response signal runs. Its answer is a text/plain 400 whose body is the parser's error — which
quotes the offending line, Authorization header and all. aiohttp has no hook for that answer
(`web.Server` builds `RequestHandler` itself; `handler_args` only passes constructor options), so
`install()` replaces the one method that builds it, `RequestHandler.handle_error` (through
gateway/compat.py, which pins it). The
replacement still calls aiohttp's own first — its log line (redacted by gateway.observability.logs' filter on
`aiohttp.server`) and its check that nothing was sent yet — and drops only its body.
"""

from __future__ import annotations

import uuid

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.compat import AIOHTTP_HANDLE_ERROR, replace_handle_error
from gateway.edge.middleware import error_body
from gateway.state import REQUEST_ID

MESSAGE = "malformed HTTP request"


def handle_error(self: RequestHandler, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                 message: str | None = None) -> web.StreamResponse:
    """aiohttp's handle_error (400 for a parse error, 500/504 for a handler failure no middleware
    caught), answered as `{"error": {"type", "message", "request_id"}}` with none of the request's text."""
    AIOHTTP_HANDLE_ERROR(self, request, status, exc, None)  # logs, and raises if a response already began
    request_id = request.get(REQUEST_ID) or uuid.uuid4().hex
    request[REQUEST_ID] = request_id  # the access line shows it too
    if status == 400:
        type_, text = "bad_request", MESSAGE
    elif status == 504:
        type_, text = "timeout", "request timed out"
    else:
        type_, text = "internal_error", "internal error"
    response = error_body(status, type_, text, request_id)
    response.headers["X-Request-Id"] = request_id
    response.force_close()  # as aiohttp's: after a parse error the connection's framing is unknown
    return response


def install() -> None:
    """Answer malformed requests with our JSON error in every aiohttp server of this process. Idempotent."""
    replace_handle_error(handle_error)
