"""A chat's thread as UIMessage[], as the `ai` package's validateUIMessages accepts it.

A user message keeps the id the app gave it (its client_message_id); a reply's id is its row's,
the `messageId` its stream's `start` chunk announced. Of a message's replies only the newest is
shown (a regenerate replaces the one before, as useChat does). A reply's metadata is what its
stream's `start` and `finish` chunks carried, merged, plus its error when it has one. A reply's
reasoning parts (one per block its stream showed, a signature closing a block) come before its text.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.api.aisdk.stream import STATUSES, start_metadata, usage_metadata
from gateway.vocabulary import LIVE_STATUSES

_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)[;,]")


def ui_messages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The thread's rows (each reply right after the message it answers) as UI messages."""
    newest: dict[Any, dict[str, Any]] = {}  # a user message's id -> its newest reply
    for row in rows:
        if row["role"] == "assistant":
            newest[row["reply_to"]] = row
    out = []
    for row in rows:
        if row["role"] == "user":
            out.append(user_message(row))
            reply = newest.get(row["id"])
            if reply is not None:
                out.append(assistant_message(reply))
    return out


def user_message(row: dict[str, Any]) -> dict[str, Any]:
    parts = row["parts"]
    if parts is None:
        ui_parts = [{"type": "text", "text": row["content"]}]
    else:
        ui_parts = [{"type": "text", "text": p["text"]} if p["type"] == "text" else image_part(p["image_url"]["url"])
                    for p in parts]
    return {"id": row["client_message_id"] or str(row["id"]), "role": "user", "parts": ui_parts}


def image_part(url: str) -> dict[str, Any]:
    found = _DATA_URL.match(url)
    return {"type": "file", "mediaType": found.group(1) if found else "image/*", "url": url}


def assistant_message(row: dict[str, Any]) -> dict[str, Any]:
    meta = row["metadata"] or {}
    live = row["status"] in LIVE_STATUSES
    metadata = start_metadata({"thread_id": str(row["thread_id"]), "model": row["model"],
                               "provider": row["provider"], "category": meta.get("category"),
                               "auto": meta.get("auto", False)})
    if not live and row["error"] is None:
        metadata["usage"] = usage_metadata(row["prompt_tokens"] or 0, row["completion_tokens"] or 0,
                                           bool(meta.get("estimated")))
    metadata["status"] = row["status"] if live or row["error"] is not None else \
        STATUSES.get(meta.get("finish_reason", "stop"), "complete")
    if row["error"] is not None:
        metadata["error"] = {"type": row["error"].get("type"), "message": row["error"].get("message")}
    parts = reasoning_parts(str(row["id"]), meta.get("reasoning", ()), live)
    if row["content"]:
        parts.append({"type": "text", "text": row["content"], "state": "streaming" if live else "done"})
    return {"id": str(row["id"]), "role": "assistant", "parts": parts, "metadata": metadata}


def reasoning_parts(mid: str, pieces: Any, live: bool) -> list[dict[str, Any]]:
    """The reasoning a reply's metadata keeps ([seq, text(, signature)] per event) as the parts its
    stream made: consecutive pieces are one part until a signature closes it."""
    parts: list[dict[str, Any]] = []
    part: dict[str, Any] | None = None
    for piece in pieces:
        if part is None:
            part = {"type": "reasoning", "id": f"{mid}:r{len(parts)}", "text": "", "state": "done"}
            parts.append(part)
        part["text"] += piece[1]
        if len(piece) > 2 and piece[2]:
            part["providerMetadata"] = {"gateway": {"signature": piece[2]}}
            part = None
    if live and part is not None:
        part["state"] = "streaming"
    return parts
