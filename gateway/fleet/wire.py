"""A reply's events as entries of a Redis Stream, one stream per assistant message.

An entry's id is `<seq>-1` (Redis refuses `0-0`), so "everything after the client's Last-Event-ID"
is one `XREAD` from `<seq>-1`, and a publisher that starts over (after a Redis restart) can never
write an event twice: an id at or below the stream's top is refused. The entry holds the seq
again, the event name and the data bytes exactly as the generating instance encoded them, so a
reader rebuilds the very `Event` (and so the very SSE bytes) its own listeners got.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from gateway.generation.events import Event

if TYPE_CHECKING:  # redis is an optional extra
    from redis.typing import EncodableT, FieldT

PREFIX = "gw:reply:"


def stream_key(message_id: uuid.UUID | str) -> str:
    """`gw:reply:{<message id>}`: the braces are a Redis Cluster hash tag — only the id picks the
    slot, so every key of one reply lands on one node (a single server ignores them)."""
    return f"{PREFIX}{{{message_id}}}"


def entry_id(seq: int) -> str:
    return f"{seq}-1"


def after_id(seq: int) -> str:
    """The XREAD position that returns the events after seq `seq` (-1: from the first)."""
    return "0-0" if seq < 0 else entry_id(seq)


def entry(event: Event) -> dict[FieldT, EncodableT]:
    return {b"s": b"%d" % event.seq, b"n": event.name.encode(), b"d": event.data}


def event_of(message: bytes, fields: dict[bytes, bytes]) -> Event:
    return Event(message, int(fields[b"s"]), fields[b"n"].decode(), fields[b"d"])
