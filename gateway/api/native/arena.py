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

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gateway.api.common import caller, json_response, lapse_frame, parse_uuid, read_body, stream_reader, until_lapsed
from gateway.api.native.bodies import parse_arena, wants_stream
from gateway.contract.native import ArenaRequest, Vote, decode
from gateway.contract.operations import (
    RESUME_PARAMETERS,
    SSE_DESCRIPTION,
    STREAM_SECURITY,
    errors,
    ok,
    operation,
    path_id,
    query,
    response,
    sse_content,
)
from gateway.contract.replies import ArenaAccepted, Comparison, Leaderboard
from gateway.edge.auth import Principal
from gateway.edge.sse import DONE, open_stream, parse_seq
from gateway.errors import BadRequest
from gateway.generation.events import DELTA, Event
from gateway.state import AUTH, DB, LEADERBOARD, MODELS, SETTINGS, TIMINGS, TURNS
from gateway.store import arena as arena_store
from gateway.vocabulary import LIVE_STATUSES, Slot, Winner


@operation("Dual chat: two models answer the same message side by side", "arena",
           {"200": response(SSE_DESCRIPTION + "; every data object carries `slot` a or b, ids are "
                            "`<comparison_id>:<seq a>:<seq b>`", sse_content("ArenaEvent")),
            **ok(202, "Accepted: both replies are generating", ArenaAccepted),
            **errors(400, 401, 403, 404, 409, 413, 429, 503)},
           body=ArenaRequest, description="503 when fewer than two models are available for a random draw.")
async def post_arena(request: web.Request) -> web.StreamResponse:
    principal = await caller(request, "arena")
    app = request.app
    turn, stream, models, anonymous = parse_arena(await read_body(request), app[MODELS].chat_model)
    turns = app[TURNS]
    started = time.monotonic()
    stored = await asyncio.shield(turns.begin_arena(principal, turn, models, anonymous, request[TIMINGS].start))
    request[TIMINGS].add("persist", started)  # for the access log
    if not wants_stream(request, stream):
        return json_response({
            "status": "accepted", "comparison_id": stored.comparison_id, "message": stored.user_message,
            "duplicate": stored.duplicate, "thread_id": stored.thread_id,
            "assistant_message_ids": {"a": stored.message_a, "b": stored.message_b},
            "stream_url": turns.comparison_stream_url(principal, stored.comparison_id)}, status=202)
    return await stream_comparison(request, principal, stored.comparison_id, {"a": -1, "b": -1})


def parse_arena_event_id(raw: str | None, comparison_id: uuid.UUID) -> dict[str, int]:
    """`<comparison_id>:<seq a>:<seq b>` into the seq to resume after, per slot."""
    if not raw or not raw.strip():
        return {"a": -1, "b": -1}
    parts = raw.strip().split(":")
    if len(parts) != 3 or parts[0] != str(comparison_id):
        raise BadRequest("Last-Event-ID does not name an event of this comparison")
    return {"a": parse_seq(parts[1], "Last-Event-ID"), "b": parse_seq(parts[2], "Last-Event-ID")}


async def stream_comparison(request: web.Request, principal: Principal, comparison_id: uuid.UUID,
                            after: dict[str, int]) -> web.StreamResponse:
    user_id = principal.user_id
    comparison = await arena_store.get_comparison(request.app[DB].pool, user_id, comparison_id)
    settings = request.app[SETTINGS]
    queue: asyncio.Queue[tuple[str, list[Event] | None]] = asyncio.Queue()
    turns = request.app[TURNS]

    async def pump(slot: str) -> None:
        try:
            reply = await turns.reply(user_id, comparison[f"message_{slot}"])
            async for batch in reply.events(after[slot]):
                queue.put_nowait((slot, batch))
        finally:
            queue.put_nowait((slot, None))

    resp: EventSourceResponse | None = None

    async def relay() -> None:
        nonlocal resp
        position = dict(after)
        prefix = str(comparison_id).encode()
        ended = 0
        while ended < len(Slot):
            slot, batch = await queue.get()
            if batch is None:
                ended += 1
                continue
            if resp is None:
                resp = await open_stream(request, settings.sse_ping_s, settings.sse_retry_ms)
            out = []
            for event in batch:
                position[slot] = event.seq
                out.append(comparison_frame(prefix, position, event))
            await resp.write(b"".join(out))

    pumps = [asyncio.create_task(pump(slot)) for slot in Slot]
    try:
        # a slot can wait long for its first token: answer (headers, retry, pings) at once unless
        # this is a resume of a finished comparison, which may have nothing left (204)
        resuming = any(v >= 0 for v in after.values())
        if not resuming or any(comparison[f"status_{slot}"] in LIVE_STATUSES for slot in Slot):
            resp = await open_stream(request, settings.sse_ping_s, settings.sse_retry_ms)
        # a lapsed credential ends the relay, not the generations: both run on and are saved
        with request.app[AUTH].watch(principal) as watch:
            lapse = await until_lapsed(watch, relay())
        if lapse is not None:
            if resp is None:
                resp = await open_stream(request, settings.sse_ping_s, settings.sse_retry_ms)
            await resp.write(lapse_frame(lapse))
        if resp is None:
            return web.Response(status=204)  # a finished comparison with nothing after that id
        await resp.write(DONE)
        await resp.write_eof()
    except ConnectionResetError:
        # the client left; both generations go on. Before the headers there is nothing to
        # answer: the error goes up, as from any handler whose client is gone
        if resp is None:
            raise
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if resp is not None:
            resp.stop_streaming()
    for task in pumps:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    return resp


def comparison_frame(comparison: bytes, position: dict[str, int], event: Event) -> bytes:
    """A slot's event on the comparison's stream: its id names both slots' positions."""
    if event.name == DELTA:
        return b"id: %s:%d:%d\ndata: %s\n\n" % (comparison, position["a"], position["b"], event.data)
    return b"id: %s:%d:%d\nevent: %s\ndata: %s\n\n" % (comparison, position["a"], position["b"],
                                                       event.name.encode(), event.data)


@operation("Follow both slots of a comparison", "arena",
           {"200": response("Both slots' events (see POST /api/arena)", sse_content("ArenaEvent")),
            **ok(204, "Nothing after Last-Event-ID in either slot"), **errors(400, 401, 403, 404, 503)},
           parameters=[path_id("comparison_id", "comparison"), *RESUME_PARAMETERS], security=STREAM_SECURITY)
async def get_comparison_stream(request: web.Request) -> web.StreamResponse:
    comparison_id = parse_uuid(request.match_info["comparison_id"], "comparison id")
    principal = await stream_reader(request, comparison_id, "arena")
    raw = request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    return await stream_comparison(request, principal, comparison_id, parse_arena_event_id(raw, comparison_id))


@operation("A comparison (models named once voted, or when not anonymous)", "arena",
           {**ok(200, "The comparison", Comparison), **errors(400, 401, 403, 404, 503)},
           parameters=[path_id("comparison_id", "comparison")])
async def get_comparison(request: web.Request) -> web.Response:
    principal = await caller(request, "arena")
    comparison_id = parse_uuid(request.match_info["comparison_id"], "comparison id")
    row = await arena_store.get_comparison(request.app[DB].pool, principal.user_id, comparison_id)
    return json_response(arena_store.comparison_json(row))


@operation("Vote once, after both replies finished", "arena",
           {**ok(200, "The comparison with its vote", Comparison), **errors(400, 401, 403, 404, 409, 413, 503)},
           parameters=[path_id("comparison_id", "comparison")], body=Vote,
           description="The same vote again is a no-op; a different one, or one before both finished, is 409.")
async def post_vote(request: web.Request) -> web.Response:
    principal = await caller(request, "arena")
    comparison_id = parse_uuid(request.match_info["comparison_id"], "comparison id")
    winner = Winner(decode(await read_body(request), Vote).winner)
    row = await arena_store.vote(request.app[DB].pool, principal.user_id, comparison_id, winner)
    request.app[LEADERBOARD].votes_changed()
    return json_response(arena_store.comparison_json(row))


@operation("Bradley-Terry ratings from the votes (weak prior; raw and length-controlled), with 95% intervals",
           "arena", {**ok(200, "The ratings, best first", Leaderboard), **errors(400, 401, 503)},
           parameters=[query("include_named", {"type": "string", "default": "false",
                                               "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0)$"},
                             "Count votes on comparisons that were not anonymous")])
async def get_leaderboard(request: web.Request) -> web.Response:
    await caller(request)
    raw = request.query.get("include_named", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise BadRequest("include_named must be true or false")
    return json_response(await request.app[LEADERBOARD].get(include_named=raw in ("true", "1")))
