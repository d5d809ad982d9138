"""SQL for users and API keys. A key is stored only as its SHA-256 and a short display prefix."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

KEY_PREFIX = "gwk_"
DISPLAY_CHARS = 12  # "gwk_" + 8 characters: enough to tell keys apart, useless to an attacker


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


async def upsert_user(conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID, email: str | None) -> None:
    await conn.execute("""
        INSERT INTO users (id, email) VALUES ($1, $2)
        ON CONFLICT (id) DO UPDATE SET email = coalesce(EXCLUDED.email, users.email), last_seen_at = now()""",
        user_id, email)


async def create_key(conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID, name: str,
                     scopes: list[str]) -> tuple[uuid.UUID, str]:
    """Returns (key id, the plaintext key): the only time the key exists outside its owner's hands."""
    key = new_key()
    key_id = await conn.fetchval(
        "INSERT INTO api_keys (user_id, name, prefix, key_hash, scopes) VALUES ($1, $2, $3, $4, $5) RETURNING id",
        user_id, name, key[:DISPLAY_CHARS], hash_key(key), scopes)
    return key_id, key


async def find_key(pool: asyncpg.Pool, key_hash: bytes) -> KeyRecord | None:
    row = await pool.fetchrow("""
        SELECT k.id, k.user_id, u.email, k.scopes, k.expires_at, k.revoked_at
        FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_hash = $1""", key_hash)
    if row is None:
        return None
    return KeyRecord(row["id"], row["user_id"], row["email"], frozenset(row["scopes"]), row["expires_at"],
                     row["revoked_at"])


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
