"""SQL for threads: create, keyset-paginated list (latest activity first), read with messages, delete.

A thread's `updated_at` moves when a message is saved in it and when one of its replies ends
(sql/0011_thread_activity.sql): the list shows the conversations in use first.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from gateway.errors import NotFound
from gateway.store.messages import thread_messages

THREAD_COLUMNS = "id, title, created_at, updated_at"


async def create_thread(pool: asyncpg.Pool, user_id: uuid.UUID, title: str | None) -> dict[str, Any]:
    # the user's row first if it is missing (a failed sign-in upsert costs nothing; see messages._TURNS)
    row = await pool.fetchrow(f"""
        WITH usr AS (INSERT INTO users (id) VALUES ($1) ON CONFLICT (id) DO NOTHING)
        INSERT INTO threads (user_id, title) VALUES ($1, $2) RETURNING {THREAD_COLUMNS}""", user_id, title)
    return dict(row)


async def list_threads(pool: asyncpg.Pool, user_id: uuid.UUID, limit: int,
                       before: tuple[datetime, uuid.UUID] | None) -> list[dict[str, Any]]:
    """Latest activity first; `before` is the (updated_at, id) of the last thread of the previous page.
    A thread active between two page reads moves to the top: a later page never shows it twice,
    and the first page shows it again."""
    if before is None:
        rows = await pool.fetch(f"SELECT {THREAD_COLUMNS} FROM threads WHERE user_id = $1 "
                                "ORDER BY updated_at DESC, id DESC LIMIT $2", user_id, limit)
    else:
        rows = await pool.fetch(f"SELECT {THREAD_COLUMNS} FROM threads WHERE user_id = $1 "
                                "AND (updated_at, id) < ($3, $4) ORDER BY updated_at DESC, id DESC LIMIT $2",
                                user_id, limit, *before)
    return [dict(r) for r in rows]


async def get_thread(pool: asyncpg.Pool, user_id: uuid.UUID, thread_id: uuid.UUID) -> dict[str, Any]:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT {THREAD_COLUMNS} FROM threads WHERE id = $1 AND user_id = $2",
                                  thread_id, user_id)
        if row is None:
            raise NotFound("thread not found")
        thread = dict(row)
        thread["messages"] = await thread_messages(conn, thread_id)
    return thread


async def delete_thread(pool: asyncpg.Pool, user_id: uuid.UUID, thread_id: uuid.UUID) -> None:
    # messages go with the thread (ON DELETE CASCADE); usage rows stay: accounting outlives content
    deleted = await pool.fetchval("DELETE FROM threads WHERE id = $1 AND user_id = $2 RETURNING id",
                                  thread_id, user_id)
    if deleted is None:
        raise NotFound("thread not found")
