"""A reply's events, structured: (message, seq, name, data bytes), and the log that holds them.

Every transport formats the same events: native SSE (`id: <message>:<seq>`), the arena's SSE
(`id: <comparison>:<seq a>:<seq b>`), WebSocket JSON frames, and a replay from the stored row.
An event's `data` is encoded to JSON once, when the event is made; the native SSE frame is built
once too, on first use, so any number of listeners write the same bytes.

    seq 0        metadata   model, provider, thread and message ids
    seq 1..n     delta      (no event name on the wire) {"delta": "..."}
                 reasoning  among the deltas, when the upstream streams its reasoning:
                            {"delta": "...", "signature": "..." when it gives one}
    seq n+1      usage      then done; or error instead of both
    seq n+2      done       {"finish_reason", "message_id", "attempts"}, and "tool_calls" (whole calls, in
                            the canonical turn's shape) when the reply called tools
"""

from __future__ import annotations

import bisect
import uuid
from collections import deque
from typing import Any

import orjson

DELTA = "delta"  # a delta's name: the SSE frame of a delta has no `event:` line


class Event:
    """One event of one message. `message` is the message id as ASCII bytes (shared by its events)."""

    __slots__ = ("message", "seq", "name", "data", "_sse")

    def __init__(self, message: bytes, seq: int, name: str, data: bytes) -> None:
        self.message = message
        self.seq = seq
        self.name = name
        self.data = data
        self._sse: bytes | None = None

    @property
    def sse(self) -> bytes:
        """The native SSE frame, built once."""
        if self._sse is None:
            if self.name == DELTA:
                self._sse = b"id: %s:%d\ndata: %s\n\n" % (self.message, self.seq, self.data)
            else:
                self._sse = b"id: %s:%d\nevent: %s\ndata: %s\n\n" % (
                    self.message, self.seq, self.name.encode(), self.data)
        return self._sse

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL

    def __repr__(self) -> str:
        return f"Event({self.message.decode()}:{self.seq} {self.name} {self.data!r})"


TERMINAL = frozenset({"done", "error"})


class EventMaker:
    """Makes the events of one message. An arena slot's data objects carry `"slot"` first."""

    __slots__ = ("message", "slot", "_open")

    def __init__(self, message_id: uuid.UUID | str, slot: str | None = None) -> None:
        self.message = str(message_id).encode()
        self.slot = slot
        self._open = b'{"slot":"' + slot.encode() + b'",' if slot else b"{"

    def delta(self, seq: int, text: str) -> Event:
        # the per-token path: one orjson call, the rest is bytes
        return Event(self.message, seq, DELTA, b'%s"delta":%s}' % (self._open, orjson.dumps(text)))

    def event(self, seq: int, name: str, data: dict[str, Any]) -> Event:
        if self.slot:
            data = {"slot": self.slot, **data}
        return Event(self.message, seq, name, orjson.dumps(data))


class EventLog:
    """A generation's events by seq, in bounded memory.

    The newest events are kept for the live listeners; older deltas are re-made on demand from
    the reply's text chunks (kept anyway, for the final save), so a long reply costs its text,
    not a list of every event it ever sent.
    """

    RECENT = 128

    def __init__(self, maker: EventMaker, parts: list[str]) -> None:
        self._maker = maker
        self._parts = parts
        self._recent: deque[Event] = deque(maxlen=self.RECENT)
        self._metadata: Event | None = None
        # the reasoning events among the deltas, kept whole (a reply without reasoning has none):
        # their seqs, ascending, and the events by seq
        self._side_seqs: list[int] = []
        self._side: dict[int, Event] = {}
        self.count = 0  # events so far; the next one gets this seq

    def append(self, event: Event) -> None:
        if self.count == 0:
            self._metadata = event
        self._recent.append(event)
        self.count += 1

    def append_side(self, event: Event) -> None:
        """An event among the deltas that is not one (reasoning): kept whole, since the text chunks
        cannot re-make it."""
        self._side_seqs.append(event.seq)
        self._side[event.seq] = event
        self.append(event)

    def between(self, start: int, end: int) -> list[Event]:
        """Events with seq in [start, end)."""
        first_recent = self.count - len(self._recent)
        out = [self._old(seq) for seq in range(start, min(end, first_recent))]
        out.extend(self._recent[seq - first_recent] for seq in range(max(start, first_recent), end))
        return out

    def _old(self, seq: int) -> Event:
        # only metadata (seq 0) and deltas (1..n) can have left the recent window: the closing
        # usage/done/error events are always the newest
        if seq == 0 and self._metadata is not None:
            return self._metadata
        if not self._side_seqs:
            return self._maker.delta(seq, self._parts[seq - 1])
        side = self._side.get(seq)
        if side is not None:
            return side
        return self._maker.delta(seq, self._parts[seq - 1 - bisect.bisect_left(self._side_seqs, seq)])


# -- the data of each event, live or replayed: one builder each so both are byte-identical -----

def metadata_json(*, thread_id: uuid.UUID, user_message_id: uuid.UUID, message_id: uuid.UUID,
                  model: str | None, provider: str | None, category: str | None, auto: bool,
                  fallback_from: str | None, selected: str | None = None) -> dict[str, Any]:
    data = {"thread_id": thread_id, "user_message_id": user_message_id, "message_id": message_id, "model": model,
            "provider": provider, "category": category, "auto": auto, "fallback_from": fallback_from}
    if selected is not None:  # how the model was chosen when the client did not name it: "random"
        data["selected"] = selected
    return data


def usage_json(prompt_tokens: int, completion_tokens: int, estimated: bool, cached_tokens: int = 0,
               cache_write_tokens: int = 0) -> dict[str, Any]:
    """The usage event's data: the prompt's parts read from and written to a prompt cache (both
    counted in prompt_tokens) only when there are any."""
    data: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        data["cached_tokens"] = cached_tokens
    if cache_write_tokens:
        data["cache_write_tokens"] = cache_write_tokens
    if estimated:
        data["estimated"] = True
    return data


def reasoning_json(text: str, signature: str | None) -> dict[str, Any]:
    """A reasoning event's data: a piece of the model's reasoning, and the signature that closes
    its block when the upstream gives one."""
    return {"delta": text, "signature": signature} if signature else {"delta": text}


def done_json(finish_reason: str, message_id: uuid.UUID, attempts: list[dict[str, Any]],
              anonymous: bool, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    # the attempt trail names models: an anonymous arena slot keeps them for the vote to reveal
    data: dict[str, Any] = {"finish_reason": finish_reason, "message_id": message_id}
    if not anonymous:
        data["attempts"] = attempts
    if tool_calls:  # the reply's calls, whole: a client (the Responses door) sends their results back
        data["tool_calls"] = tool_calls
    return data
