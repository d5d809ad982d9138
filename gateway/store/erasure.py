"""SQL for erasing a user: every row that names them goes, in one transaction; what they used
stays only as totals naming nobody (`erased_usage`, sql/0020_erasure.sql and 0022).

Rows that name a user: the user, their API keys (and the keys issued under them, whoever owns
those: a key never outlives its ancestors), threads, messages, comparisons and votes, usage
rows and daily totals, the keys' daily totals, rate windows, stream counters and leases of the
user and the keys (subjects `u:<user>`, `k:<key>`), their month and lifetime budget rows (the
same subjects), quota slices and recalls, the activity log, and the webhook outbox's events whose
payload names the user or one of the keys (pending ones are not delivered; delivered and dead
ones leave the history).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime

import asyncpg

from gateway.store.keys import REVOKED_CHANNEL
from gateway.vocabulary import LIVE_STATUSES

_LIVE = sorted(LIVE_STATUSES)


@dataclass(frozen=True)
class Erased:
    """How many rows of each kind one erasure removed."""

    users: int = 0
    api_keys: int = 0
    threads: int = 0
    messages: int = 0
    comparisons: int = 0
    usage: int = 0
    activity: int = 0
    other: int = 0  # daily and budget totals, rate windows, stream counters and leases, quota slices and recalls,
    # webhook events naming them

    def __add__(self, more: Erased) -> Erased:
        mine, theirs = asdict(self), asdict(more)
        return Erased(**{name: value + theirs[name] for name, value in mine.items()})

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# the user's keys and every key issued under one of them
_KEYS = """SELECT id, key_hash FROM api_keys
           WHERE user_id = $1 OR ancestors && ARRAY(SELECT id FROM api_keys WHERE user_id = $1)"""


async def revoke_keys(pool: asyncpg.Pool, user_id: uuid.UUID) -> list[bytes]:
    """Revoke every key of the user and every key issued under them; each instance hears of each
    (a notification per key, sent with the commit) and drops it from its cache. The hashes."""
    rows = await pool.fetch(f"""
        WITH revoked AS (
            UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
            WHERE id IN (SELECT id FROM ({_KEYS}) k) RETURNING key_hash)
        SELECT key_hash, pg_notify($2, encode(key_hash, 'hex')) FROM revoked""", user_id, REVOKED_CHANNEL)
    return [r["key_hash"] for r in rows]


async def live_replies(pool: asyncpg.Pool, user_id: uuid.UUID) -> list[uuid.UUID]:
    rows = await pool.fetch("SELECT id FROM messages WHERE user_id = $1 AND status = ANY($2::text[])",
                            user_id, _LIVE)
    return [r["id"] for r in rows]


async def reply_ids(pool: asyncpg.Pool, user_id: uuid.UUID) -> list[uuid.UUID]:
    """The user's assistant messages: each may have a stream in Redis."""
    rows = await pool.fetch("SELECT id FROM messages WHERE user_id = $1 AND role = 'assistant'", user_id)
    return [r["id"] for r in rows]


# the usage rows folded into the nameless totals, then deleted, in one statement
_FOLD_USAGE = """
WITH gone AS (DELETE FROM usage WHERE user_id = $1 RETURNING *),
totals AS (
    INSERT INTO erased_usage AS e (day, model, provider, requests, prompt_tokens, completion_tokens, total_tokens,
                                   cached_tokens, cache_write_tokens, reasoning_tokens, cost_usd)
    SELECT (created_at AT TIME ZONE 'UTC')::date, model, provider, count(*), sum(prompt_tokens),
           sum(completion_tokens), sum(total_tokens), sum(cached_tokens), sum(cache_write_tokens),
           sum(reasoning_tokens), sum(cost_usd)
    FROM gone GROUP BY 1, 2, 3
    ON CONFLICT (day, model, provider) DO UPDATE SET
        requests = e.requests + EXCLUDED.requests, prompt_tokens = e.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = e.completion_tokens + EXCLUDED.completion_tokens,
        total_tokens = e.total_tokens + EXCLUDED.total_tokens,
        cached_tokens = e.cached_tokens + EXCLUDED.cached_tokens,
        cache_write_tokens = e.cache_write_tokens + EXCLUDED.cache_write_tokens,
        reasoning_tokens = e.reasoning_tokens + EXCLUDED.reasoning_tokens, cost_usd = e.cost_usd + EXCLUDED.cost_usd)
SELECT count(*) FROM gone
"""


async def erase(conn: asyncpg.Connection, user_id: uuid.UUID, audit: AuditEntry | None = None) -> Erased:
    """Delete every row that names the user (see the module's docstring), in one transaction, with
    the audit entry if given and anything was removed (it names the actor; its path is the
    erasure's, nothing of the user's content). Idempotent: a second call removes what was written
    since (a usage record or an activity row of a request that was in flight), else nothing."""
    async with conn.transaction():
        keys = await conn.fetch(_KEYS, user_id)
        key_ids = [r["id"] for r in keys]
        subjects = [f"u:{user_id}", *(f"k:{k}" for k in key_ids)]

        async def count(sql: str, *args: object) -> int:
            return int(await conn.fetchval(f"WITH d AS ({sql} RETURNING 1) SELECT count(*) FROM d", *args))

        usage = int(await conn.fetchval(_FOLD_USAGE, user_id))
        other = (await count("DELETE FROM daily_usage WHERE user_id = $1", user_id)
                 + await count("DELETE FROM key_daily_usage WHERE api_key_id = ANY($1::uuid[])", key_ids)
                 + await count("DELETE FROM rate_windows WHERE subject = ANY($1::text[])", subjects)
                 + await count("DELETE FROM stream_counts WHERE subject = ANY($1::text[])", subjects)
                 # only leases of the user's own streams: one of another user's key under theirs also
                 # holds that user's counters, given back when its stream ends
                 + await count("DELETE FROM stream_leases WHERE subjects <@ $1::text[]", subjects)
                 + await count("DELETE FROM quota_leases WHERE user_id = $1", user_id)
                 + await count("DELETE FROM quota_recalls WHERE user_id = $1", user_id)
                 + await count("DELETE FROM budget_usage WHERE subject = ANY($1::text[])", subjects)
                 # an event names them anywhere in its payload (user_id, key_id, parent_id, ...)
                 + await count("DELETE FROM webhook_outbox WHERE payload::text LIKE ANY($1::text[])",
                               [f"%{i}%" for i in (user_id, *key_ids)]))
        activity = await count("DELETE FROM activity_log WHERE user_id = $1", user_id)
        # children before parents: the cascades would take them, but then uncounted
        comparisons = await count("DELETE FROM comparisons WHERE user_id = $1", user_id)
        messages = await count("DELETE FROM messages WHERE user_id = $1", user_id)
        threads = await count("DELETE FROM threads WHERE user_id = $1", user_id)
        api_keys = await count("DELETE FROM api_keys WHERE id = ANY($1::uuid[])", key_ids)
        users = await count("DELETE FROM users WHERE id = $1", user_id)
        erased = Erased(users=users, api_keys=api_keys, threads=threads, messages=messages, comparisons=comparisons,
                        usage=usage, activity=activity, other=other)
        if audit is not None and erased.total:
            await conn.execute(
                "INSERT INTO activity_log (at, user_id, api_key_id, action, method, path, status, ip, request_id) "
                "VALUES ($1, $2, $3, 'users.erase', $4, $5, 200, $6, $7)",
                audit.at, audit.actor, audit.api_key_id, audit.method, audit.path, audit.ip, audit.request_id)
    return erased


@dataclass(frozen=True)
class AuditEntry:
    """Who erased whom (the path names the erased user's id and nothing else of theirs)."""

    at: datetime
    actor: uuid.UUID  # the admin's user; the nil UUID for the operator's command line
    api_key_id: uuid.UUID | None
    method: str
    path: str
    ip: str | None = None
    request_id: str | None = None
