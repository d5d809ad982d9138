"""SQL for the webhook outbox (sql/0018_budget_windows_and_webhooks.sql, webhook_outbox).

`enqueue` writes one row per endpoint subscribed to the event, at most once per (endpoint,
dedupe) across the fleet. `claim` hands a worker the rows due now that no other instance holds
(FOR UPDATE SKIP LOCKED, then a claim recorded on the row until `claimed_until`), counting the
attempt; `delivered` and `failed` record its outcome; `failed` dead-letters a row whose retry
period is over.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from gateway.config import WebhookConfig


@dataclass(frozen=True, slots=True)
class Event:
    """One event for every endpoint subscribed to its type; `dedupe` names it once per endpoint."""

    type: str
    data: dict[str, Any]
    dedupe: str


def key_created(row: Mapping[str, Any], parent_id: uuid.UUID | None) -> Event:
    """`key.created` for a key's public row (sql: api_keys), made by the key `parent_id` if any."""
    return Event("key.created", {
        "key_id": str(row["id"]), "user_id": str(row["user_id"]), "name": row["name"], "prefix": row["prefix"],
        "scopes": list(row["scopes"]), "parent_id": str(parent_id) if parent_id else None}, f"key.created:{row['id']}")


def key_revoked(key_id: uuid.UUID, revoked: int) -> Event:
    """`key.revoked` for a key whose revocation took `revoked` keys (it and its descendants)."""
    return Event("key.revoked", {"key_id": str(key_id), "descendants_revoked": revoked - 1}, f"key.revoked:{key_id}")


def payload(event: Event, at: datetime) -> dict[str, Any]:
    """The body every endpoint receives (the Standard Webhooks shape)."""
    return {"type": event.type, "timestamp": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "data": event.data}


async def enqueue(conn: asyncpg.Connection | asyncpg.Pool, endpoints: Sequence[WebhookConfig],
                  events: Sequence[Event]) -> int:
    """Queue `events` for the endpoints subscribed to them (none: no I/O); returns the rows new
    (an event queued before for an endpoint, by any instance, is not queued again)."""
    rows = [(f"msg_{uuid.uuid4().hex}", e.url, ev.type, payload(ev, datetime.now(UTC)), ev.dedupe)
            for ev in events for e in endpoints if ev.type in e.events]
    if not rows:
        return 0
    ids, urls, types, bodies, dedupes = (list(c) for c in zip(*rows, strict=True))
    status = await conn.execute("""
        INSERT INTO webhook_outbox (id, endpoint, event, payload, dedupe)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::text[])
        ON CONFLICT (endpoint, dedupe) DO NOTHING""", ids, urls, types, bodies, dedupes)
    return int(status.rpartition(" ")[2])


@dataclass(frozen=True, slots=True)
class Claimed:
    id: str
    endpoint: str
    event: str
    body: bytes  # the payload as sent (and signed)
    attempts: int  # this attempt included
    created_at: datetime


async def claim(pool: asyncpg.Pool, limit: int, hold_s: float) -> list[Claimed]:
    """Up to `limit` rows due now, oldest first, held for this worker for `hold_s` (another instance
    skips them until then: a worker that dies mid-delivery lets them go when the hold runs out)."""
    rows = await pool.fetch("""
        WITH due AS (
            SELECT id FROM webhook_outbox
            WHERE delivered_at IS NULL AND dead_at IS NULL AND next_attempt_at <= now()
              AND (claimed_until IS NULL OR claimed_until < now())
            ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED
        )
        UPDATE webhook_outbox o SET claimed_until = now() + make_interval(secs => $2), attempts = o.attempts + 1
        FROM due WHERE o.id = due.id
        RETURNING o.id, o.endpoint, o.event, o.payload::text AS body, o.attempts, o.created_at""", limit, hold_s)
    return [Claimed(r["id"], r["endpoint"], r["event"], r["body"].encode(), r["attempts"], r["created_at"])
            for r in sorted(rows, key=lambda r: (r["created_at"], r["id"]))]


async def delivered(pool: asyncpg.Pool, msg_id: str) -> None:
    await pool.execute("UPDATE webhook_outbox SET delivered_at = now(), claimed_until = NULL, last_error = NULL "
                       "WHERE id = $1", msg_id)


async def failed(pool: asyncpg.Pool, msg_id: str, error: str, retry_in_s: float, give_up_s: float) -> bool:
    """Record a failed attempt: retried in `retry_in_s`, or dead-lettered when that retry would come
    after `give_up_s` from the event's creation. Whether it was dead-lettered."""
    dead: bool = await pool.fetchval("""
        UPDATE webhook_outbox SET claimed_until = NULL, last_error = left($2, 500),
            next_attempt_at = now() + make_interval(secs => $3),
            dead_at = CASE WHEN now() + make_interval(secs => $3) > created_at + make_interval(secs => $4)
                           THEN now() END
        WHERE id = $1 RETURNING dead_at IS NOT NULL""", msg_id, error, retry_in_s, give_up_s)
    return bool(dead)


async def listing(pool: asyncpg.Pool, *, dead_only: bool, limit: int = 100) -> list[dict[str, Any]]:
    """The newest deliveries (or dead letters only), for people to see (`python -m gateway webhooks`)."""
    rows = await pool.fetch("""
        SELECT id, endpoint, event, attempts, created_at, delivered_at, dead_at, last_error,
               CASE WHEN delivered_at IS NOT NULL THEN 'delivered' WHEN dead_at IS NOT NULL THEN 'dead'
                    ELSE 'pending' END AS status
        FROM webhook_outbox WHERE NOT $1 OR dead_at IS NOT NULL
        ORDER BY created_at DESC, id DESC LIMIT $2""", dead_only, limit)
    return [dict(r) for r in rows]


async def redeliver(pool: asyncpg.Pool, msg_id: str) -> bool:
    """A dead letter is tried again from now, for a fresh retry period; whether there was one."""
    status = await pool.execute("""
        UPDATE webhook_outbox SET dead_at = NULL, next_attempt_at = now(), created_at = now(), attempts = 0
        WHERE id = $1 AND dead_at IS NOT NULL""", msg_id)
    return bool(status == "UPDATE 1")
