"""Reasoning in the native stream: `reasoning` events among the deltas, kept out of the saved
content, replayed where they were, and turned into a stored response's reasoning item."""

from __future__ import annotations

from typing import Any

import orjson

from tests.support.common import MakeClient, User, wait_for
from tests.support.conformance import MODELS, SIGNATURE, THOUGHT, Upstreams
from tests.support.fakes import parse_sse


async def test_reasoning_streams_as_its_own_events_and_replays_byte_identical(
        make_client: MakeClient, config_file: Any, upstreams: Upstreams, user: User, db: Any):
    client = await make_client(GATEWAY_CONFIG=config_file(upstreams.toml()))
    upstreams.script("anthropic", "reasoning")
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "Say hello", "model": MODELS["anthropic"], "stream": True})
    assert resp.status == 200
    live = await resp.read()
    events = parse_sse(live)
    message_id = orjson.loads(events[0].data)["message_id"]
    assert [(e.id, e.event, e.data) for e in events[1:4]] == [
        (f"{message_id}:1", "reasoning", orjson.dumps({"delta": THOUGHT}).decode()),
        (f"{message_id}:2", "reasoning", orjson.dumps({"delta": "", "signature": SIGNATURE}).decode()),
        (f"{message_id}:3", "message", '{"delta":"Hello"}')]
    assert [e.event for e in events[4:]] == ["usage", "done", "message"]  # the last is [DONE]
    row = await db.fetchrow("SELECT content, metadata FROM messages WHERE id = $1::uuid", message_id)
    assert row["content"] == "Hello"
    assert row["metadata"]["reasoning"] == [[1, THOUGHT], [2, "", SIGNATURE]]
    # a replay of the finished reply is the live stream, byte for byte
    replay = await client.get(f"/api/messages/{message_id}/stream", headers=user.headers)
    assert await replay.read() == live
    resumed = await client.get(f"/api/messages/{message_id}/stream",
                               headers={**user.headers, "Last-Event-ID": f"{message_id}:1"})
    assert [e.id for e in parse_sse(await resumed.read())][:2] == [f"{message_id}:2", f"{message_id}:3"]


async def test_a_stored_response_carries_the_reasoning_item(make_client: MakeClient, config_file: Any,
                                                            upstreams: Upstreams, user: User, db: Any):
    client = await make_client(GATEWAY_CONFIG=config_file(upstreams.toml()))
    upstreams.script("openai", "reasoning")
    resp = await client.post("/v1/responses", headers=user.headers,
                             json={"model": MODELS["openai"], "input": "Say hello"})
    assert resp.status == 200
    body = await resp.json()
    assert [item["type"] for item in body["output"]] == ["message", "reasoning"]  # as with store: false
    assert body["output"][1]["content"] == [{"type": "reasoning_text", "text": THOUGHT}]
    assert body["output_text"] == "Hello"
    await wait_for(lambda: _finished(db, user))
    again = await (await client.get(f"/v1/responses/{body['id']}", headers=user.headers)).json()
    assert again["output"] == body["output"]  # retrieved from the row, reasoning included


async def _finished(db: Any, user: User) -> bool:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND role = 'assistant' "
                             "AND status = 'streaming'", user.id) == 0
