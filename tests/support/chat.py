"""The native chat stream as tests read it: frames, rows, scripted and gated upstreams, resumption."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.providers.base import estimate_tokens
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream, openai_stream, parse_sse

RETRY = b"retry: 3000\n"  # rides in the first event's block


DONE = b"data: [DONE]\n\n"


def frame(mid: uuid.UUID | str, seq: int, data: Any, event: str | None = None) -> bytes:
    head = f"id: {mid}:{seq}\n" + (f"event: {event}\n" if event else "")
    return head.encode() + b"data: " + orjson.dumps(data) + b"\n\n"


def metadata(meta: dict[str, Any], model: str, provider: str, category: str | None = "general",
             auto: bool = True) -> dict[str, Any]:
    """The metadata event's data, in wire order, with the ids the stream announced."""
    return {"thread_id": meta["thread_id"], "user_message_id": meta["user_message_id"],
            "message_id": meta["message_id"], "model": model, "provider": provider, "category": category,
            "auto": auto, "fallback_from": None}


def expected_stream(meta: dict[str, Any], model: str, provider: str, texts: list[str], prompt_tokens: int,
                    completion_tokens: int, attempts: list[dict[str, Any]]) -> bytes:
    """A whole successful stream: retry, metadata, deltas, usage, done, [DONE]."""
    mid = meta["message_id"]
    frames = [frame(mid, 0, metadata(meta, model, provider), "metadata")]
    frames += [frame(mid, i, {"delta": t}) for i, t in enumerate(texts, 1)]
    n = len(texts) + 1
    frames.append(frame(mid, n, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}, "usage"))
    frames.append(frame(mid, n + 1, {"finish_reason": "stop", "message_id": mid, "attempts": attempts}, "done"))
    return RETRY + b"".join(frames) + DONE


def first_metadata(body: bytes) -> dict[str, Any]:
    events = parse_sse(body)
    assert events[0].event == "metadata", body[:200]
    return orjson.loads(events[0].data)


def ok_attempt(row: asyncpg.Record, model: str, provider: str) -> list[dict[str, Any]]:
    """The done event's attempts: one successful try, with the duration the row saved."""
    saved = row["metadata"]["attempts"]
    assert len(saved) == 1 and isinstance(saved[0]["ms"], int) and saved[0]["ms"] >= 0
    return [{"model": model, "provider": provider, "outcome": "ok", "ms": saved[0]["ms"]}]


async def fake_client(make_client: MakeClient, upstream: FakeUpstream, **env: str) -> TestClient:
    """An app whose default model is `fake`, served by the fake OpenAI-compatible upstream."""
    return await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_MODEL="fake", **env)


async def row(db: asyncpg.Pool, message_id: uuid.UUID | str) -> asyncpg.Record:
    return await db.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(str(message_id)))


async def wait_finished(db: asyncpg.Pool, message_id: uuid.UUID | str) -> asyncpg.Record:
    async def finished() -> bool:
        return (await row(db, message_id))["status"] not in ("pending", "streaming")

    await wait_for(finished)
    return await row(db, message_id)


async def usage_rows(db: asyncpg.Pool, message_id: uuid.UUID | str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM usage WHERE message_id = $1", uuid.UUID(str(message_id)))


async def accept_chat(client: TestClient, user: User, **body: Any) -> dict[str, Any]:
    resp = await client.post("/api/chat", json=body, headers=user.headers)
    assert resp.status == 202, await resp.text()
    return await resp.json()


TEXTS = ["Once ", "upon ", "a ", "time ", "there ", "was ", "a ", "stream."]


PROMPT_TOKENS = 7  # what the fake upstream reports


class GatedUpstream:
    """An OpenAI-compatible upstream on loopback: streams `texts` (exact OpenAI wire bytes), holds
    after `hold_at` of them until `release()`, counts the pieces it got out, and notices when the
    gateway hangs up on it (its next write fails)."""

    def __init__(self, texts: list[str], hold_at: int | None = None) -> None:
        self.texts = texts
        self.pieces = openai_stream(texts, prompt_tokens=PROMPT_TOKENS)
        # the role chunk comes first: holding "at k" means the role chunk and k texts are out
        self.hold_before = None if hold_at is None else hold_at + 1
        self.gate = asyncio.Event()
        self.requests = 0
        self.sent = 0
        self.hung_up = asyncio.Event()
        self.server: Any = None
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))

    def release(self) -> None:
        self.gate.set()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i, piece in enumerate(self.pieces):
                if i == self.hold_before:
                    await self.gate.wait()
                await resp.write(piece)
                self.sent += 1
            await resp.write_eof()
        except ConnectionResetError:
            self.hung_up.set()
        except asyncio.CancelledError:  # the test server cancels the handler of a closed connection
            self.hung_up.set()
            raise
        return resp


MakeUpstream = Callable[..., Awaitable[GatedUpstream]]


@pytest.fixture
def gated(aiohttp_server: Any) -> MakeUpstream:
    async def make(texts: list[str], hold_at: int | None = None) -> GatedUpstream:
        fake = GatedUpstream(texts, hold_at)
        fake.server = await aiohttp_server(fake.app)
        return fake

    return make


async def gated_client(make_client: MakeClient, up: GatedUpstream, **env: str) -> TestClient:
    """An app whose default model `fake` is served by `up`."""
    return await make_client(OPENAI_BASE_URL=up.base_url, OPENAI_MODEL="fake", **env)


def usage_json(prompt: int, completion: int, estimated: bool) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if estimated:
        usage["estimated"] = True
    return usage


def saved_attempts(saved: asyncpg.Record, outcome: str) -> list[dict[str, Any]]:
    """The done event's attempts, in wire key order, with the one duration the row recorded."""
    attempts = saved["metadata"]["attempts"]
    assert [a["outcome"] for a in attempts] == [outcome]
    return [{"model": a["model"], "provider": a["provider"], "outcome": a["outcome"], "ms": a["ms"]}
            for a in attempts]


def reply_frames(saved: asyncpg.Record, texts: list[str], usage: dict[str, Any], finish_reason: str,
                 outcome: str) -> list[bytes]:
    """Every event of a finished reply, index = event seq, built from the protocol."""
    mid = str(saved["id"])
    meta = {"thread_id": str(saved["thread_id"]), "user_message_id": str(saved["reply_to"]), "message_id": mid}
    frames = [frame(mid, 0, metadata(meta, saved["model"], saved["provider"], saved["metadata"]["category"],
                                     saved["metadata"]["auto"]), "metadata")]
    frames += [frame(mid, i, {"delta": t}) for i, t in enumerate(texts, 1)]
    frames.append(frame(mid, len(frames), usage, "usage"))
    frames.append(frame(mid, len(frames), {"finish_reason": finish_reason, "message_id": mid,
                                           "attempts": saved_attempts(saved, outcome)}, "done"))
    return frames


def complete_frames(saved: asyncpg.Record, texts: list[str]) -> list[bytes]:
    """A reply the gated upstream finished: its usage is the upstream's report."""
    return reply_frames(saved, texts, usage_json(PROMPT_TOKENS, len(texts), False), "stop", "ok")


def stopped_frames(saved: asyncpg.Record, prompt: str, texts: list[str], reason: str) -> list[bytes]:
    """A reply stopped early (cancelled, interrupted): usage estimated from what was consumed."""
    content = "".join(texts)
    usage = usage_json(estimate_tokens(prompt) if content else 0, estimate_tokens(content), True)
    return reply_frames(saved, texts, usage, reason, "cancelled")


def wire(frames: list[bytes]) -> bytes:
    return RETRY + b"".join(frames) + DONE


async def read_blocks(resp: Any, count: int) -> list[bytes]:
    """The next `count` SSE blocks (each with its blank-line terminator)."""
    return [await resp.content.readuntil(b"\n\n") for _ in range(count)]


async def accept(client: TestClient, user: User, content: str, **body: Any) -> dict[str, Any]:
    resp = await client.post("/api/chat", json={"content": content, **body}, headers=user.headers)
    assert resp.status == 202, await resp.text()
    return await resp.json()


def stream_path(mid: uuid.UUID | str) -> str:
    return f"/api/messages/{mid}/stream"


async def open_listeners(client: TestClient, user: User, mid: str, count: int) -> list[Any]:
    """`count` listeners from the start; each has its headers (so it is attached) when this returns."""
    resps = await asyncio.gather(*(client.get(stream_path(mid), headers=user.headers) for _ in range(count)))
    assert [r.status for r in resps] == [200] * count
    return list(resps)


# each demo turn: prompt "hello" (2 tokens) + max_tokens 10 = a worst case of 12: one fits
ONE_TURN = "[limits]\ndaily_tokens = 12\n"


TURN = {"content": "hello", "max_tokens": 10}


def tomorrow() -> str:
    return datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), UTC).isoformat()


def refused_stream(mid: str, thread_id: str, user_message_id: str, error: dict[str, Any],
                   model: str = "demo", category: str | None = "general", auto: bool = True) -> bytes:
    """A refused reply on the wire: retry, metadata (no provider: none was called), the policy's
    error event, [DONE]."""
    meta = {"thread_id": thread_id, "user_message_id": user_message_id, "message_id": mid, "model": model,
            "provider": None, "category": category, "auto": auto, "fallback_from": None}
    return RETRY + frame(mid, 0, meta, "metadata") + frame(mid, 1, error, "error") + DONE


def daily_error() -> dict[str, Any]:
    return {"type": "policy", "message": "daily token cap reached (user daily tokens)", "retryable": True,
            "reason": "daily_tokens", "reset_at": tomorrow()}


async def spend_the_day(client: TestClient, user: User, db: asyncpg.Pool) -> None:
    first = await client.post("/api/chat", headers=user.headers, json=TURN)
    assert first.status == 202
    await wait_for(lambda: no_live(db, user.id))


async def no_live(db: asyncpg.Pool, user_id: uuid.UUID) -> bool:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 "
                             "AND status IN ('pending', 'streaming')", user_id) == 0


@pytest.fixture
async def openai_sdk() -> AsyncIterator[Callable[[TestClient, str], openai.AsyncOpenAI]]:
    """The official OpenAI SDK pointed at a test app's /v1 with a key (no retries); closed after."""
    made: list[openai.AsyncOpenAI] = []

    def make(client: TestClient, key: str) -> openai.AsyncOpenAI:
        made.append(openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0))
        return made[-1]

    yield make
    for api in made:
        await api.close()
