"""A reply's native events as the AI SDK's UI message stream (version 1), as `ai`'s parser reads it.

    data: {"type":"start","messageId":"<reply id>","messageMetadata":{"threadId",..,"model",..}}
    data: {"type":"text-start","id":"<reply id>"}
    data: {"type":"text-delta","id":"<reply id>","delta":"Hel"}         one per native delta
    data: {"type":"text-end","id":"<reply id>"}
    data: {"type":"finish","finishReason":"stop","messageMetadata":{"usage":{..},"status":"complete"}}
    data: [DONE]

A failed or refused reply ends with `{"type":"error","errorText":...}` instead of `finish`; a
stopped one with `{"type":"abort","reason":"cancelled"}` then `finish` (its usage).

The model's reasoning, when its upstream streams it (native `reasoning` events among the deltas),
is a reasoning part: `reasoning-start` / `reasoning-delta` / `reasoning-end`, with the id
`<reply id>:r<n>`, n its place among the message's parts from 0. A text part and a reasoning part
are never open at once: one ends before the other starts. A text part is `<reply id>:t<n>`, except
one in the first place, which keeps the reply's id (so a reply without reasoning reads as before).
A signature closes its reasoning part, carried as `providerMetadata: {"gateway": {"signature": ...}}`
on `reasoning-end`.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.generation.events import DELTA, Event

# what createUIMessageStreamResponse sends besides the SSE ones (UI_MESSAGE_STREAM_HEADERS)
HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}

# the native finish reasons the AI SDK has a name for; any other is "other"
FINISH_REASONS = {"stop": "stop", "length": "length", "content_filter": "content-filter",
                  "tool_calls": "tool-calls", "interrupted": "interrupted"}
# a finished reply's status by its native finish reason (a row's `status`)
STATUSES = {"cancelled": "cancelled", "interrupted": "interrupted"}


def chunk(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def start_metadata(native: dict[str, Any]) -> dict[str, Any]:
    """The `start` chunk's messageMetadata, from the native metadata event (or a row's)."""
    return {"threadId": native["thread_id"], "model": native["model"], "provider": native["provider"],
            "category": native["category"], "auto": native["auto"]}


def usage_metadata(prompt_tokens: int, completion_tokens: int, estimated: bool) -> dict[str, Any]:
    """Usage as the AI SDK names it (LanguageModelUsage), flagged when estimated."""
    usage: dict[str, Any] = {"inputTokens": prompt_tokens, "outputTokens": completion_tokens,
                             "totalTokens": prompt_tokens + completion_tokens}
    if estimated:
        usage["estimated"] = True
    return usage


class UIMessageStream:
    """Turns one reply's native events, in order, into UI message stream chunks."""

    __slots__ = ("_mid", "_text_id", "_open", "_reasoning_id", "_parts", "_usage")

    def __init__(self) -> None:
        self._mid = ""
        self._text_id = ""
        self._open = False  # a text part is open
        self._reasoning_id: str | None = None  # the open reasoning part's
        self._parts = 0  # text and reasoning parts started so far
        self._usage: dict[str, Any] | None = None

    def frames(self, events: list[Event]) -> bytes:
        return b"".join([self.frame(e) for e in events])

    def frame(self, event: Event) -> bytes:
        name = event.name
        if name == DELTA:
            delta = orjson.loads(event.data)["delta"]
            head = b""
            if not self._open:
                head = self._close_reasoning()
                self._open = True
                self._text_id = self._mid if self._parts == 0 else f"{self._mid}:t{self._parts}"
                self._parts += 1
                head += chunk({"type": "text-start", "id": self._text_id})
            return head + chunk({"type": "text-delta", "id": self._text_id, "delta": delta})
        data = orjson.loads(event.data)
        if name == "reasoning":
            return self._reasoning(data["delta"], data.get("signature"))
        if name == "metadata":
            self._mid = self._text_id = data["message_id"]
            return chunk({"type": "start", "messageId": data["message_id"], "messageMetadata": start_metadata(data)})
        if name == "usage":
            self._usage = usage_metadata(data["prompt_tokens"], data["completion_tokens"],
                                         bool(data.get("estimated")))
            return b""
        out = self._close_text() + self._close_reasoning()
        if name == "error":
            return out + chunk({"type": "error", "errorText": data["message"]})
        if name == "done":
            reason = data["finish_reason"]
            if reason == "cancelled":
                out += chunk({"type": "abort", "reason": "cancelled"})
            metadata: dict[str, Any] = {"status": STATUSES.get(reason, "complete")}
            if self._usage is not None:
                metadata = {"usage": self._usage, **metadata}
            return out + chunk({"type": "finish", "finishReason": FINISH_REASONS.get(reason, "other"),
                                "messageMetadata": metadata})
        return out

    def _reasoning(self, delta: str, signature: str | None) -> bytes:
        out = b""
        if self._reasoning_id is None:
            out = self._close_text()
            self._reasoning_id = f"{self._mid}:r{self._parts}"
            self._parts += 1
            out += chunk({"type": "reasoning-start", "id": self._reasoning_id})
        if delta:
            out += chunk({"type": "reasoning-delta", "id": self._reasoning_id, "delta": delta})
        if signature:
            out += self._close_reasoning(signature)
        return out

    def _close_text(self) -> bytes:
        if not self._open:
            return b""
        self._open = False
        return chunk({"type": "text-end", "id": self._text_id})

    def _close_reasoning(self, signature: str | None = None) -> bytes:
        if self._reasoning_id is None:
            return b""
        end: dict[str, Any] = {"type": "reasoning-end", "id": self._reasoning_id}
        if signature:
            end["providerMetadata"] = {"gateway": {"signature": signature}}
        self._reasoning_id = None
        return chunk(end)


def lapse_chunk(message: str) -> bytes:
    """The error chunk that ends a stream whose credential stopped working meanwhile."""
    return chunk({"type": "error", "errorText": message})
