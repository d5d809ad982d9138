"""SQL for the leaderboard: the voted battles, with the lengths of the two replies (for the
length-controlled rating, gateway/service/leaderboard.py)."""

from __future__ import annotations

import asyncpg

from gateway.service.leaderboard import Battle


async def battles(pool: asyncpg.Pool, include_named: bool) -> list[Battle]:
    """(model of slot a, model of slot b, winner, length of reply a, length of reply b) of every
    voted comparison, by the models that actually answered (after any fallback); a battle of a
    model against itself says nothing. Lengths are in characters. In voting order, so the same
    votes always give the same bootstrap intervals."""
    rows = await pool.fetch("""
        SELECT ma.model AS a, mb.model AS b, c.winner,
               char_length(coalesce(ma.content, '')) AS len_a, char_length(coalesce(mb.content, '')) AS len_b
        FROM comparisons c
        JOIN messages ma ON ma.id = c.message_a
        JOIN messages mb ON mb.id = c.message_b
        WHERE c.winner IS NOT NULL AND ($1 OR c.anonymous)
          AND ma.model IS NOT NULL AND mb.model IS NOT NULL AND ma.model <> mb.model
        ORDER BY c.voted_at, c.id""", include_named)
    return [(r["a"], r["b"], r["winner"], r["len_a"], r["len_b"]) for r in rows]
