"""A reply's native events as the AI SDK's UI message stream (version 1), as `ai`'s parser reads it.

    data: {"type":"start","messageId":"<reply id>","messageMetadata":{"threadId",..,"model",..}}
    data: {"type":"text-start","id":"<reply id>"}
    data: {"type":"text-delta","id":"<reply id>","delta":"Hel"}         one per native delta
    data: {"type":"text-end","id":"<reply id>"}
    data: {"type":"finish","finishReason":"stop","messageMetadata":{"usage":{..},"status":"complete"}}
    data: [DONE]

A failed or refused reply ends with `{"type":"error","errorText":...}` instead of `finish`; a
stopped one with `{"type":"abort","reason":"cancelled"}` then `finish` (its usage). Replies carry
text only: the native turn stores and streams text (no reasoning or tool parts to translate).
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

    __slots__ = ("_text_id", "_open", "_usage")

    def __init__(self) -> None:
        self._text_id = ""
        self._open = False
        self._usage: dict[str, Any] | None = None

    def frames(self, events: list[Event]) -> bytes:
        return b"".join([self.frame(e) for e in events])

    def frame(self, event: Event) -> bytes:
        name = event.name
        if name == DELTA:
            delta = orjson.loads(event.data)["delta"]
            head = b""
            if not self._open:
                self._open = True
                head = chunk({"type": "text-start", "id": self._text_id})
            return head + chunk({"type": "text-delta", "id": self._text_id, "delta": delta})
        if name == "reasoning":  # not relayed: this stream carries the reply's text
            return b""
        data = orjson.loads(event.data)
        if name == "metadata":
            self._text_id = data["message_id"]
            return chunk({"type": "start", "messageId": data["message_id"], "messageMetadata": start_metadata(data)})
        if name == "usage":
            self._usage = usage_metadata(data["prompt_tokens"], data["completion_tokens"],
                                         bool(data.get("estimated")))
            return b""
        out = self._close_text()
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

    def _close_text(self) -> bytes:
        if not self._open:
            return b""
        self._open = False
        return chunk({"type": "text-end", "id": self._text_id})


def lapse_chunk(message: str) -> bytes:
    """The error chunk that ends a stream whose credential stopped working meanwhile."""
    return chunk({"type": "error", "errorText": message})
