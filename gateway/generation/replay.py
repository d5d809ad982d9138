"""A finished reply's events, rebuilt from its stored row with the seqs the live stream gave them.

The finish write stores what this needs: the content, the chunk boundaries (`metadata.chunks`),
the usage, the error, the attempt trail, the tool calls (`metadata.tool_calls`). A replay is
byte-identical to what live listeners got.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from gateway.generation.events import Event, EventMaker, done_json, metadata_json, reasoning_json, usage_json
from gateway.providers.base import Attempt


def replay_events(message: dict[str, Any], after: int = -1) -> list[Event]:
    """The reply's events with seq > `after`.

    A reply swept after its instance died has only its last checkpoint's deltas, while a client
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
    content, pos = message["content"], 0
    reasoning = iter(meta.get("reasoning", ()))  # [seq, text(, signature)], among the deltas
    side = next(reasoning, None)
    for length in meta.get("chunks", [len(content)] if content else []):
        while side is not None and side[0] == len(events):
            events.append(maker.event(side[0], "reasoning", reasoning_json(side[1], (side[2:] or [None])[0])))
            side = next(reasoning, None)
        events.append(maker.delta(len(events), content[pos:pos + length]))
        pos += length
    while side is not None:  # reasoning after the last delta
        events.append(maker.event(len(events), "reasoning", reasoning_json(side[1], (side[2:] or [None])[0])))
        side = next(reasoning, None)
    seq = len(events)
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
