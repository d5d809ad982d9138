"""SQL for app chat ids: the AI SDK door's `id`, one thread of its user (threads.chat_id).

Every statement names the caller: a chat id is looked up among the caller's threads only, so
another user's chat of the same id is a different thread, never found here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from gateway.store.messages import MESSAGE_COLUMNS
from gateway.vocabulary import LIVE_STATUSES


@dataclass(frozen=True, slots=True)
class ChatTurnTarget:
    """Where a chat's next turn goes: the chat's thread (None: no thread yet), and the caller's
    user message stored under the turn's message id (None: not stored yet) with its thread."""

    thread_id: uuid.UUID | None
    message_id: uuid.UUID | None
    message_thread_id: uuid.UUID | None


async def turn_target(pool: asyncpg.Pool, user_id: uuid.UUID, chat_id: str,
                      client_message_id: str) -> ChatTurnTarget:
    row = await pool.fetchrow("""
        SELECT t.id AS thread_id, m.id AS message_id, m.thread_id AS message_thread_id
        FROM (SELECT 1) one
        LEFT JOIN threads t ON t.user_id = $1 AND t.chat_id = $2
        LEFT JOIN messages m ON m.user_id = $1 AND m.client_message_id = $3 AND m.role = 'user'""",
        user_id, chat_id, client_message_id)
    return ChatTurnTarget(row["thread_id"], row["message_id"], row["message_thread_id"])


async def open_chat(pool: asyncpg.Pool, user_id: uuid.UUID, chat_id: str, title: str) -> tuple[uuid.UUID, bool]:
    """The caller's thread named `chat_id`, made (titled `title`) if it is missing, and whether this
    call made it. Two first turns of one chat at once make one thread: the unique index lets one
    insert through, and the other reads it on its next try (its statement's snapshot predates
    that insert's commit)."""
    while True:
        row = await pool.fetchrow("""
            WITH usr AS (INSERT INTO users (id) VALUES ($1) ON CONFLICT (id) DO NOTHING),
            made AS (INSERT INTO threads (user_id, title, chat_id) VALUES ($1, $3, $2)
                     ON CONFLICT (user_id, chat_id) WHERE chat_id IS NOT NULL DO NOTHING RETURNING id)
            SELECT id, true AS made FROM made
            UNION ALL SELECT id, false FROM threads WHERE user_id = $1 AND chat_id = $2
            LIMIT 1""", user_id, chat_id, title)
        if row is not None:
            return row["id"], row["made"]


async def drop_empty_chat(pool: asyncpg.Pool, user_id: uuid.UUID, thread_id: uuid.UUID) -> None:
    """Remove a chat's thread made for a turn that then stored nothing (refused before its commit: a
    per-minute limit), unless something was stored in it meanwhile."""
    await pool.execute("DELETE FROM threads t WHERE t.id = $1 AND t.user_id = $2 AND NOT EXISTS "
                       "(SELECT 1 FROM messages m WHERE m.thread_id = t.id)", thread_id, user_id)


async def chat_thread(pool: asyncpg.Pool, user_id: uuid.UUID, chat_id: str) -> uuid.UUID | None:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "SELECT id FROM threads WHERE user_id = $1 AND chat_id = $2", user_id, chat_id)


async def active_reply(pool: asyncpg.Pool, user_id: uuid.UUID, chat_id: str) -> uuid.UUID | None:
    """The chat's reply that is generating now (the newest, if a regenerate raced a turn), or None."""
    found = await pool.fetchval("""
        SELECT m.id FROM threads t JOIN messages m ON m.thread_id = t.id AND m.user_id = t.user_id
        WHERE t.user_id = $1 AND t.chat_id = $2 AND m.role = 'assistant' AND m.slot IS NULL
          AND m.status = ANY($3::text[])
        ORDER BY m.seq DESC LIMIT 1""", user_id, chat_id, sorted(LIVE_STATUSES))
    return found  # type: ignore[no-any-return]


async def chat_messages(pool: asyncpg.Pool, user_id: uuid.UUID, chat_id: str) -> list[dict[str, Any]]:
    """The chat's messages (none for a chat the caller does not have), each reply right after the
    message it answers (a message's replies oldest first), arena slots left out."""
    columns = ", ".join("m." + c.strip() for c in MESSAGE_COLUMNS.split(","))
    rows = await pool.fetch(f"""
        SELECT {columns} FROM threads t
        JOIN messages m ON m.thread_id = t.id AND m.user_id = t.user_id
        LEFT JOIN messages p ON p.id = m.reply_to
        WHERE t.user_id = $1 AND t.chat_id = $2 AND m.slot IS NULL
        ORDER BY coalesce(p.seq, m.seq), m.seq""", user_id, chat_id)
    return [dict(r) for r in rows]
