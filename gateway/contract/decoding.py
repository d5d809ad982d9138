"""Decoding a request body through a struct, and naming the field a msgspec.ValidationError is about:
each door turns (field, error, body) into its own error shape (native, OpenAI's, Anthropic's)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import orjson

from gateway.errors import GatewayError

T = TypeVar("T")

# (the field's path, as `messages[0].role` ("" for the body itself), msgspec's message, the body as
# plain JSON) -> the error to raise
Refusal = Callable[[str, str, Any], GatewayError]

_AT = re.compile(r" - at `\$(.*)`$")
_MISSING = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]*)`")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def decode(raw: bytes, kind: type[T], refuse: Refusal, not_json: Callable[[], GatewayError]) -> T:
    """A request body (JSON bytes) as `kind`, or the door's error naming the field."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:
        message = str(e)
        raise refuse(field_path(message), message, _loads(raw)) from None
    except msgspec.DecodeError:
        raise not_json() from None


def convert(data: Any, kind: type[T], refuse: Refusal) -> T:
    """Already decoded JSON (a WebSocket frame, a translated item) as `kind`, or the door's error."""
    try:
        return msgspec.convert(data, type=kind)
    except msgspec.ValidationError as e:
        message = str(e)
        raise refuse(field_path(message), message, data) from None


def reread(raw: bytes, kind: type[T], refuse: Refusal) -> T:
    """The body as orjson reads it (an integer beyond 64 bits becomes a float), then as `kind`: for a
    body whose untyped values (passed on as sent) hold an integer orjson cannot encode."""
    return convert(orjson.loads(raw), kind, refuse)


def wide_int(value: Any) -> bool:
    """Whether JSON `value` holds an integer beyond 64 bits (msgspec decodes one, orjson cannot encode it)."""
    kind = type(value)
    if kind is str or value is None or kind is bool or kind is float:
        return False
    if kind is int:
        return not -(2**63) <= value < 2**64
    if kind is dict:
        return any(wide_int(v) for v in value.values())
    if kind is list:
        return any(wide_int(v) for v in value)
    return False


def field_path(error: str) -> str:
    """Where a msgspec ValidationError points: `max_tokens`, `content[0].text`; "" for the body."""
    at = _AT.search(error)
    path = at.group(1) if at else ""
    field = _MISSING.match(error)
    if field:
        path = f"{path}.{field.group(1)}"
    return path.lstrip(".")


def top_field(path: str) -> str:
    """The body's own field a path starts at: `content` of `content[0].text`."""
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def walk(data: Any, path: str) -> Any:
    """The value at a field path of the decoded body, or None."""
    for name, index in _STEP.findall(f".{path}" if path and path[0] != "[" else path):
        try:
            data = data[int(index)] if index else data[name]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
