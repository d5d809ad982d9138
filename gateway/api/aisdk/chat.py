"""The AI SDK's chat routes: what `DefaultChatTransport` calls, served by the native turn lifecycle.

    POST /api/ai-sdk/chat                 a turn (or a regenerate): the UI message stream
    GET  /api/ai-sdk/chat/{id}/stream     the chat's generating reply from its start, live; 204: none
    GET  /api/ai-sdk/chat/{id}/messages   the chat as UIMessage[]
    POST /api/ai-sdk/chat/{id}/stop       stop the generating reply (saved cancelled, usage counted once)

The chat id names one thread of the caller (made by its first turn). A turn is begun exactly as
POST /api/chat begins one (gateway/service/turns.py): persisted first, then the policy (a refusal
is saved and streamed as an `error` chunk), fallbacks, caps, usage once. The last user message's
id is the idempotency key: a retry of it streams the reply it made, never a second one.
"""

from __future__ import annotations

import asyncio
import uuid

from aiohttp import web

from gateway.api.aisdk.bodies import check_chat_id, parse_chat
from gateway.api.aisdk.history import ui_messages
from gateway.api.aisdk.stream import HEADERS, UIMessageStream, lapse_chunk
from gateway.api.common import caller, json_response, read_json, relay_to_end
from gateway.contract.native import MAX_CLIENT_MESSAGE_ID
from gateway.contract.operations import Schema, errors, ok, operation, path_string, response
from gateway.edge.auth import Principal
from gateway.edge.held import hold_open
from gateway.edge.sse import NativeStream
from gateway.errors import Conflict, GatewayError
from gateway.service.turns import TurnInput
from gateway.state import DB, MODELS, SETTINGS, TIMINGS, TURNS
from gateway.store import chats
from gateway.store.messages import thread_title

# what GET /openapi.json says of these routes (gateway/contract/operations.py)
STREAM_ANSWER = response(
    "The AI SDK's UI message stream (header `x-vercel-ai-ui-message-stream: v1`): `data:` lines of `start`, "
    "`text-start`, `text-delta`, `text-end`, `finish` (or `error`; `abort` when stopped), then `data: [DONE]`",
    {"text/event-stream": {"schema": {"type": "string"}}})
UI_MESSAGE: Schema = {"type": "object", "required": ["id", "role", "parts"],
                      "properties": {"id": {"type": "string"}, "role": {"enum": ["system", "user", "assistant"]},
                                     "parts": {"type": "array", "items": {"type": "object"}}, "metadata": {}}}
CHAT_BODY: Schema = {"type": "object", "required": ["id", "messages"], "properties": {
    "id": {"type": "string", "minLength": 1, "maxLength": 200},
    "messages": {"type": "array", "minItems": 1, "items": UI_MESSAGE},
    "trigger": {"enum": ["submit-message", "regenerate-message"]},
    "messageId": {"type": "string"}, "model": {"type": "string"}}}
STOPPED: Schema = {"type": "object", "required": ["id", "messageId", "status"], "properties": {
    "id": {"type": "string"}, "messageId": {"type": "string", "format": "uuid"}, "status": {"type": "string"}}}
# the chat id's limit is said in words: a bounded string made the fuzzer's path generation crawl
CHAT_ID = path_string("chat_id", "The app's chat id, up to 200 characters (one thread of the caller)")


@operation("A chat turn as the AI SDK's DefaultChatTransport sends it; the reply as its UI message stream",
           "ai-sdk", {"200": STREAM_ANSWER, **errors(400, 401, 403, 404, 409, 413, 429, 503)}, body=CHAT_BODY,
           description="The last message is the turn (the user's); its id is the idempotency key. "
                       "`regenerate-message` replaces the reply to it.")
async def post_chat(request: web.Request) -> web.StreamResponse:
    principal = await caller(request, "chat")
    app = request.app
    turn = parse_chat(await read_json(request), app[MODELS].chat_model)
    pool, turns = app[DB].pool, app[TURNS]
    target = await chats.turn_target(pool, principal.user_id, turn.chat_id, turn.message_id)
    if target.message_id is not None and target.message_thread_id != target.thread_id:
        raise Conflict("the last message's id is a message of another chat")
    started = request[TIMINGS].start
    if turn.regenerate and target.message_id is not None:
        # a retry of this regenerate (the same reply replaced) streams the reply it made
        request_id = turn.regenerated_id if turn.regenerated_id and \
            len(turn.regenerated_id) <= MAX_CLIENT_MESSAGE_ID else None
        made = await asyncio.shield(turns.regenerate(principal, target.message_id, turn.model, request_id, started))
        message_id = made.assistant_message_id
    else:
        thread_id, opened = target.thread_id, False
        if thread_id is None:
            thread_id, opened = await chats.open_chat(pool, principal.user_id, turn.chat_id, thread_title(turn.content))
        try:
            stored = await asyncio.shield(turns.begin_chat(principal, TurnInput(
                content=turn.content, parts=turn.parts, thread_id=thread_id, model=turn.model,
                client_message_id=turn.message_id), started))
        except GatewayError:
            if opened:  # a turn refused before its commit leaves no chat behind
                await chats.drop_empty_chat(pool, principal.user_id, thread_id)
            raise
        message_id = stored.assistant_message_id
    return await stream_reply(request, principal, message_id)


@operation("The chat's generating reply from its start, followed live (reconnectToStream)", "ai-sdk",
           {"200": STREAM_ANSWER, **ok(204, "Nothing is generating"), **errors(400, 401, 403, 404, 503)},
           parameters=[CHAT_ID])
async def get_chat_stream(request: web.Request) -> web.StreamResponse:
    """What `reconnectToStream` asks: the chat's generating reply, replayed from its start and then
    followed live (from whichever instance generates it); 204 when none is generating."""
    principal = await caller(request, "chat")
    chat_id = check_chat_id(request.match_info["chat_id"], "chat id")
    message_id = await chats.active_reply(request.app[DB].pool, principal.user_id, chat_id)
    if message_id is None:
        return web.Response(status=204)
    return await stream_reply(request, principal, message_id)


@operation("The chat as UIMessage[]", "ai-sdk",
           {**ok(200, "The chat's messages", {"type": "array", "items": UI_MESSAGE}),
            **errors(400, 401, 403, 404, 503)}, parameters=[CHAT_ID])
async def get_chat_messages(request: web.Request) -> web.Response:
    principal = await caller(request, "chat")
    chat_id = check_chat_id(request.match_info["chat_id"], "chat id")
    return json_response(ui_messages(await chats.chat_messages(request.app[DB].pool, principal.user_id, chat_id)))


@operation("Stop the chat's generating reply (saved cancelled, its usage counted once)", "ai-sdk",
           {**ok(200, "The stopped reply", STOPPED), **ok(204, "Nothing is generating"),
            **errors(400, 401, 403, 404, 503)}, parameters=[CHAT_ID])
async def stop_chat(request: web.Request) -> web.Response:
    """Cancel the chat's generating reply wherever it runs; answers once it is saved, with its id and
    status (204 when nothing is generating)."""
    principal = await caller(request, "chat")
    chat_id = check_chat_id(request.match_info["chat_id"], "chat id")
    message_id = await chats.active_reply(request.app[DB].pool, principal.user_id, chat_id)
    if message_id is None:
        return web.Response(status=204)
    saved = await request.app[TURNS].cancel(principal.user_id, message_id)
    return json_response({"id": chat_id, "messageId": saved["id"], "status": saved["status"]})


async def stream_reply(request: web.Request, principal: Principal, message_id: uuid.UUID) -> web.StreamResponse:
    """One reply, all of it, as the UI message stream: live here, followed from another instance, or
    replayed from its row. If the caller's credential stops working meanwhile, an `error` chunk ends it."""
    settings = request.app[SETTINGS]
    reply = await request.app[TURNS].reply(principal.user_id, message_id)
    resp = NativeStream(settings.sse_retry_ms, settings.sse_ping_s)
    resp.headers.update(HEADERS)
    resp.headers["Cache-Control"] = "no-cache, no-transform"
    await resp.prepare(request)
    hold_open(request, resp)
    chunks = UIMessageStream()

    async def relay() -> None:
        async for batch in reply.events(-1):
            data = chunks.frames(batch)
            if data:  # a usage event alone says nothing yet: it rides in `finish`
                await resp.write(data)

    return await relay_to_end(request, resp, principal, relay(), lambda lapse: lapse_chunk(lapse.message))
