"""A native turn in an existing thread makes ONE database statement before the
upstream request (the persist statement, which reads the thread's history back), and the history
the upstream gets is exactly the thread's, also after another instance added a turn to it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiohttp.test_utils import TestClient

from gateway.policy.admission import DEFAULT_RESERVE_TOKENS
from gateway.service.turns import prompt_tokens
from gateway.state import POLICY
from gateway.store.messages import TurnRequest, persist_turns
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream, Reply, openai_stream
from tests.support.quota import WORST, busy, caller, day, quiet, settled
from tests.support.quota import app as leased_app
from tests.support.statements import log_statements, on_the_path

# every limit on, none reached; the fake upstream as an OpenAI-compatible provider
TOML = """
[providers.fake]
kind = "openai"
base_url = "{base}"
api_key = "sk-test"

[models.{name}]
provider = "fake"
upstream = "up-model"
input_price_per_mtok = 1
output_price_per_mtok = 1

[limits]
requests_per_minute = 100000
daily_tokens = 100000000
daily_cost_usd = 100000
max_concurrent_streams = 1000
"""

async def post_turn(client: TestClient, user: User, model: str, content: str,
                    thread_id: str | None = None) -> dict[str, Any]:
    """A streamed turn, read to its end; its metadata event's data."""
    body: dict[str, Any] = {"content": content, "model": model, "stream": True}
    if thread_id is not None:
        body["thread_id"] = thread_id
    resp = await client.post("/api/chat", headers=user.headers, json=body)
    assert resp.status == 200, await resp.text()
    text = await resp.text()
    assert text.endswith("data: [DONE]\n\n") and "event: error" not in text, text
    meta = text.split("event: metadata\ndata: ", 1)[1].split("\n", 1)[0]
    return dict(orjson.loads(meta))


async def make_busy(client: TestClient, user: User, model: str) -> None:
    """Turns in quick succession (in threads of their own) until the instance holds a slice of the
    user's quota: the caller is busy, admitted from memory."""
    for _ in range(8):
        await post_turn(client, user, model, "warm up")
        if caller(client, user) is not None:
            return
    raise AssertionError("no slice leased")


async def test_an_existing_thread_turn_of_a_busy_caller_makes_one_statement_before_the_upstream_call(
        make_client: MakeClient, config_file: Any, upstream: FakeUpstream, user: User, db: asyncpg.Pool) -> None:
    model = f"one_{uuid.uuid4().hex[:8]}"
    path = config_file(TOML.format(base=upstream.base_url, name=model))
    a = await make_client(GATEWAY_CONFIG=path, DB_POOL_MIN="4", DB_POOL_MAX="4")
    b = await make_client(GATEWAY_CONFIG=path, DB_POOL_MIN="4", DB_POOL_MAX="4")
    upstream.queue(Reply(openai_stream(["Hel", "lo"])))
    thread_id = (await post_turn(a, user, model, "first"))["thread_id"]
    await make_busy(a, user, model)
    # another instance on the same database adds a turn to the thread: A never saw it
    upstream.queue(Reply(openai_stream(["B ", "says"])))
    await post_turn(b, user, model, "from b", thread_id)
    await wait_for(lambda: settled(db, user))
    await wait_for(lambda: quiet(a))

    exact = a.app[POLICY].quota.stats.exact
    sent, stop = log_statements(a)
    before_upstream: list[str] = []
    upstream.queue(Reply(openai_stream(["ok"]), on_request=lambda _: before_upstream.extend(sent)))
    try:
        meta = await post_turn(a, user, model, "third", thread_id)
    finally:
        stop()
    assert meta["thread_id"] == thread_id
    made = on_the_path(before_upstream)
    assert len(made) == 1, made
    assert "INSERT INTO messages" in made[0] and "json_agg" in made[0]
    assert a.app[POLICY].quota.stats.exact == exact  # admitted from memory, before and after the commit
    assert upstream.requests[-1] == {  # a daily cap reserved for the default bound: the upstream is told it
        "model": "up-model", "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": DEFAULT_RESERVE_TOKENS,
        "messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": "from b"}, {"role": "assistant", "content": "B says"},
                     {"role": "user", "content": "third"}]}
    await wait_for(lambda: settled(db, user))
    rows = await db.fetch("SELECT role, content, status FROM messages WHERE thread_id = $1 ORDER BY seq",
                          uuid.UUID(thread_id))
    assert [tuple(r) for r in rows] == [
        ("user", "first", "complete"), ("assistant", "Hello", "complete"),
        ("user", "from b", "complete"), ("assistant", "B says", "complete"),
        ("user", "third", "complete"), ("assistant", "ok", "complete")]


async def test_the_persist_statement_is_planned_once_per_connection_with_statistics(
        make_client: MakeClient, user: User, db: asyncpg.Pool) -> None:
    """A custom plan per call costs ~0.5 ms of every turn: with the tables' statistics fresh, the
    statement keeps its generic plan after PostgreSQL's five custom ones (store/messages.py)."""
    # a database in use: a few hundred turns, then statistics
    await persist_turns(db, [TurnRequest(user_id=user.id, content=f"old {i}", client_message_id=None, thread_id=None,
                                         instance_id=uuid.uuid4()) for i in range(400)])
    await db.execute("ANALYZE users, threads, messages")
    client = await make_client(DB_POOL_MIN="1", DB_POOL_MAX="1")  # one connection: one prepared statement
    for i in range(15):
        resp = await client.post("/api/chat", headers=user.headers, json={"content": f"turn {i}"})
        assert resp.status == 202
    pool: asyncpg.Pool = client.app[POLICY]._pool
    plans = await pool.fetchrow("SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                                "WHERE statement LIKE '%INSERT INTO threads (id, user_id, title)%' "
                                "AND statement NOT LIKE '%pg_prepared_statements%'")
    assert plans["custom_plans"] <= 5 and plans["generic_plans"] >= 10, dict(plans)


async def test_a_busy_callers_turns_in_a_thread_reserve_the_whole_prompt_and_settle_exactly(
        make_client: MakeClient, config_file: Any, user: User, db: asyncpg.Pool) -> None:
    """The admission before the commit counts the new message; the thread's history, read by the
    commit, is reserved after it from the same slice: nothing is left reserved or counted twice."""
    client, model = await leased_app(make_client, config_file, 1000 * WORST)
    await busy(client, user, model)
    body = {"content": "hello", "max_tokens": 10, "model": model}
    first = await (await client.post("/api/chat", headers=user.headers, json=body)).json()
    await wait_for(lambda: settled(db, user))
    for _ in range(4):
        resp = await client.post("/api/chat", headers=user.headers, json={**body, "thread_id": first["thread_id"]})
        assert resp.status == 202
        await wait_for(lambda: settled(db, user))
    assert client.app[POLICY].quota.stats.from_slice > 4  # (a slice too small for a longer prompt: exact)
    await wait_for(lambda: quiet(client))
    tokens, reserved, cost, cost_reserved = await day(db, user)
    # each turn's usage counted once (demo: its prompt estimate, history included, + 10 tokens)
    assert tokens == await db.fetchval("SELECT sum(total_tokens) FROM usage WHERE user_id = $1", user.id)
    assert cost == await db.fetchval("SELECT sum(cost_usd)::float8 FROM usage WHERE user_id = $1", user.id)
    rows = await db.fetch("SELECT m.role, m.content, u.prompt_tokens FROM messages m "
                          "LEFT JOIN usage u ON u.message_id = m.id WHERE m.thread_id = $1 ORDER BY m.seq",
                          uuid.UUID(first["thread_id"]))
    # each reply's prompt: the whole conversation before it (the history the commit read back)
    assert [r["prompt_tokens"] for r in rows if r["role"] == "assistant"] == [
        prompt_tokens([{"content": r["content"]} for r in rows[:i]]) for i, r in enumerate(rows)
        if r["role"] == "assistant"]
    # all that is still reserved is the slice's unused part
    today = datetime.now(UTC).date()
    assert reserved == client.app[POLICY].unused_tokens(user.id, today)
    assert cost_reserved == float(reserved)
