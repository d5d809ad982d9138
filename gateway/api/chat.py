"""POST /api/chat and the message endpoints: decide, persist, execute, respond.

The admission part of "decide" (limits, reservations) runs before the user message is
committed, so that a refusal persists nothing; the commit still precedes any provider call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from ..auth import Principal
from ..errors import BadRequest, NotFound, ServiceUnavailable
from ..generation import Generation, Turn, replay_frames
from ..metrics import Timings
from ..providers.base import ChatRequest, estimate_tokens
from ..providers.chain import Chain
from ..router import AUTO, route
from ..sse import DONE, open_stream, parse_last_event_id
from ..state import DB, GENERATIONS, INSTANCE, MODELS, POLICY, SETTINGS, STREAM_TOKENS, TIMINGS, TURNS
from ..store import arena as arena_store
from ..store import messages as message_store
from .common import caller, check_text, json_response, optional, parse_uuid, read_json, stream_reader

MAX_CLIENT_MESSAGE_ID = 200
# max_tokens is added to the prompt estimate in bigint SQL (the daily reservation): bounded here,
# where a larger one is a 400, not an overflow (500) later
MAX_TOKENS_LIMIT = 2**31 - 1
# how long a stream waits for a message generating elsewhere (another instance) before giving up
WAIT_ELSEWHERE_S = 60.0


@dataclass(slots=True)
class ChatBody:
    content: str
    thread_id: uuid.UUID | None
    model: str | None
    client_message_id: str | None
    stream: bool | None
    max_tokens: int | None
    temperature: float | None


def parse_chat(body: dict[str, Any], known_model: Any) -> ChatBody:
    """Validate everything before anything is written."""
    content = body.get("content")
    if not isinstance(content, str):
        raise BadRequest("content must be a string")
    if not content.strip():
        raise BadRequest("content must not be empty")
    check_text(content, "content")
    thread_id = body.get("thread_id")
    model = optional(body, "model", str, "a model name")
    if model is not None and model != AUTO and not known_model(model):
        raise BadRequest(f"unknown model {model!r}")
    client_message_id = optional(body, "client_message_id", str, "a string")
    if client_message_id is not None and not 0 < len(client_message_id) <= MAX_CLIENT_MESSAGE_ID:
        raise BadRequest(f"client_message_id must be 1 to {MAX_CLIENT_MESSAGE_ID} characters")
    max_tokens = optional(body, "max_tokens", int, "a positive integer")
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}")
    temperature = optional(body, "temperature", (int, float), "a number")
    return ChatBody(content, parse_uuid(thread_id, "thread_id") if thread_id is not None else None, model,
                    client_message_id, optional(body, "stream", bool, "true or false"), max_tokens,
                    float(temperature) if temperature is not None else None)


def wants_stream(request: web.Request, chat: ChatBody) -> bool:
    if chat.stream is not None:
        return chat.stream
    return "text/event-stream" in request.headers.get("Accept", "")


async def post_chat(request: web.Request) -> web.StreamResponse:
    principal = await caller(request, "chat")
    app = request.app
    chat = parse_chat(await read_json(request), app[MODELS].__contains__)

    started = time.monotonic()
    turn = await asyncio.shield(begin_turn(app, principal, chat))
    request[TIMINGS].add("persist", started)  # decide + persist: the database work before the reply starts
    # respond
    if not wants_stream(request, chat):
        return json_response({"status": "accepted", "message": turn.user_message, "duplicate": turn.duplicate,
                              "thread_id": turn.thread_id, "assistant_message_id": turn.assistant_message_id,
                              "stream_url": stream_url(app, principal.user_id, turn.assistant_message_id)},
                             status=202)
    return await stream_message(request, principal.user_id, turn.assistant_message_id, after=-1)


async def begin_turn(app: web.Application, principal: Principal, chat: ChatBody) -> message_store.Turn:
    """Decide, persist, start. Run it shielded: once the user message is committed its generation
    must start even if the client disconnects in between."""
    models, pool, settings, policy = app[MODELS], app[DB].pool, app[SETTINGS], app[POLICY]
    if chat.client_message_id is not None:
        # a retry of an accepted turn is answered before any limit: it costs nothing new
        existing = await message_store.find_duplicate(pool, principal.user_id, chat.client_message_id)
        if existing is not None:
            return existing
    messages = await conversation(pool, principal, chat)
    # decide: the router advises; the policy approves, downgrades or refuses. A refusal raises
    # here, before anything is written, so the same client_message_id can be retried later.
    choice = route(chat.model, chat.content, dict(settings.router), models.default)
    admission = await policy.admit(principal, choice.model, prompt_tokens(messages), chat.max_tokens,
                                   settings.limits.downgrade_model)
    # persist: after this commit the user's message is never lost
    try:
        turn = await app[TURNS].submit(message_store.TurnRequest(
            principal.user_id, chat.content, chat.client_message_id, chat.thread_id, app[INSTANCE].id))
    except BaseException:
        await policy.release(admission, principal.user_id, principal.api_key_id)
        raise
    if turn.duplicate:  # lost a race with an identical request: that one runs
        await policy.release(admission, principal.user_id, principal.api_key_id)
        return turn
    # execute: a task the app owns, not this handler
    extra: dict[str, Any] = {"complexity": choice.complexity} if choice.complexity else {}
    if admission.action == "downgrade":
        extra["policy"] = {"action": "downgrade", "reasons": admission.reasons,
                           "downgraded_from": admission.downgraded_from}
    generations = app[GENERATIONS]
    generations.start(Generation(
        Turn(principal.user_id, principal.api_key_id, turn.thread_id, turn.user_message["id"],
             turn.assistant_message_id, choice.category, choice.auto, extra, admission),
        Chain(models, models.chain(admission.model)),
        ChatRequest(messages, max_tokens=admission.max_tokens, temperature=chat.temperature),
        pool, generations.save))
    return turn


async def conversation(pool: asyncpg.Pool, principal: Principal, chat: ChatBody) -> list[dict[str, Any]]:
    """What the upstream gets: the thread's history (NotFound if not the caller's), then the new message.
    Read before the commit: it bounds the prompt the policy reserves for."""
    messages = [] if chat.thread_id is None else await message_store.thread_history(
        pool, principal.user_id, chat.thread_id)
    messages.append({"role": "user", "content": chat.content})
    return messages


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(estimate_tokens(m["content"]) for m in messages if isinstance(m.get("content"), str))


def stream_url(app: web.Application, user_id: uuid.UUID, message_id: uuid.UUID) -> str:
    """Where an EventSource (which cannot send headers) follows the reply: a token in the URL,
    bound to this user and message, short-lived, and redacted from the access log."""
    return f"/api/messages/{message_id}/stream?token={app[STREAM_TOKENS].issue(user_id, message_id)}"


async def stream_message(request: web.Request, user_id: uuid.UUID, message_id: uuid.UUID,
                         after: int) -> web.StreamResponse:
    """Stream one assistant message's events after seq `after`: live if it is generating here,
    replayed from the database if it has finished."""
    app = request.app
    settings = app[SETTINGS]
    generation, message = await live_or_finished(request, user_id, message_id)
    if generation is None:
        frames = replay_frames(message)[after + 1:]
        if not frames and after >= 0:
            return web.Response(status=204)  # nothing after that id: EventSource stops for good
    resp = await open_stream(request, settings.sse_ping_s, settings.sse_retry_ms)
    try:
        if generation is not None:
            timings: Timings | None = request[TIMINGS]
            async for frames in generation.follow(after):
                await resp.write(frames[0] if len(frames) == 1 else b"".join(frames))
                if timings is not None:  # the first write carries the first token
                    timings.mark("first_token")
                    timings = None
        else:
            await resp.write(b"".join(frames))
        await resp.write(DONE)
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left; the generation goes on without it
    finally:
        resp.stop_streaming()
    return resp


async def live_or_finished(request: web.Request, user_id: uuid.UUID,
                           message_id: uuid.UUID) -> tuple[Generation | None, dict[str, Any]]:
    """The live generation of an assistant message, or its finished row.

    A message still generating on another instance is waited for (bounded) by polling its row.
    """
    registry, pool = request.app[GENERATIONS], request.app[DB].pool
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_ELSEWHERE_S
    while True:
        generation = registry.get(message_id)
        if generation is not None:
            if generation.turn.user_id != user_id:
                raise NotFound("message not found")
            return generation, {}
        message = await message_store.get_message(pool, user_id, message_id)
        if message["role"] != "assistant":
            raise NotFound("message not found")
        if message["status"] not in ("pending", "streaming"):
            return None, message
        if loop.time() >= deadline:
            raise ServiceUnavailable("the message is still being generated elsewhere; retry later")
        await asyncio.sleep(0.25)


async def get_message_stream(request: web.Request) -> web.StreamResponse:
    message_id = parse_uuid(request.match_info["message_id"], "message id")
    user_id = await stream_reader(request, message_id, "chat")
    raw = request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    return await stream_message(request, user_id, message_id, parse_last_event_id(raw, str(message_id)))


async def cancel_message(request: web.Request) -> web.Response:
    """Stop but finish: the upstream stops, the partial reply is saved as cancelled with the usage
    consumed, and every listener gets usage, done (finish_reason "cancelled") and [DONE]."""
    principal = await caller(request, "chat")
    message_id = parse_uuid(request.match_info["message_id"], "message id")
    return json_response(await cancel_reply(request, principal.user_id, message_id))


async def cancel_reply(request: web.Request, user_id: uuid.UUID, message_id: uuid.UUID) -> dict[str, Any]:
    """Cancel an assistant message wherever it is generating; returns its saved row."""
    app = request.app
    message = await message_store.get_message(app[DB].pool, user_id, message_id)
    if message["role"] != "assistant":
        raise NotFound("message not found")
    generation = app[GENERATIONS].get(message_id)
    if generation is not None:
        generation.cancel("cancelled")
        if generation.task is not None:
            await asyncio.shield(generation.task)  # returns once the partial reply is saved
    elif message["status"] in ("pending", "streaming"):
        # generating on another instance: ask it (LISTEN/NOTIFY), then wait for the saved row
        await app[INSTANCE].notify_cancel(message_id)
        _, message = await live_or_finished(request, user_id, message_id)
        return message
    return await message_store.get_message(app[DB].pool, user_id, message_id)


async def get_message(request: web.Request) -> web.Response:
    principal = await caller(request, "chat")
    message_id = parse_uuid(request.match_info["message_id"], "message id")
    pool = request.app[DB].pool
    message = await message_store.get_message(pool, principal.user_id, message_id)
    return json_response((await arena_store.masked(pool, [message]))[0])
