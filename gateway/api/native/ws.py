"""GET /ws: WebSocket chat, the same turns and events as POST /api/chat, as JSON text frames.

Auth happens before the upgrade (a refused caller gets the usual HTTP JSON error): an
`Authorization: Bearer` header, or, for browsers (which cannot set headers on a WebSocket), a
`token` query parameter holding an API key or a JWT (the access log redacts `token=`).

Client -> server, one JSON object per text frame::

    {"type": "chat", "content": "...", "thread_id"?, "model"?, "client_message_id"?,
     "max_tokens"?, "temperature"?}                   same fields and checks as POST /api/chat
    {"type": "resume", "message_id": "...", "last_event_id"?: "<message_id>:<n>"}
    {"type": "cancel", "message_id": "..."}          as POST /api/messages/{id}/cancel

Server -> client::

    {"event": "accepted", "message": {...user message...}, "duplicate": false,
     "thread_id": "...", "assistant_message_id": "..."}         right after the persist commit
    {"id": "<mid>:0", "event": "metadata", "data": {...}}
    {"id": "<mid>:1", "event": "delta", "data": {"delta": "Hel"}}
    {"id": "<mid>:N", "event": "usage", "data": {...}}
    {"id": "<mid>:N+1", "event": "done", "data": {...}}         or "error": {"type", "message", "retryable"}
    {"event": "end", "message_id": "<mid>"}                      the message's last frame ([DONE])
    {"event": "cancelled", "message": {...assistant message row...}}   answers a cancel frame
    {"event": "error", "data": {"type", "message"}}              a refused frame; the socket stays open

The credential is checked on every frame (from the key cache that revocations clear) and
watched in between, so a socket lives only as long as the credential that opened it. When the
key is revoked, or the key or JWT expires (a JWT at its `exp` plus the configured leeway), the
socket's last frame is `{"event": "error", "data": {"type": "unauthorized", "message": ...}}`
(without a request's ids: it ends them all), and it closes with code 4003 (revoked) or 4001
(expired, or otherwise no longer valid). A frame that arrives then writes nothing.

One socket is one conversation: its first chat turn makes a thread (or names one), and every later
turn without a `thread_id` continues that thread; a turn may still name another thread. Turns sent
before the first is accepted wait for its thread; if the first is refused, the next one makes it.

Event ids and data are the SSE stream's own (a resume over SSE or WS may use either), so
`last_event_id` resumes exactly after the last frame seen. A refused frame's error carries the
frame's `client_message_id` or `message_id`, when it had one, at the top level. Turns run
concurrently on one socket: frames of different messages interleave, each message's in order.

Closing the socket stops only the relaying: generations are app-owned tasks, they run on and are
saved, and a later `resume` (here or over SSE) picks them up. Protocol pings (`heartbeat`, every
SSE_PING_S seconds) keep idle proxies open and drop dead peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import asyncpg
import orjson
from aiohttp import WSMsgType, web

from gateway.api.common import caller, parse_uuid
from gateway.api.native.bodies import turn_from_frame
from gateway.contract.operations import errors, operation, response
from gateway.edge.auth import CredentialWatch, Principal
from gateway.edge.sse import parse_last_event_id
from gateway.errors import BadRequest, CredentialRevoked, GatewayError, ServiceUnavailable, Unauthorized
from gateway.generation.events import Event
from gateway.service.turns import TurnInput
from gateway.state import AUTH, MODELS, PRINCIPAL, SETTINGS, TURNS, USER_ID

log = logging.getLogger(__name__)

# a frame's credential check that could not reach the database refuses the frame, not the socket
DATABASE_DOWN = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

# turns, resumes and cancels one socket may have running at once: bounds what a client can pile up
MAX_IN_FLIGHT = 32
# close codes (the 4000s are the application's): the credential that opened the socket is gone
CLOSE_REVOKED = 4003
CLOSE_UNAUTHORIZED = 4001  # expired, or no longer valid


@operation("WebSocket chat: the same turns and events as POST /api/chat, as JSON text frames", "chat",
           {"101": response("Switching Protocols: the socket is open"), **errors(400, 401, 403, 503)},
           security=[{"bearerAuth": []}, {"queryToken": []}],
           description="Client frames: `{\"type\": \"chat\", ...}` (the fields of POST /api/chat), "
                       "`{\"type\": \"resume\", \"message_id\", \"last_event_id\"?}`, "
                       "`{\"type\": \"cancel\", \"message_id\"}`. A request that is not a WebSocket upgrade "
                       "answers 400 after authentication.")
async def websocket(request: web.Request) -> web.WebSocketResponse:
    principal = await authenticate(request)
    settings = request.app[SETTINGS]
    ws = web.WebSocketResponse(heartbeat=settings.sse_ping_s, max_msg_size=settings.max_body_bytes)
    if not ws.can_prepare(request).ok:
        raise BadRequest("expected a WebSocket upgrade")
    await ws.prepare(request)
    with request.app[AUTH].watch(principal) as watch:
        await Session(request, ws, principal, watch).run()
    return ws


async def authenticate(request: web.Request) -> Principal:
    """The Authorization header when sent, else the `token` query parameter."""
    token = request.query.get("token")
    if token is None or "Authorization" in request.headers:
        return await caller(request, "chat")
    principal = await request.app[AUTH].authenticate_token(token.strip())
    request[PRINCIPAL] = principal  # for the activity log
    request[USER_ID] = str(principal.user_id)  # for the access log
    principal.require("chat")
    return principal


def ws_frame(event: Event) -> bytes:
    """`{"id":"<message>:<seq>","event":"<name>","data":<data>}`: the data is already JSON, and the id
    (`<uuid>:<n>`) and the name need no escaping."""
    return b'{"id":"%s:%d","event":"%s","data":%s}' % (event.message, event.seq, event.name.encode(), event.data)


class Session:
    """One socket: reads frames and runs each as its own task, so turns proceed concurrently.

    The tasks only relay; they are cancelled when the socket closes, the generations are not.
    """

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, principal: Principal,
                 watch: CredentialWatch) -> None:
        self.request = request
        self.ws = ws
        self.principal = principal
        self.user_id = principal.user_id
        self._watch = watch
        self._tasks: set[asyncio.Task[None]] = set()
        self._expelled = False  # the credential lapsed: the socket is closing
        # the socket's conversation: the thread of its first turn, which turns without a thread_id
        # continue (one session per connection); pending while that turn is on its way
        self._thread: asyncio.Future[uuid.UUID | None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self.read())
        watcher = loop.create_task(self._watch.lapsed())
        try:
            await asyncio.wait((reader, watcher), return_when=asyncio.FIRST_COMPLETED)
            if watcher.done() and watcher.exception() is None and not self._expelled:
                # the credential lapsed between frames: the reader stops before the socket closes,
                # so the close waits for the client's close frame (closed while another task waits
                # in receive(), aiohttp drops the connection right after sending its close frame,
                # and a client that answers it finds the connection gone: 1006, not our code)
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                await self.expel(watcher.result())
            else:  # the client closed, or a frame found the credential lapsed (dispatch expels)
                await reader
        finally:
            reader.cancel()
            watcher.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(reader, watcher, *self._tasks, return_exceptions=True)

    async def read(self) -> None:
        async for msg in self.ws:
            if msg.type is WSMsgType.TEXT:
                await self.dispatch(msg.data)
            elif msg.type is WSMsgType.BINARY and not self._expelled:
                await self.error(BadRequest("frames must be JSON text"), {})

    async def expel(self, e: Unauthorized) -> None:
        """The credential stopped working: stop relaying, say why, close the socket."""
        if self._expelled:
            return
        self._expelled = True
        for task in self._tasks:
            task.cancel()  # relays only: the generations run on and are saved
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.error(e, {})
        code = CLOSE_REVOKED if isinstance(e, CredentialRevoked) else CLOSE_UNAUTHORIZED
        await self.ws.close(code=code, message=e.message.encode())

    async def dispatch(self, raw: str) -> None:
        """Check the credential, then validate the frame now (errors answer at once, in order);
        run its work as a task."""
        if self._expelled:
            return
        try:
            await self.request.app[AUTH].recheck(self.principal)
        except Unauthorized as e:
            return await self.expel(e)
        except DATABASE_DOWN:
            return await self.error(ServiceUnavailable("database unavailable"), {})
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return await self.error(BadRequest("frame is not valid JSON"), {})
        if not isinstance(frame, dict):
            return await self.error(BadRequest("frame must be a JSON object"), {})
        kind = frame.get("type")
        # echoed on errors, so a client with several requests in flight knows which one failed
        context = {k: frame[k] for k in ("client_message_id", "message_id") if isinstance(frame.get(k), str)}
        try:
            if len(self._tasks) >= MAX_IN_FLIGHT:
                raise BadRequest(f"more than {MAX_IN_FLIGHT} requests in flight on this socket")
            work: Coroutine[Any, Any, None]
            if kind == "chat":
                # validated here, before anything is written
                work = self.turn(turn_from_frame(frame, self.request.app[MODELS].chat_model))
            elif kind in ("resume", "cancel"):
                message_id = parse_uuid(frame.get("message_id"), "message_id")
                if kind == "resume":
                    last = frame.get("last_event_id")
                    if last is not None and not isinstance(last, str):
                        raise BadRequest("last_event_id must be a string")
                    work = self.relay(message_id, parse_last_event_id(last, str(message_id)))
                else:
                    work = self.cancel(message_id)
            else:
                raise BadRequest(f"unknown frame type {kind!r}; expected chat, resume or cancel")
        except GatewayError as e:
            return await self.error(e, context)
        task = asyncio.get_running_loop().create_task(self.guard(work, context))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def guard(self, work: Coroutine[Any, Any, None], context: dict[str, Any]) -> None:
        try:
            await work
        except GatewayError as e:
            await self.error(e, context)
        except ConnectionResetError:
            pass  # the socket is gone; the generation goes on without it
        except Exception:
            log.exception("websocket request failed")
            await self.error(GatewayError("internal error"), context)

    async def turn(self, turn: TurnInput) -> None:
        claim: asyncio.Future[uuid.UUID | None] | None = None
        if turn.thread_id is None:
            while self._thread is not None:  # the socket has a conversation, or its first turn is on its way
                thread_id = await asyncio.shield(self._thread)
                if thread_id is not None:
                    turn.thread_id = thread_id
                    break
        if self._thread is None:  # this turn makes (or names) the socket's conversation
            claim = self._thread = asyncio.get_running_loop().create_future()
        thread_id = None
        try:
            # shielded like POST /api/chat: once the message is committed its generation starts,
            # even if this socket closes in between
            t = await asyncio.shield(self.request.app[TURNS].begin_chat(self.principal, turn, time.monotonic()))
            thread_id = t.thread_id
        finally:
            if claim is not None:
                if thread_id is None:
                    self._thread = None  # refused: the next turn makes the conversation
                claim.set_result(thread_id)  # waiters go on with it, or (None) try for themselves
        await self.send(orjson.dumps({"event": "accepted", "message": t.user_message, "duplicate": t.duplicate,
                                      "thread_id": t.thread_id, "assistant_message_id": t.assistant_message_id}))
        await self.relay(t.assistant_message_id, after=-1)

    async def relay(self, message_id: uuid.UUID, after: int) -> None:
        """A message's events after seq `after`, live or replayed, then `end`."""
        reply = await self.request.app[TURNS].reply(self.user_id, message_id)
        async for batch in reply.events(after):
            for event in batch:
                await self.send(ws_frame(event))
        await self.send(b'{"event":"end","message_id":"%s"}' % str(message_id).encode())

    async def cancel(self, message_id: uuid.UUID) -> None:
        message = await self.request.app[TURNS].cancel(self.user_id, message_id)
        await self.send(orjson.dumps({"event": "cancelled", "message": message}))

    async def send(self, data: bytes) -> None:
        # a text frame straight from bytes: no decode/encode round trip
        await self.ws.send_frame(data, WSMsgType.TEXT)

    async def error(self, e: GatewayError, context: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionResetError):
            await self.send(orjson.dumps({"event": "error", "data": {"type": e.type, "message": e.message},
                                          **context}))
