"""Incremental Server-Sent Events decoding, as browsers do it (WHATWG "Server-sent events").

Upstream bytes arrive split anywhere: an event may straddle reads, a CRLF may be cut between
its CR and its LF, and lines may end in LF, CRLF or CR. `feed` takes whatever arrived and
returns the events completed by it; the rest waits for the next read.

What waits is bounded: an event (or a line) longer than `max_event_bytes` is an
`UpstreamProtocolError`, so an upstream that sends 10 MB without a line end, or data lines
without a blank line, costs at most that much memory before the reply fails cleanly. The read
that overflows still returns the events it completed; the error is raised by the next `feed`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.providers.base import UpstreamProtocolError

_BOM = b"\xef\xbb\xbf"
# a real chunk is well under a kilobyte; this is the client body limit's default too
MAX_EVENT_BYTES = 1 << 20


@dataclass(slots=True)
class SSEEvent:
    event: str  # "message" unless the stream named it
    data: bytes  # data lines joined by LF


class SSEDecoder:
    # one per held stream: no __dict__
    __slots__ = ("_max", "_held", "_overflow", "_tail", "_skip_lf", "_started", "_event", "_data")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._held = 0  # bytes of the data lines of the event being read
        self._overflow: UpstreamProtocolError | None = None
        self._tail = b""  # an incomplete line, already CR-normalised
        self._skip_lf = False  # the last read ended in CR: a leading LF belongs to that line end
        self._started = False
        self._event = ""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._overflow is not None:
            raise self._overflow
        if self._skip_lf and chunk:  # an empty read must not forget the pending CR
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not self._started:
            # a BOM can only be at the very start, and may itself be split across reads
            head = self._tail + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._tail = head
                return []
            self._started = True
            if head.startswith(_BOM):
                head = head[len(_BOM):]
            self._tail, chunk = b"", head
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        events: list[SSEEvent] = []
        for line in lines:
            if not line:
                # a blank line dispatches; empty data dispatches nothing
                if self._data:
                    events.append(SSEEvent(self._event or "message", b"\n".join(self._data)))
                self._event = ""
                self._data = []
                self._held = 0
                continue
            if line[0] == 0x3A:  # ":" comment (keep-alives, OpenRouter's PROCESSING lines)
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._held += len(value) + 1
                if self._held > self._max:
                    return self._fail(events)
                self._data.append(value)
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
            # id and retry matter to a browser, not to a relay; unknown fields are ignored
        if len(self._tail) > self._max:
            return self._fail(events)
        return events

    def _fail(self, events: list[SSEEvent]) -> list[SSEEvent]:
        """Stop at an event too long: what was completed is returned, the next `feed` raises."""
        self._overflow = UpstreamProtocolError(f"upstream sent an event longer than {self._max} bytes")
        self._tail, self._data = b"", []
        return events
