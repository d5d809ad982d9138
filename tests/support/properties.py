"""The machinery of tests/test_hardening_property.py: a fake upstream that knows whose request it
serves, a seeded schedule of operations on every door, the code that runs each one, and the
checks of the database at the end.

Every user text carries a marker, `[<run>.u<user>.op<n>]`: the fake upstream reads it from the last
user message to know whose request it serves (its per-user concurrency) and echoes it in its reply,
so a reply or a row that ends up with the wrong user, thread or turn shows which request it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from gateway.providers.base import estimate_tokens, text_of
from tests.support.fakes import openai_chunk, parse_sse

MARKER = re.compile(r"\[(\w+)\.u(\d)\.((?:op|s)\d+)\]")
LENGTH = re.compile(r"len=(\d+)")
PIECES = 5  # text pieces per streamed reply


def reply_text(marker: str | None, completion: int) -> str:
    """The reply the fake gives to `marker`'s request: its echo, then filler, cut to at most four
    characters a token, so that even a count from the text (the gateway's estimate for a reply cut
    short) stays within the `completion` tokens it reports: a compliant upstream."""
    return echo_pattern(marker, completion * 4)[:completion * 4]


def echo_pattern(marker: str | None, chars: int) -> str:
    """Every reply to `marker` is a prefix of this (at least `chars` long)."""
    head = f"echo {marker} "
    return head + "alpha beta gamma delta " * (max(0, chars - len(head)) // 23 + 1)


def is_reply_to(text: str, marker: str | None) -> bool:
    return echo_pattern(marker, len(text)).startswith(text)


# what the policy reserves for a reply whose request names no max_tokens (gateway/policy/admission.py)
DEFAULT_RESERVE = 1024


# -- the fake upstream ------------------------------------------------------------------------------

@dataclass
class Call:
    """One upstream request, as the fake saw it."""

    api: str  # "openai" | "anthropic" | "embeddings"
    user: int | None
    marker: str | None
    bound: int | None  # the max_tokens (or max_completion_tokens) the gateway sent; None: none
    natural: int  # the length the reply has when nothing bounds it
    prompt: int
    completion: int


def user_marker(text: str) -> tuple[int | None, str | None]:
    found = MARKER.search(text)
    return (int(found.group(2)), found.group(0)) if found else (None, None)


class PropertyUpstream:
    """OpenAI-compatible chat (streamed, exact usage, honouring max_tokens), embeddings, and the
    Anthropic Messages stream, on loopback. A reply is as long as its prompt's `len=N` says
    (unbounded: N completion tokens) unless the request bounds it; its text echoes the prompt's
    marker. It counts, per user, the requests in flight (handler cancellation on: a request the
    gateway hangs up on ends at once), and records each moment one user has more than its cap."""

    def __init__(self, piece_delay_s: float, stream_caps: dict[int, int]) -> None:
        self.piece_delay_s = piece_delay_s
        self.stream_caps = stream_caps
        self.calls: list[Call] = []
        self.in_flight: dict[int, list[str]] = defaultdict(list)
        self.overlaps: list[str] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_post("/anthropic/v1/messages", self.anthropic)
        self.server: Any = None

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def _enter(self, call: Call) -> None:
        self.calls.append(call)
        if call.user is None:
            return
        flying = self.in_flight[call.user]
        flying.append(call.marker or "?")
        cap = self.stream_caps.get(call.user)
        if cap is not None and len(flying) > cap:
            self.overlaps.append(f"user u{call.user}: {len(flying)} upstream requests in flight at once, cap {cap}: "
                                 f"{sorted(flying)}")

    def _leave(self, call: Call) -> None:
        if call.user is not None:
            self.in_flight[call.user].remove(call.marker or "?")

    @staticmethod
    def _last_user_text(messages: list[dict[str, Any]]) -> str:
        for message in reversed(messages):
            if message.get("role") == "user":
                return text_of(message.get("content"))
        return ""

    def _plan(self, api: str, messages: list[dict[str, Any]], bound: int | None, system: Any = None) -> Call:
        text = self._last_user_text(messages)
        user, marker = user_marker(text)
        length = LENGTH.search(text)
        natural = int(length.group(1)) if length else 12
        # the prompt as the gateway estimates it: an exact reservation can cover it
        prompt = sum(estimate_tokens(text_of(m.get("content"))) for m in messages)
        if system is not None:
            prompt += estimate_tokens(text_of(system))
        completion = natural if bound is None else min(natural, bound)
        return Call(api, user, marker, bound, natural, prompt, completion)

    @staticmethod
    def _texts(call: Call) -> list[str]:
        text = reply_text(call.marker, call.completion)
        size = -(-len(text) // PIECES)
        return [text[i:i + size] for i in range(0, len(text), size)]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bound = body.get("max_completion_tokens", body.get("max_tokens"))
        call = self._plan("openai", body["messages"], bound)
        self._enter(call)
        try:
            finish = "length" if call.completion < call.natural else "stop"
            pieces = [openai_chunk({"role": "assistant", "content": ""})]
            pieces += [openai_chunk({"content": t}) for t in self._texts(call)]
            pieces.append(openai_chunk({}, finish))
            pieces.append(openai_chunk(usage={"prompt_tokens": call.prompt, "completion_tokens": call.completion,
                                              "total_tokens": call.prompt + call.completion}, choices=False))
            pieces.append(b"data: [DONE]\n\n")
            return await self._stream(request, pieces)
        finally:
            self._leave(call)

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        call = self._plan("anthropic", body["messages"], body.get("max_tokens"), body.get("system"))
        self._enter(call)
        try:
            def event(name: str, data: dict[str, Any]) -> bytes:
                return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"

            stop = "max_tokens" if call.completion < call.natural else "end_turn"
            pieces = [event("message_start", {"message": {
                "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": body["model"],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": call.prompt, "output_tokens": 1}}}),
                event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]
            pieces += [event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": t}})
                       for t in self._texts(call)]
            pieces += [event("content_block_stop", {"index": 0}),
                       event("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                                               "usage": {"output_tokens": call.completion}}),
                       event("message_stop", {})]
            return await self._stream(request, pieces)
        finally:
            self._leave(call)

    async def _stream(self, request: web.Request, pieces: list[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(self.piece_delay_s)
            try:
                await resp.write(piece)
            except ConnectionResetError:
                return resp  # the gateway hung up (cancel, or its client left)
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        user, marker = user_marker(" ".join(str(i) for i in inputs))
        prompt = sum(estimate_tokens(str(i)) for i in inputs)
        call = Call("embeddings", user, marker, None, 0, prompt, 0)
        self._enter(call)
        try:
            await asyncio.sleep(4 * self.piece_delay_s)  # long enough for a client to leave meanwhile
            return web.json_response({
                "object": "list", "model": body["model"], "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
                "data": [{"object": "embedding", "index": i, "embedding": [0.5, -0.25, 0.125]}
                         for i in range(len(inputs))]})
        finally:
            self._leave(call)


# -- the people, their caps, the gateway's configuration ---------------------------------------------

# per user, from [limits]; per key, on the key's row (u2's key has none of its own)
USER_CAPS = {"requests_per_minute": 40, "daily_tokens": 2500, "daily_cost_usd": 4.5, "max_concurrent_streams": 5}
KEY_CAPS: list[dict[str, Any]] = [{"daily_tokens": 1800, "max_concurrent_streams": 3},
                                  {"daily_cost_usd": 2.0, "requests_per_minute": 30},
                                  {}]
# USD per million tokens, every model alike: a 100-token reply costs about $0.2
INPUT_PRICE, OUTPUT_PRICE = 1000, 2000


@dataclass(frozen=True)
class Models:
    a: str  # OpenAI-compatible
    b: str  # OpenAI-compatible, another name on the same provider
    claude: str  # an Anthropic-kind provider
    embed: str  # kind = "embedding"

    @property
    def chat(self) -> list[str]:
        return [self.a, self.b, self.claude]


def gateway_toml(up: PropertyUpstream, models: Models) -> str:
    prices = f"input_price_per_mtok = {INPUT_PRICE}\noutput_price_per_mtok = {OUTPUT_PRICE}\n"
    caps = "".join(f"{k} = {v}\n" for k, v in USER_CAPS.items())
    return (f'[providers.prop_up]\nkind = "openai"\nbase_url = "{up.url("/v1")}"\napi_key = "sk-up"\n\n'
            f'[providers.prop_claude]\nkind = "anthropic"\nbase_url = "{up.url("/anthropic/v1")}"\n'
            'api_key = "sk-ant"\n\n'
            f'[models.{models.a}]\nprovider = "prop_up"\nupstream = "up-a"\n{prices}\n'
            f'[models.{models.b}]\nprovider = "prop_up"\nupstream = "up-b"\n{prices}\n'
            f'[models.{models.claude}]\nprovider = "prop_claude"\nupstream = "claude-x"\n{prices}\n'
            f'[models.{models.embed}]\nprovider = "prop_up"\nupstream = "emb"\nkind = "embedding"\n{prices}\n'
            f'[router]\ndefault = "{models.a}"\n\n[limits]\n{caps}')


@dataclass
class Person:
    index: int
    id: uuid.UUID
    key: str
    key_id: uuid.UUID
    key_caps: dict[str, Any]
    threads: list[uuid.UUID] = field(default_factory=list)
    user_messages: list[uuid.UUID] = field(default_factory=list)  # one per setup thread
    replies: list[uuid.UUID] = field(default_factory=list)  # their replies
    comparison: uuid.UUID | None = None
    response_id: str | None = None  # a stored /v1/responses reply

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def cap(self, name: str) -> Any:
        return self.key_caps.get(name)

    @property
    def stream_cap(self) -> int:
        caps = [USER_CAPS["max_concurrent_streams"], self.cap("max_concurrent_streams")]
        return min(c for c in caps if c is not None)


# -- the schedule ------------------------------------------------------------------------------------

# the doors, weighted; a stranger op aims at another user's thread, message, response or comparison
DOORS = [("chat", 20), ("ws", 9), ("arena", 7), ("regenerate", 7), ("openai", 12), ("responses", 10),
         ("anthropic", 8), ("embeddings", 9), ("stranger", 13), ("vote", 3)]
STRANGER = ["chat", "chat", "ws", "arena", "regenerate", "responses", "cancel", "vote"]
# doors whose successful answer means a user message was saved (regenerate adds a reply only)
STATEFUL = {"chat", "ws", "arena", "responses_stored"}


@dataclass
class Op:
    n: int
    door: str  # chat, ws, arena, regenerate, openai, responses, anthropic, embeddings, cancel, vote
    user: int  # who sends it
    owner: int  # whose thread / message it aims at (== user unless a stranger's)
    instance: int
    start: float
    marker: str
    stream: bool = False
    max_tokens: int | None = None
    natural: int = 20
    model: str = ""
    thread: int | None = None  # the owner's setup thread; None: a new one
    # full; disconnect (after the first event); cancel (from either instance); retry (the same id, on the
    # other instance); follow (its stream_url, on the other instance); close (the socket, once accepted)
    variant: str = "full"
    store: bool = True  # /v1/responses
    delay: float = 0.0  # before a cancel or a hang-up
    cancel_on: int = 0  # the instance a cancel goes to
    winner: str = "a"

    @property
    def stranger(self) -> bool:
        return self.user != self.owner

    @property
    def content(self) -> str:
        return f"{self.marker} len={self.natural} please answer"

    def describe(self) -> str:
        """One line naming the op and what of it matters for its door."""
        parts = [f"op{self.n:03d}", self.door, f"u{self.user}"]
        if self.stranger:
            parts.append(f"(stranger, aiming at u{self.owner}'s)")
        parts += [f"instance {self.instance}", f"t={self.start:.2f}s"]
        if self.door in ("chat", "ws", "arena", "regenerate", "openai", "responses", "anthropic"):
            parts.append("stream" if self.stream or self.door == "ws" else "plain")
        if self.door in ("chat", "ws", "arena", "regenerate", "openai", "responses", "anthropic", "embeddings"):
            parts.append(self.variant)
        if self.door in ("chat", "ws", "arena") and self.thread is not None:
            parts.append(f"thread{self.thread}")
        if self.door == "responses":
            parts.append(("store" if self.store else "no store")
                         + (", previous_response_id" if self.stranger or self.thread is not None else ""))
        if self.door in ("chat", "ws", "arena", "openai", "responses", "anthropic"):
            if self.door != "arena":
                parts.append(f"model {self.model.rsplit('_', 1)[-1]}")
            parts.append(f"max_tokens={self.max_tokens}" if self.max_tokens is not None else "no max_tokens")
            parts.append(f"len={self.natural}")
        return " ".join(parts)


def schedule(seed: int, tag: str, models: Models, n_ops: int, pair_bursts: int, window_s: float) -> list[Op]:
    """The run's operations, all drawn from `seed`: doors, users, instances, bodies, variants and
    start times (in bursts, so turns pile up and are group-committed together). Then two kinds of
    bursts aimed at races: owner and stranger turns into one thread, and long unbounded replies."""
    rng = random.Random(seed)
    bursts = [rng.uniform(0, window_s) for _ in range(max(1, n_ops // 6))]
    doors, weights = zip(*DOORS, strict=True)
    ops: list[Op] = []

    def new(door: str, user: int, owner: int, start: float, instance: int | None = None) -> Op:
        n = len(ops)
        op = Op(n=n, door=door, user=user, owner=owner, instance=rng.randrange(2) if instance is None else instance,
                start=start, marker=f"[{tag}.u{user}.op{n:03d}]")
        roll = rng.random()
        op.natural = rng.randint(8, 90) if roll < 0.6 else rng.randint(100, 400) if roll < 0.8 else \
            rng.randint(1200, 2200)
        op.max_tokens = rng.choice([None, None, rng.randint(16, 200), rng.randint(16, 200), rng.randint(300, 1500)])
        op.model = rng.choice(models.chat)
        op.stream = rng.random() < 0.55
        op.delay = rng.uniform(0.0, 0.2)
        op.cancel_on = rng.randrange(2)
        op.winner = rng.choice(["a", "b", "tie", "both_bad"])
        op.thread = rng.choice([None, 0, 1])
        op.store = rng.random() < 0.6
        if door == "chat":
            op.variant = rng.choice(["full", "full", "disconnect"]) if op.stream else \
                rng.choice(["full", "cancel", "cancel", "retry", "follow"])
        elif door == "regenerate":
            op.variant = rng.choice(["full", "full", "disconnect"]) if op.stream else \
                rng.choice(["full", "cancel", "cancel", "retry"])
        elif door in ("arena", "openai", "responses", "anthropic"):
            op.variant = rng.choice(["full", "full", "disconnect"]) if op.stream else "full"
        elif door == "ws":
            op.variant = rng.choice(["full", "full", "cancel", "close"])
        elif door == "embeddings":
            op.variant = rng.choice(["full", "full", "disconnect"])
        if door == "anthropic" and op.max_tokens is None:
            op.max_tokens = rng.choice([rng.randint(16, 200), 4096])  # Anthropic's API requires it
        if door == "arena":
            op.model = ""  # two models, drawn in run_arena from the marker's op number
        ops.append(op)
        return op

    for _ in range(n_ops):
        start = rng.choice(bursts) + rng.uniform(0, 0.015)
        door = rng.choices(doors, weights)[0]
        user = rng.randrange(3)
        if door == "stranger":
            owner = rng.choice([u for u in range(3) if u != user])
            op = new(rng.choice(STRANGER), user, owner, start)
            if op.door in ("chat", "ws", "arena"):
                op.thread = rng.randrange(2)
        else:
            new(door, user, user, start)
    # owner and stranger turns into one thread, on one instance, at one moment: batched together
    for _ in range(pair_bursts):
        owner = rng.randrange(3)
        stranger = rng.choice([u for u in range(3) if u != owner])
        thread, instance, start = rng.randrange(2), rng.randrange(2), rng.uniform(0, window_s)
        for who in (owner, stranger, owner, stranger, owner):
            op = new("chat", who, owner, start + rng.uniform(0, 0.002), instance)
            op.thread = thread
            op.stream = rng.random() < 0.3
            op.variant = "full"
    # per user, early (budgets still wide): three long replies at once whose requests name no max_tokens
    for user in range(3):
        start = rng.uniform(0, window_s / 3)
        for _ in range(3):
            op = new(rng.choice(["chat", "openai"]), user, user, start + rng.uniform(0, 0.01))
            op.max_tokens, op.natural, op.variant = None, rng.randint(1300, 2200), "full"
    ops.sort(key=lambda o: o.start)
    return ops


# -- running the operations ---------------------------------------------------------------------------

@dataclass
class Outcome:
    op: Op
    status: int | str  # the HTTP status, or for WS the refused frame's type / "accepted"
    detail: str = ""
    user_message_id: uuid.UUID | None = None
    assistant_ids: list[uuid.UUID] = field(default_factory=list)
    thread_id: uuid.UUID | None = None
    text: str | None = None  # a stateless door's whole reply text, when it was read to the end
    problems: list[str] = field(default_factory=list)  # what the client itself saw go wrong

    @property
    def ok(self) -> bool:
        return (isinstance(self.status, int) and 200 <= self.status < 300) or self.status == "accepted"


WS_STATUSES = {"rate_limited": 429, "not_found": 404, "conflict": 409, "invalid_request": 400,
               "forbidden": 403, "unavailable": 503, "internal_error": 500}


class Runner:
    def __init__(self, clients: list[TestClient], people: list[Person], models: Models) -> None:
        self.clients = clients
        self.people = people
        self.models = models

    async def run(self, op: Op, t0: float, timeout_s: float) -> Outcome:
        await asyncio.sleep(max(0.0, t0 + op.start - time.monotonic()))
        runner: Callable[[Op], Awaitable[Outcome]] = getattr(self, f"run_{op.door}")
        try:
            return await asyncio.wait_for(runner(op), timeout_s)
        except TimeoutError:
            return Outcome(op, "hung", f"no answer within {timeout_s:.0f} s")
        except (aiohttp.ClientError, ConnectionError) as e:
            return Outcome(op, "transport", f"{type(e).__name__}: {e}")

    def _client(self, op: Op) -> TestClient:
        return self.clients[op.instance]

    def _sender(self, op: Op) -> Person:
        return self.people[op.user]

    def _owner(self, op: Op) -> Person:
        return self.people[op.owner]

    async def _sse(self, resp: aiohttp.ClientResponse, out: Outcome, disconnect: bool, done: bool = True) -> list[Any]:
        """The SSE events, or (disconnect) only the first block's, then the connection is dropped.
        `done`: the door ends its streams with `data: [DONE]`."""
        if disconnect:
            head = await resp.content.readuntil(b"\n\n")
            resp.close()
            return parse_sse(head)
        raw = await resp.read()
        if done and not raw.rstrip().endswith(b"data: [DONE]"):
            out.problems.append(f"stream did not end with [DONE]: ...{raw[-120:]!r}")
        return parse_sse(raw)

    async def run_chat(self, op: Op) -> Outcome:
        who, client = self._sender(op), self._client(op)
        body: dict[str, Any] = {"content": op.content, "client_message_id": op.marker, "model": op.model}
        if op.max_tokens is not None:
            body["max_tokens"] = op.max_tokens
        if op.thread is not None:
            body["thread_id"] = str(self._owner(op).threads[op.thread])
        body["stream"] = op.stream
        resp = await client.post("/api/chat", json=body, headers=who.headers)
        out = Outcome(op, resp.status)
        if op.stream:
            if resp.status != 200:
                out.detail = (await resp.text())[:200]
                return out
            events = await self._sse(resp, out, op.variant == "disconnect")
            meta = orjson.loads(events[0].data) if events and events[0].event == "metadata" else None
            if meta is None:
                out.problems.append(f"first event is not metadata: {events[:1]}")
                return out
            out.user_message_id = uuid.UUID(meta["user_message_id"])
            out.assistant_ids = [uuid.UUID(meta["message_id"])]
            out.thread_id = uuid.UUID(meta["thread_id"])
            return out
        answer = await resp.json()
        if resp.status != 202:
            out.detail = str(answer.get("error", answer))[:200]
            return out
        out.user_message_id = uuid.UUID(answer["message"]["id"])
        out.assistant_ids = [uuid.UUID(answer["assistant_message_id"])]
        out.thread_id = uuid.UUID(answer["thread_id"])
        if op.variant == "retry":  # the same turn again, on the other instance: the stored one comes back
            again = await self.clients[1 - op.instance].post("/api/chat", json=body, headers=who.headers)
            retried = await again.json()
            if not (again.status == 202 and retried.get("duplicate") is True
                    and retried["message"]["id"] == answer["message"]["id"]
                    and retried["assistant_message_id"] == answer["assistant_message_id"]):
                out.problems.append(f"retry of the same client_message_id answered {again.status} {retried}")
        elif op.variant == "cancel":
            await self._cancel(op, out, out.assistant_ids[0])
        elif op.variant == "follow":  # the reply's stream_url (a token, no header), on the other instance
            other = self.clients[1 - op.instance]
            followed = await other.get(answer["stream_url"])
            if followed.status != 200:
                out.problems.append(f"its stream_url on instance {1 - op.instance} answered {followed.status}")
                return out
            events = await self._sse(followed, out, disconnect=False)
            text = "".join(orjson.loads(e.data).get("delta", "") for e in events
                           if e.event == "message" and e.data != "[DONE]")
            if not is_reply_to(text, op.marker):
                out.problems.append(f"followed on instance {1 - op.instance}, the reply's text {text[:80]!r} is "
                                    f"not the upstream's reply to {op.marker}")
        return out

    async def _cancel(self, op: Op, out: Outcome, message_id: uuid.UUID) -> None:
        await asyncio.sleep(op.delay)
        resp = await self.clients[op.cancel_on].post(f"/api/messages/{message_id}/cancel",
                                                     headers=self._sender(op).headers)
        row = await resp.json()
        if resp.status != 200 or row.get("status") in ("pending", "streaming"):
            out.problems.append(f"cancel on instance {op.cancel_on} answered {resp.status} {str(row)[:200]}")

    async def run_regenerate(self, op: Op) -> Outcome:
        who, owner = self._sender(op), self._owner(op)
        target = owner.user_messages[op.n % len(owner.user_messages)]
        body: dict[str, Any] = {"stream": op.stream}
        if op.variant == "retry":
            body["client_request_id"] = op.marker
        resp = await self._client(op).post(f"/api/messages/{target}/regenerate", json=body, headers=who.headers)
        out = Outcome(op, resp.status)
        out.user_message_id = target
        if op.stream and resp.status == 200:
            events = await self._sse(resp, out, op.variant == "disconnect")
            if events and events[0].event == "metadata":
                out.assistant_ids = [uuid.UUID(orjson.loads(events[0].data)["message_id"])]
            else:
                out.problems.append(f"first event is not metadata: {events[:1]}")
            return out
        answer = await resp.json()
        if resp.status != 202:
            out.detail = str(answer.get("error", answer))[:200]
            return out
        out.assistant_ids = [uuid.UUID(answer["assistant_message_id"])]
        if op.variant == "retry":  # the same client_request_id again, on the other instance: nothing new
            again = await self.clients[1 - op.instance].post(f"/api/messages/{target}/regenerate", json=body,
                                                             headers=who.headers)
            retried = await again.json()
            if not (again.status == 202 and retried.get("duplicate") is True
                    and retried["assistant_message_id"] == answer["assistant_message_id"]):
                out.problems.append(f"retry of the same client_request_id answered {again.status} {retried}")
        elif op.variant == "cancel":
            await self._cancel(op, out, out.assistant_ids[0])
        return out

    async def run_ws(self, op: Op) -> Outcome:
        who, client = self._sender(op), self._client(op)
        frame: dict[str, Any] = {"type": "chat", "content": op.content, "client_message_id": op.marker,
                                 "model": op.model}
        if op.max_tokens is not None:
            frame["max_tokens"] = op.max_tokens
        if op.thread is not None:
            frame["thread_id"] = str(self._owner(op).threads[op.thread])
        out = Outcome(op, "no answer")
        async with client.ws_connect("/ws", headers=who.headers) as ws:
            await ws.send_str(orjson.dumps(frame).decode())
            ended = cancelled = False
            while True:
                msg = await ws.receive(timeout=20)
                if msg.type != WSMsgType.TEXT:
                    out.problems.append(f"socket closed before the reply's end frame ({msg.type.name})")
                    break
                data = orjson.loads(msg.data)
                event = data.get("event")
                if event == "accepted":
                    out.status = "accepted"
                    out.user_message_id = uuid.UUID(data["message"]["id"])
                    out.assistant_ids = [uuid.UUID(data["assistant_message_id"])]
                    out.thread_id = uuid.UUID(data["thread_id"])
                    if op.variant == "close":
                        break  # hang up: the reply runs on and is saved
                    if op.variant == "cancel":
                        await ws.send_str(orjson.dumps({"type": "cancel",
                                                        "message_id": data["assistant_message_id"]}).decode())
                elif event == "error" and "id" not in data:  # a refused frame (a reply's error has an id)
                    if out.status == "accepted":
                        out.problems.append(f"refused frame after acceptance: {data}")
                    else:
                        out.status = WS_STATUSES.get(data["data"]["type"], data["data"]["type"])
                        out.detail = data["data"]["message"][:200]
                    break
                elif event == "cancelled":
                    cancelled = True
                    if data["message"]["status"] in ("pending", "streaming"):
                        out.problems.append(f"cancel frame answered a live row: {data['message']['status']}")
                elif event == "end":
                    ended = True
                if ended and (op.variant != "cancel" or cancelled):
                    break
        return out

    async def run_arena(self, op: Op) -> Outcome:
        who, client = self._sender(op), self._client(op)
        pair = [self.models.a, self.models.b] if op.n % 3 else [self.models.a, self.models.claude]
        body: dict[str, Any] = {"content": op.content, "client_message_id": op.marker, "models": pair,
                                "stream": op.stream}
        if op.max_tokens is not None:
            body["max_tokens"] = op.max_tokens
        if op.thread is not None:
            body["thread_id"] = str(self._owner(op).threads[op.thread])
        resp = await client.post("/api/arena", json=body, headers=who.headers)
        out = Outcome(op, resp.status)
        if op.stream and resp.status == 200:
            events = await self._sse(resp, out, op.variant == "disconnect")
            metas = [orjson.loads(e.data) for e in events if e.event == "metadata"]
            if metas:
                out.user_message_id = uuid.UUID(metas[0]["user_message_id"])
                out.thread_id = uuid.UUID(metas[0]["thread_id"])
                out.assistant_ids = [uuid.UUID(m["message_id"]) for m in metas]
            else:
                out.problems.append(f"no metadata event: {events[:1]}")
            return out
        answer = await resp.json()
        if resp.status != 202:
            out.detail = str(answer.get("error", answer))[:200]
            return out
        out.user_message_id = uuid.UUID(answer["message"]["id"])
        out.thread_id = uuid.UUID(answer["thread_id"])
        out.assistant_ids = [uuid.UUID(answer["assistant_message_ids"][s]) for s in ("a", "b")]
        return out

    async def run_openai(self, op: Op) -> Outcome:
        body: dict[str, Any] = {"model": op.model, "messages": [{"role": "user", "content": op.content}],
                                "stream": op.stream}
        if op.max_tokens is not None:
            body["max_tokens" if op.n % 2 else "max_completion_tokens"] = op.max_tokens
        if op.stream:
            body["stream_options"] = {"include_usage": True}
        resp = await self._client(op).post("/v1/chat/completions", json=body, headers=self._sender(op).headers)
        out = Outcome(op, resp.status)
        if resp.status != 200:
            out.detail = (await resp.text())[:200]
        elif op.stream:
            events = await self._sse(resp, out, op.variant == "disconnect")
            if op.variant != "disconnect":
                chunks = [orjson.loads(e.data) for e in events if e.data != "[DONE]"]
                out.text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        else:
            out.text = (await resp.json())["choices"][0]["message"]["content"]
        return out

    async def run_responses(self, op: Op) -> Outcome:
        who, owner = self._sender(op), self._owner(op)
        body: dict[str, Any] = {"model": op.model, "input": op.content, "stream": op.stream, "store": op.store}
        if op.max_tokens is not None:
            body["max_output_tokens"] = op.max_tokens
        if op.stranger or op.thread is not None:
            body["previous_response_id"] = owner.response_id
        resp = await self._client(op).post("/v1/responses", json=body, headers=who.headers)
        out = Outcome(op, resp.status)
        if resp.status != 200:
            out.detail = (await resp.text())[:200]
        elif op.stream:
            events = await self._sse(resp, out, op.variant == "disconnect", done=False)
            if op.variant != "disconnect":
                done = [orjson.loads(e.data) for e in events if e.event == "response.completed"]
                out.text = done[0]["response"]["output_text"] if done else None
            created = [orjson.loads(e.data) for e in events if e.event == "response.created"]
            if created and op.store:
                out.assistant_ids = [uuid.UUID(hex=created[0]["response"]["id"].removeprefix("resp_"))]
        else:
            answer = await resp.json()
            out.text = answer["output_text"] if answer["status"] == "completed" else None
            if op.store:
                out.assistant_ids = [uuid.UUID(hex=answer["id"].removeprefix("resp_"))]
        return out

    async def run_anthropic(self, op: Op) -> Outcome:
        headers = {"x-api-key": self._sender(op).key, "anthropic-version": "2023-06-01"}
        body = {"model": op.model, "max_tokens": op.max_tokens, "stream": op.stream,
                "messages": [{"role": "user", "content": op.content}]}
        resp = await self._client(op).post("/v1/messages", json=body, headers=headers)
        out = Outcome(op, resp.status)
        if resp.status != 200:
            out.detail = (await resp.text())[:200]
        elif op.stream:
            raw = await resp.content.readuntil(b"\n\n") if op.variant == "disconnect" else await resp.read()
            if op.variant == "disconnect":
                resp.close()
            else:
                deltas = [orjson.loads(e.data) for e in parse_sse(raw) if e.event == "content_block_delta"]
                out.text = "".join(d["delta"].get("text", "") for d in deltas)
        else:
            out.text = "".join(b.get("text", "") for b in (await resp.json())["content"])
        return out

    async def run_embeddings(self, op: Op) -> Outcome:
        body = {"model": self.models.embed, "input": [op.content, f"{op.marker} second input"]}
        call = asyncio.ensure_future(self._client(op).post("/v1/embeddings", json=body,
                                                           headers=self._sender(op).headers))
        if op.variant == "disconnect":
            await asyncio.sleep(op.delay / 4)
            if not call.done():
                call.cancel()  # the client hangs up while the gateway works
                await asyncio.gather(call, return_exceptions=True)
                return Outcome(op, "left")
        resp = await call
        out = Outcome(op, resp.status)
        if resp.status != 200:
            out.detail = (await resp.text())[:200]
        else:
            await resp.read()
        return out

    async def run_cancel(self, op: Op) -> Outcome:
        owner = self._owner(op)
        target = owner.replies[op.n % len(owner.replies)]
        resp = await self._client(op).post(f"/api/messages/{target}/cancel", headers=self._sender(op).headers)
        return Outcome(op, resp.status, (await resp.text())[:200])

    async def run_vote(self, op: Op) -> Outcome:
        owner = self._owner(op)
        resp = await self._client(op).post(f"/api/comparisons/{owner.comparison}/vote", json={"winner": op.winner},
                                           headers=self._sender(op).headers)
        return Outcome(op, resp.status, (await resp.text())[:200])


# -- the checks ----------------------------------------------------------------------------------------

# what each door may answer; anything else is reported
ALLOWED = {
    "chat": {200, 202, 429}, "ws": {"accepted", 429}, "arena": {200, 202, 429}, "regenerate": {200, 202, 409, 429},
    "openai": {200, 429}, "responses": {200, 429}, "anthropic": {200, 429}, "embeddings": {200, 429, "left"},
    "vote": {200, 409},
}
STRANGER_ALLOWED = {404, 429}  # 429: the edge's rate limit may answer first (nothing written either way)


class Violations:
    """Every broken invariant, by kind, each line naming the user, the row and expected vs found."""

    def __init__(self) -> None:
        self.found: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, line: str) -> None:
        self.found[kind].append(line)

    def report(self, header: str, per_kind: int = 12) -> str:
        lines = [header]
        for kind, found in sorted(self.found.items()):
            lines.append(f"\n[{kind}] {len(found)} violation(s):")
            lines += ["  - " + line for line in found[:per_kind]]
            if len(found) > per_kind:
                lines.append(f"  ... and {len(found) - per_kind} more")
        return "\n".join(lines)


def marker_of(text: str | None) -> str | None:
    found = MARKER.search(text or "")
    return found.group(0) if found else None


class Checker:
    def __init__(self, db: asyncpg.Pool, people: list[Person], outcomes: list[Outcome], up: PropertyUpstream,
                 instance_ids: list[uuid.UUID], tag: str, violations: Violations) -> None:
        self.db = db
        self.people = people
        self.outcomes = outcomes
        self.up = up
        self.instance_ids = instance_ids
        self.tag = tag
        self.v = violations
        self.users = [p.id for p in people]
        self.keys = [p.key_id for p in people]
        self.name = {p.id: f"u{p.index}" for p in people}

    def who(self, user_id: uuid.UUID) -> str:
        return self.name.get(user_id, f"user {user_id} (not one of the three)")

    # -- answers the clients got ------------------------------------------------------------------

    def answers(self) -> None:
        for out in self.outcomes:
            op = out.op
            for problem in out.problems:
                self.v.add("client saw", f"{op.describe()}: {problem}")
            if op.stranger:
                if out.status not in STRANGER_ALLOWED:
                    self.v.add("(a) stranger not refused",
                               f"{op.describe()}: expected 404 (not the sender's {self._target(op)}), got "
                               f"{out.status} {out.detail[:120]} user_message={out.user_message_id} "
                               f"thread={out.thread_id}")
            elif out.status not in ALLOWED[op.door]:
                self.v.add("unexpected answer", f"{op.describe()}: got {out.status} {out.detail}")
            if out.text is not None and not is_reply_to(out.text, op.marker):
                self.v.add("(a) reply crossed", f"{op.describe()}: the reply text {out.text[:80]!r} is not the "
                                                f"upstream's reply to {op.marker}")

    @staticmethod
    def _target(op: Op) -> str:
        return {"chat": "thread", "ws": "thread", "arena": "thread", "regenerate": "message",
                "responses": "previous response", "cancel": "reply", "vote": "comparison"}[op.door]

    # -- (a) nothing crossed users ------------------------------------------------------------------

    async def crossing(self) -> None:
        rows = await self.db.fetch("""
            SELECT m.id, m.role, m.user_id, t.user_id AS owner, m.thread_id, left(m.content, 60) AS content
            FROM messages m JOIN threads t ON t.id = m.thread_id
            WHERE (m.user_id = ANY($1) OR t.user_id = ANY($1)) AND m.user_id <> t.user_id""", self.users)
        for r in rows:
            self.v.add("(a) message in another user's thread",
                       f"{r['role']} message {r['id']} of {self.who(r['user_id'])} is in thread {r['thread_id']} "
                       f"owned by {self.who(r['owner'])} (content {r['content']!r})")
        rows = await self.db.fetch("""
            SELECT r.id, r.user_id, r.thread_id, p.id AS parent, p.user_id AS parent_user, p.thread_id AS parent_thread
            FROM messages r JOIN messages p ON p.id = r.reply_to
            WHERE (r.user_id = ANY($1) OR p.user_id = ANY($1))
              AND (r.user_id <> p.user_id OR r.thread_id <> p.thread_id)""", self.users)
        for r in rows:
            self.v.add("(a) reply crossed", f"reply {r['id']} of {self.who(r['user_id'])} in thread {r['thread_id']} "
                                            f"answers message {r['parent']} of {self.who(r['parent_user'])} in "
                                            f"thread {r['parent_thread']}")
        rows = await self.db.fetch("""
            SELECT u.message_id, u.user_id, m.user_id AS owner FROM usage u JOIN messages m ON m.id = u.message_id
            WHERE (u.user_id = ANY($1) OR m.user_id = ANY($1)) AND u.user_id <> m.user_id""", self.users)
        for r in rows:
            self.v.add("(a) usage crossed", f"usage row {r['message_id']} is charged to {self.who(r['user_id'])} but "
                                            f"its message belongs to {self.who(r['owner'])}")
        rows = await self.db.fetch("""
            SELECT u.message_id, u.user_id, k.user_id AS key_owner FROM usage u JOIN api_keys k ON k.id = u.api_key_id
            WHERE (u.user_id = ANY($1) OR k.user_id = ANY($1)) AND u.user_id <> k.user_id""", self.users)
        for r in rows:
            self.v.add("(a) usage crossed", f"usage row {r['message_id']} of {self.who(r['user_id'])} names a key of "
                                            f"{self.who(r['key_owner'])}")
        rows = await self.db.fetch("""
            SELECT c.id, c.user_id, t.user_id AS t, um.user_id AS um, ma.user_id AS ma, mb.user_id AS mb,
                   ma.reply_to = c.user_message_id AND mb.reply_to = c.user_message_id AS linked
            FROM comparisons c JOIN threads t ON t.id = c.thread_id JOIN messages um ON um.id = c.user_message_id
            JOIN messages ma ON ma.id = c.message_a JOIN messages mb ON mb.id = c.message_b
            WHERE c.user_id = ANY($1) OR t.user_id = ANY($1) OR um.user_id = ANY($1)""", self.users)
        for r in rows:
            owners = {r["t"], r["um"], r["ma"], r["mb"]}
            if owners != {r["user_id"]} or not r["linked"]:
                self.v.add("(a) comparison crossed",
                           f"comparison {r['id']} of {self.who(r['user_id'])}: thread of {self.who(r['t'])}, user "
                           f"message of {self.who(r['um'])}, slots of {self.who(r['ma'])} / {self.who(r['mb'])}, "
                           f"slots reply to its user message: {r['linked']}")
        # votes: only the owner's, and the first one the owner got a 200 for
        voted: dict[uuid.UUID, str] = {}
        for out in self.outcomes:
            if out.op.door == "vote" and not out.op.stranger and out.status == 200:
                cid = self.people[out.op.owner].comparison
                assert cid is not None
                if voted.setdefault(cid, out.op.winner) != out.op.winner:
                    self.v.add("(a) vote", f"{out.op.describe()}: a second, different vote answered 200 "
                                           f"(first was {voted[cid]})")
        for p in self.people:
            winner = await self.db.fetchval("SELECT winner FROM comparisons WHERE id = $1", p.comparison)
            if winner != voted.get(p.comparison):  # type: ignore[arg-type]
                self.v.add("(a) vote", f"u{p.index}'s comparison {p.comparison}: winner {winner!r}, expected "
                                       f"{voted.get(p.comparison)!r} (the owner's accepted vote; strangers' are 404)")

    # -- (c) every accepted user message saved exactly once, nothing else written ----------------------

    async def saved(self) -> dict[str, list[asyncpg.Record]]:
        rows = await self.db.fetch("""
            SELECT m.id, m.role, m.user_id, m.thread_id, m.reply_to, m.slot, m.status, m.content
            FROM messages m
            WHERE m.user_id = ANY($1) OR m.thread_id IN (SELECT id FROM threads WHERE user_id = ANY($1))
               OR m.content LIKE '%[' || $2 || '.%'
            ORDER BY m.seq""", self.users, self.tag)
        by_marker: dict[str, list[asyncpg.Record]] = defaultdict(list)
        replies: dict[uuid.UUID, list[asyncpg.Record]] = defaultdict(list)
        for r in rows:
            if r["role"] == "user":
                by_marker[marker_of(r["content"]) or "?"].append(r)
            else:
                replies[r["reply_to"]].append(r)
        users = {r["id"]: r for r in rows if r["role"] == "user"}
        for out in self.outcomes:
            self._saved_once(out, by_marker.get(out.op.marker, []), replies)
        # regenerations: each setup message has its first reply plus one per accepted regenerate
        regenerated: Counter[uuid.UUID] = Counter()
        for out in self.outcomes:
            if out.op.door == "regenerate" and not out.op.stranger and out.ok and out.user_message_id is not None:
                regenerated[out.user_message_id] += 1
        for p in self.people:
            for umid in p.user_messages:
                got = replies.get(umid, [])
                if len(got) != 1 + regenerated[umid]:
                    self.v.add("(c) replies", f"u{p.index}'s setup message {umid}: {len(got)} replies, expected "
                                              f"1 + {regenerated[umid]} accepted regenerates")
        # a reply's text is (a prefix of) the upstream's reply to the message it answers, never another's
        for reply_to, got in replies.items():
            parent = users.get(reply_to)
            for r in got:
                if parent is not None and not is_reply_to(r["content"], marker_of(parent["content"])):
                    self.v.add("(a) reply crossed",
                               f"reply {r['id']} of {self.who(r['user_id'])} to {marker_of(parent['content'])} "
                               f"reads {r['content'][:60]!r}: it is not the upstream's reply to that turn")
        return by_marker

    def _saved_once(self, out: Outcome, rows: list[asyncpg.Record],
                    replies: dict[uuid.UUID, list[asyncpg.Record]]) -> None:
        op = out.op
        door = "responses_stored" if op.door == "responses" and op.store and not op.stranger else op.door
        where = f"{op.describe()} answered {out.status}"
        if op.stranger or door not in STATEFUL:
            if rows:
                self.v.add("(c) written when nothing should be",
                           f"{where}: expected no message with {op.marker}, found {len(rows)}: "
                           + "; ".join(f"{r['id']} of {self.who(r['user_id'])} in thread {r['thread_id']}"
                                       for r in rows))
            return
        if out.ok:
            expected = "exactly once"
        elif out.status == 429 and door == "responses_stored":
            expected = "at most once"  # a daily cap's refusal is decided after the commit, and answered 429
        elif out.status in (429, 400, 404):
            expected = "never"
        else:
            expected = "at most once"  # gone, hung or failed before an answer: never twice
        count = len(rows)
        if (expected == "exactly once" and count != 1) or (expected == "never" and count) or count > 1:
            self.v.add("(c) user message not saved exactly once",
                       f"{where}: expected the user message {expected}, found {count} "
                       + "; ".join(f"{r['id']} in thread {r['thread_id']}" for r in rows))
            return
        if not rows:
            return
        row = rows[0]
        if row["user_id"] != self.people[op.user].id:
            self.v.add("(a) message of the wrong user", f"{where}: saved as {self.who(row['user_id'])}'s")
        thread = self.people[op.owner].threads[op.thread] if op.thread is not None and door != "responses_stored" \
            else out.thread_id
        if thread is not None and row["thread_id"] != thread:
            self.v.add("(c) wrong thread", f"{where}: saved in thread {row['thread_id']}, expected {thread}")
        if out.user_message_id is not None and out.user_message_id != row["id"]:
            self.v.add("(c) wrong ids", f"{where}: answered user message {out.user_message_id}, saved {row['id']}")
        got = replies.get(row["id"], [])
        slots = sorted(r["slot"] or "-" for r in got)
        want = ["a", "b"] if door == "arena" else ["-"]
        if slots != want:
            self.v.add("(c) replies", f"{where}: user message {row['id']} has replies {slots}, expected {want}")
        # (a client that left after the first event knows only the replies it was told of)
        answered, saved = set(out.assistant_ids), {r["id"] for r in got}
        if answered and (answered != saved if op.variant != "disconnect" else not answered <= saved):
            self.v.add("(c) wrong ids", f"{where}: answered replies {out.assistant_ids}, saved "
                                        f"{[r['id'] for r in got]}")

    # -- (b) caps: per user, per key, per day; the totals are the sum of the usage rows ---------------

    async def caps(self) -> None:
        for p in self.people:
            days = await self.db.fetch("SELECT day, tokens, cost_usd, requests FROM daily_usage WHERE user_id = $1",
                                       p.id)
            usage = await self.db.fetchrow(
                "SELECT coalesce(sum(total_tokens), 0) AS t, coalesce(sum(cost_usd), 0) AS c, count(*) AS n "
                "FROM usage WHERE user_id = $1", p.id)
            await self._usage_rows_within(p, "user_id", p.id, USER_CAPS["daily_tokens"], USER_CAPS["daily_cost_usd"],
                                          f"u{p.index}")
            await self._usage_rows_within(p, "api_key_id", p.key_id, p.cap("daily_tokens"), p.cap("daily_cost_usd"),
                                          f"u{p.index}'s key")
            for d in days:
                if d["tokens"] > USER_CAPS["daily_tokens"]:
                    self.v.add("(b) user token cap exceeded",
                               f"u{p.index} on {d['day']}: daily_usage.tokens = {d['tokens']} > daily_tokens "
                               f"{USER_CAPS['daily_tokens']}; {self._overruns(p)}")
                if d["cost_usd"] > Decimal(str(USER_CAPS["daily_cost_usd"])):
                    self.v.add("(b) user cost cap exceeded",
                               f"u{p.index} on {d['day']}: daily_usage.cost_usd = {d['cost_usd']} > daily_cost_usd "
                               f"{USER_CAPS['daily_cost_usd']}; {self._overruns(p)}")
            totals = (sum(d["tokens"] for d in days), sum((d["cost_usd"] for d in days), Decimal(0)),
                      sum(d["requests"] for d in days))
            if totals != (usage["t"], usage["c"], usage["n"]):
                self.v.add("(b) totals differ from usage rows",
                           f"u{p.index}: daily_usage (tokens, cost, requests) = {totals}, the usage rows sum to "
                           f"{(usage['t'], usage['c'], usage['n'])}")
            kdays = await self.db.fetch("SELECT day, tokens, cost_usd, requests FROM key_daily_usage "
                                        "WHERE api_key_id = $1", p.key_id)
            kusage = await self.db.fetchrow(
                "SELECT coalesce(sum(total_tokens), 0) AS t, coalesce(sum(cost_usd), 0) AS c, count(*) AS n "
                "FROM usage WHERE api_key_id = $1", p.key_id)
            for d in kdays:
                if p.cap("daily_tokens") is not None and d["tokens"] > p.cap("daily_tokens"):
                    self.v.add("(b) key token cap exceeded",
                               f"u{p.index}'s key on {d['day']}: key_daily_usage.tokens = {d['tokens']} > "
                               f"daily_tokens {p.cap('daily_tokens')}; {self._overruns(p)}")
                if p.cap("daily_cost_usd") is not None and d["cost_usd"] > Decimal(str(p.cap("daily_cost_usd"))):
                    self.v.add("(b) key cost cap exceeded",
                               f"u{p.index}'s key on {d['day']}: key_daily_usage.cost_usd = {d['cost_usd']} > "
                               f"daily_cost_usd {p.cap('daily_cost_usd')}; {self._overruns(p)}")
            ktotals = (sum(d["tokens"] for d in kdays), sum((d["cost_usd"] for d in kdays), Decimal(0)),
                       sum(d["requests"] for d in kdays))
            if kdays and ktotals != (kusage["t"], kusage["c"], kusage["n"]):
                self.v.add("(b) totals differ from usage rows",
                           f"u{p.index}'s key: key_daily_usage (tokens, cost, requests) = {ktotals}, its usage rows "
                           f"sum to {(kusage['t'], kusage['c'], kusage['n'])}")
            windows = await self.db.fetch("SELECT subject, window_start, count FROM rate_windows "
                                          "WHERE subject = ANY($1)", [f"u:{p.id}", f"k:{p.key_id}"])
            for w in windows:
                cap = USER_CAPS["requests_per_minute"] if w["subject"].startswith("u:") else \
                    p.cap("requests_per_minute")
                if cap is not None and w["count"] > cap:
                    self.v.add("(b) rate window over its limit",
                               f"u{p.index} {w['subject'][:1]} window {w['window_start']}: {w['count']} > {cap}")
        for line in self.up.overlaps:
            self.v.add("(b) concurrent streams over the cap (seen by the upstream)", line)

    async def _usage_rows_within(self, p: Person, column: str, value: uuid.UUID, tokens: int | None,
                                 cost: float | None, who: str) -> None:
        """The usage rows themselves, summed per UTC day, within the caps (whatever the day rows say)."""
        for d in await self.db.fetch(
                f"SELECT (created_at AT TIME ZONE 'UTC')::date AS day, sum(total_tokens) AS t, sum(cost_usd) AS c "
                f"FROM usage WHERE {column} = $1 GROUP BY 1", value):  # column: one of two names above
            if tokens is not None and d["t"] > tokens:
                self.v.add("(b) usage rows over the token cap", f"{who} on {d['day']}: the usage rows sum to {d['t']} "
                                                                f"tokens > daily_tokens {tokens}; {self._overruns(p)}")
            if cost is not None and d["c"] > Decimal(str(cost)):
                self.v.add("(b) usage rows over the cost cap",
                           f"{who} on {d['day']}: the usage rows sum to ${d['c']} > daily_cost_usd {cost}; "
                           f"{self._overruns(p)}")

    def _overruns(self, p: Person) -> str:
        """Evidence: this user's upstream calls whose completion went past what a request without
        max_tokens reserves, and whether the upstream was told any bound."""
        mine = [c for c in self.up.calls if c.user == p.index and c.api != "embeddings"]
        unbounded = [c for c in mine if c.bound is None]
        big = [c for c in mine if c.completion > DEFAULT_RESERVE]
        return (f"upstream calls of u{p.index}: {len(mine)}, sent with no max_tokens: {len(unbounded)}, with a bound "
                f"above the {DEFAULT_RESERVE} reserved by default: "
                f"{len([c for c in mine if c.bound is not None and c.bound > DEFAULT_RESERVE])}; replies longer than "
                f"{DEFAULT_RESERVE} tokens: "
                + (", ".join(f"{c.marker} {c.api} {c.completion} tokens (bound {c.bound})" for c in big[:6]) or "none"))

    # -- (d) nothing left reserved, once the instances closed ------------------------------------------

    async def nothing_reserved(self) -> None:
        for p in self.people:
            for d in await self.db.fetch("SELECT day, reserved, cost_reserved FROM daily_usage WHERE user_id = $1 "
                                         "AND (reserved <> 0 OR cost_reserved <> 0)", p.id):
                self.v.add("(d) user day row still reserved",
                           f"u{p.index} on {d['day']}: daily_usage.reserved = {d['reserved']}, cost_reserved = "
                           f"{d['cost_reserved']}, expected 0 and 0; {self._door_counts(p)}")
            for d in await self.db.fetch("SELECT day, reserved, cost_reserved FROM key_daily_usage "
                                         "WHERE api_key_id = $1 AND (reserved <> 0 OR cost_reserved <> 0)", p.key_id):
                self.v.add("(d) key day row still reserved",
                           f"u{p.index}'s key on {d['day']}: key_daily_usage.reserved = {d['reserved']}, "
                           f"cost_reserved = {d['cost_reserved']}, expected 0 and 0; {self._door_counts(p)}")
            for s in await self.db.fetch("SELECT subject, streams FROM stream_counts WHERE subject = ANY($1) "
                                         "AND streams <> 0", [f"u:{p.id}", f"k:{p.key_id}"]):
                self.v.add("(d) stream count not back to 0",
                           f"u{p.index} {s['subject'][:1]}: stream_counts.streams = {s['streams']}, expected 0; "
                           f"{self._door_counts(p)}")
            # a slice given back may keep its row while replies it served still hold their shares; once
            # they settled, a closed row holding nothing is harmless (a dead instance's are deleted)
            for q in await self.db.fetch("SELECT * FROM quota_leases WHERE user_id = $1 AND (open OR user_tokens > 0 "
                                         "OR key_tokens > 0 OR user_cost > 0 OR key_cost > 0)", p.id):
                self.v.add("(d) quota slice left",
                           f"u{p.index}: quota_leases row {q['id']} of instance {q['instance_id']} open={q['open']} "
                           f"holds user_tokens {q['user_tokens']}, key_tokens {q['key_tokens']}, user_cost "
                           f"{q['user_cost']}, key_cost {q['key_cost']}, expected none open and nothing held; "
                           f"{self._door_counts(p)}")
        subjects = [f"u:{u}" for u in self.users] + [f"k:{k}" for k in self.keys]
        for lease in await self.db.fetch("SELECT id, instance_id, subjects FROM stream_leases "
                                         "WHERE instance_id = ANY($1) OR subjects && $2::text[]",
                                         self.instance_ids, subjects):
            self.v.add("(d) stream lease left", f"stream_leases row {lease['id']} of instance {lease['instance_id']} "
                                                f"for {lease['subjects']}, expected none")

    def _door_counts(self, p: Person) -> str:
        """Evidence: what this user's successful requests went through."""
        counts = Counter(o.op.door + ("/left" if o.status == "left" else "") for o in self.outcomes
                         if o.op.user == p.index and not o.op.stranger and (o.ok or o.status == "left"))
        return "accepted requests by door: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))

    # -- (e) nothing left live ------------------------------------------------------------------------

    async def live(self, when: str) -> None:
        for r in await self.db.fetch("""
                SELECT id, user_id, status, left(content, 40) AS content, instance_id FROM messages
                WHERE user_id = ANY($1) AND status IN ('pending', 'streaming')""", self.users):
            self.v.add("(e) message left live", f"{when}: message {r['id']} of {self.who(r['user_id'])} is "
                                                 f"{r['status']} (instance {r['instance_id']}, content "
                                                 f"{r['content']!r})")


async def sample_stream_counts(db: asyncpg.Pool, people: list[Person], violations: Violations,
                               stop: asyncio.Event) -> None:
    """While the run goes on: no stream counter above its cap, at any moment looked at."""
    caps = {f"u:{p.id}": (f"u{p.index}", USER_CAPS["max_concurrent_streams"]) for p in people}
    caps.update({f"k:{p.key_id}": (f"u{p.index}'s key", p.cap("max_concurrent_streams")) for p in people})
    seen: set[tuple[str, int]] = set()
    while not stop.is_set():
        for r in await db.fetch("SELECT subject, streams FROM stream_counts WHERE subject = ANY($1)", list(caps)):
            name, cap = caps[r["subject"]]
            if cap is not None and r["streams"] > cap and (r["subject"], r["streams"]) not in seen:
                seen.add((r["subject"], r["streams"]))
                violations.add("(b) stream count over its cap", f"{name}: stream_counts.streams = {r['streams']} > "
                                                                 f"max_concurrent_streams {cap}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
