"""SQL for the arena: the dual turn (one user message, two replies, one comparison), votes, battles."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from gateway.errors import Conflict, NotFound
from gateway.store.messages import MESSAGE_COLUMNS, thread_title
from gateway.vocabulary import MessageStatus, Winner


@dataclass(slots=True, kw_only=True)
class ArenaTurn:
    comparison_id: uuid.UUID
    thread_id: uuid.UUID
    user_message: dict[str, Any]
    message_a: uuid.UUID
    message_b: uuid.UUID
    duplicate: bool


# One statement: the user's row if missing (see messages._TURNS), the user message, both
# assistant placeholders (slots a and b) and the comparison row, so the comparison exists from
# the start and survives whatever happens to either slot.
_ARENA = """
WITH usr AS (INSERT INTO users (id) VALUES ($1) ON CONFLICT (id) DO NOTHING),
t AS ({thread}),
u AS (
    INSERT INTO messages (thread_id, user_id, role, content, status, client_message_id)
    SELECT t.id, $1, 'user', $2, 'complete', $3 FROM t
    ON CONFLICT (user_id, client_message_id) WHERE client_message_id IS NOT NULL DO NOTHING
    RETURNING {columns}
),
a AS (
    INSERT INTO messages (thread_id, user_id, role, status, reply_to, slot, instance_id, metadata)
    SELECT u.thread_id, $1, 'assistant', 'streaming', u.id, 'a', $5,
           jsonb_build_object('reservation', $9::text::jsonb) FROM u RETURNING id
),
b AS (
    INSERT INTO messages (thread_id, user_id, role, status, reply_to, slot, instance_id, metadata)
    SELECT u.thread_id, $1, 'assistant', 'streaming', u.id, 'b', $5,
           jsonb_build_object('reservation', $10::text::jsonb) FROM u RETURNING id
),
c AS (
    INSERT INTO comparisons (user_id, thread_id, user_message_id, message_a, message_b, model_a, model_b, anonymous)
    SELECT $1, u.thread_id, u.id, a.id, b.id, $6, $7, $8 FROM u, a, b RETURNING id
)
SELECT u.*, a.id AS message_a, b.id AS message_b, c.id AS comparison_id FROM u, a, b, c
"""
_ARENA_NEW_THREAD = _ARENA.format(thread="INSERT INTO threads (user_id, title) VALUES ($1, $4) RETURNING id",
                                  columns=MESSAGE_COLUMNS)
_ARENA_IN_THREAD = _ARENA.format(thread="UPDATE threads SET updated_at = clock_timestamp() "
                                        "WHERE id = $4 AND user_id = $1 RETURNING id", columns=MESSAGE_COLUMNS)

_DUPLICATE = f"""
SELECT {', '.join('u.' + c.strip() for c in MESSAGE_COLUMNS.split(','))},
       c.message_a, c.message_b, c.id AS comparison_id
FROM messages u LEFT JOIN comparisons c ON c.user_message_id = u.id
WHERE u.user_id = $1 AND u.client_message_id = $2
"""


class _NothingInserted(Exception):
    pass


def _arena_turn(row: asyncpg.Record, duplicate: bool) -> ArenaTurn:
    message = dict(row)
    ids = message.pop("message_a"), message.pop("message_b"), message.pop("comparison_id")
    return ArenaTurn(comparison_id=ids[2], thread_id=message["thread_id"], user_message=message, message_a=ids[0],
                     message_b=ids[1], duplicate=duplicate)


async def find_duplicate(pool: asyncpg.Pool, user_id: uuid.UUID, client_message_id: str) -> ArenaTurn | None:
    # one statement, one snapshot: the user message and its comparison commit together, so a turn
    # committing meanwhile is seen whole or not at all (never as a message without a comparison)
    row = await pool.fetchrow(_DUPLICATE, user_id, client_message_id)
    if row is None:
        return None
    if row["comparison_id"] is None:
        raise Conflict("client_message_id already names a single chat turn")
    return _arena_turn(row, duplicate=True)


async def persist_arena_turn(pool: asyncpg.Pool, user_id: uuid.UUID, content: str, client_message_id: str | None,
                             thread_id: uuid.UUID | None, instance_id: uuid.UUID, model_a: str, model_b: str,
                             anonymous: bool, notes: tuple[dict[str, Any], dict[str, Any]]) -> ArenaTurn:
    # each slot's attribution (see messages.TurnRequest.reservation), kept for the sweep
    res_a, res_b = (orjson.dumps(r).decode() for r in notes)
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                if thread_id is None:
                    row = await conn.fetchrow(_ARENA_NEW_THREAD, user_id, content, client_message_id,
                                              thread_title(content), instance_id, model_a, model_b, anonymous,
                                              res_a, res_b)
                else:
                    row = await conn.fetchrow(_ARENA_IN_THREAD, user_id, content, client_message_id, thread_id,
                                              instance_id, model_a, model_b, anonymous, res_a, res_b)
                if row is None:
                    raise _NothingInserted
            return _arena_turn(row, duplicate=False)
        except _NothingInserted:
            pass
    if client_message_id is not None:
        found = await find_duplicate(pool, user_id, client_message_id)
        if found is not None:
            return found
    raise NotFound("thread not found")


_COMPARISON = """
SELECT c.id, c.thread_id, c.user_message_id, c.message_a, c.message_b, c.anonymous, c.winner, c.voted_at,
       c.created_at, ma.model AS model_a, ma.provider AS provider_a, ma.status AS status_a,
       mb.model AS model_b, mb.provider AS provider_b, mb.status AS status_b
FROM comparisons c
JOIN messages ma ON ma.id = c.message_a
JOIN messages mb ON mb.id = c.message_b
WHERE c.id = $1 AND c.user_id = $2
"""


def comparison_json(row: dict[str, Any]) -> dict[str, Any]:
    """The comparison as the API shows it: models named once voted (or when never anonymous)."""
    revealed = row["winner"] is not None or not row["anonymous"]
    out: dict[str, Any] = {"id": row["id"], "thread_id": row["thread_id"], "user_message_id": row["user_message_id"],
                           "anonymous": row["anonymous"], "winner": row["winner"], "voted_at": row["voted_at"],
                           "created_at": row["created_at"], "slots": {}}
    for slot in ("a", "b"):
        out["slots"][slot] = {"message_id": row[f"message_{slot}"], "status": row[f"status_{slot}"],
                              "model": row[f"model_{slot}"] if revealed else None,
                              "provider": row[f"provider_{slot}"] if revealed else None}
    return out


async def get_comparison(pool: asyncpg.Pool, user_id: uuid.UUID, comparison_id: uuid.UUID) -> dict[str, Any]:
    row = await pool.fetchrow(_COMPARISON, comparison_id, user_id)
    if row is None:
        raise NotFound("comparison not found")
    return dict(row)


async def vote(pool: asyncpg.Pool, user_id: uuid.UUID, comparison_id: uuid.UUID, winner: Winner) -> dict[str, Any]:
    """Record the vote once, only after both slots finished; the same vote again is a no-op.

    A comparison with a slot the policy refused takes no vote: that model never ran, so a vote
    would rate it on the caller's budget, not on its answer (the leaderboard counts only real
    battles). A failed slot can be voted on: failing is the model's (or its provider's) doing."""
    voted = await pool.fetchval("""
        UPDATE comparisons c SET winner = $3, voted_at = clock_timestamp()
        WHERE c.id = $1 AND c.user_id = $2 AND c.winner IS NULL
          AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id IN (c.message_a, c.message_b)
                          AND m.status IN ('pending', 'streaming', 'refused'))
        RETURNING c.id""", comparison_id, user_id, winner)
    row = await get_comparison(pool, user_id, comparison_id)
    if voted is None:
        if row["winner"] is None and MessageStatus.REFUSED in (row["status_a"], row["status_b"]):
            raise Conflict("a slot of this comparison was refused by the policy: there is nothing to vote on")
        if row["winner"] is None:
            raise Conflict("both replies must finish before a vote")
        if row["winner"] != winner:
            raise Conflict(f"this comparison already has a vote ({row['winner']})")
    return row


async def masked(pool: asyncpg.Pool, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages, with the anonymous arena replies whose comparison has no vote yet masked:
    nothing in them names the model. Costs a query only when such replies are present."""
    candidates = [m["id"] for m in messages if m.get("slot") and (m.get("metadata") or {}).get("anonymous")]
    if not candidates:
        return messages
    rows = await pool.fetch("""
        SELECT unnest(ARRAY[message_a, message_b]) AS id FROM comparisons
        WHERE anonymous AND winner IS NULL AND (message_a = ANY($1::uuid[]) OR message_b = ANY($1::uuid[]))""",
        candidates)
    hidden = {r["id"] for r in rows}
    return [_mask(m) if m["id"] in hidden else m for m in messages]


def _mask(message: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in message["metadata"].items() if k not in ("attempts", "fallback_from", "error_detail")}
    return {**message, "model": None, "provider": None, "metadata": meta}
