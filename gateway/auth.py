"""Who is calling: gateway API keys and Supabase-style JWTs, behind in-process caches.

The hot path does no database round trip for a known caller: key lookups are cached for
`key_cache_ttl_s`, and a JWT user's row is upserted once and then skipped while fresh.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import asyncpg
from aiohttp import web

from .config import Settings
from .errors import Forbidden, Unauthorized
from .jwt_auth import JwtVerifier
from .store import keys as key_store

log = logging.getLogger(__name__)

JWT_SCOPES = frozenset({"chat", "arena"})


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: uuid.UUID
    email: str | None
    api_key_id: uuid.UUID | None
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Forbidden(f"this credential lacks the {scope!r} scope")


class Authenticator:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, jwt: JwtVerifier | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._pool = pool
        self._jwt = jwt
        self._clock = clock
        self._keys: dict[bytes, tuple[key_store.KeyRecord, float]] = {}
        self._fresh_users: dict[uuid.UUID, float] = {}

    async def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing bearer credential (Authorization: Bearer <key or JWT>)")
        if token.startswith(key_store.KEY_PREFIX):
            return await self._from_key(token)
        if self._jwt is not None and token.count(".") == 2:
            return await self._from_jwt(token)
        raise Unauthorized("invalid credential")

    async def _from_key(self, key: str) -> Principal:
        digest = key_store.hash_key(key)
        now = self._clock()
        cached = self._keys.get(digest)
        if cached is None or cached[1] <= now:
            record = await key_store.find_key(self._pool, digest)
            if record is not None:  # unknown keys are not cached: random guesses must not grow memory
                self._keys[digest] = (record, now + self._settings.key_cache_ttl_s)
        else:
            record = cached[0]
        if record is None:
            raise Unauthorized("invalid API key")
        wall = datetime.now(timezone.utc)
        if record.revoked_at is not None and record.revoked_at <= wall:
            raise Unauthorized("API key revoked")
        if record.expires_at is not None and record.expires_at <= wall:
            raise Unauthorized("API key expired")
        return Principal(record.user_id, record.email, record.id, record.scopes)

    def forget_key(self, key_hash: bytes) -> None:
        """Drop a cached key (revocation)."""
        self._keys.pop(key_hash, None)

    async def _from_jwt(self, token: str) -> Principal:
        assert self._jwt is not None
        identity = await self._jwt.verify(token)
        now = self._clock()
        if self._fresh_users.get(identity.user_id, 0.0) <= now:
            try:
                await key_store.upsert_user(self._pool, identity.user_id, identity.email)
                self._fresh_users[identity.user_id] = now + self._settings.user_cache_ttl_s
            except (asyncpg.PostgresError, OSError) as e:
                # the caller is authenticated either way; the row is retried on the next request
                log.warning("user upsert failed for %s: %s", identity.user_id, type(e).__name__)
        return Principal(identity.user_id, identity.email, None, JWT_SCOPES)
