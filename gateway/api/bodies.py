"""Request bodies shared by several front doors (chat, arena, WebSocket): validated before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..errors import BadRequest
from ..router import AUTO, RANDOM
from ..turns import TurnInput
from .common import check_text, optional, parse_uuid

MAX_CLIENT_MESSAGE_ID = 200
# max_tokens is added to the prompt estimate in bigint SQL (the daily reservation): bounded here,
# where a larger one is a 400, not an overflow (500) later
MAX_TOKENS_LIMIT = 2**31 - 1

KnownModel = Callable[[str], bool]


def parse_turn(body: dict[str, Any], known_model: KnownModel) -> tuple[TurnInput, bool | None]:
    """A chat turn's fields and its `stream` flag (None: not given)."""
    content = body.get("content")
    if not isinstance(content, str):
        raise BadRequest("content must be a string")
    if not content.strip():
        raise BadRequest("content must not be empty")
    check_text(content, "content")
    thread_id = body.get("thread_id")
    model = optional(body, "model", str, "a model name")
    if model is not None and model != AUTO and not known_model(model):
        raise BadRequest(f"unknown model {model!r}")
    client_message_id = optional(body, "client_message_id", str, "a string")
    if client_message_id is not None and not 0 < len(client_message_id) <= MAX_CLIENT_MESSAGE_ID:
        raise BadRequest(f"client_message_id must be 1 to {MAX_CLIENT_MESSAGE_ID} characters")
    max_tokens = optional(body, "max_tokens", int, "a positive integer")
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}")
    temperature = optional(body, "temperature", (int, float), "a number")
    stream = optional(body, "stream", bool, "true or false")
    return TurnInput(content=content, thread_id=parse_uuid(thread_id, "thread_id") if thread_id is not None else None,
                     model=model, client_message_id=client_message_id, max_tokens=max_tokens,
                     temperature=float(temperature) if temperature is not None else None), stream


def parse_arena(body: dict[str, Any], known_model: KnownModel) -> tuple[TurnInput, bool | None, list[str] | None,
                                                                       bool]:
    """An arena turn: the chat fields, `models` (two different known names, or None: drawn) and
    `anonymous` (default true)."""
    turn, stream = parse_turn({k: v for k, v in body.items() if k not in ("models", "anonymous", "model")},
                              known_model)
    models = body.get("models")
    if models is not None:
        if (not isinstance(models, list) or len(models) != 2 or not all(isinstance(m, str) for m in models)
                or models[0] == models[1]):
            raise BadRequest("models must be two different model names")
        unknown = [m for m in models if m == RANDOM or not known_model(m)]  # omit `models` to draw
        if unknown:
            raise BadRequest(f"unknown model {unknown[0]!r}")
    anonymous = optional(body, "anonymous", bool, "true or false")
    return turn, stream, models, True if anonymous is None else anonymous


def wants_stream(request: web.Request, stream: bool | None) -> bool:
    """`stream` when given, else whether the client accepts an event stream."""
    if stream is not None:
        return stream
    return "text/event-stream" in request.headers.get("Accept", "")
