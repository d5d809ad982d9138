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

A reply's events are structured (`events.Event`); each builds its SSE frame once, so every
listener writes the same bytes.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp_sse import EventSourceResponse

DONE = b"data: [DONE]\n\n"


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
