"""Request bodies shared by several front doors (chat, arena, WebSocket): decoded through the
contract's structs (gateway/contract/native.py) and validated before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.contract.native import (
    MAX_CLIENT_MESSAGE_ID,
    ArenaRequest,
    ChatRequest,
    check_content,
    check_text,
    convert,
    decode,
)
from gateway.errors import BadRequest
from gateway.service.router import AUTO, RANDOM
from gateway.service.turns import TurnInput

__all__ = ["MAX_CLIENT_MESSAGE_ID", "parse_arena", "parse_turn", "turn_from_frame", "wants_stream"]

KnownModel = Callable[[str], bool]


def _turn(body: ChatRequest, known_model: KnownModel) -> tuple[TurnInput, bool | None]:
    content, parts = check_content(body.content)
    model = body.model
    if model is not None and model != AUTO and not known_model(model):
        raise BadRequest(f"unknown model {model!r}")
    if body.client_message_id is not None:
        check_text(body.client_message_id, "client_message_id")
    temperature = body.temperature
    return TurnInput(content=content, parts=parts, thread_id=body.thread_id, model=model,
                     client_message_id=body.client_message_id, max_tokens=body.max_tokens,
                     temperature=float(temperature) if temperature is not None else None), body.stream


def parse_turn(raw: bytes, known_model: KnownModel) -> tuple[TurnInput, bool | None]:
    """A chat turn's fields and its `stream` flag (None: not given), from the body's bytes."""
    return _turn(decode(raw, ChatRequest), known_model)


def turn_from_frame(frame: dict[str, Any], known_model: KnownModel) -> TurnInput:
    """A chat turn from a WebSocket frame (already decoded JSON)."""
    return _turn(convert(frame, ChatRequest), known_model)[0]


def parse_arena(raw: bytes, known_model: KnownModel) -> tuple[TurnInput, bool | None, list[str] | None, bool]:
    """An arena turn: the chat fields, `models` (two different known names, or None: drawn) and
    `anonymous` (default true)."""
    body = decode(raw, ArenaRequest)
    if not body.content.strip():
        raise BadRequest("content must not be empty")
    check_text(body.content, "content")
    if body.client_message_id is not None:
        check_text(body.client_message_id, "client_message_id")
    models = body.models
    if models is not None:
        if models[0] == models[1]:
            raise BadRequest("models must be two different model names")
        unknown = [m for m in models if m == RANDOM or not known_model(m)]  # omit `models` to draw
        if unknown:
            raise BadRequest(f"unknown model {unknown[0]!r}")
    temperature = body.temperature
    turn = TurnInput(content=body.content, thread_id=body.thread_id,
                     client_message_id=body.client_message_id, max_tokens=body.max_tokens,
                     temperature=float(temperature) if temperature is not None else None)
    return turn, body.stream, models, True if body.anonymous is None else body.anonymous


def wants_stream(request: web.Request, stream: bool | None) -> bool:
    """`stream` when given, else whether the client accepts an event stream."""
    if stream is not None:
        return stream
    return "text/event-stream" in request.headers.get("Accept", "")
