"""The native API's request bodies as typed structs: one definition for the handlers' decoding and
for GET /openapi.json's schemas.

msgspec checks the types, required fields, ranges, lengths and enums while it decodes. What is
cheaper as code than as a regex on every request (no NUL in text, a content that is not blank, an
image URL's shape) is checked after decoding by `decode`, and stated in the schema alike through
`extra_json_schema` (the patterns below): the document's verdict and the handler's agree
(tests/test_contract.py holds a corpus of bodies to both).

A refused body raises BadRequest with a message that names the field (`field_message`).
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.contract import decoding
from gateway.errors import BadRequest, GatewayError, InvalidId

# max_tokens is added to the prompt estimate in bigint SQL (the daily reservation): bounded here,
# where a larger one is a 400, not an overflow (500) later
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_PARTS = 100
MAX_CLIENT_MESSAGE_ID = 200
MAX_TITLE = 200
IMAGE_DETAILS = ("auto", "low", "high")

# -- what the code checks after decoding, as the schema states it ------------------------------

NO_NUL = "^[^\\x00]*$"
# str.strip() leaves something, and no NUL (PostgreSQL text cannot hold one). Python's whitespace
# spelled out: a regex's \s differs in both directions (\x1c-\x1f and \x85 are not in ECMAScript's,
# which has \ufeff)
PY_SPACE = "\\t\\n\\x0b\\x0c\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
NOT_BLANK = f"^[^\\x00]*[^{PY_SPACE}\\x00][^\\x00]*$"
# a data URL's media type and base64 payload (what an Anthropic upstream needs to build its image
# source), or an http(s) URL of printable ASCII without spaces
_DATA_URL = "data:image/[a-z0-9.+-]{1,40};base64,[A-Za-z0-9+/]+={0,2}"
IMAGE_URL = f"^({_DATA_URL}|https?://[\\x21-\\x7e]*)$"
_IMAGE_URL = re.compile(f"{_DATA_URL}|https?://[\\x21-\\x7e]*", re.ASCII)

# what msgspec decodes as a UUID: the hyphenated form or 32 bare hex digits (uuid.UUID would also
# take braces or a urn: prefix; a JSON Schema "uuid" format takes the hyphenated form alone)
UUID_PATTERN = "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32})$"
ThreadId = Annotated[uuid.UUID, Meta(extra_json_schema={"pattern": UUID_PATTERN},
                                     description="Continue this thread (one of the caller's)")]
NoNul = Annotated[str, Meta(extra_json_schema={"pattern": NO_NUL})]
Text = Annotated[str, Meta(min_length=1, extra_json_schema={"pattern": NOT_BLANK},
                           description="The user's message: not blank, no NUL")]
ClientId = Annotated[str, Meta(min_length=1, max_length=MAX_CLIENT_MESSAGE_ID, extra_json_schema={"pattern": NO_NUL})]
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)]
ModelName = Annotated[str, Meta(description="Default: auto (the router picks)")]


# -- content parts (OpenAI's shape; every door that takes parts checks them here) ---------------

class ImageURL(Struct, forbid_unknown_fields=True, omit_defaults=True):
    url: Annotated[str, Meta(extra_json_schema={"pattern": IMAGE_URL},
                             description="An http(s) URL, or a base64 data:image/... URL")]
    detail: Literal["auto", "low", "high"] | UnsetType = UNSET


class TextPart(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: NoNul


class ImagePart(Struct, tag="image_url", tag_field="type", forbid_unknown_fields=True):
    image_url: ImageURL


Part = TextPart | ImagePart
# something in it: an image, or a text part that is not blank (check_parts)
_SOMETHING = {"contains": {"anyOf": [{"properties": {"type": {"const": "image_url"}}, "required": ["type"]},
                                     {"properties": {"text": {"pattern": NOT_BLANK}}, "required": ["text"]}]}}
Parts = Annotated[list[Part], Meta(min_length=1, max_length=MAX_PARTS, extra_json_schema=_SOMETHING,
                                   description="OpenAI-style content parts, stored and returned as sent "
                                               "(`parts`); the demo model answers about the text parts")]


# -- the bodies ---------------------------------------------------------------------------------

class ChatRequest(Struct):
    """A chat turn (POST /api/chat, and the WebSocket's chat frames). Unknown fields are ignored."""

    content: Text | Parts
    thread_id: ThreadId | None = None
    model: ModelName | None = None
    client_message_id: Annotated[ClientId, Meta(description="Idempotency key: a retry returns the stored turn")] \
        | None = None
    stream: Annotated[bool, Meta(description="Stream SSE (default: by the Accept header)")] | None = None
    max_tokens: MaxTokens | None = None
    temperature: float | None = None


class ArenaRequest(Struct):
    """An arena turn: both slots answer the same text. Unknown fields (and `model`) are ignored."""

    content: Text
    thread_id: ThreadId | None = None
    client_message_id: ClientId | None = None
    stream: bool | None = None
    max_tokens: MaxTokens | None = None
    temperature: float | None = None
    models: Annotated[list[str], Meta(min_length=2, max_length=2,
                                      extra_json_schema={"uniqueItems": True},
                                      description="Two configured models (default: drawn at random)")] | None = None
    anonymous: Annotated[bool, Meta(description="Hide the models until the vote (default true)")] | None = None


class RegenerateRequest(Struct):
    """Optional; unknown fields are ignored."""

    model: Annotated[str, Meta(description="Default: what the last reply was asked for (auto if it was "
                                           "routed)")] | None = None
    client_request_id: Annotated[ClientId, Meta(description="Idempotency key: a retry returns the reply it "
                                                            "made")] | None = None
    stream: Annotated[bool, Meta(description="Stream SSE (default: by the Accept header)")] | None = None


class CreateThread(Struct):
    """Unknown fields are ignored."""

    title: Annotated[str, Meta(max_length=MAX_TITLE, extra_json_schema={"pattern": NO_NUL})] | None = None


class Vote(Struct):
    """Unknown fields are ignored."""

    winner: Literal["a", "b", "tie", "both_bad"]


# -- POST /api/keys ---------------------------------------------------------------------------

SCOPES = ("chat", "arena", "admin")
KEY_NAME_MAX = 100
# integers the policy passes to SQL as `integer`
LIMIT_INTS = ("requests_per_minute", "daily_tokens", "max_concurrent_streams", "max_tokens", "monthly_tokens",
              "total_tokens")
LIMIT_MAX = 2**31 - 1
# dollars per UTC day, month or lifetime, kept in numeric(16, 8) columns (sql/0010, sql/0018)
LIMIT_USD = ("daily_cost_usd", "monthly_cost_usd", "total_cost_usd")
USD_MAX = 100_000_000
MODELS_MAX = 100
LIMIT_NAMES = (*LIMIT_INTS, *LIMIT_USD, "models")

Limit = Annotated[int, Meta(ge=1, le=LIMIT_MAX)]
# an int stays an int (it is stored as sent)
Dollars = Annotated[int, Meta(gt=0, lt=USD_MAX)] | Annotated[float, Meta(gt=0, lt=USD_MAX)]
UserId = Annotated[uuid.UUID, Meta(extra_json_schema={"pattern": UUID_PATTERN},
                                   description="Admin only: the key's owner (created if new)")]


class KeyLimits(Struct, forbid_unknown_fields=True):
    """A new key's own limits (each within the creating key's and its ancestors')."""

    requests_per_minute: Limit | None = None
    daily_tokens: Limit | None = None
    max_concurrent_streams: Limit | None = None
    max_tokens: Limit | None = None
    daily_cost_usd: Dollars | None = None
    monthly_tokens: Limit | None = None
    total_tokens: Limit | None = None
    monthly_cost_usd: Dollars | None = None
    total_cost_usd: Dollars | None = None
    models: Annotated[list[Annotated[str, Meta(min_length=1, max_length=200, extra_json_schema={"pattern": NO_NUL})]],
                      Meta(min_length=1, max_length=MODELS_MAX)] | None = None


class CreateKey(Struct):
    """Unknown fields are ignored."""

    name: Annotated[str, Meta(min_length=1, max_length=KEY_NAME_MAX, extra_json_schema={"pattern": NOT_BLANK})]
    scopes: Annotated[list[Literal["chat", "arena", "admin"]],
                      Meta(min_length=1, description="Default: chat and arena (within the creating key's own)")] \
        | None = None
    # checked as code (datetime.fromisoformat, a timezone, in the future)
    expires_at: Annotated[str, Meta(extra_json_schema={"format": "date-time"},
                                    description="In the future, with a timezone")] | None = None
    limits: KeyLimits | None = None
    user_id: UserId | None = None


def _key_message(field: str, error: str, body: Any) -> GatewayError:
    top = decoding.top_field(field)
    value = decoding.walk(body, top) if top else None
    if top == "name":
        if value is None or isinstance(value, str):
            return BadRequest(f"name is required: 1 to {KEY_NAME_MAX} characters")
        return BadRequest("name must be a string")
    if top == "scopes":
        if isinstance(value, list) and value and all(isinstance(s, str) for s in value):
            return BadRequest(f"unknown scopes {sorted(set(value) - set(SCOPES))}: allowed are {list(SCOPES)}")
        return BadRequest(f"scopes must be a non-empty list drawn from {list(SCOPES)}")
    if top == "expires_at":
        return BadRequest("expires_at must be an ISO-8601 string with a timezone")
    if top == "user_id":
        return InvalidId("user_id is not a valid UUID" if isinstance(value, str) else "user_id must be a UUID string")
    if top == "limits":
        if not isinstance(value, dict):
            return BadRequest("limits must be an object")
        if "unknown field" in error:
            unknown = sorted(set(value) - set(LIMIT_NAMES))
            return BadRequest(f"unknown limits {unknown}: allowed are {list(LIMIT_NAMES)}")
        name = field.removeprefix("limits.").split("[", 1)[0]
        if name in LIMIT_USD:
            return BadRequest(f"limits.{name} must be a number of dollars above 0 and below {USD_MAX}")
        if name == "models":
            return BadRequest(f"limits.models must be a list of 1 to {MODELS_MAX} model names")
        return BadRequest(f"limits.{name} must be an integer from 1 to {LIMIT_MAX}")
    return BadRequest("body must be a JSON object" if not field else f"{top} is not valid")


def key_limits(limits: KeyLimits | None) -> dict[str, Any] | None:
    """A decoded `limits` as stored: the limits that are set (models once each, no NUL), or None."""
    if limits is None:
        return None
    out = {name: value for name in (*LIMIT_INTS, *LIMIT_USD) if (value := getattr(limits, name)) is not None}
    if limits.models is not None:
        for model in limits.models:
            check_text(model, "limits.models")
        out["models"] = list(dict.fromkeys(limits.models))
    return out or None


# -- the schemas ------------------------------------------------------------------------------

BODIES: tuple[type[Struct], ...] = (ChatRequest, ArenaRequest, RegenerateRequest, CreateThread, Vote, CreateKey)


# -- decoding -----------------------------------------------------------------------------------

T = TypeVar("T", bound=Struct)

_INDEX = re.compile(r"\[(\d+)\]")


def decode(raw: bytes, kind: type[T]) -> T:
    """A request body (JSON bytes) as `kind`, or BadRequest naming the field."""
    return decoding.decode(raw, kind, _REFUSALS.get(kind) or _refusal(kind), _not_json)


def convert(data: Any, kind: type[T]) -> T:
    """An already decoded JSON object (a WebSocket frame) as `kind`, or BadRequest naming the field."""
    return decoding.convert(data, kind, _REFUSALS.get(kind) or _refusal(kind))


def _not_json() -> GatewayError:
    return BadRequest("body is not valid JSON")


def _refusal(kind: type[Struct]) -> decoding.Refusal:
    def refuse(field: str, error: str, body: Any) -> GatewayError:
        if decoding.top_field(field) == "thread_id":
            return InvalidId("thread_id is not a valid UUID" if error.startswith("Invalid UUID")
                             else "thread_id must be a UUID string")
        return BadRequest(field_message(field, error, body, kind))
    _REFUSALS[kind] = refuse
    return refuse


_REFUSALS: dict[type[Struct], decoding.Refusal] = {CreateKey: _key_message}


def _part_message(where: str, part: Any) -> str:
    if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
        return f"{where} must be a text or image_url part"
    if part["type"] == "text":
        return f"{where} must be {{\"type\": \"text\", \"text\": string}}"
    return f"{where} must be {{\"type\": \"image_url\", \"image_url\": {{\"url\": string, \"detail\"?}}}}"


def field_message(field: str, error: str, body: Any, kind: type[Struct]) -> str:
    """The native message for a msgspec ValidationError at `field`: which field, and what it must be."""
    if not field:
        return "body must be a JSON object"
    top = decoding.top_field(field)
    if top == "content" and field != "content":
        index = _INDEX.match(field[len("content"):])
        where = f"content[{index.group(1)}]" if index else "content"
        if field.endswith(".image_url.detail") and "unknown field" not in error:
            return f"{where}.image_url.detail must be auto, low or high"
        return _part_message(where, decoding.walk(body, where))
    if top == "content":
        value = decoding.walk(body, "content")
        if isinstance(value, list):
            if kind is ArenaRequest:  # both slots get the text: parts would be dropped in silence
                return "content parts are not supported by the arena: send a string"
            return f"content must have 1 to {MAX_PARTS} parts"
        if isinstance(value, str):
            return "content must not be empty"
        return "content must be a string or a list of content parts"
    return _MESSAGES.get(top, f"{top} is not valid")


_MESSAGES = {
    "model": "model must be a model name",
    "client_message_id": f"client_message_id must be 1 to {MAX_CLIENT_MESSAGE_ID} characters",
    "client_request_id": f"client_request_id must be 1 to {MAX_CLIENT_MESSAGE_ID} characters",
    "stream": "stream must be true or false",
    "anonymous": "anonymous must be true or false",
    "max_tokens": f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}",
    "temperature": "temperature must be a number",
    "models": "models must be two different model names",
    "title": f"title must be a string of at most {MAX_TITLE} characters",
    "winner": "winner must be one of a, b, tie, both_bad",
}


# -- what the schema states by pattern, checked as code -------------------------------------------

def check_text(value: str, key: str) -> str:
    # PostgreSQL text cannot hold NUL: refuse it here, before anything is written, not as a 500 later
    if "\x00" in value:
        raise BadRequest(f"{key} must not contain NUL characters")
    return value


def check_parts(parts: list[Part]) -> tuple[str, list[dict[str, Any]]]:
    """Decoded content parts' text (of the text parts, joined by spaces) and the parts as JSON
    objects (as sent: an absent `detail` stays absent)."""
    texts = []
    for i, part in enumerate(parts):
        if type(part) is TextPart:
            texts.append(check_text(part.text, f"content[{i}].text"))
        elif not _IMAGE_URL.fullmatch(part.image_url.url):  # type: ignore[union-attr]
            raise BadRequest(f"content[{i}].image_url.url must be an http(s) URL or a base64 data:image/... URL")
    text = " ".join(t for t in texts if t)
    if not text.strip() and len(texts) == len(parts):
        raise BadRequest("content must not be empty")
    return text, msgspec.to_builtins(parts)


def check_content(content: str | list[Part]) -> tuple[str, list[dict[str, Any]] | None]:
    """`content`: the text and the parts (None for a string)."""
    if type(content) is str:
        if not content.strip():
            raise BadRequest("content must not be empty")
        return check_text(content, "content"), None
    return check_parts(content)  # type: ignore[arg-type]


def parse_content(content: Any) -> tuple[str, list[dict[str, Any]] | None]:
    """Already decoded JSON `content` (a string or a list of parts), checked as ChatRequest's."""
    return check_content(convert({"content": content}, _Content).content)


class _Content(Struct):
    content: Text | Parts
