"""Request bodies shared by several front doors (chat, arena, WebSocket): validated before anything is written."""

from __future__ import annotations

import re
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

MAX_PARTS = 100
IMAGE_DETAILS = ("auto", "low", "high")
# a data URL's media type and base64 payload: what an Anthropic upstream needs to build its image source
_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]{1,40};base64,[A-Za-z0-9+/]+={0,2}", re.ASCII)


def _part(part: Any, where: str) -> str:
    """One OpenAI-style content part, checked exactly (it is stored as sent); its text, if any."""
    if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
        raise BadRequest(f"{where} must be a text or image_url part")
    if part["type"] == "text":
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise BadRequest(f"{where} must be {{\"type\": \"text\", \"text\": string}}")
        return check_text(part["text"], f"{where}.text")
    image = part.get("image_url")
    if (set(part) != {"type", "image_url"} or not isinstance(image, dict) or not set(image) <= {"url", "detail"}
            or not isinstance(image.get("url"), str)):
        raise BadRequest(f"{where} must be {{\"type\": \"image_url\", \"image_url\": {{\"url\": string, "
                         f"\"detail\"?}}}}")
    url = image["url"]
    if not (_DATA_URL.fullmatch(url) or (url.startswith(("https://", "http://")) and url.isascii()
                                         and url.isprintable() and " " not in url)):
        raise BadRequest(f"{where}.image_url.url must be an http(s) URL or a base64 data:image/... URL")
    if "detail" in image and image["detail"] not in IMAGE_DETAILS:
        raise BadRequest(f"{where}.image_url.detail must be auto, low or high")
    return ""


def parse_content(content: Any) -> tuple[str, list[dict[str, Any]] | None]:
    """`content`: a non-blank string, or a list of OpenAI-style parts (text, image_url) with something
    in it. Returns the text (of the text parts, joined by spaces) and the parts (None for a string)."""
    if isinstance(content, str):
        if not content.strip():
            raise BadRequest("content must not be empty")
        return check_text(content, "content"), None
    if not isinstance(content, list):
        raise BadRequest("content must be a string or a list of content parts")
    if not 0 < len(content) <= MAX_PARTS:
        raise BadRequest(f"content must have 1 to {MAX_PARTS} parts")
    texts = [_part(part, f"content[{i}]") for i, part in enumerate(content)]
    text = " ".join(t for t in texts if t)
    if not text.strip() and all(p["type"] == "text" for p in content):
        raise BadRequest("content must not be empty")
    return text, content


def parse_turn(body: dict[str, Any], known_model: KnownModel) -> tuple[TurnInput, bool | None]:
    """A chat turn's fields and its `stream` flag (None: not given)."""
    content, parts = parse_content(body.get("content"))
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
    return TurnInput(content=content, parts=parts,
                     thread_id=parse_uuid(thread_id, "thread_id") if thread_id is not None else None,
                     model=model, client_message_id=client_message_id, max_tokens=max_tokens,
                     temperature=float(temperature) if temperature is not None else None), stream


def parse_arena(body: dict[str, Any], known_model: KnownModel) -> tuple[TurnInput, bool | None, list[str] | None,
                                                                       bool]:
    """An arena turn: the chat fields, `models` (two different known names, or None: drawn) and
    `anonymous` (default true)."""
    if isinstance(body.get("content"), list):  # both slots get the text: parts would be dropped in silence
        raise BadRequest("content parts are not supported by the arena: send a string")
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
