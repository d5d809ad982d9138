"""Who is calling: gateway API keys and Supabase-style JWTs, behind in-process caches.

The hot path does no database round trip for a known caller: key lookups are cached for
`key_cache_ttl_s`, and a JWT user's row is upserted once and then skipped while fresh.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import KW_ONLY, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import asyncpg
from aiohttp import web

from .background import BatchWriter
from .config import Settings
from .errors import Forbidden, Unauthorized
from .jwt_auth import JwtVerifier
from .metrics import Metrics
from .store import keys as key_store

log = logging.getLogger(__name__)

JWT_SCOPES = frozenset({"chat", "arena"})


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: uuid.UUID
    email: str | None
    api_key_id: uuid.UUID | None
    scopes: frozenset[str]
    limits: dict[str, Any] | None = None  # the key's own limits, if it carries any
    expires_at: datetime | None = None  # the key's expiry: a key cannot mint one that outlives it
    _: KW_ONLY  # fields below by name only
    # the keys above this one in its tree, parent first: their limits bound it (see api/keys.py)
    ancestors: tuple[key_store.Ancestor, ...] = ()

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Forbidden(f"this credential lacks the {scope!r} scope")


class Authenticator:
    # last_used_at is a coarse signal: at most one write per key per this many seconds per instance
    TOUCH_EVERY_S = 30.0

    def __init__(self, settings: Settings, pool: asyncpg.Pool, jwt: JwtVerifier | None,
                 clock: Callable[[], float] = time.monotonic,
                 last_used: BatchWriter[tuple[uuid.UUID, datetime]] | None = None,
                 metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._pool = pool
        self._jwt = jwt
        self._clock = clock
        self._keys: dict[bytes, tuple[key_store.KeyRecord, float]] = {}
        self._forgets = 0  # bumped by every forget: a lookup in flight across one is not cached
        self._last_used = last_used
        self._touched: dict[uuid.UUID, float] = {}
        self._fresh_users: dict[uuid.UUID, float] = {}
        metrics = metrics or Metrics()
        self._key_hit, self._key_miss = metrics.cache("api_key")
        self._user_hit, self._user_miss = metrics.cache("jwt_user")

    async def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing bearer credential (Authorization: Bearer <key or JWT>)")
        return await self.authenticate_token(token)

    async def authenticate_token(self, token: str) -> Principal:
        """A bearer value (API key or JWT), wherever the transport carried it: the Authorization
        header, or the query of a WebSocket upgrade (browsers cannot set headers there)."""
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
            self._key_miss.inc()
            forgets = self._forgets
            record = await key_store.find_key(self._pool, digest)
            # unknown keys are not cached: random guesses must not grow memory; and a row read
            # before a revocation we heard of meanwhile may be stale
            if record is not None and forgets == self._forgets:
                self._keys[digest] = (record, now + self._settings.key_cache_ttl_s)
        else:
            self._key_hit.inc()
            record = cached[0]
        if record is None:
            raise Unauthorized("invalid API key")
        wall = datetime.now(timezone.utc)
        if record.revoked_at is not None and record.revoked_at <= wall:
            raise Unauthorized("API key revoked")
        if record.expires_at is not None and record.expires_at <= wall:
            raise Unauthorized("API key expired")
        if self._last_used is not None and self._touched.get(record.id, 0.0) <= now:
            self._touched[record.id] = now + self.TOUCH_EVERY_S
            self._last_used.add((record.id, wall))  # written in a batch, off the request path
        return Principal(record.user_id, record.email, record.id, record.scopes, record.limits, record.expires_at,
                         ancestors=record.ancestors)

    def forget_key(self, key_hash: bytes) -> None:
        """Drop a cached key (revocation)."""
        self._forgets += 1
        self._keys.pop(key_hash, None)

    def forget_all_keys(self) -> None:
        """Drop every cached key: revocations may have gone unheard (the LISTEN connection dropped)."""
        self._forgets += 1
        self._keys.clear()

    async def _from_jwt(self, token: str) -> Principal:
        assert self._jwt is not None
        identity = await self._jwt.verify(token)
        now = self._clock()
        if self._fresh_users.get(identity.user_id, 0.0) <= now:
            self._user_miss.inc()
            try:
                await key_store.upsert_user(self._pool, identity.user_id, identity.email)
                self._fresh_users[identity.user_id] = now + self._settings.user_cache_ttl_s
            except (asyncpg.PostgresError, OSError) as e:
                # the caller is authenticated either way; the row is retried on the next request
                log.warning("user upsert failed for %s: %s", identity.user_id, type(e).__name__)
        else:
            self._user_hit.inc()
        return Principal(identity.user_id, identity.email, None, JWT_SCOPES)
