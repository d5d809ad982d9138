"""Arena comparisons as tests drive them: two upstreams, accept, vote, wait for the pair."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import orjson
from aiohttp.test_utils import TestClient

from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream
from tests.support.providers import model_toml, openai_provider_toml

RETRY = b"retry: 3000\n"  # rides in the first event's block


DONE = b"data: [DONE]\n\n"


SLOTS = ("a", "b")


def two_upstreams_toml(url_a: str, url_b: str, **alpha: Any) -> str:
    """`alpha` on provider pa (the first fake upstream), `beta` on pb (the second); `alpha` may
    carry timeouts and fallbacks (`fallbacks=("demo",)`)."""
    fallbacks = tuple(alpha.pop("fallbacks", ()))
    return (openai_provider_toml("pa", url_a, "sk-a") + openai_provider_toml("pb", url_b, "sk-b")
            + model_toml("alpha", "pa", "up-alpha", fallbacks, **alpha) + model_toml("beta", "pb", "up-beta"))


def demo_models_toml(*names: str, disable_demo: bool = False, limits: str = "") -> str:
    """Models served by the built-in demo provider under their own names."""
    text = "".join(f'[models.{n}]\nprovider = "demo"\n\n' for n in names)
    if disable_demo:
        text += '[models.demo]\nprovider = "demo"\nenabled = false\n\n'
    return text + limits


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def split_frames(body: bytes) -> list[bytes]:
    return [block + b"\n\n" for block in body.split(b"\n\n") if block]


class ArenaStream:
    """An arena SSE body, checked as it is read: retry first, `data: [DONE]` once and last, and
    every id naming both slots' positions with exactly the tagged slot advancing by one."""

    def __init__(self, body: bytes, comparison_id: str, start: tuple[int, int] = (-1, -1),
                 retry: bool = True) -> None:
        if retry:
            assert body.startswith(RETRY + b"id: "), body[:200]
            body = body.removeprefix(RETRY)
        blocks = split_frames(body)
        assert blocks[-1] == DONE and DONE not in blocks[:-1], body[-300:]
        self.slots: dict[str, list[bytes]] = {"a": [], "b": []}
        self.ids: list[str] = []
        self.order: list[tuple[str, str]] = []  # (slot, event name) in stream order
        pos = dict(zip(SLOTS, start, strict=True))
        for block in blocks[:-1]:
            id_line, _, rest = block.partition(b"\n")
            data_line = next(line for line in rest.split(b"\n") if line.startswith(b"data: "))
            slot = orjson.loads(data_line[len(b"data: "):])["slot"]
            pos[slot] += 1
            expected_id = f"{comparison_id}:{pos['a']}:{pos['b']}"
            assert id_line == b"id: " + expected_id.encode(), (id_line, expected_id)
            self.ids.append(expected_id)
            self.slots[slot].append(rest)
            event = rest.partition(b"\n")[0][len(b"event: "):].decode() if rest.startswith(b"event: ") else "message"
            self.order.append((slot, event))

    def data(self, slot: str, event: str) -> list[dict[str, Any]]:
        out = []
        for frame in self.slots[slot]:
            name = frame.partition(b"\n")[0][len(b"event: "):].decode() if frame.startswith(b"event: ") else "message"
            if name == event:
                out.append(orjson.loads(frame.rstrip(b"\n").rpartition(b"data: ")[2]))
        return out

    def metadata(self, slot: str) -> dict[str, Any]:
        return self.data(slot, "metadata")[0]

    def text(self, slot: str) -> str:
        return "".join(d["delta"] for d in self.data(slot, "message"))


async def comparison_id_of(db: asyncpg.Pool, user_message_id: str) -> str:
    return str(await db.fetchval("SELECT id FROM comparisons WHERE user_message_id = $1",
                                 uuid.UUID(user_message_id)))


async def stream_arena(client: TestClient, user: User, db: asyncpg.Pool,
                       **body: Any) -> tuple[ArenaStream, str, bytes]:
    """POST /api/arena streaming: the checked stream, the comparison id and the raw body."""
    resp = await client.post("/api/arena", json={"stream": True, **body}, headers=user.headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/event-stream"
    raw = await resp.read()
    first = orjson.loads(split_frames(raw)[0].rpartition(b"data: ")[2])
    cid = await comparison_id_of(db, first["user_message_id"])
    return ArenaStream(raw, cid), cid, raw


async def accept_arena(client: TestClient, user: User, status: int = 202, **body: Any) -> dict[str, Any]:
    resp = await client.post("/api/arena", json=body, headers=user.headers)
    assert resp.status == status, await resp.text()
    return await resp.json()


async def row(db: asyncpg.Pool, message_id: uuid.UUID | str) -> asyncpg.Record:
    return await db.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(str(message_id)))


async def wait_comparison_finished(db: asyncpg.Pool, comparison_id: str) -> None:
    async def finished() -> bool:
        return await db.fetchval("""
            SELECT count(*) FROM comparisons c JOIN messages m ON m.id IN (c.message_a, c.message_b)
            WHERE c.id = $1 AND m.status NOT IN ('pending', 'streaming')""", uuid.UUID(comparison_id)) == 2

    await wait_for(finished)


async def vote(client: TestClient, user: User, comparison_id: str, winner: Any) -> Any:
    return await client.post(f"/api/comparisons/{comparison_id}/vote", json={"winner": winner},
                             headers=user.headers)


async def fake_pair_client(make_client: MakeClient, config_file: Any, upstream: FakeUpstream,
                           upstream_b: FakeUpstream, **alpha: Any) -> TestClient:
    return await make_client(GATEWAY_CONFIG=config_file(two_upstreams_toml(upstream.base_url,
                                                                            upstream_b.base_url, **alpha)))
