"""POST /api/messages/{user_message_id}/regenerate: a new reply to a saved user
message, decided by the policy and streamed exactly like POST /api/chat; every reply is kept."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from gateway.providers.base import estimate_tokens
from gateway.providers.demo import demo_reply
from gateway.store import messages as message_store
from tests.support.chat import (
    ONE_TURN,
    TURN,
    daily_error,
    expected_stream,
    fake_client,
    first_metadata,
    no_live,
    ok_attempt,
    refused_stream,
    row,
    spend_the_day,
    wait_finished,
)
from tests.support.common import User, wait_for
from tests.support.fakes import FakeUpstream, Reply, openai_stream


async def regenerate(client: TestClient, user: User, user_message_id: str, status: int | None = None,
                     **body: Any) -> Any:
    """The stream's bytes (`stream`: true) or the 202 body."""
    resp = await client.post(f"/api/messages/{user_message_id}/regenerate", headers=user.headers, json=body)
    assert resp.status == (status or (200 if body.get("stream") else 202)), await resp.text()
    return await resp.read() if body.get("stream") else await resp.json()


async def replies(db: asyncpg.Pool, user_message_id: str) -> list[tuple[str, str]]:
    found = await db.fetch("SELECT status, content FROM messages WHERE reply_to = $1 ORDER BY seq",
                           uuid.UUID(user_message_id))
    return [tuple(r) for r in found]


async def test_a_refused_reply_regenerated_later_streams_exactly_like_post_chat_and_both_are_kept(
        make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(ONE_TURN), DEMO_CHUNKS="10")
    await spend_the_day(client, user, db)
    refused = await (await client.post("/api/chat", headers=user.headers, json=TURN)).json()
    umid = refused["message"]["id"]
    # still over the cap: the regenerate is decided like any turn, and refused again (a new row)
    again = await regenerate(client, user, umid, stream=True)
    meta = first_metadata(again)
    assert meta["message_id"] != refused["assistant_message_id"]
    assert again == refused_stream(meta["message_id"], refused["thread_id"], umid, daily_error())
    # the budget clears (here: a larger cap): the reply runs
    roomier = await make_client(GATEWAY_CONFIG=config_file("[limits]\ndaily_tokens = 1000\n"), DEMO_CHUNKS="10")
    body = await regenerate(roomier, user, umid, stream=True)
    meta = first_metadata(body)
    saved = await row(db, meta["message_id"])
    assert (meta["thread_id"], meta["user_message_id"]) == (refused["thread_id"], umid)
    # the conversation so far is the other thread's; this thread holds just this message
    assert body == expected_stream(meta, "demo", "demo", demo_reply("hello", 10), estimate_tokens("hello"), 10,
                                   ok_attempt(saved, "demo", "demo"))
    assert await replies(db, umid) == [("refused", ""), ("refused", ""), ("complete", "".join(demo_reply("hello",
                                                                                                         10)))]
    # resumable like any reply: the stream endpoint replays the same bytes
    replay = await roomier.get(f"/api/messages/{meta['message_id']}/stream", headers=user.headers)
    assert await replay.read() == body
    # one usage row per reply that ran (the refusals consumed nothing), counted once in the day
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 2
    assert await db.fetchval("SELECT tokens FROM daily_usage WHERE user_id = $1", user.id) == 24
    # the thread shows every reply, with its status, after the message it answers
    thread = await (await roomier.get(f"/api/threads/{refused['thread_id']}", headers=user.headers)).json()
    assert [(m["role"], m["status"]) for m in thread["messages"]] == [
        ("user", "complete"), ("assistant", "refused"), ("assistant", "refused"), ("assistant", "complete")]
    assert {m["reply_to"] for m in thread["messages"][1:]} == {umid}


async def test_the_upstream_gets_the_thread_up_to_that_message_and_the_newest_reply_of_each(
        make_client, upstream: FakeUpstream, user, db):
    client = await fake_client(make_client, upstream)
    upstream.queue(Reply(openai_stream(["one"])), Reply(status=500, body=b'{"error": "down"}'),
                   Reply(openai_stream(["three"])))
    first = await (await client.post("/api/chat", headers=user.headers, json={"content": "first"})).json()
    await wait_finished(db, first["assistant_message_id"])
    thread = first["thread_id"]
    second = await (await client.post("/api/chat", headers=user.headers,
                                      json={"content": "second", "thread_id": thread})).json()
    assert (await wait_finished(db, second["assistant_message_id"]))["status"] == "failed"
    third = await (await client.post("/api/chat", headers=user.headers,
                                     json={"content": "third", "thread_id": thread})).json()
    await wait_finished(db, third["assistant_message_id"])
    # regenerate "second": its history stops at it (no "third"), and its failed reply is not in it
    upstream.queue(Reply(openai_stream(["two"])))
    made = await regenerate(client, user, second["message"]["id"])
    assert (made["duplicate"], made["thread_id"]) == (False, thread)
    await wait_finished(db, made["assistant_message_id"])
    assert upstream.requests[-1]["messages"] == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"}]
    # regenerate "first" (a complete reply may be regenerated too: both are kept)
    upstream.queue(Reply(openai_stream(["ONE"])))
    made = await regenerate(client, user, first["message"]["id"])
    await wait_finished(db, made["assistant_message_id"])
    assert upstream.requests[-1]["messages"] == [{"role": "user", "content": "first"}]
    assert await replies(db, first["message"]["id"]) == [("complete", "one"), ("complete", "ONE")]
    # a new turn sees each message once, with its newest complete reply, in the thread's order
    upstream.queue(Reply(openai_stream(["four"])))
    fourth = await (await client.post("/api/chat", headers=user.headers,
                                      json={"content": "fourth", "thread_id": thread})).json()
    await wait_finished(db, fourth["assistant_message_id"])
    assert upstream.requests[-1]["messages"] == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "ONE"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"},
        {"role": "user", "content": "third"}, {"role": "assistant", "content": "three"},
        {"role": "user", "content": "fourth"}]


async def test_a_live_reply_cannot_be_regenerated(make_client, upstream: FakeUpstream, user, db):
    client = await fake_client(make_client, upstream)
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["slow"]), hold_at=1, release=release))
    turn = await (await client.post("/api/chat", headers=user.headers, json={"content": "wait"})).json()
    await wait_for(lambda: _upstream_called(upstream))
    answer = await client.post(f"/api/messages/{turn['message']['id']}/regenerate", headers=user.headers)
    assert answer.status == 409 and (await answer.json())["error"]["type"] == "conflict"
    release.set()
    await wait_finished(db, turn["assistant_message_id"])
    assert await replies(db, turn["message"]["id"]) == [("complete", "slow")]
    # once it has finished it may be
    made = await regenerate(client, user, turn["message"]["id"])
    assert (await wait_finished(db, made["assistant_message_id"]))["status"] == "complete"


async def _upstream_called(upstream: FakeUpstream) -> bool:
    return bool(upstream.requests)


async def test_client_request_id_makes_one_reply_however_often_it_is_sent(client, user, db):
    turn = await (await client.post("/api/chat", headers=user.headers, json={"content": "hi"})).json()
    await wait_finished(db, turn["assistant_message_id"])
    umid = turn["message"]["id"]
    # sent four times at once (a client retrying over a flaky link): one reply, three duplicates of it
    sent = await asyncio.gather(*(regenerate(client, user, umid, client_request_id="again-1") for _ in range(4)))
    assert sorted(r["duplicate"] for r in sent) == [False, True, True, True]
    assert len({r["assistant_message_id"] for r in sent}) == 1
    again = await regenerate(client, user, umid, client_request_id="again-1")
    assert (again["duplicate"], again["assistant_message_id"]) == (True, sent[0]["assistant_message_id"])
    await wait_for(lambda: no_live(db, user.id))
    assert len(await replies(db, umid)) == 2
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 2
    # the same id for another message's reply is a conflict, not a second meaning
    other = await (await client.post("/api/chat", headers=user.headers, json={"content": "other"})).json()
    await wait_finished(db, other["assistant_message_id"])
    await regenerate(client, user, other["message"]["id"], status=409, client_request_id="again-1")


async def test_what_cannot_be_regenerated_is_a_clear_4xx_and_writes_nothing(client, make_user, user, db):
    turn = await (await client.post("/api/chat", headers=user.headers, json={"content": "hi"})).json()
    await wait_finished(db, turn["assistant_message_id"])
    before = await db.fetchval("SELECT count(*) FROM messages")
    stranger = await make_user()
    cases = [
        (stranger, turn["message"]["id"], {}, 404),  # another user's message
        (user, turn["assistant_message_id"], {}, 404),  # an assistant message
        (user, str(uuid.uuid4()), {}, 404),
        (user, "not-a-uuid", {}, 400),
        (user, turn["message"]["id"], {"model": "no-such-model"}, 400),
        (user, turn["message"]["id"], {"client_request_id": ""}, 400),
        (user, turn["message"]["id"], {"stream": "yes"}, 400),
    ]
    for who, mid, body, status in cases:
        resp = await client.post(f"/api/messages/{mid}/regenerate", headers=who.headers, json=body)
        assert resp.status == status, (mid, body, await resp.text())
    bad = await client.post(f"/api/messages/{turn['message']['id']}/regenerate", headers=user.headers,
                            data=b"{nope")
    assert bad.status == 400
    assert await db.fetchval("SELECT count(*) FROM messages") == before


async def test_an_arena_turn_is_not_regenerated(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file('[models.other]\nprovider = "demo"\n'), DEMO_CHUNKS="2")
    answer = await (await client.post("/api/arena", headers=user.headers,
                                      json={"content": "hi", "models": ["demo", "other"]})).json()
    await wait_for(lambda: no_live(db, user.id))
    resp = await client.post(f"/api/messages/{answer['message']['id']}/regenerate", headers=user.headers)
    assert resp.status == 409


async def test_without_a_model_it_asks_for_what_the_last_reply_was_asked_for(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file('[models.other]\nprovider = "demo"\n'), DEMO_CHUNKS="2")
    turn = await (await client.post("/api/chat", headers=user.headers,
                                    json={"content": "hi", "model": "other"})).json()
    await wait_finished(db, turn["assistant_message_id"])
    same = await regenerate(client, user, turn["message"]["id"], stream=True)
    assert (first_metadata(same)["model"], first_metadata(same)["auto"]) == ("other", False)
    chosen = await regenerate(client, user, turn["message"]["id"], stream=True, model="demo")
    assert first_metadata(chosen)["model"] == "demo"
    # the 202 form, as POST /api/chat answers it
    accepted = await regenerate(client, user, turn["message"]["id"])
    assert set(accepted) == {"status", "message", "duplicate", "thread_id", "assistant_message_id", "stream_url"}
    streamed = await (await client.get(accepted["stream_url"])).read()
    assert first_metadata(streamed)["model"] == "demo"


async def test_history_reads_a_window_of_the_newest_turns_each_with_its_newest_reply(db, user):
    thread_id = await db.fetchval("INSERT INTO threads (user_id, title) VALUES ($1, 't') RETURNING id", user.id)

    async def message(role: str, content: str, reply_to: uuid.UUID | None = None,
                      status: str = "complete") -> dict[str, Any]:
        found = await db.fetchrow("INSERT INTO messages (thread_id, user_id, role, content, status, reply_to) "
                                  "VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, seq", thread_id, user.id, role,
                                  content, status, reply_to)
        return dict(found)

    asked = []
    for n in range(1, 61):
        asked.append(await message("user", f"u{n}"))
        await message("assistant", f"a{n}", asked[-1]["id"])
    await message("assistant", "a59 again", asked[58]["id"])  # regenerated, newer than turn 60
    await message("assistant", "a2 again", asked[1]["id"])  # regenerated, far outside the window
    await message("assistant", "a60 failed again", asked[59]["id"], status="failed")

    def texts(rows: list[dict[str, Any]]) -> list[str]:
        return [r["content"] for r in rows]

    history = await message_store.thread_history(db, user.id, thread_id, limit=4)
    assert texts(history) == ["u59", "a59 again", "u60", "a60"]
    assert len(await message_store.thread_history(db, user.id, thread_id)) == 50
    # a regenerate of u3: what precedes it, turn 2 with its newest reply
    before = await message_store.thread_history(db, user.id, thread_id, limit=4, before=asked[2])
    assert texts(before) == ["u1", "a1", "u2", "a2 again"]
