"""The gateway's closed sets of values, as types: one definition each, used by code and SQL alike.

`StrEnum` members are `str`s: they compare equal to the text stored in PostgreSQL and written to
JSON, so a row's `status` can be checked with `MessageStatus.COMPLETE` and an enum can be passed
to asyncpg or orjson unchanged.
"""

from __future__ import annotations

from enum import StrEnum


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
