"""SQL for users and API keys. A key is stored only as its SHA-256 and a short display prefix.

Keys form trees (sql/0008_key_tree.sql): a key made by another key is its child, and carries its
whole chain of ancestors (parent first, root last), written once. A key works only while it and
every ancestor work; revoking a key revokes its descendants in the same statement.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

KEY_PREFIX = "gwk_"
DISPLAY_CHARS = 12  # "gwk_" + 8 characters: enough to tell keys apart, useless to an attacker
# every instance LISTENs here and drops the key (payload: its hash in hex) from its cache
REVOKED_CHANNEL = "gateway_key_revoked"
# what a listing shows: never the key, never its hash
_PUBLIC = "id, user_id, parent_id, name, prefix, scopes, limits, expires_at, revoked_at, last_used_at, created_at"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    # keys are 256 random bits: a fast hash is enough (no dictionary to attack), and lookups stay cheap
    return hashlib.sha256(key.encode()).digest()


class ParentRevoked(Exception):
    """The key that would be the new key's parent (or one of its ancestors) is revoked."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ancestor:
    """A key above another in its tree: its limits bound every key below it, whose usage is its own."""

    id: uuid.UUID
    limits: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: uuid.UUID
    user_id: uuid.UUID
    email: str | None
    scopes: frozenset[str]
    expires_at: datetime | None  # the earliest of the key's and its ancestors'
    revoked_at: datetime | None  # likewise: a key dies with any ancestor
    limits: dict[str, Any] | None = None  # per-key limits for the policy (requests_per_minute, models, ...)
    ancestors: tuple[Ancestor, ...] = ()  # parent first, root last


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


# A child is inserted only while its parent and every ancestor are unrevoked, checked under a
# KEY SHARE lock on each of them: a revocation (which locks its key FOR UPDATE first, see
# revoke_key) either waits for this insert and then sees the child, or commits first and this
# insert sees it revoked. No child escapes its tree's revocation.
_ISSUE = f"""
WITH parent AS (SELECT id, ancestors FROM api_keys WHERE id = $8),
chain AS (
    SELECT revoked_at FROM api_keys WHERE id = $8 OR id IN (SELECT unnest(ancestors) FROM parent) FOR KEY SHARE
)
INSERT INTO api_keys (user_id, name, prefix, key_hash, scopes, expires_at, limits, parent_id, ancestors)
SELECT $1, $2, $3, $4, $5, $6, $7, $8,
       CASE WHEN $8::uuid IS NULL THEN '{{}}'::uuid[] ELSE $8 || (SELECT ancestors FROM parent) END
WHERE (SELECT count(*) FILTER (WHERE revoked_at IS NOT NULL) FROM chain) = 0
RETURNING {_PUBLIC}"""


async def issue_key(conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID, name: str, scopes: list[str],
                    expires_at: datetime | None = None, limits: dict[str, Any] | None = None,
                    parent_id: uuid.UUID | None = None) -> tuple[dict[str, Any], str]:
    """Returns (the key's public row, the plaintext key). `parent_id`: the key creating it (None for
    the CLI, the bootstrap and signed-in users); raises ParentRevoked when that key or one of its
    ancestors is revoked."""
    key = new_key()
    row = await conn.fetchrow(_ISSUE, user_id, name, key[:DISPLAY_CHARS], hash_key(key), scopes, expires_at, limits,
                              parent_id)
    if row is None:
        raise ParentRevoked(str(parent_id))
    return dict(row), key


async def list_keys(pool: asyncpg.Pool, user_id: uuid.UUID | None,
                    key_id: uuid.UUID | None = None) -> list[dict[str, Any]]:
    """A user's keys (None: everybody's), newest first; only the key `key_id` when given."""
    rows = await pool.fetch(
        f"SELECT {_PUBLIC} FROM api_keys WHERE ($1::uuid IS NULL OR user_id = $1) AND ($2::uuid IS NULL OR id = $2) "
        "ORDER BY created_at DESC, id DESC", user_id, key_id)
    return [dict(r) for r in rows]


async def find_keys(pool: asyncpg.Pool, ref: str) -> list[dict[str, Any]]:
    """Every user's keys whose id, display prefix or name is `ref`, newest first (the operator's
    command line: it sees every user)."""
    try:
        key_id: uuid.UUID | None = uuid.UUID(ref)
    except ValueError:
        key_id = None
    rows = await pool.fetch(
        f"SELECT {_PUBLIC} FROM api_keys WHERE id = $1 OR prefix = $2 OR name = $2 ORDER BY created_at DESC, id DESC",
        key_id, ref)
    return [dict(r) for r in rows]


async def revoke_key(pool: asyncpg.Pool, key_id: uuid.UUID, user_id: uuid.UUID | None,
                     then: Callable[[asyncpg.Connection, list[bytes]], Awaitable[object]] | None = None,
                     ) -> list[bytes] | None:
    """Revoke a key of `user_id` (None: anybody's) and all its descendants (whoever owns them);
    the hashes of every key revoked, or None when there is no such key. `then` runs in the
    revocation's transaction with the hashes (the key.revoked webhook event is queued there, so
    it is written if and only if the revocation commits).

    Idempotent: a second revocation keeps the first time. The key is locked first, so a child
    being created under it (see _ISSUE) is either refused or committed and revoked here. The
    notifications (one per key) go out with the commit, so no instance hears of a revocation
    that did not happen.
    """
    async with pool.acquire() as conn, conn.transaction():
        found = await conn.fetchval("SELECT id FROM api_keys WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2) "
                                    "FOR UPDATE", key_id, user_id)
        if found is None:
            return None
        # a new statement, so a new snapshot: children committed while we waited for the lock are in it
        rows = await conn.fetch("""
            WITH revoked AS (
                UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
                WHERE id = $1 OR ancestors @> ARRAY[$1::uuid] RETURNING key_hash)
            SELECT key_hash, pg_notify($2, encode(key_hash, 'hex')) FROM revoked""", key_id, REVOKED_CHANNEL)
        hashes = [r["key_hash"] for r in rows]
        if then is not None:
            await then(conn, hashes)
    return hashes


async def touch_keys(pool: asyncpg.Pool, used: list[tuple[uuid.UUID, datetime]]) -> None:
    """Record when keys were last used, a batch in one statement; never moves a time backwards."""
    await pool.execute("""
        UPDATE api_keys k SET last_used_at = greatest(k.last_used_at, u.at)
        FROM (SELECT id, max(at) AS at FROM unnest($1::uuid[], $2::timestamptz[]) AS t (id, at) GROUP BY id) u
        WHERE k.id = u.id""", [u[0] for u in used], [u[1] for u in used])


async def find_key(pool: asyncpg.Pool, key_hash: bytes) -> KeyRecord | None:
    """The key with this hash and its chain: revoked or expired when it or any ancestor is (the
    revocation cascade already marks descendants; this is the belt to its braces)."""
    row = await pool.fetchrow("""
        SELECT k.id, k.user_id, u.email, k.scopes, k.limits,
               least(k.expires_at, a.expires_at) AS expires_at, least(k.revoked_at, a.revoked_at) AS revoked_at,
               coalesce(a.ids, '{}') AS ancestor_ids, coalesce(a.limits, '{}') AS ancestor_limits
        FROM api_keys k JOIN users u ON u.id = k.user_id
        LEFT JOIN LATERAL (
            SELECT array_agg(p.id ORDER BY c.pos) AS ids, array_agg(p.limits ORDER BY c.pos) AS limits,
                   min(p.expires_at) AS expires_at, min(p.revoked_at) AS revoked_at
            FROM unnest(k.ancestors) WITH ORDINALITY AS c (id, pos) JOIN api_keys p ON p.id = c.id
        ) a ON true
        WHERE k.key_hash = $1""", key_hash)
    if row is None:
        return None
    ancestors = tuple(Ancestor(id=i, limits=limits)
                      for i, limits in zip(row["ancestor_ids"], row["ancestor_limits"], strict=True))
    return KeyRecord(row["id"], row["user_id"], row["email"], frozenset(row["scopes"]), row["expires_at"],
                     row["revoked_at"], row["limits"], ancestors)


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
    key_hash: bytes | None = await pool.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", key_id)
    return key_hash
