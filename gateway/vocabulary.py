"""The gateway's closed sets of values, as types: one definition each, used by code and SQL alike;
and `Principal`, who is calling: a value the edge makes and every layer below it reads.

`StrEnum` members are `str`s: they compare equal to the text stored in PostgreSQL and written to
JSON, so a row's `status` can be checked with `MessageStatus.COMPLETE` and an enum can be passed
to asyncpg or orjson unchanged.
"""

from __future__ import annotations

import uuid
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from gateway.errors import Forbidden

if TYPE_CHECKING:
    from gateway.store.keys import Ancestor


class MessageStatus(StrEnum):
    """A message row's `status`. User messages are `complete` from their commit."""

    PENDING = "pending"
    STREAMING = "streaming"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"  # stopped on purpose (cancel endpoint, WS cancel frame)
    INTERRUPTED = "interrupted"  # stopped by a shutdown, or swept after its instance died
    REFUSED = "refused"  # the policy stopped it before any provider call

    @property
    def live(self) -> bool:
        return self in LIVE_STATUSES


LIVE_STATUSES = frozenset({MessageStatus.PENDING, MessageStatus.STREAMING})


class CircuitState(StrEnum):
    """A model's circuit breaker (gateway/providers/circuit.py), as /metrics labels it."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"  # open, but the cool-down has passed: one probe may go
    OPEN = "open"


class Winner(StrEnum):
    """An arena vote."""

    A = "a"
    B = "b"
    TIE = "tie"
    BOTH_BAD = "both_bad"


class PolicyAction(StrEnum):
    """What the policy decided for one request (a refusal raises instead)."""

    APPROVE = "approve"
    DOWNGRADE = "downgrade"


class Slot(StrEnum):
    """An arena reply's side."""

    A = "a"
    B = "b"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, once authenticated (gateway/edge/auth.py): the user, the key and its scopes and limits."""

    user_id: uuid.UUID
    email: str | None
    api_key_id: uuid.UUID | None
    scopes: frozenset[str]
    limits: dict[str, Any] | None = None  # the key's own limits, if it carries any
    # when the credential stops working: a key's expiry (a key cannot mint one that outlives it),
    # or a JWT's `exp` plus the leeway; an open WebSocket is closed then
    expires_at: datetime | None = None
    # the API key's SHA-256, how revocations name it (not a secret, but no use in a log line either)
    key_hash: bytes | None = field(default=None, repr=False, compare=False)
    _: KW_ONLY  # fields below by name only
    # the keys above this one in its tree, parent first: their limits bound it (see api/native/keys.py)
    ancestors: tuple[Ancestor, ...] = ()

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Forbidden(f"this credential lacks the {scope!r} scope")
