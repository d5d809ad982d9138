"""A reply's events, rebuilt from its stored row with the seqs the live stream gave them.

The finish write stores what this needs: the content, the chunk boundaries (`metadata.chunks`),
the reasoning events with their seqs (`metadata.reasoning`), the usage, the error, the attempt
trail, the tool calls (`metadata.tool_calls`). A replay is byte-identical to what live listeners got.
A live reply's checkpoint stores the same content, chunks and reasoning, so its events so far are
rebuilt the same way (`body_events`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from gateway.generation.events import Event, EventMaker, done_json, metadata_json, reasoning_json, usage_json
from gateway.providers.base import Attempt


def body_events(maker: EventMaker, content: str, chunks: Sequence[int], reasoning: Sequence[Sequence[Any]],
                after: int = -1) -> list[Event]:
    """The events between a reply's metadata (seq 0) and its closing ones, with seq > `after`: one
    delta per chunk of `content`, and the reasoning events ([seq, text(, signature)], ascending)
    at their seqs among them. Seqs 1 .. len(chunks) + len(reasoning), so the closing events follow."""
    out: list[Event] = []
    seq, pos = 1, 0
    sides = iter(reasoning)
    side = next(sides, None)
    for length in chunks:
        while side is not None and side[0] == seq:
            if seq > after:
                out.append(maker.event(seq, "reasoning", reasoning_json(side[1], (side[2:] or [None])[0])))
            seq, side = seq + 1, next(sides, None)
        if seq > after:
            out.append(maker.delta(seq, content[pos:pos + length]))
        seq, pos = seq + 1, pos + length
    while side is not None:  # reasoning after the last delta
        if seq > after:
            out.append(maker.event(seq, "reasoning", reasoning_json(side[1], (side[2:] or [None])[0])))
        seq, side = seq + 1, next(sides, None)
    return out


def replay_events(message: dict[str, Any], after: int = -1) -> list[Event]:
    """The reply's events with seq > `after`.

    A reply swept after its instance died has only its last checkpoint's events, while a client
    may have seen more of it live: its closing events are numbered after the client's position,
    so a resume from any id the client holds gets the outcome (never a 204 that hides it).
    """
    maker = EventMaker(message["id"], message["slot"])
    meta = message["metadata"]
    anonymous = bool(meta.get("anonymous"))
    events = [maker.event(0, "metadata", metadata_json(
        thread_id=message["thread_id"], user_message_id=message["reply_to"], message_id=message["id"],
        model=None if anonymous else message["model"], provider=None if anonymous else message["provider"],
        category=meta.get("category"), auto=meta.get("auto", False),
        fallback_from=None if anonymous else meta.get("fallback_from"), selected=meta.get("selected")))]
    content = message["content"]
    chunks = meta.get("chunks", [len(content)] if content else [])
    reasoning = meta.get("reasoning", ())
    events += body_events(maker, content, chunks, reasoning, after)
    seq = 1 + len(chunks) + len(reasoning)
    if meta.get("swept"):
        seq = max(seq, after + 1)
    if message["error"] is not None:
        events.append(maker.event(seq, "error", _in_order(message["error"], _ERROR_KEYS)))
    else:
        usage = usage_json(message["prompt_tokens"] or 0, message["completion_tokens"] or 0,
                           bool(meta.get("estimated")), meta.get("cached_tokens", 0),
                           meta.get("cache_write_tokens", 0))
        if meta.get("usage_suspect"):
            usage["usage_suspect"] = True  # as the live usage event had it (generation.py)
        events.append(maker.event(seq, "usage", usage))
        events.append(maker.event(seq + 1, "done", done_json(
            meta.get("finish_reason", "stop"), message["id"],
            [_in_order(a, _ATTEMPT_KEYS) for a in meta.get("attempts", [])], anonymous,
            [_call_in_order(c) for c in meta.get("tool_calls", ())])))
    return [e for e in events if e.seq > after]


# jsonb keeps object keys sorted (shortest first), not as written: replayed objects get the live
# stream's key order back, so a replay is byte-identical to what the live listeners received
_ATTEMPT_KEYS = tuple(f.name for f in fields(Attempt))
_ERROR_KEYS = ("type", "message", "retryable")


_CALL_KEYS = ("id", "type", "function")
_FUNCTION_KEYS = ("name", "arguments")


def _in_order(obj: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {**{k: obj[k] for k in keys if k in obj}, **obj}


def _call_in_order(call: dict[str, Any]) -> dict[str, Any]:
    return {**_in_order(call, _CALL_KEYS), "function": _in_order(call["function"], _FUNCTION_KEYS)}
