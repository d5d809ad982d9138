"""Verification of Supabase-style access tokens (JWT), signed with HS* or with keys from a JWKS.

The accepted algorithms are fixed by configuration, never by the token: the header's `alg` only
picks one of them, and the algorithm family decides the key. HMAC algorithms verify with
JWT_SECRET only; public-key algorithms verify with a JWKS key of the matching key type only, so
a public key can never be used as an HMAC secret (algorithm confusion).

The issuer is checked whenever one is known: JWT_ISSUER, or by default, when JWKS_URL is a Supabase
project's (`https://<ref>.supabase.co/auth/v1/.well-known/jwks.json`), that project's
`https://<ref>.supabase.co/auth/v1` (see `config._jwt_issuer`; `JWT_ISSUER=*` turns it off), so a
token of another Supabase project is refused even if the key set were shared.

JWKS keys are cached by `kid`. An unknown `kid` or a cache older than `jwks_ttl_s` triggers a
refetch; refetches are at most one per `jwks_min_refresh_s`, and concurrent verifies share it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt
from jwt.algorithms import get_default_algorithms

from gateway.config import Settings
from gateway.errors import ConfigError, Unauthorized
from gateway.observability.metrics import Metrics

log = logging.getLogger(__name__)

# JWK key type (`kty`) that each public-key algorithm family verifies with
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


@dataclass(frozen=True, slots=True)
class JwtIdentity:
    """The verified caller: `sub` as a UUID, `email` if the token carries one, all claims, and
    when the token stops verifying here (`exp` plus the leeway): an open WebSocket closes then."""

    user_id: uuid.UUID
    email: str | None
    claims: dict[str, Any]
    valid_until: datetime


@dataclass(frozen=True, slots=True)
class _Jwk:
    key: jwt.PyJWK
    declared_alg: str | None  # the JWK's own `alg`, if it pins one


class JwtVerifier:
    """Verifies access tokens; one per app, sharing the app's ClientSession for JWKS fetches."""

    FETCH_TIMEOUT_S = 5.0

    def __init__(self, settings: Settings, session: aiohttp.ClientSession | None, *,
                 clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._jwks_hit, self._jwks_miss = (metrics or Metrics()).cache("jwks")
        self._session = session
        self._clock = clock
        self._secret = settings.jwt_secret.reveal().encode() if settings.jwt_secret else None
        self._keys: dict[str, _Jwk] = {}
        self._fetched_at: float | None = None  # last successful fetch, for the TTL
        self._attempted_at: float | None = None  # last finished fetch, for the rate limit
        self._lock = asyncio.Lock()
        if any(not a.startswith("HS") for a in settings.jwt_algorithms) and (
                not settings.jwks_url or session is None):
            raise ConfigError("JWT_ALGORITHMS allows public-key algorithms but JWKS is not usable "
                              "(JWKS_URL unset or no HTTP session)")
        self._check_secret()

    def _check_secret(self) -> None:
        # Fail at start rather than on every request: PyJWT warns about (or, as configured here,
        # rejects) HMAC secrets shorter than the hash, and rejects PEM-looking secrets.
        for alg in (a for a in self._settings.jwt_algorithms if a.startswith("HS")):
            if not self._secret:
                raise ConfigError(f"JWT_ALGORITHMS allows {alg} but JWT_SECRET is not set")
            algorithm = get_default_algorithms()[alg]
            try:
                problem = algorithm.check_key_length(algorithm.prepare_key(self._secret))
            except jwt.InvalidKeyError:
                problem = "it looks like a public key or certificate"
            if problem:
                raise ConfigError(f"JWT_SECRET is not usable for {alg}: {problem}")

    async def verify(self, token: str) -> JwtIdentity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._settings.jwt_algorithms:
            raise Unauthorized("token algorithm not allowed")
        key: Any = self._secret if alg.startswith("HS") else await self._public_key(header.get("kid"), alg)

        issuer = self._settings.jwt_issuer
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=self._settings.jwt_audience, issuer=issuer,
                leeway=self._settings.jwt_leeway_s,
                options={"require": ["exp", "sub"], "enforce_minimum_key_length": True})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except (jwt.ImmatureSignatureError, jwt.InvalidIssuedAtError):
            raise Unauthorized("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            raise Unauthorized(f"token has no {e.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("token signature is invalid") from None
        except jwt.PyJWTError:
            raise Unauthorized("invalid token") from None

        try:
            user_id = uuid.UUID(claims["sub"])
        except (TypeError, ValueError):
            raise Unauthorized("token subject is not a user id") from None
        email = claims.get("email")
        return JwtIdentity(user_id, email if isinstance(email, str) else None, claims,
                           _valid_until(claims["exp"], self._settings.jwt_leeway_s))

    async def _public_key(self, kid: Any, alg: str) -> Any:
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("token has no key id")
        fetched_at = self._fetched_at
        if kid not in self._keys or fetched_at is None or self._clock() - fetched_at >= self._settings.jwks_ttl_s:
            self._jwks_miss.inc()
            await self._refresh()
        else:
            self._jwks_hit.inc()
        jwk = self._keys.get(kid)
        if jwk is None:
            raise Unauthorized("unknown signing key" if self._keys else "signing keys unavailable")
        # the family check is ours, not PyJWT's: an RS* token must never meet an EC key, etc.
        if jwk.key.key_type != _KEY_TYPES[alg[:2]] or jwk.declared_alg not in (None, alg):
            raise Unauthorized("signing key does not match token algorithm")
        return jwk.key.key

    async def _refresh(self) -> None:
        # Verifies queue on the lock; whoever gets it after a fetch finished sees the fresh
        # attempt time and returns, so concurrent verifies share one fetch.
        async with self._lock:
            started = self._clock()
            if self._attempted_at is not None and started - self._attempted_at < self._settings.jwks_min_refresh_s:
                return
            keys = await self._fetch()
            # set only once the fetch has finished: a cancelled fetch leaves the next verify free to try
            self._attempted_at = started
            if keys is not None:
                self._keys, self._fetched_at = keys, started

    async def _fetch(self) -> dict[str, _Jwk] | None:
        """The JWKS as usable keys by `kid`, or None (logged) if it cannot be had: old keys stay."""
        url = self._settings.jwks_url
        assert url and self._session is not None  # checked in __init__
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=self.FETCH_TIMEOUT_S)) as resp:
                if resp.status != 200:
                    log.warning("JWKS fetch from %s failed: HTTP %d", url, resp.status)
                    return None
                doc = await resp.json(content_type=None)
            keys = _usable_keys(doc)
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            log.warning("JWKS fetch from %s failed: %s", url, type(e).__name__)
            return None
        if not keys:
            log.warning("JWKS fetch from %s returned no usable signing keys", url)
            return None
        return keys


def _valid_until(exp: Any, leeway_s: float) -> datetime:
    # PyJWT has checked that `exp` is a number in the future; one past datetime's range is "never"
    try:
        return datetime.fromtimestamp(float(exp) + leeway_s, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return datetime.max.replace(tzinfo=UTC)


def _usable_keys(doc: Any) -> dict[str, _Jwk]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWK set")
    keys: dict[str, _Jwk] = {}
    for entry in doc["keys"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, LookupError, TypeError, ValueError):
            continue  # a malformed or unsupported key (type, curve) must not hide the usable ones
        alg = entry.get("alg")
        keys[entry["kid"]] = _Jwk(jwk, alg if isinstance(alg, str) else None)
    return keys
