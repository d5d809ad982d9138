"""max_concurrent_streams holds across instances: leases in PostgreSQL, taken in the admission call,
given back exactly once by the finish (whatever the ending) and by the sweep when their instance died."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
from aiohttp.test_utils import TestClient

from gateway.state import INSTANCE
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream, Reply, openai_stream, parse_sse
from tests.support.quota import dead

CAP_TOML = """
[providers.up]
kind = "openai"
base_url = "{url}"
api_key = "k"

[models.held]
provider = "up"
upstream = "fake-up"

[limits]
max_concurrent_streams = {cap}
"""


def held_reply() -> tuple[Reply, asyncio.Event]:
    """A reply that writes its role chunk, then waits for the test."""
    release = asyncio.Event()
    return Reply(openai_stream(["Hel", "lo"]), hold_at=1, release=release), release


async def app_pair(make_client: MakeClient, config_file, upstream: FakeUpstream, cap: int = 2,
                   **env: str) -> tuple[TestClient, TestClient]:
    path = config_file(CAP_TOML.format(url=upstream.base_url, cap=cap))
    a = await make_client(GATEWAY_CONFIG=path, **env)
    b = await make_client(GATEWAY_CONFIG=path, **env)
    assert a.app[INSTANCE].id != b.app[INSTANCE].id
    return a, b


async def chat(client: TestClient, user: User, content: str = "hi") -> tuple[int | str, dict]:
    """The answer's status, or "refused" for a 202 whose reply the policy stopped after the user
    message was saved (persist first; the body then carries the reply's `error`)."""
    resp = await client.post("/api/chat", headers=user.headers, json={"content": content})
    body = await resp.json()
    if resp.status == 202:
        reply = await (await client.get(f"/api/messages/{body['assistant_message_id']}", headers=user.headers)).json()
        if reply["status"] == "refused":
            return "refused", {**body, "error": reply["error"]}
    return resp.status, body


async def counters(db: asyncpg.Pool, user: User) -> dict[str, int]:
    """The stream counters of the user and of their keys."""
    rows = await db.fetch("SELECT subject, streams FROM stream_counts WHERE subject = 'u:' || $1::uuid::text "
                          "OR subject IN (SELECT 'k:' || id::text FROM api_keys WHERE user_id = $1::uuid)", user.id)
    return {r["subject"]: r["streams"] for r in rows}


async def leases(db: asyncpg.Pool, *clients: TestClient) -> list[uuid.UUID]:
    """The instance of each lease the clients' instances hold."""
    rows = await db.fetch("SELECT instance_id FROM stream_leases WHERE instance_id = ANY($1::uuid[])",
                          [c.app[INSTANCE].id for c in clients])
    return sorted(r["instance_id"] for r in rows)


async def finished(db: asyncpg.Pool, user: User, n: int) -> bool:
    """n replies ran and ended (refused ones never ran)."""
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND role = 'assistant' "
                             "AND status NOT IN ('pending', 'streaming', 'refused')", user.id) == n


async def test_two_instances_with_a_cap_of_two_refuse_a_third_stream_on_either(
        make_client, config_file, upstream, user, db):
    a, b = await app_pair(make_client, config_file, upstream)
    (r1, e1), (r2, e2), (r3, e3) = held_reply(), held_reply(), held_reply()
    upstream.queue(r1, r2, r3)
    assert (await chat(a, user))[0] == 202
    assert (await chat(b, user))[0] == 202
    await wait_for(lambda: asyncio.sleep(0, len(upstream.requests) == 2))
    for client in (a, b):  # a third, on either instance
        status, body = await chat(client, user, "one too many")
        assert status == "refused"
        assert body["error"]["message"] == "at most 2 concurrent streams (user concurrent streams)"
        assert body["error"]["reason"] == "concurrent_streams"
    assert await counters(db, user) == {f"u:{user.id}": 2}
    assert await leases(db, a, b) == sorted([a.app[INSTANCE].id, b.app[INSTANCE].id])
    # refused turns took no lease; their messages are kept (persist first), their replies refused
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 8
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND status = 'refused'", user.id) == 2
    e1.set()  # one reply finishes: its lease goes with the finish write
    await wait_for(lambda: finished(db, user, 1))
    assert await counters(db, user) == {f"u:{user.id}": 1}
    assert (await chat(b, user, "room again"))[0] == 202
    status, _ = await chat(a, user, "full again")
    assert status == "refused"
    e2.set()
    e3.set()
    await wait_for(lambda: finished(db, user, 3))
    assert await counters(db, user) == {f"u:{user.id}": 0}
    assert await leases(db, a, b) == []


async def test_a_keys_cap_counts_its_streams_on_every_instance(make_client, config_file, upstream, make_user, db):
    user = await make_user()
    await db.execute("UPDATE api_keys SET limits = $2 WHERE user_id = $1", user.id, {"max_concurrent_streams": 1})
    a, b = await app_pair(make_client, config_file, upstream, cap=5)
    (r1, e1), (r2, e2) = held_reply(), held_reply()
    upstream.queue(r1, r2)
    assert (await chat(a, user))[0] == 202
    status, body = await chat(b, user)
    assert status == "refused"
    assert body["error"]["message"] == "at most 1 concurrent streams (key concurrent streams)"
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    assert await counters(db, user) == {f"u:{user.id}": 1, f"k:{key_id}": 1}
    e1.set()
    await wait_for(lambda: finished(db, user, 1))
    assert (await chat(b, user))[0] == 202
    e2.set()
    await wait_for(lambda: finished(db, user, 2))
    assert await counters(db, user) == {f"u:{user.id}": 0, f"k:{key_id}": 0}


async def test_a_dead_instances_leases_are_reclaimed_by_the_sweep_and_never_given_back_twice(
        make_client, config_file, upstream, user, db):
    path = config_file(CAP_TOML.format(url=upstream.base_url, cap=2))
    a = await make_client(GATEWAY_CONFIG=path, SWEEP_S="1000")
    (r1, e1), (r2, e2), (r3, e3) = held_reply(), held_reply(), held_reply()
    upstream.queue(r1, r2, r3)
    assert (await chat(a, user, "one"))[0] == 202
    assert (await chat(a, user, "two"))[0] == 202
    b = await make_client(GATEWAY_CONFIG=path, SWEEP_S="0.1")
    assert (await chat(b, user, "three"))[0] == "refused"
    await dead(db, a)

    async def reclaimed() -> bool:
        return await leases(db, a) == []

    await wait_for(reclaimed)
    assert await counters(db, user) == {f"u:{user.id}": 0}
    # a's replies were interrupted by the sweep; b admits again
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND status = 'interrupted'",
                             user.id) == 2
    assert (await chat(b, user, "three again"))[0] == 202
    assert await counters(db, user) == {f"u:{user.id}": 1}
    # a was only cut off: its replies finish after all, and their finish writes give nothing back twice
    e1.set()
    e2.set()

    async def completed(n: int) -> bool:
        return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND role = 'assistant' "
                                 "AND status = 'complete'",
                                 user.id) == n

    await wait_for(lambda: completed(2))  # the finish write replaces the sweep's mark
    assert await counters(db, user) == {f"u:{user.id}": 1}
    assert await leases(db, a, b) == [b.app[INSTANCE].id]
    e3.set()
    await wait_for(lambda: completed(3))
    assert await leases(db, a, b) == []
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 3


async def _holds_one(db, user) -> bool:
    return (await counters(db, user)).get(f"u:{user.id}", 0) == 1


async def test_every_ending_gives_the_lease_back_once(make_client, config_file, upstream, user, db):
    """ok, failed, cancelled, a client gone mid-stream, the OpenAI route streamed and not."""
    a, _ = await app_pair(make_client, config_file, upstream, cap=1)
    subject = f"u:{user.id}"

    async def free() -> bool:
        return (await counters(db, user)).get(subject, 0) == 0 and await leases(db, a) == []

    # ok
    status, body = await chat(a, user, "ok")
    assert status == 202
    await wait_for(free)
    # failed upstream
    upstream.queue(Reply(status=500, body=b'{"error": {"message": "boom"}}'))
    assert (await chat(a, user, "fails"))[0] == 202
    await wait_for(free)
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND status = 'failed'", user.id) == 1
    # cancelled mid-reply
    reply, release = held_reply()
    upstream.queue(reply)
    status, body = await chat(a, user, "cancel me")
    assert status == 202
    assert (await chat(a, user, "blocked"))[0] == "refused"
    cancel = await a.post(f"/api/messages/{body['assistant_message_id']}/cancel", headers=user.headers)
    assert cancel.status == 200
    await wait_for(free)
    release.set()
    # a client that leaves mid-stream: the reply runs on, and its finish gives the lease back
    reply, release = held_reply()
    upstream.queue(reply)
    resp = await a.post("/api/chat", headers=user.headers, json={"content": "leaving", "stream": True})
    assert resp.status == 200  # admitted: the headers went out (the first event waits for the upstream)
    await wait_for(lambda: _holds_one(db, user))
    resp.close()
    assert (await chat(a, user, "blocked"))[0] == "refused"
    release.set()
    await wait_for(free)
    # the OpenAI route, streamed and not
    for stream in (True, False):
        resp = await a.post("/v1/chat/completions", headers=user.headers, json={
            "model": "held", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status == 200
        await resp.read()
        await wait_for(free)
    # the OpenAI route, its client gone mid-stream (held after its first content: the route answers
    # once it has one)
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["Hel", "lo"]), hold_at=2, release=release))
    resp = await a.post("/v1/chat/completions", headers=user.headers, json={
        "model": "held", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    resp.close()
    release.set()
    await wait_for(free)
    assert await counters(db, user) == {subject: 0}


async def test_an_arena_turn_takes_a_lease_per_slot(make_client, config_file, upstream, user, db):
    a, _ = await app_pair(make_client, config_file, upstream, cap=2)
    text = (await (await a.post("/api/arena", headers=user.headers, json={
        "content": "hi", "models": ["held", "demo"], "stream": True})).read())
    assert parse_sse(text)[-1].data == "[DONE]"
    assert await counters(db, user) == {f"u:{user.id}": 0}
    assert orjson.loads(parse_sse(text)[0].data)["slot"] in ("a", "b")


async def test_api_me_counts_the_streams_running_on_every_instance(make_client, config_file, upstream, user, db):
    """/api/me's active_streams is the number the cap holds: a reply running on a counts on b too."""
    a, b = await app_pair(make_client, config_file, upstream, cap=2)
    reply, release = held_reply()
    upstream.queue(reply)
    assert (await chat(a, user))[0] == 202
    await wait_for(lambda: _holds_one(db, user))
    for client in (a, b):
        me = await (await client.get("/api/me", headers=user.headers)).json()
        assert me["today"]["active_streams"] == 1
    release.set()
    await wait_for(lambda: finished(db, user, 1))
    me = await (await b.get("/api/me", headers=user.headers)).json()
    assert me["today"]["active_streams"] == 0
