"""A reply with reasoning events among its deltas keeps every event's seq on every path that rebuilds it.

Reasoning events take seqs between the deltas (gateway/generation/task.py), so "delta k is chunk
k" no longer holds: the live log, a finished reply's replay, a live reply's checkpoints read by
another instance, and a reply recovered from its checkpoint after its instance died must all
number the same events alike, or a browser resuming with Last-Event-ID gets text twice or never.
The upstream is a local OpenAI-compatible server streaming `reasoning_content` among the content;
each test compares exact SSE bytes against what the live listeners got.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from gateway.fleet.follow import checkpointed_events
from gateway.generation.durability import fallbacks
from gateway.generation.replay import replay_events
from gateway.generation.task import Generation
from gateway.state import GENERATIONS
from gateway.store import messages as message_store
from gateway.store.messages import (
    Checkpoint,
    FinishRecord,
    StoredTurn,
    TurnRequest,
    checkpoint_many,
    finish_many,
    persist_turns,
)
from gateway.store.usage import UsageRecord
from gateway.vocabulary import MessageStatus
from tests.support.chat import DONE, RETRY, frame, row, stream_path, usage_json, wait_finished
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import openai_reasoning_stream, parse_sse
from tests.support.fleet import GatewayProcess, RedisServer, gateway_env, read_events, without_pings

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

# item k of the script is the reply's event k + 1 (metadata is 0)
SCRIPT = [("reasoning", "Let me think. "), ("content", "Once "), ("reasoning", "A story, then. "),
          ("reasoning", "A short one. "), ("content", "upon "), ("content", "a "), ("reasoning", "Go on. "),
          ("content", "time "), ("reasoning", "Nearly there. "), ("content", "there "), ("content", "was "),
          ("reasoning", "End it. "), ("content", "a stream.")]


def long_script(n: int) -> list[tuple[str, str]]:
    """`n` items, reasoning among the content at an irregular beat, reasoning first."""
    return [("reasoning", f"r{i} ") if i % 3 == 0 or i % 7 == 5 else ("content", f"c{i} ") for i in range(n)]


def content_of(script: list[tuple[str, str]]) -> str:
    return "".join(t for kind, t in script if kind == "content")


def reasoning_of(script: list[tuple[str, str]]) -> list[list[Any]]:
    """The reply's metadata.reasoning for `script`: [seq, text] of each reasoning item."""
    return [[k + 1, t] for k, (kind, t) in enumerate(script) if kind == "reasoning"]


def events_of(raw: bytes) -> list[bytes]:
    """A response body as its event blocks (pings and the retry line dropped, [DONE] dropped)."""
    body = without_pings(raw)
    body = body.removeprefix(RETRY).removesuffix(DONE)
    return [block + b"\n\n" for block in body.split(b"\n\n") if block]


def blocks(seen: list[bytes]) -> list[bytes]:
    """Blocks read live, the retry line taken off the first: event k is blocks[k]."""
    return [seen[0].removeprefix(RETRY), *seen[1:]]


def assert_numbered(mid: str, events: list[bytes]) -> None:
    """One event per seq, from 0, none twice, none missing."""
    assert [e.id for e in parse_sse(b"".join(events))] == [f"{mid}:{i}" for i in range(len(events))]


async def wait_content(db: asyncpg.Pool, mid: str, content: str) -> asyncpg.Record:
    async def checkpointed() -> bool:
        return (await row(db, mid))["content"] == content

    await wait_for(checkpointed)
    return await row(db, mid)


# -- 1. the instance dies mid-reply: the reply is recovered from its checkpoint on another instance --

async def test_resume_on_b_after_a_died_mid_reply_with_reasoning_gets_exactly_the_remaining_events(
        tmp_path: Path, gateways: list[GatewayProcess], database_url: str, stepped: Any, make_client: MakeClient,
        user: User, db: asyncpg.Pool) -> None:
    held = 8  # the role chunk and 8 items out (the last one text), then the upstream holds for good
    up = await stepped([], holds=(held + 1,), pieces=openai_reasoning_stream(SCRIPT))
    a = GatewayProcess(tmp_path / "a", gateway_env(database_url, OPENAI_BASE_URL=up.base_url, OPENAI_MODEL="fake",
                                                   CHECKPOINT_S="0.05", SWEEP_S="1000"))
    gateways.append(a)
    await a.ready()
    async with aiohttp.ClientSession(headers=user.headers) as http:
        resp = await http.post(a.url + "/api/chat", json={"content": "a story", "stream": True})
        live = blocks(await read_events(resp, 1 + held))  # metadata, then events 1..8 as A sent them
        mid = parse_sse(live[0])[0].id.rpartition(":")[0]
        assert [e.event for e in parse_sse(b"".join(live))][1:] == [
            "reasoning" if kind == "reasoning" else "message" for kind, _ in SCRIPT[:held]]
        checkpoint = await wait_content(db, mid, content_of(SCRIPT[:held]))
        a.kill()
        resp.close()
    assert checkpoint["status"] == "streaming"

    b = await make_client(OPENAI_BASE_URL=up.base_url, OPENAI_MODEL="fake", SWEEP_S="0.1")

    async def swept() -> bool:
        return (await row(db, mid))["status"] == "interrupted"

    await wait_for(swept)
    saved = await row(db, mid)
    assert saved["content"] == content_of(SCRIPT[:held])
    closing = [frame(mid, held + 1, usage_json(saved["prompt_tokens"], saved["completion_tokens"], True), "usage"),
               frame(mid, held + 2, {"finish_reason": "interrupted", "message_id": mid, "attempts": []}, "done")]
    whole = live + closing
    assert_numbered(mid, whole)
    # a browser that saw events 0..k live on A resumes on B with Last-Event-ID k: exactly the rest
    for k in range(held + 1):
        resumed = await b.get(stream_path(mid), headers={**user.headers, "Last-Event-ID": f"{mid}:{k}"})
        assert resumed.status == 200
        assert await resumed.read() == RETRY + b"".join(whole[k + 1:]) + DONE, k
    # from the start: the same events after the metadata (a swept row's metadata names no model)
    replayed = events_of(await (await b.get(stream_path(mid), headers=user.headers)).read())
    assert replayed[1:] == whole[1:]
    # what made that possible: the checkpoint kept the reasoning events' seqs, and the seq of its last event
    assert checkpoint["metadata"]["reasoning"] == reasoning_of(SCRIPT[:held])
    assert checkpoint["metadata"]["checkpoint_seq"] == held
    up.release()


# -- 2. live, followed from another instance through the checkpoints, and finished --------------------

async def test_reasoning_reply_has_the_same_events_live_from_checkpoints_and_replayed(
        stepped: Any, make_client: MakeClient, private_redis: RedisServer, user: User, db: asyncpg.Pool) -> None:
    script = long_script(300)  # more events than a live log keeps as bytes (EventLog.RECENT)
    first, second = 40, 230  # the upstream holds after 40 items, then after 230 (item 229: reasoning)
    assert script[second - 1][0] == "reasoning"
    up = await stepped([], holds=(first + 1, second + 1), pieces=openai_reasoning_stream(script))
    env = {"OPENAI_BASE_URL": up.base_url, "OPENAI_MODEL": "fake", "SWEEP_S": "1000", "CHECKPOINT_S": "0.05",
           "REDIS_URL": private_redis.url}
    a, b = await make_client(**env), await make_client(**env)
    resp = await a.post("/api/chat", json={"content": "think aloud", "stream": True}, headers=user.headers)
    head = await read_events(resp, 1 + first)
    mid = parse_sse(head[0])[0].id.rpartition(":")[0]
    on_b = await b.get(stream_path(mid), headers=user.headers)
    head_b = await read_events(on_b, 1 + first)  # through Redis
    assert head_b == head

    # Redis goes away: B follows A's reply from its checkpoints, A's listener goes on live
    private_redis.stop()
    up.step(first + 1)
    middle = await read_events(resp, second - first)
    middle_b = await read_events(on_b, second - first)
    assert middle_b == middle
    live = blocks(head + middle)  # events 0..230, as A sent them
    assert_numbered(mid, live)

    # held: every path that rebuilds the events so far gives each event its live seq and bytes
    generation = a.app[GENERATIONS].get(uuid.UUID(mid))
    assert generation is not None and generation.events.count == second + 1
    for k in range(-1, second):
        assert await first_batch(generation, k) == live[k + 1:], k
    checkpoint = await wait_content(db, mid, content_of(script[:second]))

    async def whole_checkpoint() -> bool:  # the trailing reasoning item too
        return (await row(db, mid))["metadata"].get("checkpoint_seq") == second

    await wait_for(whole_checkpoint)
    checkpoint = await row(db, mid)
    assert checkpoint["metadata"]["reasoning"] == reasoning_of(script[:second])
    for start in range(1, second + 2):
        assert [e.sse for e in checkpointed_events(dict(checkpoint), start)] == live[start:], start
    # a resume on B from an id inside the checkpoint, while A still generates: the rest, live
    resumed_b = await b.get(stream_path(mid), headers={**user.headers, "Last-Event-ID": f"{mid}:100"})
    resumed_head = blocks(await read_events(resumed_b, second - 100))
    assert resumed_head == live[101:]

    private_redis.start()
    up.release()
    rest = events_of(await resp.read())
    rest_b = events_of(await on_b.read())
    assert rest_b == rest
    whole = live + rest
    assert_numbered(mid, whole)
    assert blocks(resumed_head) + events_of(await resumed_b.read()) == whole[101:]
    saved = await wait_finished(db, mid)
    assert (saved["status"], saved["content"]) == ("complete", content_of(script))
    assert saved["metadata"]["reasoning"] == reasoning_of(script)
    assert [e.event for e in parse_sse(b"".join(whole))][-2:] == ["usage", "done"]

    # finished: the replay from the row, from every id, equals the live stream
    for k in range(-1, len(whole)):
        assert [e.sse for e in replay_events(dict(saved), k)] == whole[k + 1:], k
    # ... and the finished log on A, re-making the old deltas around the reasoning it kept
    for k in range(-1, len(whole)):
        got = [e.sse async for batch in generation.follow(k) for e in batch]
        assert got == whole[k + 1:], k
    for client in (a, b):
        replay = await client.get(stream_path(mid), headers=user.headers)
        assert await replay.read() == RETRY + b"".join(whole) + DONE
        for k in (0, 1, 2, 57, 100, second, len(whole) - 3):
            resumed = await client.get(stream_path(mid), headers={**user.headers, "Last-Event-ID": f"{mid}:{k}"})
            assert await resumed.read() == RETRY + b"".join(whole[k + 1:]) + DONE, k
    assert orjson.loads(parse_sse(whole[1])[0].data) == {"delta": script[0][1]}


# -- 3. a finish that keeps no text leaves no checkpointed events behind ------------------------------

async def test_a_finish_saved_without_its_text_drops_the_checkpoints_chunks_and_reasoning(
        user: User, db: asyncpg.Pool) -> None:
    # a live reply, checkpointed with a reasoning event and two chunks
    [stored] = await persist_turns(db, [TurnRequest(user_id=user.id, content="hi", client_message_id=None,
                                                    thread_id=None, instance_id=uuid.uuid4())])
    assert isinstance(stored, StoredTurn)
    mid = stored.assistant_message_id
    assert await checkpoint_many(db, [Checkpoint(message_id=mid, content="Hello", chunks=[3, 2], seq=3,
                                                 reasoning=[[1, "Hm. "]])]) == 1
    # its finish, refused for good (a NUL), is saved as the bare reply: no text, no chunks, no reasoning
    record = FinishRecord(
        usage=UsageRecord(message_id=mid, user_id=user.id, api_key_id=None, model="m", provider="p",
                          prompt_tokens=1, completion_tokens=2, estimated=False, cost_usd=0.0,
                          day=datetime.now(UTC).date()),
        status=MessageStatus.COMPLETE, content="Hel\x00lo", ttft_ms=1, latency_ms=2, error=None,
        metadata={"chunks": [4, 2], "reasoning": [[1, "Hm. "]], "finish_reason": "stop"})
    bare = fallbacks(record)[1]
    assert bare.content == "" and "chunks" not in bare.metadata
    assert await finish_many(db, [bare]) == (1, 1)
    saved = await message_store.get_message(db, user.id, mid)
    assert saved["content"] == "" and not {"chunks", "reasoning", "checkpoint_seq"} & saved["metadata"].keys()
    # its replay: the head and the error, not deltas of a text the row no longer holds
    assert [(e.seq, e.name) for e in replay_events(saved)] == [(0, "metadata"), (1, "error")]


async def first_batch(generation: Generation, after: int) -> list[bytes]:
    """What a listener of the live generation gets at once after `after` (then it would wait for more)."""
    follow = generation.follow(after)
    try:
        return [e.sse for e in await anext(follow)]
    finally:
        await follow.aclose()
