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

The `retry:` field rides in the first event's block, not a block of its own: a block with no
data dispatches nothing in a browser, but client libraries (httpx-sse, some SDKs) deliver it as
an empty message event first.

A reply's events are structured (`events.Event`); each builds its SSE frame once, so every
listener writes the same bytes.
"""

from __future__ import annotations

import asyncio
import re

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gateway.compat import forget_ping_task, ping_task
from gateway.edge.held import hold_open
from gateway.errors import BadRequest

DONE = b"data: [DONE]\n\n"


# a seq is at most this many ASCII digits: `str.isdigit` also takes "²" and other digits `int`
# refuses, and a long run of digits would hit Python's int-string limit (both were 500s)
MAX_SEQ_DIGITS = 9
_SEQ = re.compile(rf"-1|[0-9]{{1,{MAX_SEQ_DIGITS}}}", re.ASCII)


def parse_seq(raw: str, what: str) -> int:
    """One position of an event id: ASCII digits (or -1, "nothing yet"), bounded; else a 400."""
    if _SEQ.fullmatch(raw) is None:
        raise BadRequest(f"{what} is not a valid event id")
    return int(raw)


def parse_last_event_id(raw: str | None, message_id: str) -> int:
    """The seq after which to resume (`<message_id>:<seq>`): -1 for "from the start" (absent or
    empty). An id of another message, or a malformed one, is a 400 (BadRequest): resuming from
    the start instead would send the client events it already has."""
    if not raw or not raw.strip():
        return -1
    mid, _, seq = raw.strip().rpartition(":")
    if mid != message_id:
        raise BadRequest("Last-Event-ID does not name an event of this message")
    return parse_seq(seq, "Last-Event-ID")


class NativeStream(EventSourceResponse):
    """An SSE response whose first frame carries the `retry:` line.

    Keep-alive comments (`: ping`) may go out before it and leave it pending: a `retry:` field
    in a comment's block would make that block an (empty) event for the libraries above."""

    def __init__(self, retry_ms: int, ping_s: float) -> None:
        super().__init__(sep="\n", ping_interval=ping_s, allow_all_methods=True)
        self._retry: bytes | None = b"retry: %d\n" % retry_ms

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._retry is not None and data[:1] != b":":
            data, self._retry = self._retry + bytes(data), None
        await super().write(data)

    def stop_streaming(self) -> None:
        """Stop the keep-alive task, and let go of it once it has ended. The cancelled task keeps
        its CancelledError, whose traceback holds the task's frame and so this response, which
        holds the task: a reference cycle per stream, that only the cyclic garbage collector frees,
        ~1,000 streams' worth at a time (7-9 ms pauses of the whole loop, measured at c=1 with
        `gc.callbacks`). Without the response's reference the task is freed as soon as it ends."""
        task = ping_task(self)
        super().stop_streaming()
        if task is not None:
            task.add_done_callback(self._forget_ping)

    def _forget_ping(self, task: asyncio.Task[None]) -> None:
        forget_ping_task(self, task)


async def open_stream(request: web.Request, ping_s: float, retry_ms: int) -> EventSourceResponse:
    """Send the headers; the caller writes frames, the first of which gets the `retry:` line."""
    resp = NativeStream(retry_ms, ping_s)
    # no-transform keeps proxies from buffering or compressing the stream
    resp.headers["Cache-Control"] = "no-cache, no-transform"
    resp.headers["X-Accel-Buffering"] = "no"  # nginx: pass each frame on as it comes (also set by aiohttp-sse)
    await resp.prepare(request)
    hold_open(request, resp)
    return resp
