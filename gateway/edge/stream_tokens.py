"""Short-lived tokens for `stream_url`: EventSource cannot send an Authorization header.

A token is bound to one user, one message and the API key that asked for it (none for a JWT),
and expires: `<user hex>.<key id hex, or empty>.<expiry>.<signature>`, the signature an
HMAC-SHA256 over the message id and the three fields as written. Whoever accepts a token checks
that its key still works (a revoked key's tokens die with it), and a token never outlives the
credential that asked for it. The signing key is shared by every instance
(one row in gateway_secrets, made by whichever instance starts first).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from gateway.errors import Unauthorized
from gateway.store.secrets import shared_secret

SECRET_NAME = "stream_token_key"


async def load_signing_key(pool: asyncpg.Pool) -> bytes:
    """The signing key every instance shares: made by whichever instance asks first."""
    return await shared_secret(pool, SECRET_NAME, secrets.token_bytes(32))


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamGrant:
    """What a genuine, unexpired stream token says: who may read, and with which API key's
    authority (None: a JWT's). The caller still checks that the key works."""

    user_id: uuid.UUID
    api_key_id: uuid.UUID | None


class StreamTokens:
    def __init__(self, key: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._ttl = ttl_s
        self._clock = clock

    def _sign(self, user: str, api_key: str, message_id: uuid.UUID, expires: str) -> str:
        # over the fields as written: no second spelling of a token verifies
        mac = hmac.new(self._key, f"{user}.{api_key}.{message_id.hex}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def issue(self, user_id: uuid.UUID, message_id: uuid.UUID, *, api_key_id: uuid.UUID | None = None,
              not_after: datetime | None = None) -> str:
        """A token for `message_id`, for the caller `user_id` authenticated as `api_key_id` (None:
        a JWT); it expires after the TTL (rounded up), or at `not_after` (the credential's own
        expiry) if that comes first."""
        expires = math.ceil(self._clock() + self._ttl)
        if not_after is not None:
            expires = min(expires, math.floor(not_after.timestamp()))
        user, api_key, until = user_id.hex, api_key_id.hex if api_key_id else "", str(expires)
        return f"{user}.{api_key}.{until}.{self._sign(user, api_key, message_id, until)}"

    def verify(self, token: str, message_id: uuid.UUID) -> StreamGrant:
        """Who the token was issued to, if it is genuine, unexpired and for this message."""
        parts = token.split(".")
        if len(parts) != 4 or not token.isascii():
            raise Unauthorized("invalid stream token")
        user, api_key, until, signature = parts
        if not hmac.compare_digest(signature, self._sign(user, api_key, message_id, until)):
            raise Unauthorized("invalid stream token")
        try:
            grant = StreamGrant(user_id=uuid.UUID(hex=user), api_key_id=uuid.UUID(hex=api_key) if api_key else None)
            expires = int(until)
        except ValueError:  # we signed it, so it parses: belt and braces
            raise Unauthorized("invalid stream token") from None
        if expires <= self._clock():
            raise Unauthorized("stream token expired")
        return grant
