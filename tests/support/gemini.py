"""A fake Gemini upstream: a real aiohttp server speaking Google AI's `streamGenerateContent?alt=sse`.

It records every request (path, query, headers, body) and checks each body against the published
shape: the top-level fields of a `GenerateContentRequest`, and every content, tool, tool config and
generation config parsed strictly (unknown fields refused) by the official `google-genai` SDK's
types. A body that breaks it is answered 400 `INVALID_ARGUMENT`, as Google answers, and its
problems are kept in `problems`. Every event it streams is checked the same way against the SDK's
`GenerateContentResponse`, so a test cannot script a reply the real API would never send.

Replies are scripted per test (`queue`): any list of events, written in pieces of any size (so an
event can be split at every byte), a non-200 answer, or a connection cut after some pieces.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from google.genai import types
from pydantic import BaseModel, ValidationError

REQUEST_FIELDS = frozenset({"contents", "systemInstruction", "tools", "toolConfig", "generationConfig",
                            "safetySettings", "cachedContent"})
ROLES = frozenset({"user", "model"})
MODES = frozenset({"AUTO", "ANY", "NONE", "VALIDATED"})
# one part carries exactly one of these
PART_DATA = ("text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode",
             "codeExecutionResult")


def request_problems(body: Any) -> list[str]:
    """Where `body` departs from a `GenerateContentRequest` as Google publishes it ([] when it does not)."""
    if not isinstance(body, dict):
        return ["the body is not a JSON object"]
    problems = [f"unknown field {k!r}" for k in body if k not in REQUEST_FIELDS]
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        problems.append("contents must be a non-empty list")
        contents = []
    for i, content in enumerate(contents):
        problems += strict(types.Content, content, f"contents[{i}]")
        if not isinstance(content, dict):
            continue
        if content.get("role") not in ROLES:
            problems.append(f"contents[{i}].role must be user or model, got {content.get('role')!r}")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            problems.append(f"contents[{i}].parts must be a non-empty list")
            continue
        for j, part in enumerate(parts):
            data = [k for k in PART_DATA if isinstance(part, dict) and k in part]
            if len(data) != 1:
                problems.append(f"contents[{i}].parts[{j}] must hold one of {PART_DATA}, holds {data}")
    if "systemInstruction" in body:
        problems += strict(types.Content, body["systemInstruction"], "systemInstruction")
    for i, tool in enumerate(body.get("tools") or ()):
        problems += strict(types.Tool, tool, f"tools[{i}]")
    if "toolConfig" in body:
        problems += strict(types.ToolConfig, body["toolConfig"], "toolConfig")
        mode = (body["toolConfig"].get("functionCallingConfig") or {}).get("mode")
        if mode not in MODES:
            problems.append(f"toolConfig.functionCallingConfig.mode must be one of {sorted(MODES)}, got {mode!r}")
    if "generationConfig" in body:
        problems += strict(types.GenerationConfig, body["generationConfig"], "generationConfig")
    return problems


def strict(model: type[BaseModel], value: Any, where: str) -> list[str]:
    try:
        model.model_validate(value)
    except ValidationError as e:
        return [f"{where}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return []


def response(parts: list[dict[str, Any]] | None = None, finish: str | None = None,
             usage: dict[str, int] | None = None, **fields: Any) -> dict[str, Any]:
    """One `GenerateContentResponse` as the API streams it (checked against the SDK's type)."""
    obj: dict[str, Any] = {}
    if parts is not None or finish is not None:
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts or []}, "index": 0}
        if finish is not None:
            candidate["finishReason"] = finish
        obj["candidates"] = [candidate]
    if usage is not None:
        obj["usageMetadata"] = usage
    obj.update(modelVersion="gemini-fake", responseId="resp-1", **fields)
    types.GenerateContentResponse.model_validate(obj)  # a fake never sends what Google would not
    return obj


def usage(prompt: int = 12, output: int = 5, cached: int = 0, thoughts: int = 0) -> dict[str, int]:
    counts = {"promptTokenCount": prompt, "candidatesTokenCount": output,
              "totalTokenCount": prompt + output + thoughts}
    if cached:
        counts["cachedContentTokenCount"] = cached
    if thoughts:
        counts["thoughtsTokenCount"] = thoughts
    return counts


def sse(*events: dict[str, Any]) -> bytes:
    """Events as Google writes them: `data: <json>` lines, each followed by a blank line (CRLF)."""
    return b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\r\n\r\n" for e in events)


def text_stream(texts: list[str], finish: str = "STOP", counts: dict[str, int] | None = None) -> bytes:
    """A reply of `texts`, one event each, the last one carrying the finish reason and the usage."""
    events = [response([{"text": t}], usage=usage(output=i + 1)) for i, t in enumerate(texts[:-1])]
    events.append(response([{"text": texts[-1]}], finish, counts or usage(output=len(texts))))
    return sse(*events)


@dataclass
class GeminiReply:
    body: bytes = b""  # the SSE bytes of a 200 reply, or the error body of another status
    status: int = 200
    piece: int = 0  # 0: one write; n: writes of n bytes
    cut_after: int | None = None  # close the connection after this many pieces (no end of body)


@dataclass
class Seen:
    model: str
    method: str
    query: str
    headers: dict[str, str]
    body: dict[str, Any]
    problems: list[str] = field(default_factory=list)


class FakeGemini:
    def __init__(self) -> None:
        self.default = GeminiReply(text_stream(["Hello", " world"]))
        self.replies: list[GeminiReply] = []
        self.seen: list[Seen] = []
        self.server: Any = None
        self.app = web.Application()
        self.app.router.add_post("/v1beta/models/{tail}", self.generate)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1beta"))

    @property
    def requests(self) -> list[dict[str, Any]]:
        return [s.body for s in self.seen]

    def queue(self, *replies: GeminiReply) -> None:
        self.replies.extend(replies)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["tail"].partition(":")
        body = await request.json()
        seen = Seen(model, method, request.query_string, dict(request.headers), body, request_problems(body))
        self.seen.append(seen)
        if seen.problems:
            return web.json_response({"error": {"code": 400, "message": "; ".join(seen.problems),
                                                "status": "INVALID_ARGUMENT"}}, status=400)
        reply = self.replies.pop(0) if self.replies else self.default
        if reply.status != 200:
            return web.Response(status=reply.status, body=reply.body, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        size = reply.piece or len(reply.body) or 1
        pieces = [reply.body[i:i + size] for i in range(0, len(reply.body), size)]
        for i, piece in enumerate(pieces):
            if reply.cut_after is not None and i >= reply.cut_after:
                assert request.transport is not None
                request.transport.close()  # mid-body: the chunked framing never ends
                return resp
            await resp.write(piece)
        await resp.write_eof()
        return resp


def error_body(code: int, message: str, status: str) -> bytes:
    """Google's error body."""
    return json.dumps({"error": {"code": code, "message": message, "status": status}}).encode()


@pytest.fixture
async def gemini(aiohttp_server: Any) -> AsyncIterator[FakeGemini]:
    fake = FakeGemini()
    fake.server = await aiohttp_server(fake.app)
    yield fake
