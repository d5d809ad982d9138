"""Fake upstreams: real aiohttp servers speaking the providers' exact wire formats, scripted per test.

A test queues `Reply` objects; each POST takes the next one (or the default). A reply can
stream any list of byte pieces (so events can be split at awkward boundaries), fail with a
status, hang before the first byte, or hang mid-stream (for good, or until the test releases it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CHUNK_HEAD = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"fake-up"'


def openai_chunk(delta: dict[str, Any] | None = None, finish_reason: str | None = None,
                 usage: dict[str, int] | None = None, choices: bool = True) -> bytes:
    """One OpenAI `chat.completion.chunk` SSE event, as the API writes it."""
    if choices:
        choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
        body = CHUNK_HEAD + ',"choices":[' + json.dumps(choice, separators=(",", ":")) + "]"
    else:
        body = CHUNK_HEAD + ',"choices":[]'
    body += ',"usage":' + (json.dumps(usage, separators=(",", ":")) if usage else "null") + "}"
    return b"data: " + body.encode() + b"\n\n"


def openai_stream(texts: list[str], prompt_tokens: int = 9, completion_tokens: int | None = None,
                  finish_reason: str = "stop", done: bool = True, usage: bool = True) -> list[bytes]:
    """A whole OpenAI stream: role chunk, one chunk per text, finish chunk, usage chunk, [DONE]."""
    events = [openai_chunk({"role": "assistant", "content": ""})]
    events += [openai_chunk({"content": t}) for t in texts]
    events.append(openai_chunk({}, finish_reason))
    if usage:
        completion = len(texts) if completion_tokens is None else completion_tokens
        events.append(openai_chunk(usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                          "total_tokens": prompt_tokens + completion}, choices=False))
    if done:
        events.append(b"data: [DONE]\n\n")
    return events


def openai_reasoning_stream(script: list[tuple[str, str]], prompt_tokens: int = 7) -> list[bytes]:
    """An OpenAI-compatible stream with the model's reasoning among its text, as DeepSeek, vLLM and
    Groq send it: role chunk, then one chunk per `(kind, text)` of `script` (`"reasoning"`: a
    `delta.reasoning_content`, `"content"`: a `delta.content`), finish chunk, usage chunk, [DONE].
    Piece k + 1 is script item k."""
    events = [openai_chunk({"role": "assistant", "content": ""})]
    events += [openai_chunk({"reasoning_content": t} if kind == "reasoning" else {"content": t})
               for kind, t in script]
    events.append(openai_chunk({}, "stop"))
    events.append(openai_chunk(usage={"prompt_tokens": prompt_tokens, "completion_tokens": len(script),
                                      "total_tokens": prompt_tokens + len(script)}, choices=False))
    events.append(b"data: [DONE]\n\n")
    return events


def split_every(data: bytes, size: int = 1) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@dataclass
class Reply:
    pieces: list[bytes] = field(default_factory=list)  # written one write() each
    status: int = 200
    body: bytes = b""  # for non-200 replies
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the status line
    piece_delay_s: float = 0.0  # between pieces
    hang_after: int | None = None  # stop writing (but keep the connection) after this many pieces
    hold_at: int | None = None  # with `release`: write this many pieces, then wait for it
    release: asyncio.Event | None = None
    on_request: Callable[[dict[str, Any]], Any] | None = None  # awaited, sees the request body


class FakeUpstream:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.default = Reply(openai_stream(["Hel", "lo"]))
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.sent: list[int] = []  # pieces each request's reply got written before it ended or was cut
        self.server: Any = None
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        reply = self.replies.pop(0) if self.replies else self.default
        if reply.on_request is not None:
            result = reply.on_request(body)
            if asyncio.iscoroutine(result):
                await result
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status != 200:
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers,
                                content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **reply.headers})
        await resp.prepare(request)
        self.sent.append(0)
        index = len(self.sent) - 1
        for i, piece in enumerate(reply.pieces):
            if reply.hang_after is not None and i >= reply.hang_after:
                await asyncio.sleep(3600)
            if reply.release is not None and i == reply.hold_at:
                await reply.release.wait()
            if reply.piece_delay_s and i:
                await asyncio.sleep(reply.piece_delay_s)
            try:
                await resp.write(piece)
            except ConnectionResetError:
                return resp  # the gateway hung up on this reply
            self.sent[index] += 1
        await resp.write_eof()
        return resp


@dataclass
class SSE:
    id: str | None
    event: str
    data: str


def parse_sse(raw: bytes) -> list[SSE]:
    """The gateway's SSE output as a browser would see it (comments and `retry:` dropped)."""
    events: list[SSE] = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if "data" in fields:
            events.append(SSE(fields.get("id", [None])[-1], fields.get("event", ["message"])[-1],
                              "\n".join(fields["data"])))
    return events
