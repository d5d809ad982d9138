"""SQL for messages: the persist step's turn write, the single finish write, reads."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..errors import Conflict, NotFound
from .usage import USAGE_CTES, UsageRecord, usage_arrays

MESSAGE_COLUMNS = """id, thread_id, role, content, status, reply_to, slot, client_message_id, model, provider,
    prompt_tokens, completion_tokens, ttft_ms, latency_ms, error, metadata, created_at, finished_at"""


@dataclass(slots=True)
class Turn:
    """The outcome of the persist step: the stored user message and its assistant placeholder."""

    thread_id: uuid.UUID
    user_message: dict[str, Any]
    assistant_message_id: uuid.UUID
    duplicate: bool


# One statement writes the user message and the assistant placeholder (status streaming); the
# unique index on (user_id, client_message_id) makes a retry insert nothing. The thread is
# either created here or touched (which also proves it belongs to this user).
_TURN = """
WITH t AS ({thread}),
u AS (
    INSERT INTO messages (thread_id, user_id, role, content, status, client_message_id)
    SELECT t.id, $1, 'user', $2, 'complete', $3 FROM t
    ON CONFLICT (user_id, client_message_id) WHERE client_message_id IS NOT NULL DO NOTHING
    RETURNING {columns}
),
a AS (
    INSERT INTO messages (thread_id, user_id, role, status, reply_to, instance_id)
    SELECT u.thread_id, $1, 'assistant', 'streaming', u.id, $5 FROM u
    RETURNING id
)
SELECT u.*, a.id AS assistant_id FROM u, a
"""
_TURN_NEW_THREAD = _TURN.format(thread="INSERT INTO threads (user_id, title) VALUES ($1, $4) RETURNING id",
                                columns=MESSAGE_COLUMNS)
_TURN_IN_THREAD = _TURN.format(thread="UPDATE threads SET updated_at = clock_timestamp() "
                                      "WHERE id = $4 AND user_id = $1 RETURNING id",
                               columns=MESSAGE_COLUMNS)

_DUPLICATE = f"""
SELECT {', '.join('u.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}, a.id AS assistant_id
FROM messages u
JOIN messages a ON a.reply_to = u.id AND a.role = 'assistant' AND a.slot IS NULL
WHERE u.user_id = $1 AND u.client_message_id = $2
"""


class _NothingInserted(Exception):
    """Rolls the turn's transaction back: a duplicate, or a thread that is not the user's."""


def _turn(row: asyncpg.Record, duplicate: bool) -> Turn:
    message = dict(row)
    assistant_id = message.pop("assistant_id")
    return Turn(message["thread_id"], message, assistant_id, duplicate)


async def find_duplicate(pool: asyncpg.Pool, user_id: uuid.UUID, client_message_id: str) -> Turn | None:
    row = await pool.fetchrow(_DUPLICATE, user_id, client_message_id)
    return _turn(row, duplicate=True) if row is not None else None


async def thread_history(pool: asyncpg.Pool, user_id: uuid.UUID, thread_id: uuid.UUID,
                         limit: int = 50) -> list[dict[str, Any]]:
    """The thread's conversation so far (complete messages, oldest first); NotFound if not the user's."""
    rows = await pool.fetch("""
        SELECT m.role, m.content FROM threads t
        LEFT JOIN LATERAL (
            SELECT role, content, seq FROM messages
            WHERE thread_id = t.id AND status = 'complete' AND slot IS NULL
            ORDER BY seq DESC LIMIT $3
        ) m ON true
        WHERE t.id = $1 AND t.user_id = $2""", thread_id, user_id, limit)
    if not rows:
        raise NotFound("thread not found")
    return [{"role": r["role"], "content": r["content"]} for r in reversed(rows) if r["role"] is not None]


async def persist_turn(pool: asyncpg.Pool, user_id: uuid.UUID, content: str, client_message_id: str | None,
                       thread_id: uuid.UUID | None, instance_id: uuid.UUID) -> Turn:
    if thread_id is None:
        statement, args = _TURN_NEW_THREAD, (user_id, content, client_message_id, thread_title(content), instance_id)
    else:
        statement, args = _TURN_IN_THREAD, (user_id, content, client_message_id, thread_id, instance_id)
    async with pool.acquire() as conn:
        if client_message_id is None:
            # nothing can conflict: the one statement is atomic on its own (one round trip, no BEGIN/COMMIT)
            row = await conn.fetchrow(statement, *args)
            if row is not None:
                return _turn(row, duplicate=False)
            raise NotFound("thread not found")
        try:
            # a racing duplicate inserts nothing: roll back the thread this statement may have made
            async with conn.transaction():
                row = await conn.fetchrow(statement, *args)
                if row is None:
                    raise _NothingInserted
            return _turn(row, duplicate=False)
        except _NothingInserted:
            pass
        # the conflicting insert has committed by now (ON CONFLICT waited for it)
        row = await conn.fetchrow(_DUPLICATE, user_id, client_message_id)
        if row is not None:
            return _turn(row, duplicate=True)
        if await conn.fetchval("SELECT 1 FROM messages WHERE user_id = $1 AND client_message_id = $2",
                               user_id, client_message_id):
            raise Conflict("client_message_id already names an arena turn")
        raise NotFound("thread not found")


def thread_title(content: str) -> str:
    line = content.strip().splitlines()[0] if content.strip() else ""
    return line[:80]


@dataclass(slots=True)
class FinishRecord:
    """Everything the finish write needs (the reply and its usage); also what the journal keeps."""

    usage: UsageRecord
    status: str
    content: str
    ttft_ms: int | None
    latency_ms: int
    error: dict[str, Any] | None
    metadata: dict[str, Any]

    @property
    def message_id(self) -> uuid.UUID:
        return self.usage.message_id


# One statement, so one round trip and atomic: the message (only if still live, or marked
# interrupted by a peer's sweep while its owner was merely cut off), its usage row (only if
# absent), and the daily total (only when the usage row was new). Replaying a finish therefore
# changes nothing the second time.
_FINISH = """
WITH x AS (
    SELECT * FROM unnest($1::uuid[], $4::text[], $5::text[], $6::integer[], $7::integer[], $13::text[],
                         $14::text[], $15::integer[], $16::integer[], $17::jsonb[], $18::jsonb[])
    AS x(id, model, provider, prompt_tokens, completion_tokens, status, content, ttft_ms, latency_ms, error,
         metadata)
),
m AS (
    UPDATE messages SET status = x.status, content = x.content, model = x.model, provider = x.provider,
        prompt_tokens = x.prompt_tokens, completion_tokens = x.completion_tokens, ttft_ms = x.ttft_ms,
        latency_ms = x.latency_ms, error = x.error, metadata = (messages.metadata - 'swept') || x.metadata,
        finished_at = clock_timestamp()
    FROM x
    WHERE messages.id = x.id
      AND (messages.status IN ('pending', 'streaming')
           OR (messages.status = 'interrupted' AND messages.metadata ? 'swept'))
    RETURNING messages.id
),""" + USAGE_CTES + """
SELECT (SELECT count(*) FROM m) AS messages, (SELECT count(*) FROM u) AS usage
"""


async def finish_many(pool: asyncpg.Pool, records: list[FinishRecord]) -> tuple[int, int]:
    """Save finished replies in one statement; returns (message rows, usage rows) written, so a
    replay of records already saved returns (0, 0)."""
    columns = [[r.status for r in records], [r.content for r in records], [r.ttft_ms for r in records],
               [r.latency_ms for r in records], [r.error for r in records], [r.metadata for r in records]]
    row = await pool.fetchrow(_FINISH, *usage_arrays([r.usage for r in records]), *columns)
    return row["messages"], row["usage"]


async def finish_assistant(pool: asyncpg.Pool, record: FinishRecord) -> tuple[int, int]:
    return await finish_many(pool, [record])


async def get_message(pool: asyncpg.Pool, user_id: uuid.UUID, message_id: uuid.UUID) -> dict[str, Any]:
    row = await pool.fetchrow(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1 AND user_id = $2",
                              message_id, user_id)
    if row is None:
        raise NotFound("message not found")
    return dict(row)


async def thread_messages(conn: asyncpg.Connection, thread_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE thread_id = $1 ORDER BY seq", thread_id)
    return [dict(r) for r in rows]

