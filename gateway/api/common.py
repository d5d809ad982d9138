"""What every handler shares: JSON in and out, ids, the caller."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gateway.compat import HeadWithFirstWrite
from gateway.contract.native import check_text
from gateway.edge.auth import CredentialWatch, Principal
from gateway.edge.sse import DONE
from gateway.errors import BadRequest, InvalidId, PayloadTooLarge, Unauthorized
from gateway.observability import tracing
from gateway.state import AUTH, PRINCIPAL, SETTINGS, STREAM_TOKENS, TIMINGS, USER_ID

# the headers of a vendor-style SSE answer (the OpenAI and Anthropic doors): no caching, no proxy buffering
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache, no-transform",
               "X-Accel-Buffering": "no"}


def sse_stream() -> web.StreamResponse:
    """A vendor-style SSE answer, to prepare only once its first events are in hand: its head goes
    out with the first write (one socket write less before the first token: compat.HeadWithFirstWrite)."""
    return HeadWithFirstWrite(headers=SSE_HEADERS)


def json_response(data: Any, status: int = 200) -> web.Response:
    # orjson writes UUIDs and datetimes natively
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


async def read_body(request: web.Request) -> bytes:
    """The body's bytes, refused past the configured limit (decode them with gateway.contract)."""
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body over {limit} bytes")
    # read off the payload rather than with request.read(), which keeps the bytes on the request
    # (and grows its attribute dict) for as long as the request lives: a held stream's whole life
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:  # a chunked body has no Content-Length to refuse it by up front
            raise PayloadTooLarge(f"body over {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_uuid(raw: Any, what: str) -> uuid.UUID:
    if not isinstance(raw, str):
        raise InvalidId(f"{what} must be a UUID string")
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidId(f"{what} is not a valid UUID") from None


def optional(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    # bool is an int in Python; a JSON true must not pass as a number
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and bool not in
                                                               (kind if isinstance(kind, tuple) else (kind,)))):
        raise BadRequest(f"{key} must be {what}")
    if isinstance(value, str):
        check_text(value, key)
    return value


async def stream_reader(request: web.Request, resource_id: uuid.UUID, scope: str) -> Principal:
    """Who may read this stream: the user named by the `?token=` of a stream_url (EventSource cannot
    send headers), as long as the API key that asked for the token still works; or else the
    caller of the Authorization header."""
    token = request.query.get("token")
    if token is None:
        return await caller(request, scope)
    grant = request.app[STREAM_TOKENS].verify(token, resource_id)
    request[USER_ID] = str(grant.user_id)
    if grant.api_key_id is None:  # asked for with a JWT: good for the token's few minutes
        return Principal(grant.user_id, None, None, frozenset())
    started = time.monotonic()
    try:
        return await request.app[AUTH].key_principal(grant.api_key_id, grant.user_id)
    finally:
        request[TIMINGS].add("auth", started)


async def until_lapsed(watch: CredentialWatch, relay: Coroutine[Any, Any, None]) -> Unauthorized | None:
    """Run a stream's relay until it ends, or until the credential that opened the stream stops
    working (then the relay is cancelled: the generation it follows runs on and is saved).
    None, or why the credential lapsed.

    The relay runs in the handler's own task, and the watch adds no task while all is well: a
    revocation's poke (or the expiry timer) runs one recheck, which cancels this task if it fails.
    """
    try:
        await watch.check_now()
    except Unauthorized as e:
        relay.close()
        return e
    task = asyncio.current_task()
    assert task is not None
    watch.guard(task)
    try:
        await relay
    except asyncio.CancelledError:
        if watch.reason is None:
            raise  # a real cancellation (shutdown)
        task.uncancel()
        return watch.reason
    finally:
        watch.unguard()
    return None


async def relay_to_end(request: web.Request, resp: EventSourceResponse, principal: Principal,
                       relay: Coroutine[Any, Any, None],
                       lapsed: Callable[[Unauthorized], bytes]) -> EventSourceResponse:
    """The end every door's held reply stream shares: run `relay` (writing the reply's events into
    the prepared `resp`) until it ends or the caller's credential lapses (`lapsed(why)` is then
    written), then `[DONE]`. A client that left ends it quietly: the generation goes on without it."""
    try:
        with request.app[AUTH].watch(principal) as watch:
            lapse = await until_lapsed(watch, relay)
        if lapse is not None:
            await resp.write(lapsed(lapse))
        await resp.write(DONE)
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left; the generation goes on without it
    finally:
        resp.stop_streaming()
    return resp


def lapse_frame(e: Unauthorized) -> bytes:
    """The SSE error event that ends a stream whose credential lapsed: it belongs to no message's
    event log, so it has no `id:` (a resume is not confused), and retrying will not help."""
    return b"event: error\ndata: %s\n\n" % orjson.dumps({"type": e.type, "message": e.message, "retryable": False})


async def caller(request: web.Request, scope: str | None = None) -> Principal:
    started = time.monotonic()
    try:
        with tracing.span("gateway.auth"):
            principal = await request.app[AUTH].authenticate(request)
    finally:
        request[TIMINGS].add("auth", started)
    # before the scope check: a refused attempt is activity too
    request[PRINCIPAL] = principal  # for the activity log
    request[USER_ID] = str(principal.user_id)  # for the access log
    if scope is not None:
        principal.require(scope)
    return principal
