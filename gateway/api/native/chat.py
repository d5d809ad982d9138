"""POST /api/chat and the message endpoints: parse, call the turn service, respond.

    POST /api/chat                       a turn: SSE, or 202 with the ids and a stream_url
    GET  /api/messages/{id}              the message (polling fallback)
    GET  /api/messages/{id}/stream       its events after Last-Event-ID, live or replayed
    POST /api/messages/{id}/cancel       stop it; the partial reply is saved as cancelled
    POST /api/messages/{id}/regenerate   a new reply to a saved user message: SSE or 202, as POST /api/chat
"""

from __future__ import annotations

import asyncio
import time
import uuid

from aiohttp import web

from gateway.api.common import (
    caller,
    json_response,
    lapse_frame,
    parse_uuid,
    read_body,
    relay_to_end,
    stream_reader,
)
from gateway.api.native.bodies import parse_turn, wants_stream
from gateway.contract.native import ChatRequest, RegenerateRequest, check_text, decode
from gateway.contract.operations import (
    RESUME_PARAMETERS,
    SSE_DESCRIPTION,
    STREAM_SECURITY,
    errors,
    ok,
    operation,
    path_id,
    response,
    sse_content,
)
from gateway.contract.replies import ChatAccepted, Message
from gateway.edge.auth import Principal
from gateway.edge.sse import open_stream, parse_last_event_id
from gateway.errors import BadRequest
from gateway.observability.metrics import Timings
from gateway.service.router import AUTO
from gateway.state import DB, MODELS, SETTINGS, TIMINGS, TURNS
from gateway.store import arena as arena_store
from gateway.store import messages as message_store


@operation("Send a user message; the reply streams (SSE) or runs on in the background", "chat",
           {"200": response(SSE_DESCRIPTION, sse_content("MessageEvent")),
            **ok(202, "Accepted: the user message is stored and the reply is generating", ChatAccepted),
            **errors(400, 401, 403, 404, 409, 413, 429, 503)},
           body=ChatRequest,
           description="Streams when `stream` is true, or when it is absent and `Accept` includes "
                       "`text/event-stream`. A malformed request or a per-minute limit (429) stores nothing; "
                       "once the message is stored, a policy stop (daily cap, a model the key may not use, "
                       "too many concurrent streams) is the reply: status `refused`, an `error` event of "
                       "type `policy` with `reason` and `reset_at`.")
async def post_chat(request: web.Request) -> web.StreamResponse:
    principal = await caller(request, "chat")
    app = request.app
    turn, stream = parse_turn(await read_body(request), app[MODELS].chat_model)
    turns = app[TURNS]
    started = time.monotonic()
    stored = await asyncio.shield(turns.begin_chat(principal, turn, request[TIMINGS].start))
    request[TIMINGS].add("persist", started)  # decide + persist: the database work before the reply starts
    if not wants_stream(request, stream):
        return json_response({"status": "accepted", "message": stored.user_message, "duplicate": stored.duplicate,
                              "thread_id": stored.thread_id, "assistant_message_id": stored.assistant_message_id,
                              "stream_url": turns.stream_url(principal, stored.assistant_message_id)},
                             status=202)
    return await stream_message(request, principal, stored.assistant_message_id, after=-1)


@operation("A new reply to a saved user message (its last one refused, failed, interrupted, cancelled, "
           "or complete: every reply is kept)", "chat",
           {"200": response(SSE_DESCRIPTION, sse_content("MessageEvent")),
            **ok(202, "Accepted: the new reply is generating (or was refused)", ChatAccepted),
            **errors(400, 401, 403, 404, 409, 413, 429, 503)},
           parameters=[path_id("message_id", "user message")], body=RegenerateRequest, body_required=False,
           description="Runs like POST /api/chat on the thread up to that message (the policy decides, the "
                       "reply streams and resumes alike). 409 while its last reply is still generating, "
                       "or for an arena turn.")
async def regenerate(request: web.Request) -> web.StreamResponse:
    """A new reply to the user message `{message_id}` (its last reply must not be live: 409). Body
    (optional): {model?, client_request_id?, stream?}; a retry of the same client_request_id answers
    with the reply it made (duplicate: true) and starts nothing."""
    principal = await caller(request, "chat")
    app = request.app
    user_message_id = parse_uuid(request.match_info["message_id"], "message id")
    body = decode(await read_body(request), RegenerateRequest) if request.can_read_body else RegenerateRequest()
    model, client_request_id, stream = body.model, body.client_request_id, body.stream
    if model is not None and model != AUTO and not app[MODELS].chat_model(model):
        raise BadRequest(f"unknown model {model!r}")
    if client_request_id is not None:
        check_text(client_request_id, "client_request_id")
    turns = app[TURNS]
    started = time.monotonic()
    made = await asyncio.shield(turns.regenerate(principal, user_message_id, model, client_request_id,
                                                 request[TIMINGS].start))
    request[TIMINGS].add("persist", started)
    if not wants_stream(request, stream):
        return json_response({"status": "accepted", "message": made.user_message, "duplicate": made.duplicate,
                              "thread_id": made.user_message["thread_id"],
                              "assistant_message_id": made.assistant_message_id,
                              "stream_url": turns.stream_url(principal, made.assistant_message_id)}, status=202)
    return await stream_message(request, principal, made.assistant_message_id, after=-1)


async def stream_message(request: web.Request, principal: Principal, message_id: uuid.UUID,
                         after: int) -> web.StreamResponse:
    """Stream one assistant message's events after seq `after` as SSE: live if it is generating
    here, replayed from the database if it has finished. If the caller's credential stops working
    meanwhile (revoked, expired), the stream ends with an `error` event (no id) and `[DONE]`."""
    settings = request.app[SETTINGS]
    reply = await request.app[TURNS].reply(principal.user_id, message_id)
    if not reply.live and after >= 0 and not reply.replayed_after(after):
        return web.Response(status=204)  # nothing after that id: EventSource stops for good
    resp = await open_stream(request, settings.sse_ping_s, settings.sse_retry_ms)

    async def relay() -> None:
        timings: Timings | None = request[TIMINGS] if reply.generation is not None else None
        async for batch in reply.events(after):
            await resp.write(batch[0].sse if len(batch) == 1 else b"".join([e.sse for e in batch]))
            if timings is not None:  # the first write carries the first token
                timings.mark("first_token")
                timings = None

    return await relay_to_end(request, resp, principal, relay(), lapse_frame)


@operation("Follow an assistant message's events (EventSource-compatible)", "chat",
           {"200": response(SSE_DESCRIPTION, sse_content("MessageEvent")),
            **ok(204, "Nothing after Last-Event-ID: the message has finished"),
            **errors(400, 401, 403, 404, 503)},
           parameters=[path_id("message_id", "assistant message"), *RESUME_PARAMETERS], security=STREAM_SECURITY,
           description="Replays the events after Last-Event-ID and follows the generation live. "
                       "Authenticated by the bearer header or by the `token` of `stream_url`.")
async def get_message_stream(request: web.Request) -> web.StreamResponse:
    message_id = parse_uuid(request.match_info["message_id"], "message id")
    principal = await stream_reader(request, message_id, "chat")
    raw = request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    return await stream_message(request, principal, message_id, parse_last_event_id(raw, str(message_id)))


@operation("Stop a reply; the partial content is saved as cancelled", "chat",
           {**ok(200, "The saved assistant message", Message), **errors(400, 401, 403, 404, 503)},
           parameters=[path_id("message_id", "assistant message")])
async def cancel_message(request: web.Request) -> web.Response:
    """Stop but finish: the upstream stops, the partial reply is saved as cancelled with the usage
    consumed, and every listener gets usage, done (finish_reason "cancelled") and [DONE]."""
    principal = await caller(request, "chat")
    message_id = parse_uuid(request.match_info["message_id"], "message id")
    return json_response(await request.app[TURNS].cancel(principal.user_id, message_id))


@operation("A message's status and content (the polling fallback)", "chat",
           {**ok(200, "The message", Message), **errors(400, 401, 403, 404, 503)},
           parameters=[path_id("message_id", "message")])
async def get_message(request: web.Request) -> web.Response:
    principal = await caller(request, "chat")
    message_id = parse_uuid(request.match_info["message_id"], "message id")
    pool = request.app[DB].pool
    message = await message_store.get_message(pool, principal.user_id, message_id)
    return json_response((await arena_store.masked(pool, [message]))[0])
