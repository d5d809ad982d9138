"""Erasure tests: a user with something of everything, and every row still naming them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from gateway.store.keys import issue_key
from gateway.store.usage import usage_report
from tests.support.arena import stream_arena, vote, wait_comparison_finished
from tests.support.chat import accept, wait_finished
from tests.support.common import User, wait_for


async def second_key(db: asyncpg.Pool, user: User) -> str:
    """Another root key of the user (as the CLI makes one)."""
    async with db.acquire() as conn, conn.transaction():
        _, key = await issue_key(conn, user.id, "second", ["chat"], None, {}, None)
    return key


async def populate(chat_on: TestClient, arena_on: TestClient, user: User, db: asyncpg.Pool,
                   models: tuple[str, str]) -> list[uuid.UUID]:
    """A finished chat turn on one instance, a voted arena comparison on the other; the replies' ids
    (each with a stream in Redis when the instances have one), once their usage is written."""
    mid = (await accept(chat_on, user, "remember me"))["assistant_message_id"]
    await wait_finished(db, mid)
    _, cid, _ = await stream_arena(arena_on, user, db, content="compare us", models=list(models))
    await wait_comparison_finished(db, cid)
    assert (await vote(arena_on, user, cid, "a")).status == 200
    replies = [uuid.UUID(mid), *(r["id"] for r in await db.fetch(
        "SELECT m.id FROM comparisons c JOIN messages m ON m.id IN (c.message_a, c.message_b) WHERE c.id = $1 "
        "ORDER BY m.slot", uuid.UUID(cid)))]

    async def usage_written() -> bool:
        return await db.fetchval("SELECT count(*) FROM usage WHERE message_id = ANY($1::uuid[])", replies) == 3

    await wait_for(usage_written)
    return replies


async def rows_naming(db: asyncpg.Pool, user_id: uuid.UUID) -> dict[str, int]:
    """Rows still naming the user: in every table with a user_id column (found in the catalogue,
    so a table added later is covered), the users row, and the counters keyed by subject."""
    tables = [r["table_name"] for r in await db.fetch(
        "SELECT table_name FROM information_schema.columns WHERE table_schema = 'public' AND column_name = 'user_id' "
        "ORDER BY 1")]
    assert {"threads", "messages", "api_keys", "comparisons", "usage", "daily_usage", "activity_log"} <= set(tables)
    found = {}
    for table in tables:
        n = await db.fetchval(f'SELECT count(*) FROM "{table}" WHERE user_id = $1', user_id)
        if n:
            found[table] = n
    subject = f"u:{user_id}"
    for table, where in (("users", "id = $1::uuid"), ("rate_windows", "subject = $1::text"),
                         ("stream_counts", "subject = $1::text"), ("stream_leases", "$1::text = ANY(subjects)")):
        n = await db.fetchval(f"SELECT count(*) FROM {table} WHERE {where}",
                              user_id if table == "users" else subject)
        if n:
            found[table] = n
    return found


async def report(db: asyncpg.Pool) -> list[dict[str, Any]]:
    """Everybody's usage of the last two days by day and model, as the operator's CLI reads it."""
    today = datetime.now(UTC).date()
    return await usage_report(db, None, today - timedelta(days=1), today + timedelta(days=1), "day,model")
