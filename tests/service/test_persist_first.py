"""Persist first, then decide: a policy stop keeps the user's message and saves a
`refused` reply; only the abuse limits (requests per minute, body size, malformed input) answer
before anything is written.

The concurrency half (50 requests against a cap that fits 10: 10 generations, exactly the cap,
50 user messages, 40 refused replies) is tests/test_policy.py::
test_fifty_concurrent_requests_never_exceed_a_cap_that_fits_ten.
"""

from __future__ import annotations

import uuid

import asyncpg
import orjson

from tests.support.chat import (
    DONE,
    ONE_TURN,
    RETRY,
    TURN,
    daily_error,
    first_metadata,
    frame,
    no_live,
    refused_stream,
    spend_the_day,
    tomorrow,
)
from tests.support.common import wait_for


async def rows(db: asyncpg.Pool, user_id: uuid.UUID) -> list[tuple[str, str, str]]:
    found = await db.fetch("SELECT role, status, content FROM messages WHERE user_id = $1 ORDER BY seq", user_id)
    return [tuple(r) for r in found]


async def test_a_refused_stream_is_metadata_a_policy_error_and_done_byte_for_byte(make_client, config_file,
                                                                                 user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(ONE_TURN), DEMO_CHUNKS="10")
    await spend_the_day(client, user, db)
    resp = await client.post("/api/chat", headers=user.headers, json={**TURN, "stream": True,
                                                                        "content": "still there?"})
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    body = await resp.read()
    meta = first_metadata(body)
    mid = meta["message_id"]
    assert body == refused_stream(mid, meta["thread_id"], meta["user_message_id"], daily_error())
    # the user's words are kept, the reply says what happened; no provider was called, nothing counted
    assert (await rows(db, user.id))[2:] == [("user", "complete", "still there?"), ("assistant", "refused", "")]
    assert await db.fetchval("SELECT count(*) FROM usage WHERE message_id = $1::uuid", mid) == 0
    reply = await (await client.get(f"/api/messages/{mid}", headers=user.headers)).json()
    assert (reply["status"], reply["error"], reply["prompt_tokens"]) == ("refused", daily_error(), None)
    assert (reply["metadata"]["reason"], reply["metadata"]["reset_at"]) == ("daily_tokens", tomorrow())
    # the stream endpoint replays the same bytes; resuming after the metadata gets the error alone
    replay = await client.get(f"/api/messages/{mid}/stream", headers=user.headers)
    assert await replay.read() == body
    resumed = await client.get(f"/api/messages/{mid}/stream", headers={**user.headers, "Last-Event-ID": f"{mid}:0"})
    assert await resumed.read() == RETRY + frame(mid, 1, daily_error(), "error") + DONE
    finished = await client.get(f"/api/messages/{mid}/stream", headers={**user.headers, "Last-Event-ID": f"{mid}:1"})
    assert finished.status == 204


async def test_the_202_form_answers_202_and_the_thread_shows_the_refused_reply(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(ONE_TURN), DEMO_CHUNKS="10")
    await spend_the_day(client, user, db)
    resp = await client.post("/api/chat", headers=user.headers, json={**TURN, "content": "later, then"})
    assert resp.status == 202
    answer = await resp.json()
    assert (answer["status"], answer["duplicate"], answer["message"]["content"]) == ("accepted", False, "later, then")
    # the stream_url (an EventSource's way in) replays the refusal too
    streamed = await (await client.get(answer["stream_url"])).read()
    assert streamed == refused_stream(answer["assistant_message_id"], answer["thread_id"], answer["message"]["id"],
                                      daily_error())
    thread = await (await client.get(f"/api/threads/{answer['thread_id']}", headers=user.headers)).json()
    assert [(m["role"], m["status"], m["content"]) for m in thread["messages"]] == [
        ("user", "complete", "later, then"), ("assistant", "refused", "")]


async def test_a_retry_of_a_refused_turn_returns_the_same_rows_and_gets_no_second_decision(
        make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(ONE_TURN), DEMO_CHUNKS="10")
    await spend_the_day(client, user, db)
    body = {**TURN, "client_message_id": "send-1", "stream": True}
    first = await (await client.post("/api/chat", headers=user.headers, json=body)).read()
    # a bigger budget now: a second decision would run it, but a retry is not a new turn
    roomier = await make_client(GATEWAY_CONFIG=config_file("[limits]\ndaily_tokens = 1000\n"), DEMO_CHUNKS="10")
    again = await (await roomier.post("/api/chat", headers=user.headers, json=body)).read()
    assert again == first and b'"type":"policy"' in first
    accepted = await (await roomier.post("/api/chat", headers=user.headers,
                                         json={**body, "stream": False})).json()
    assert accepted["duplicate"] is True
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 4
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 1


async def test_a_per_minute_limit_stays_at_the_edge_and_writes_nothing(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file("[limits]\nrequests_per_minute = 1\n"))
    assert (await client.post("/api/chat", headers=user.headers, json={"content": "one"})).status == 202
    await wait_for(lambda: no_live(db, user.id))
    before = await rows(db, user.id)
    refused = await client.post("/api/chat", headers=user.headers,
                                json={"content": "two", "client_message_id": "two", "stream": True})
    assert refused.status == 429 and refused.headers["Content-Type"].startswith("application/json")
    assert (await refused.json())["error"]["type"] == "rate_limited"
    assert await rows(db, user.id) == before  # nothing of "two"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND client_message_id = 'two'",
                             user.id) == 0


async def test_a_model_the_key_may_not_use_is_a_refused_reply_that_does_not_clear(client, make_user, db):
    user = await make_user()
    await db.execute("UPDATE api_keys SET limits = $2 WHERE user_id = $1", user.id, {"models": ["other"]})
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "model": "demo",
                                                                       "stream": True})
    body = await resp.read()
    meta = first_metadata(body)
    error = {"type": "policy", "message": "this key may not use model 'demo'", "retryable": False,
             "reason": "model_not_allowed", "reset_at": None}
    assert body == refused_stream(meta["message_id"], meta["thread_id"], meta["user_message_id"], error,
                                  category=None, auto=False)


async def test_the_openai_route_keeps_its_429_and_persists_nothing(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(ONE_TURN), DEMO_CHUNKS="10")
    await spend_the_day(client, user, db)
    resp = await client.post("/v1/chat/completions", headers=user.headers, json={
        "model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10})
    assert resp.status == 429
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 2


async def test_the_websocket_gets_the_refused_reply_as_frames(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(ONE_TURN), DEMO_CHUNKS="10")
    await spend_the_day(client, user, db)
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        await ws.send_json({"type": "chat", **TURN})
        frames = []
        while not frames or frames[-1]["event"] != "end":
            frames.append(orjson.loads(await ws.receive_str()))
    assert [f["event"] for f in frames] == ["accepted", "metadata", "error", "end"]
    assert frames[2]["data"] == daily_error()


async def test_a_stored_response_is_kept_and_refused_and_answered_429_as_before(make_client, config_file, user, db):
    # the Responses API with store (its default) persists the turn: persist first holds there too,
    # while the HTTP answer stays what an OpenAI SDK expects of a limit
    client = await make_client(GATEWAY_CONFIG=config_file(ONE_TURN), DEMO_CHUNKS="10")
    await spend_the_day(client, user, db)
    resp = await client.post("/v1/responses", headers=user.headers,
                             json={"model": "demo", "input": "kept anyway", "max_output_tokens": 10})
    assert resp.status == 429
    error = (await resp.json())["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert (await rows(db, user.id))[2:] == [("user", "complete", "kept anyway"), ("assistant", "refused", "")]
