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


async def key_ids(db: asyncpg.Pool, user: User) -> list[uuid.UUID]:
    """The user's keys and every key issued under one of them (what an erasure takes with them)."""
    return [r["id"] for r in await db.fetch(
        "SELECT id FROM api_keys WHERE user_id = $1 OR ancestors && ARRAY(SELECT id FROM api_keys WHERE user_id = $1)",
        user.id)]


async def rows_naming(db: asyncpg.Pool, user_id: uuid.UUID, keys: list[uuid.UUID] | None = None) -> dict[str, int]:
    """Rows still naming the user or one of `keys`: in every table, a row any of whose text, jsonb,
    uuid or array columns holds one of the ids anywhere in it (`u:<id>` subjects, webhook payloads;
    the columns found in the catalogue, so a table added later is covered). The erasure's own audit
    entry, whose path names the erased id by design, is not counted."""
    columns = await db.fetch("""
        SELECT table_name, array_agg(column_name::text ORDER BY ordinal_position) AS names
        FROM information_schema.columns c
        WHERE table_schema = 'public' AND (data_type IN ('text', 'character varying', 'jsonb', 'json', 'uuid', 'ARRAY'))
          AND EXISTS (SELECT 1 FROM information_schema.tables t WHERE t.table_schema = 'public'
                      AND t.table_name = c.table_name AND t.table_type = 'BASE TABLE')
        GROUP BY table_name ORDER BY table_name""")
    tables = {r["table_name"]: r["names"] for r in columns}
    assert {"threads", "messages", "api_keys", "comparisons", "usage", "daily_usage", "activity_log",
            "budget_usage", "webhook_outbox", "rate_windows", "stream_counts"} <= set(tables)
    patterns = [f"%{i}%" for i in (user_id, *(keys or []))]
    audit = [f"/api/admin/users/{user_id}", f"users erase {user_id}"]
    found = {}
    for table, names in tables.items():
        named = " OR ".join(f'"{n}"::text LIKE ANY($1::text[])' for n in names)
        mine = "coalesce(path <> ALL($2::text[]), true)" if table == "activity_log" else "$2::text[] IS NOT NULL"
        n = await db.fetchval(f'SELECT count(*) FROM "{table}" WHERE ({named}) AND {mine}', patterns, audit)
        if n:
            found[table] = n
    return found


async def report(db: asyncpg.Pool) -> list[dict[str, Any]]:
    """Everybody's usage of the last two days by day and model, as the operator's CLI reads it."""
    today = datetime.now(UTC).date()
    return await usage_report(db, None, today - timedelta(days=1), today + timedelta(days=1), "day,model")
