"""Respond: the SSE wire protocol of the native endpoints, as pre-encoded bytes.

    retry: 3000

    id: <message_id>:0
    event: metadata
    data: {...}

    id: <message_id>:1
    data: {"delta":"Hel"}
    ...
    id: <message_id>:N
    event: done
    data: {...}

    data: [DONE]

Frames are built once, as bytes, by the generation; every listener writes the same bytes.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

DONE = b"data: [DONE]\n\n"


class FrameEncoder:
    """Encodes the events of one message; `prefix` is `id: <message_id>:` computed once.

    An arena slot's events carry `"slot"` as the first key of every data object.
    """

    __slots__ = ("prefix", "slot", "_open")

    def __init__(self, message_id: str, slot: str | None = None) -> None:
        self.prefix = b"id: " + message_id.encode() + b":"
        self.slot = slot
        self._open = b'{"slot":"' + slot.encode() + b'",' if slot else b"{"

    def delta(self, seq: int, text: str) -> bytes:
        return b"%s%d\ndata: %s\"delta\":%s}\n\n" % (self.prefix, seq, self._open, orjson.dumps(text))

    def event(self, seq: int, name: str, data: dict[str, Any]) -> bytes:
        if self.slot:
            data = {"slot": self.slot, **data}
        return b"%s%d\nevent: %s\ndata: %s\n\n" % (self.prefix, seq, name.encode(), orjson.dumps(data))


def parse_last_event_id(raw: str | None, message_id: str) -> int:
    """The seq after which to resume: -1 for "from the start" (absent, foreign or malformed id)."""
    if not raw:
        return -1
    mid, _, seq = raw.strip().rpartition(":")
    if mid != message_id or not seq.isdigit():
        return -1
    return int(seq)


async def open_stream(request: web.Request, ping_s: float, retry_ms: int) -> EventSourceResponse:
    """Send the headers and the `retry:` line; the caller writes frames."""
    resp = EventSourceResponse(sep="\n", ping_interval=ping_s, allow_all_methods=True)
    # no-transform keeps proxies from buffering or compressing the stream
    resp.headers["Cache-Control"] = "no-cache, no-transform"
    await resp.prepare(request)
    await resp.write(b"retry: %d\n\n" % retry_ms)
    return resp
