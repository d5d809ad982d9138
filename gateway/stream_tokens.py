"""Short-lived tokens for `stream_url`: EventSource cannot send an Authorization header.

A token is bound to one user and one message, and expires: `<user hex>.<expiry>.<signature>`,
the signature an HMAC-SHA256 over all three. The signing key is shared by every instance
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
from typing import Callable

import asyncpg

from .errors import Unauthorized
from .store.secrets import shared_secret

SECRET_NAME = "stream_token_key"


async def load_signing_key(pool: asyncpg.Pool) -> bytes:
    """The signing key every instance shares: made by whichever instance asks first."""
    return await shared_secret(pool, SECRET_NAME, secrets.token_bytes(32))


class StreamTokens:
    def __init__(self, key: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._ttl = ttl_s
        self._clock = clock

    def _sign(self, user_id: uuid.UUID, message_id: uuid.UUID, expires: int) -> str:
        mac = hmac.new(self._key, f"{user_id.hex}.{message_id.hex}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def issue(self, user_id: uuid.UUID, message_id: uuid.UUID) -> str:
        expires = math.ceil(self._clock() + self._ttl)  # rounded up: a token lives at least the TTL
        return f"{user_id.hex}.{expires}.{self._sign(user_id, message_id, expires)}"

    def verify(self, token: str, message_id: uuid.UUID) -> uuid.UUID:
        """The user the token was issued to, if it is genuine, unexpired and for this message."""
        try:
            user_hex, expires_raw, signature = token.split(".")
            user_id, expires = uuid.UUID(hex=user_hex), int(expires_raw)
        except ValueError:
            raise Unauthorized("invalid stream token") from None
        if not hmac.compare_digest(signature, self._sign(user_id, message_id, expires)):
            raise Unauthorized("invalid stream token")
        if expires <= self._clock():
            raise Unauthorized("stream token expired")
        return user_id
