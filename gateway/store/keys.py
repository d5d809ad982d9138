"""SQL for users and API keys. A key is stored only as its SHA-256 and a short display prefix."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

KEY_PREFIX = "gwk_"
DISPLAY_CHARS = 12  # "gwk_" + 8 characters: enough to tell keys apart, useless to an attacker
# every instance LISTENs here and drops the key (payload: its hash in hex) from its cache
REVOKED_CHANNEL = "gateway_key_revoked"
# what a listing shows: never the key, never its hash
_PUBLIC = "id, user_id, name, prefix, scopes, limits, expires_at, revoked_at, last_used_at, created_at"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    # keys are 256 random bits: a fast hash is enough (no dictionary to attack), and lookups stay cheap
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: uuid.UUID
    user_id: uuid.UUID
    email: str | None
    scopes: frozenset[str]
    expires_at: datetime | None
    revoked_at: datetime | None
    limits: dict[str, Any] | None = None  # per-key limits for the policy (requests_per_minute, models, ...)


async def upsert_user(conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID, email: str | None) -> None:
    await conn.execute("""
        INSERT INTO users (id, email) VALUES ($1, $2)
        ON CONFLICT (id) DO UPDATE SET email = coalesce(EXCLUDED.email, users.email), last_seen_at = now()""",
        user_id, email)


async def create_key(conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID, name: str,
                     scopes: list[str]) -> tuple[uuid.UUID, str]:
    """Returns (key id, the plaintext key): the only time the key exists outside its owner's hands."""
    row, key = await issue_key(conn, user_id, name, scopes)
    return row["id"], key


async def issue_key(conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID, name: str, scopes: list[str],
                    expires_at: datetime | None = None,
                    limits: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Returns (the key's public row, the plaintext key)."""
    key = new_key()
    row = await conn.fetchrow(
        "INSERT INTO api_keys (user_id, name, prefix, key_hash, scopes, expires_at, limits) "
        f"VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_PUBLIC}",
        user_id, name, key[:DISPLAY_CHARS], hash_key(key), scopes, expires_at, limits)
    return dict(row), key


async def list_keys(pool: asyncpg.Pool, user_id: uuid.UUID | None) -> list[dict[str, Any]]:
    """A user's keys (None: everybody's), newest first."""
    rows = await pool.fetch(
        f"SELECT {_PUBLIC} FROM api_keys WHERE $1::uuid IS NULL OR user_id = $1 ORDER BY created_at DESC, id DESC",
        user_id)
    return [dict(r) for r in rows]


async def revoke_key(pool: asyncpg.Pool, key_id: uuid.UUID, user_id: uuid.UUID | None) -> bytes | None:
    """Revoke a key of `user_id` (None: anybody's); its hash, or None when there is no such key.

    Idempotent: a second revocation keeps the first time. The notification goes out with the
    commit, so no instance hears of a revocation that did not happen.
    """
    return await pool.fetchval("""
        WITH revoked AS (
            UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
            WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2) RETURNING key_hash)
        SELECT key_hash, pg_notify($3, encode(key_hash, 'hex')) FROM revoked""", key_id, user_id, REVOKED_CHANNEL)


async def touch_keys(pool: asyncpg.Pool, used: list[tuple[uuid.UUID, datetime]]) -> None:
    """Record when keys were last used, a batch in one statement; never moves a time backwards."""
    await pool.execute("""
        UPDATE api_keys k SET last_used_at = greatest(k.last_used_at, u.at)
        FROM (SELECT id, max(at) AS at FROM unnest($1::uuid[], $2::timestamptz[]) AS t (id, at) GROUP BY id) u
        WHERE k.id = u.id""", [u[0] for u in used], [u[1] for u in used])


async def find_key(pool: asyncpg.Pool, key_hash: bytes) -> KeyRecord | None:
    row = await pool.fetchrow("""
        SELECT k.id, k.user_id, u.email, k.scopes, k.expires_at, k.revoked_at, k.limits
        FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_hash = $1""", key_hash)
    if row is None:
        return None
    return KeyRecord(row["id"], row["user_id"], row["email"], frozenset(row["scopes"]), row["expires_at"],
                     row["revoked_at"], row["limits"])


async def create_user_with_key(pool: asyncpg.Pool, name: str, scopes: list[str], user_id: uuid.UUID | None = None,
                               email: str | None = None) -> tuple[uuid.UUID, str]:
    async with pool.acquire() as conn, conn.transaction():
        user_id = user_id or uuid.uuid4()
        await upsert_user(conn, user_id, email)
        return await create_key(conn, user_id, name, scopes)


async def bootstrap_admin_key(pool: asyncpg.Pool) -> str | None:
    """On a first start with no key at all, make an admin key; None when keys already exist.

    The transaction-scoped advisory lock keeps two instances starting together from both
    making one.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('gateway:bootstrap-admin-key'))")
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM api_keys)"):
            return None
        user_id = uuid.uuid4()
        await upsert_user(conn, user_id, "admin@localhost")
        _, key = await create_key(conn, user_id, "admin (first start)", ["chat", "arena", "admin"])
        return key


async def key_hash_by_id(pool: asyncpg.Pool, key_id: uuid.UUID) -> bytes | None:
    """The hash of the key with this id (a stream token names its key by id; caches go by hash)."""
    return await pool.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", key_id)
