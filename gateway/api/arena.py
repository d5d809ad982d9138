"""The arena: one prompt, two models side by side, one SSE stream, a vote, a leaderboard.

    POST /api/arena                       {content, thread_id?, models?: [a, b], anonymous? (true),
                                           client_message_id?, stream?, max_tokens?, temperature?}
    GET  /api/comparisons/{id}            the comparison (models named once voted, or if not anonymous)
    GET  /api/comparisons/{id}/stream     both slots' events after Last-Event-ID, live or replayed
    POST /api/comparisons/{id}/vote       {winner: a | b | tie | both_bad}: once, after both finished
    GET  /api/leaderboard?include_named=  Bradley-Terry ratings with 95% intervals

The stream carries both slots' events (every data object has "slot"); each event's id is
`<comparison_id>:<last seq of a>:<last seq of b>`, so one Last-Event-ID resumes both slots
exactly. A slot ends with done (or error); `data: [DONE]` follows when both have ended.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from ..auth import Principal
from ..errors import BadRequest, ServiceUnavailable
from ..generation import Generation, Turn, replay_frames
from ..policy import Admission
from ..providers.base import ChatRequest
from ..providers.chain import Chain
from ..providers.registry import NotEnoughModels
from ..sse import DONE, open_stream
from ..state import DB, GENERATIONS, INSTANCE, LEADERBOARD, MODELS, POLICY, SETTINGS, STREAM_TOKENS, TIMINGS
from ..store import arena as arena_store
from .chat import ChatBody, conversation, live_or_finished, parse_chat, prompt_tokens
from .common import caller, json_response, optional, parse_uuid, read_json, stream_reader

SLOTS = ("a", "b")


def parse_arena(body: dict[str, Any], known_model: Any) -> tuple[ChatBody, list[str] | None, bool]:
    chat = parse_chat({k: v for k, v in body.items() if k not in ("models", "anonymous", "model")}, known_model)
    models = body.get("models")
    if models is not None:
        if (not isinstance(models, list) or len(models) != 2 or not all(isinstance(m, str) for m in models)
                or models[0] == models[1]):
            raise BadRequest("models must be two different model names")
        unknown = [m for m in models if not known_model(m)]
        if unknown:
            raise BadRequest(f"unknown model {unknown[0]!r}")
    anonymous = optional(body, "anonymous", bool, "true or false")
    return chat, models, True if anonymous is None else anonymous


async def post_arena(request: web.Request) -> web.StreamResponse:
    principal = await caller(request, "arena")
    app = request.app
    chat, models, anonymous = parse_arena(await read_json(request), app[MODELS].__contains__)
    started = time.monotonic()
    turn = await asyncio.shield(begin_arena(app, principal, chat, models, anonymous))
    request[TIMINGS].add("persist", started)  # for the access log
    stream = chat.stream if chat.stream is not None else "text/event-stream" in request.headers.get("Accept", "")
    if not stream:
        token = app[STREAM_TOKENS].issue(principal.user_id, turn.comparison_id)
        return json_response({
            "status": "accepted", "comparison_id": turn.comparison_id, "message": turn.user_message,
            "duplicate": turn.duplicate, "thread_id": turn.thread_id,
            "assistant_message_ids": {"a": turn.message_a, "b": turn.message_b},
            "stream_url": f"/api/comparisons/{turn.comparison_id}/stream?token={token}"}, status=202)
    return await stream_comparison(request, principal.user_id, turn.comparison_id, {"a": -1, "b": -1})


async def begin_arena(app: web.Application, principal: Principal, chat: ChatBody, requested: list[str] | None,
                      anonymous: bool) -> arena_store.ArenaTurn:
    """Decide (both models, both admissions), persist the turn, start both slots. No downgrade to a
    cheaper model here: the comparison is of the two models asked for (max_tokens may be clamped)."""
    models, pool, policy = app[MODELS], app[DB].pool, app[POLICY]
    if chat.client_message_id is not None:
        existing = await arena_store.find_duplicate(pool, principal.user_id, chat.client_message_id)
        if existing is not None:
            return existing
    messages = await conversation(pool, principal, chat)
    if requested is None:
        try:
            pair = [m.name for m in models.draw_pair()]
        except NotEnoughModels as e:
            raise ServiceUnavailable(f"the arena needs two available models: {e}") from None
    else:
        pair = requested
    # both slots count toward the caller's limits; if either is refused, nothing is kept
    admissions: list[Admission] = []
    try:
        for shares_left, model in zip((2, 1), pair):
            # slot a may take at most half of what remains today, slot b what is left after it
            admissions.append(await policy.admit(principal, model, prompt_tokens(messages), chat.max_tokens,
                                                 share=shares_left))
        turn = await arena_store.persist_arena_turn(pool, principal.user_id, chat.content, chat.client_message_id,
                                                    chat.thread_id, app[INSTANCE].id, pair[0], pair[1], anonymous)
    except BaseException:
        for admission in admissions:
            await policy.release(admission, principal.user_id, principal.api_key_id)
        raise
    if turn.duplicate:
        for admission in admissions:
            await policy.release(admission, principal.user_id, principal.api_key_id)
        return turn
    generations = app[GENERATIONS]
    for slot, message_id, admission in zip(SLOTS, (turn.message_a, turn.message_b), admissions):
        # each slot is its own generation, with its own chain and timeouts: one failing or
        # hanging never holds up the other
        generations.start(Generation(
            Turn(principal.user_id, principal.api_key_id, turn.thread_id, turn.user_message["id"], message_id,
                 extra_metadata={"comparison_id": str(turn.comparison_id)}, admission=admission, slot=slot,
                 anonymous=anonymous),
            Chain(models, models.chain(admission.model)),
            ChatRequest(list(messages), max_tokens=admission.max_tokens, temperature=chat.temperature),
            pool, generations.save))
    return turn


def parse_arena_event_id(raw: str | None, comparison_id: uuid.UUID) -> dict[str, int]:
    """`<comparison_id>:<seq a>:<seq b>` into the seq to resume after, per slot."""
    start = {"a": -1, "b": -1}
    if not raw:
        return start
    parts = raw.strip().split(":")
    if len(parts) != 3 or parts[0] != str(comparison_id):
        return start
    try:
        a, b = int(parts[1]), int(parts[2])
    except ValueError:
        return start
    return {"a": max(a, -1), "b": max(b, -1)}


async def _slot_frames(request: web.Request, user_id: uuid.UUID, message_id: uuid.UUID,
                       after: int) -> AsyncIterator[bytes]:
    generation, message = await live_or_finished(request, user_id, message_id)
    if generation is not None:
        async for batch in generation.follow(after):
            for frame in batch:
                yield frame
    else:
        for frame in replay_frames(message)[after + 1:]:
            yield frame


async def stream_comparison(request: web.Request, user_id: uuid.UUID, comparison_id: uuid.UUID,
                            after: dict[str, int]) -> web.StreamResponse:
    comparison = await arena_store.get_comparison(request.app[DB].pool, user_id, comparison_id)
    settings = request.app[SETTINGS]
    queue: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue()

    async def pump(slot: str) -> None:
        try:
            async for frame in _slot_frames(request, user_id, comparison[f"message_{slot}"], after[slot]):
                queue.put_nowait((slot, frame))
        finally:
            queue.put_nowait((slot, None))

    pumps = [asyncio.create_task(pump(slot)) for slot in SLOTS]
    resp: web.StreamResponse | None = None
    try:
        # a slot can wait long for its first token: answer (headers, retry, pings) at once unless
        # this is a resume of a finished comparison, which may have nothing left (204)
        resuming = any(v >= 0 for v in after.values())
        if not resuming or any(comparison[f"status_{slot}"] in arena_store.LIVE for slot in SLOTS):
            resp = await open_stream(request, settings.sse_ping_s, settings.sse_retry_ms)
        position = dict(after)
        prefix = b"id: " + str(comparison_id).encode()
        ended = 0
        while ended < len(SLOTS):
            slot, frame = await queue.get()
            if frame is None:
                ended += 1
                continue
            if resp is None:
                resp = await open_stream(request, settings.sse_ping_s, settings.sse_retry_ms)
            position[slot] += 1
            # the slot's own id line becomes the comparison's, which names both positions
            body = frame[frame.index(b"\n") + 1:]
            await resp.write(b"%s:%d:%d\n%s" % (prefix, position["a"], position["b"], body))
        if resp is None:
            return web.Response(status=204)  # a finished comparison with nothing after that id
        await resp.write(DONE)
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left; both generations go on
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if resp is not None:
            resp.stop_streaming()
    for task in pumps:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return resp


async def get_comparison_stream(request: web.Request) -> web.StreamResponse:
    comparison_id = parse_uuid(request.match_info["comparison_id"], "comparison id")
    user_id = await stream_reader(request, comparison_id, "arena")
    raw = request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    return await stream_comparison(request, user_id, comparison_id, parse_arena_event_id(raw, comparison_id))


async def get_comparison(request: web.Request) -> web.Response:
    principal = await caller(request, "arena")
    comparison_id = parse_uuid(request.match_info["comparison_id"], "comparison id")
    row = await arena_store.get_comparison(request.app[DB].pool, principal.user_id, comparison_id)
    return json_response(arena_store.comparison_json(row))


async def post_vote(request: web.Request) -> web.Response:
    principal = await caller(request, "arena")
    comparison_id = parse_uuid(request.match_info["comparison_id"], "comparison id")
    winner = (await read_json(request)).get("winner")
    if winner not in arena_store.WINNERS:
        raise BadRequest("winner must be one of a, b, tie, both_bad")
    row = await arena_store.vote(request.app[DB].pool, principal.user_id, comparison_id, winner)
    request.app[LEADERBOARD].votes_changed()
    return json_response(arena_store.comparison_json(row))


async def get_leaderboard(request: web.Request) -> web.Response:
    await caller(request)
    raw = request.query.get("include_named", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise BadRequest("include_named must be true or false")
    return json_response(await request.app[LEADERBOARD].get(include_named=raw in ("true", "1")))
