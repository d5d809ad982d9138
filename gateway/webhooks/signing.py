"""Standard Webhooks signatures (https://www.standardwebhooks.com): the headers a receiver verifies.

The secret is `whsec_` followed by the base64 of the key. The signature is the base64 of
HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>"), sent as `v1,<signature>`; the
timestamp is the attempt's, in whole seconds since the epoch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

PREFIX = "whsec_"


def key_of(secret: str) -> bytes:
    """The signing key a `whsec_` secret holds."""
    return base64.b64decode(secret.removeprefix(PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value for one attempt."""
    mac = hmac.new(key_of(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header of one attempt."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body), "Content-Type": "application/json"}
