"""A hostile upstream: a real aiohttp server on loopback that speaks the providers' wire formats
exactly, with values no well-behaved upstream sends.

Each request is answered with the payload named by the model it asks for (the gateway sends a
model's `upstream` id), so one server and one config serve every case: a model `h_nul` with
`upstream = "nul"` gets the `nul` payload, through `/v1/chat/completions` (OpenAI) or
`/v1/messages` (Anthropic).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from tests.support.fakes import openai_chunk

TEN_MB = 10 * 1024 * 1024
DONE = b"data: [DONE]\n\n"
ENDLESS_GAP_S = 0.005  # between the empty deltas of a never-ending stream: far below any idle timeout


def raw_chunk(content_json: bytes) -> bytes:
    """An OpenAI chunk whose `delta.content` is `content_json` written as is (any JSON, or not JSON)."""
    return (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"fake-up",'
            b'"choices":[{"index":0,"delta":{"content":' + content_json + b'},"logprobs":null,"finish_reason":null}]}'
            b"\n\n")


def usage_chunk(prompt: Any, completion: Any) -> bytes:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "fake-up",
            "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": 0}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def openai_reply(*content: bytes, prompt: Any = 5, completion: Any = 2) -> list[bytes]:
    """Role chunk, the given content chunks, finish, usage, [DONE]."""
    return [openai_chunk({"role": "assistant", "content": ""}), *content, openai_chunk({}, "stop"),
            usage_chunk(prompt, completion), DONE]


HEL = openai_chunk({"content": "Hel"})
BIG = raw_chunk(b'"' + b"x" * TEN_MB + b'"')  # one 10 MB event, shared by the payloads that send it

# payload name -> the pieces written, one write() each (None: the never-ending stream)
OPENAI: dict[str, list[bytes] | None] = {
    "nul": openai_reply(openai_chunk({"content": "Hel\u0000lo"})),
    "number": openai_reply(raw_chunk(b"42")),
    "object": openai_reply(raw_chunk(b'{"text":"hi"}')),
    "list": openai_reply(raw_chunk(b'["hi"]')),
    "bool": openai_reply(raw_chunk(b"true")),
    "null": openai_reply(raw_chunk(b"null"), HEL),
    "number_after_content": openai_reply(HEL, raw_chunk(b"42")),
    "object_after_content": openai_reply(HEL, raw_chunk(b'{"text":"hi"}')),
    "usage_2_31": openai_reply(HEL, prompt=2**31, completion=2**31),
    "usage_2_63": openai_reply(HEL, prompt=2**63, completion=2**63),
    "usage_sum_2_31": openai_reply(HEL, prompt=2**30, completion=2**30),
    "usage_negative": openai_reply(HEL, prompt=-5, completion=-(2**63)),
    "usage_not_integers": openai_reply(HEL, prompt="12", completion=2.5),
    "invalid_utf8": openai_reply(raw_chunk(b'"caf\xc3 \xff\xfeok"')),
    "ten_mb_chunk": openai_reply(BIG),
    "ten_mb_after_content": openai_reply(HEL, BIG),
    "ten_mb_line": [BIG[:-2]],  # no line end at all
    "ten_mb_after_done": [*openai_reply(HEL), BIG],  # the reply is whole; the rest is dropped unread
    "ten_mb_error_body": [BIG],  # with status 500
    "endless_empty_deltas": None,
    "endless_after_content": None,
}


def anthropic_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def anthropic_text(text_json: bytes) -> bytes:
    """A `content_block_delta` whose `delta.text` is `text_json` written as is."""
    return (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":' + text_json + b"}}\n\n")


def anthropic_reply(*texts: bytes, input_tokens: Any = 5, output_tokens: Any = 2) -> list[bytes]:
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-x",
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}
    return [anthropic_event("message_start", start),
            anthropic_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                    "content_block": {"type": "text", "text": ""}}),
            *texts,
            anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            anthropic_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                              "usage": {"output_tokens": output_tokens}}),
            anthropic_event("message_stop", {"type": "message_stop"})]


ANT_HEL = anthropic_text(b'"Hel"')

ANTHROPIC: dict[str, list[bytes] | None] = {
    "nul": anthropic_reply(anthropic_text(b'"Hel\\u0000lo"')),
    "number": anthropic_reply(anthropic_text(b"42")),
    "object": anthropic_reply(anthropic_text(b'{"t":1}')),
    "number_after_content": anthropic_reply(ANT_HEL, anthropic_text(b"42")),
    "usage_2_63": anthropic_reply(ANT_HEL, input_tokens=2**63, output_tokens=2**63),
    "usage_negative": anthropic_reply(ANT_HEL, input_tokens=-5, output_tokens=-1),
    "invalid_utf8": anthropic_reply(anthropic_text(b'"caf\xc3 \xff\xfeok"')),
    "ten_mb_chunk": anthropic_reply(anthropic_text(BIG[BIG.index(b'"x'):BIG.rindex(b'x"') + 2])),
}


class HostileUpstream:
    """The server. `requests` counts the requests per payload name."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.server: Any = None
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.openai)
        self.app.router.add_post("/v1/messages", self.anthropic)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))

    async def openai(self, request: web.Request) -> web.StreamResponse:
        name = await self._name(request)
        pieces = OPENAI[name]
        if name == "ten_mb_error_body":
            assert pieces is not None
            return web.Response(status=500, body=pieces[0], content_type="application/json")
        if pieces is None:
            head = [openai_chunk({"role": "assistant", "content": ""})]
            if name == "endless_after_content":
                head.append(HEL)
            return await self._endless(request, head)
        return await self._write(request, pieces)

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        pieces = ANTHROPIC[await self._name(request)]
        assert pieces is not None
        return await self._write(request, pieces)

    async def _name(self, request: web.Request) -> str:
        name: str = (await request.json())["model"]
        self.requests[name] = self.requests.get(name, 0) + 1
        return name

    async def _write(self, request: web.Request, pieces: list[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for piece in pieces:
                await resp.write(piece)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the gateway hung up (as it should on an oversized event)
        return resp

    async def _endless(self, request: web.Request, head: list[bytes]) -> web.StreamResponse:
        """`head`, then empty deltas forever: data keeps coming, so only a whole-attempt or
        first-token timeout can end it."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        empty = openai_chunk({"content": ""})
        try:
            for piece in head:
                await resp.write(piece)
            while True:
                await resp.write(empty)
                await asyncio.sleep(ENDLESS_GAP_S)
        except ConnectionResetError:
            return resp  # the gateway gave up on this reply
