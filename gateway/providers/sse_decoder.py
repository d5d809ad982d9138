"""Incremental Server-Sent Events decoding, as browsers do it (WHATWG "Server-sent events").

Upstream bytes arrive split anywhere: an event may straddle reads, a CRLF may be cut between
its CR and its LF, and lines may end in LF, CRLF or CR. `feed` takes whatever arrived and
returns the events completed by it; the rest waits for the next read.
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class SSEEvent:
    event: str  # "message" unless the stream named it
    data: bytes  # data lines joined by LF


class SSEDecoder:
    def __init__(self) -> None:
        self._tail = b""  # an incomplete line, already CR-normalised
        self._skip_lf = False  # the last read ended in CR: a leading LF belongs to that line end
        self._started = False
        self._event = ""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
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
                continue
            if line[0] == 0x3A:  # ":" comment (keep-alives, OpenRouter's PROCESSING lines)
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
            # id and retry matter to a browser, not to a relay; unknown fields are ignored
        return events
