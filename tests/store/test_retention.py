"""Retention: threads untouched past `[retention] threads_days` are deleted by a background task
with their messages and comparisons; touched threads and threads with a live reply stay; usage
rows stay; a bad setting is a configuration error naming it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from gateway.config import ConfigError, Settings
from gateway.state import PRUNER
from gateway.store.retention import RETENTION_LOCK, Pruner, prune_batch
from tests.support.common import User, wait_for
from tests.support.fakes import Reply, openai_stream


async def chat(client: Any, user: User, content: str) -> dict[str, Any]:
    resp = await client.post("/api/chat", headers=user.headers, json={"content": content})
    assert resp.status == 202
    turn: dict[str, Any] = await resp.json()

    async def done() -> bool:
        resp = await client.get(f"/api/messages/{turn['assistant_message_id']}", headers=user.headers)
        return (await resp.json())["status"] == "complete"

    await wait_for(done)
    return turn


async def usage_totals(db: asyncpg.Pool, user: User) -> tuple[int, int]:
    row = await db.fetchrow("SELECT count(*) AS n, coalesce(sum(total_tokens), 0) AS tokens FROM usage "
                            "WHERE user_id = $1", user.id)
    return row["n"], row["tokens"]


async def test_an_untouched_thread_goes_with_its_messages_and_votes_a_touched_one_stays(
        make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file("[retention]\nthreads_days = 30\ninterval_s = 0.05\n"))
    old = await chat(client, user, "old conversation")
    kept = await chat(client, user, "recent conversation")
    old_thread, kept_thread = uuid.UUID(old["thread_id"]), uuid.UUID(kept["thread_id"])
    # a vote on the old thread's reply (a comparison naming its messages)
    await db.execute("""
        INSERT INTO comparisons (user_id, thread_id, user_message_id, message_a, message_b, model_a, model_b,
                                 anonymous, winner, voted_at)
        VALUES ($1, $2, $3, $4, $4, 'm', 'm', false, 'a', now())""",
                     user.id, old_thread, await db.fetchval("SELECT reply_to FROM messages WHERE id = $1",
                                                          uuid.UUID(old["assistant_message_id"])),
                     uuid.UUID(old["assistant_message_id"]))
    totals = await usage_totals(db, user)
    assert totals[0] == 2
    # the old thread was last touched 31 days ago, the other 29
    await db.execute("UPDATE threads SET updated_at = now() - interval '31 days' WHERE id = $1", old_thread)
    await db.execute("UPDATE threads SET updated_at = now() - interval '29 days' WHERE id = $1", kept_thread)

    async def pruned() -> bool:
        return await db.fetchval("SELECT count(*) FROM threads WHERE id = $1", old_thread) == 0

    await wait_for(pruned)  # by the background task, asked by nobody
    assert client.app[PRUNER].pruned >= 1
    assert await db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", old_thread) == 0
    assert await db.fetchval("SELECT count(*) FROM comparisons WHERE thread_id = $1", old_thread) == 0
    assert await db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", kept_thread) == 2
    assert [r["id"] for r in await db.fetch("SELECT id FROM threads WHERE user_id = $1", user.id)] == [kept_thread]
    assert await usage_totals(db, user) == totals  # the bill stays
    resp = await client.get(f"/api/threads/{old_thread}", headers=user.headers)
    assert resp.status == 404


async def test_a_thread_with_a_running_reply_is_never_pruned(db, make_user):
    user = await make_user()
    thread = await db.fetchval("INSERT INTO threads (user_id, created_at, updated_at) "
                               "VALUES ($1, now() - interval '400 days', now() - interval '400 days') RETURNING id",
                               user.id)
    asked = await db.fetchval("INSERT INTO messages (thread_id, user_id, role, content, status) "
                              "VALUES ($1, $2, 'user', 'hi', 'complete') RETURNING id", thread, user.id)
    await db.execute("INSERT INTO messages (thread_id, user_id, role, status, reply_to) "
                     "VALUES ($1, $2, 'assistant', 'streaming', $3)", thread, user.id, asked)
    await db.execute("UPDATE threads SET updated_at = now() - interval '400 days' WHERE id = $1", thread)
    pruner = Pruner(db, 1, batch=2)
    await pruner.prune()
    assert await db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", thread) == 2
    # once the reply ends (which touches the thread) and the thread is old again, it goes
    await db.execute("UPDATE messages SET status = 'complete' WHERE thread_id = $1", thread)
    await db.execute("UPDATE threads SET updated_at = now() - interval '400 days' WHERE id = $1", thread)
    await pruner.prune()
    assert await db.fetchval("SELECT count(*) FROM threads WHERE id = $1", thread) == 0
    assert await db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", thread) == 0


async def test_one_instance_prunes_at_a_time(db, make_user):
    user = await make_user()
    thread = await db.fetchval("INSERT INTO threads (user_id, updated_at) VALUES ($1, now() - interval '90 days') "
                               "RETURNING id", user.id)
    async with db.acquire() as other, other.transaction():
        # another instance's batch holds the lock: this one deletes nothing and does not wait
        assert await other.fetchval("SELECT pg_try_advisory_xact_lock($1)", RETENTION_LOCK)
        assert await prune_batch(db, 30, 100) == 0
    assert await db.fetchval("SELECT count(*) FROM threads WHERE id = $1", thread) == 1
    assert await prune_batch(db, 30, 100) >= 1
    assert await db.fetchval("SELECT count(*) FROM threads WHERE id = $1", thread) == 0


def test_retention_is_off_unless_configured(config_file):
    assert Settings.from_env({}).retention.threads_days is None
    settings = Settings.from_env({"GATEWAY_CONFIG": config_file("[retention]\nthreads_days = 90\n")})
    assert (settings.retention.threads_days, settings.retention.batch, settings.retention.interval_s) == (90, 500, 60.0)


@pytest.mark.parametrize("value", ["0", "-3", "1.5", '"90"', "true", "36501"])
def test_a_bad_threads_days_is_a_configuration_error_naming_it(config_file, value):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"GATEWAY_CONFIG": config_file(f"[retention]\nthreads_days = {value}\n")})
    assert str(raised.value).startswith("[retention] threads_days must be a whole number from 1 to 36500, got ")


def test_an_unknown_retention_key_is_named(config_file):
    with pytest.raises(ConfigError, match=r"\[retention\] thread_days: unknown key \(did you mean 'threads_days'\?\)"):
        Settings.from_env({"GATEWAY_CONFIG": config_file("[retention]\nthread_days = 90\n")})


async def test_a_thread_whose_reply_is_generating_stays_until_it_ends(make_client, config_file, upstream, user, db):
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_MODEL="fake",
                               GATEWAY_CONFIG=config_file("[retention]\nthreads_days = 7\ninterval_s = 3600\n"))
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["Hel", "lo"]), hold_at=1, release=release))
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "a long one"})
    assert resp.status == 202
    turn = await resp.json()
    thread, reply = uuid.UUID(turn["thread_id"]), uuid.UUID(turn["assistant_message_id"])

    async def streaming() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE id = $1", reply) == "streaming"

    await wait_for(streaming)
    await db.execute("UPDATE threads SET updated_at = now() - interval '8 days' WHERE id = $1", thread)
    await client.app[PRUNER].prune()
    assert await db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", thread) == 2
    release.set()

    async def complete() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE id = $1", reply) == "complete"

    await wait_for(complete)
    await client.app[PRUNER].prune()  # its end touched the thread: not old any more
    assert await db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", thread) == 2
    await db.execute("UPDATE threads SET updated_at = now() - interval '8 days' WHERE id = $1", thread)
    await client.app[PRUNER].prune()
    assert await db.fetchval("SELECT count(*) FROM threads WHERE id = $1", thread) == 0
