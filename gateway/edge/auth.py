"""Who is calling: gateway API keys and Supabase-style JWTs, behind in-process caches.

The hot path does no database round trip for a known caller: key lookups are cached for
`key_cache_ttl_s`, and a JWT user's row is upserted once and then skipped while fresh.

A credential is checked again for as long as a connection it opened stays open (a WebSocket,
an SSE stream): `recheck` per WebSocket frame, from the same cache; and `watch` registers the
connection by its key, so that a revocation (`forget_key`, fed by the NOTIFY that reaches every
instance) or the credential's expiry (a timer) ends it at once, idle or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web

from gateway.config import Settings
from gateway.edge.jwt_auth import JwtVerifier
from gateway.errors import CredentialRevoked, Unauthorized
from gateway.observability.metrics import Metrics
from gateway.store import keys as key_store
from gateway.store.background import BatchWriter
from gateway.vocabulary import Principal as Principal  # who is calling: a value every layer reads

log = logging.getLogger(__name__)

JWT_SCOPES = frozenset({"chat", "arena"})


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
        self._hashes: dict[uuid.UUID, bytes] = {}  # key id -> hash, for keys named by id (stream tokens)
        self._watches: dict[bytes, set[CredentialWatch]] = {}  # open connections by their key's hash
        self._forgets = 0  # bumped by every forget: a lookup in flight across one is not cached
        self._last_used = last_used
        self._touched: dict[uuid.UUID, float] = {}
        self._fresh_users: dict[uuid.UUID, float] = {}
        metrics = metrics or Metrics()
        self._key_hit, self._key_miss = metrics.cache("api_key")
        self._user_hit, self._user_miss = metrics.cache("jwt_user")

    async def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization")
        if header is None and "x-api-key" in request.headers:
            header = "Bearer " + request.headers["x-api-key"]  # how Anthropic's SDKs send a key
        scheme, _, token = (header or "").partition(" ")
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
        record = await self._record(digest)
        if record is None:
            raise Unauthorized("invalid API key")
        self._check(record)
        self._touch(record.id)
        return Principal(record.user_id, record.email, record.id, record.scopes, record.limits, record.expires_at,
                         digest, ancestors=record.ancestors)

    async def _record(self, digest: bytes) -> key_store.KeyRecord | None:
        """The key with this hash, from the cache while fresh, else from the database."""
        now = self._clock()
        cached = self._keys.get(digest)
        if cached is not None and cached[1] > now:
            self._key_hit.inc()
            return cached[0]
        self._key_miss.inc()
        forgets = self._forgets
        record = await key_store.find_key(self._pool, digest)
        # unknown keys are not cached: random guesses must not grow memory; and a row read
        # before a revocation we heard of meanwhile may be stale
        if record is not None and forgets == self._forgets:
            self._keys[digest] = (record, now + self._settings.key_cache_ttl_s)
        if record is not None:
            self._hashes[record.id] = digest
        return record

    @staticmethod
    def _check(record: key_store.KeyRecord) -> None:
        wall = datetime.now(UTC)
        if record.revoked_at is not None and record.revoked_at <= wall:
            raise CredentialRevoked("API key revoked")
        if record.expires_at is not None and record.expires_at <= wall:
            raise Unauthorized("API key expired")

    def _touch(self, key_id: uuid.UUID) -> None:
        now = self._clock()
        if self._last_used is not None and self._touched.get(key_id, 0.0) <= now:
            self._touched[key_id] = now + self.TOUCH_EVERY_S
            self._last_used.add((key_id, datetime.now(UTC)))  # written in a batch, off the request path

    async def recheck(self, principal: Principal) -> None:
        """Raise Unauthorized (CredentialRevoked when revoked) if the credential that made this
        principal has stopped working. A cached key costs no I/O: run it on every frame."""
        if principal.key_hash is not None:
            record = await self._record(principal.key_hash)
            if record is None:
                raise Unauthorized("invalid API key")
            self._check(record)
            self._touch(record.id)
        elif principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            raise Unauthorized("token expired")

    async def key_principal(self, key_id: uuid.UUID, user_id: uuid.UUID) -> Principal:
        """The principal of the API key with this id, if it still works and is `user_id`'s: a
        stream token names the key that asked for it, and dies with it."""
        digest = self._hashes.get(key_id)
        if digest is None:
            digest = await key_store.key_hash_by_id(self._pool, key_id)
        record = None if digest is None else await self._record(digest)
        if record is None or record.user_id != user_id:
            raise Unauthorized("invalid API key")
        self._check(record)
        self._touch(record.id)
        return Principal(record.user_id, record.email, record.id, record.scopes, record.limits, record.expires_at,
                         digest, ancestors=record.ancestors)

    @contextmanager
    def watch(self, principal: Principal) -> Iterator[CredentialWatch]:
        """For the life of an open connection: its credential, watched (see CredentialWatch)."""
        watch = CredentialWatch(self, principal)
        if principal.key_hash is None:
            yield watch  # a JWT is never revoked here; only its expiry ends it
            return
        watches = self._watches.setdefault(principal.key_hash, set())
        watches.add(watch)
        try:
            yield watch
        finally:
            watches.discard(watch)
            if not watches:
                self._watches.pop(principal.key_hash, None)

    def forget_key(self, key_hash: bytes) -> None:
        """Drop a cached key (revocation); the connections it opened check it again."""
        self._forgets += 1
        self._keys.pop(key_hash, None)
        for watch in self._watches.get(key_hash, ()):
            watch.poke()

    def forget_all_keys(self) -> None:
        """Drop every cached key: revocations may have gone unheard (the LISTEN connection dropped),
        so every open connection of a key checks it again."""
        self._forgets += 1
        self._keys.clear()
        for watches in self._watches.values():
            for watch in watches:
                watch.poke()

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
        return Principal(identity.user_id, identity.email, None, JWT_SCOPES, expires_at=identity.valid_until)


class CredentialWatch:
    """An open connection's hold on the credential that opened it.

    Two ways to use it:
    - `lapsed()` returns, with the reason, once the credential stops working: when poked (its key
      was forgotten: a revocation, heard on every instance) or when its expiry comes, it rechecks
      the credential (a poked key is read afresh from the database) and returns if that fails.
      A WebSocket awaits it in a task of its own and then ends the connection.
    - `guard(task)`: no task of its own while all is well (an SSE stream is the hot path): a poke,
      or a timer at the expiry, runs one recheck, and a failed one cancels `task` with `reason`
      set (see api.common.until_lapsed).
    """

    __slots__ = ("principal", "_auth", "_poked", "_owner", "_timer", "_checking", "_again", "reason")

    RETRY_S = 1.0  # a recheck the database could not answer is tried again after this

    def __init__(self, auth: Authenticator, principal: Principal) -> None:
        self.principal = principal
        self._auth = auth
        self._poked = asyncio.Event()
        # the first look is at once: a revocation between the authentication and this watch's
        # registration poked nobody (it did clear the cache, so the recheck reads the database)
        self._poked.set()
        self._owner: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._checking: asyncio.Task[None] | None = None
        self._again = False
        self.reason: Unauthorized | None = None

    def poke(self) -> None:
        self._poked.set()
        if self._owner is None:
            return
        if self._checking is not None:
            self._again = True  # the recheck under way may have read the cache before this poke
            return
        self._checking = asyncio.get_running_loop().create_task(self._check())

    async def check_now(self) -> None:
        """The first look, inline: a cached key costs no I/O. Raises Unauthorized if lapsed."""
        self._poked.clear()
        await self._auth.recheck(self.principal)

    def guard(self, task: asyncio.Task[Any]) -> None:
        self._owner = task
        expires_at = self.principal.expires_at
        if expires_at is not None:
            delay = max((expires_at - datetime.now(UTC)).total_seconds(), 0.0)
            self._timer = asyncio.get_running_loop().call_later(delay, self.poke)

    def unguard(self) -> None:
        self._owner = None
        if self._timer is not None:
            self._timer.cancel()
        if self._checking is not None:
            self._checking.cancel()

    async def _check(self) -> None:
        try:
            await self._auth.recheck(self.principal)
        except Unauthorized as e:
            self.reason = e
            if self._owner is not None:
                self._owner.cancel()
            return
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            # the connection stays open while the database cannot say; ask again soon
            log.warning("credential recheck failed: %s", type(e).__name__)
            asyncio.get_running_loop().call_later(self.RETRY_S, self.poke)
        finally:
            self._checking = None
        if self._again:
            self._again = False
            self.poke()
        elif self._owner is not None and self.principal.expires_at is not None:
            # still good: the expiry timer may have fired a hair early (the loop's clock is not the
            # wall clock): set it again for what is left
            left = (self.principal.expires_at - datetime.now(UTC)).total_seconds()
            if left > 0:
                self._timer = asyncio.get_running_loop().call_later(left + 0.01, self.poke)

    async def lapsed(self) -> Unauthorized:
        loop = asyncio.get_running_loop()
        expires_at = self.principal.expires_at
        while True:
            deadline = None
            if expires_at is not None:
                deadline = loop.time() + max((expires_at - datetime.now(UTC)).total_seconds(), 0.0)
            try:
                async with asyncio.timeout_at(deadline):
                    await self._poked.wait()
            except TimeoutError:
                pass  # expiry: the recheck says so (a timer firing a hair early just comes round again)
            self._poked.clear()
            try:
                await self._auth.recheck(self.principal)
            except Unauthorized as e:
                return e
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
                # the connection stays open while the database cannot say; ask again soon
                log.warning("credential recheck failed: %s", type(e).__name__)
                await asyncio.sleep(self.RETRY_S)
                self._poked.set()
