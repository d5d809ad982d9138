"""The OpenAI door's request bodies as typed structs: POST /v1/chat/completions.

Lenient where OpenAI is: its SDKs send fields this gateway does not know (unknown fields are
ignored, and the schema allows them); the fields OpenAI-compatible upstreams understand are passed
through unchecked. A refused body answers in OpenAI's shape, with `param` naming the field as
OpenAI does (`messages[0]`, `stream_options`).
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Annotated, Any, Literal, TypeVar

from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.contract import decoding
from gateway.contract.native import MAX_TOKENS_LIMIT, NO_NUL
from gateway.errors import GatewayError

ROLES = ("system", "developer", "user", "assistant", "tool")

MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)]
PassThrough = Annotated[Any, Meta(description="Passed through to OpenAI-compatible upstreams unchecked")]
# a message is passed upstream exactly as sent (tool calls, names and all): checked, not rebuilt
Message = Annotated[dict[str, Any], Meta(extra_json_schema={
    "properties": {"role": {"enum": list(ROLES)},
                   "content": {"anyOf": [{"type": "string", "pattern": NO_NUL}, {"type": "array"}, {"type": "null"}]}},
    "required": ["role"]})]


class StreamOptions(Struct):
    include_usage: bool | None = None


class ChatCompletionRequest(Struct):
    """Unknown fields are ignored."""

    model: Annotated[str, Meta(min_length=1, description="A configured model, or auto (the router picks)")]
    messages: Annotated[list[Message], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    # an int stays an int: it is passed upstream as sent
    temperature: Annotated[int, Meta(ge=0, le=2)] | Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[int, Meta(ge=0, le=1)] | Annotated[float, Meta(ge=0, le=1)] | None = None
    stop: str | list[str] | None = None
    n: Literal[1] | None = None
    tools: PassThrough | UnsetType = UNSET
    tool_choice: PassThrough | UnsetType = UNSET
    parallel_tool_calls: PassThrough | UnsetType = UNSET
    response_format: PassThrough | UnsetType = UNSET
    seed: PassThrough | UnsetType = UNSET
    user: PassThrough | UnsetType = UNSET
    presence_penalty: PassThrough | UnsetType = UNSET
    frequency_penalty: PassThrough | UnsetType = UNSET
    logit_bias: PassThrough | UnsetType = UNSET
    logprobs: PassThrough | UnsetType = UNSET
    top_logprobs: PassThrough | UnsetType = UNSET
    reasoning_effort: PassThrough | UnsetType = UNSET


PASS_THROUGH = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "seed", "user",
                "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "reasoning_effort")
_PASSED = attrgetter(*PASS_THROUGH)


def check_messages(messages: list[dict[str, Any]], error: Callable[[str, str], GatewayError]) -> bool:
    """What the schema says of each message, checked as code (`error(message, param)`). True when a
    message holds an integer beyond 64 bits (decoding.wide_int: to be read again as orjson reads it)."""
    wide = False
    for i, message in enumerate(messages):
        # a str first: a list or object role is unhashable, so the lookup alone would raise (a 500)
        role = message.get("role")
        if type(role) is not str or role not in ROLES:
            raise error(f"messages[{i}] must be an object with a valid 'role'", f"messages[{i}]")
        content = message.get("content")
        if type(content) is str:
            if "\x00" in content:
                raise error(f"messages[{i}].content must not contain NUL", f"messages[{i}]")
        elif not (content is None or type(content) is list):
            raise error(f"messages[{i}].content must be a string or an array", f"messages[{i}]")
        if not wide and (len(message) > 2 or type(content) is not str):  # else: a role and a string
            wide = decoding.wide_int(message)
    return wide


def pass_through(body: ChatCompletionRequest) -> dict[str, Any]:
    """The fields passed on to OpenAI-compatible upstreams, as sent."""
    return {k: v for k, v in zip(PASS_THROUGH, _PASSED(body), strict=True) if v is not UNSET}


_MESSAGES = {
    "": "the body must be a JSON object",
    "model": "'model' is required and must be a string",
    "messages": "'messages' must be a non-empty array",
    "stream": "'stream' must be a boolean",
    "stream_options": "'stream_options' must be an object",
    "max_tokens": f"'max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}",
    "max_completion_tokens": f"'max_completion_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}",
    "temperature": "'temperature' must be a number from 0 to 2",
    "top_p": "'top_p' must be a number from 0 to 1",
    "stop": "'stop' must be a string or an array of strings",
    "n": "only n = 1 is supported",
}

E = TypeVar("E", bound=GatewayError)


def refusal(error: Callable[[str, str | None], E]) -> decoding.Refusal:
    """msgspec's complaint as OpenAI's message and `param` (the body's field; `messages[i]` for a message)."""
    def refuse(field: str, message: str, body: Any) -> GatewayError:
        top = decoding.top_field(field)
        if top == "messages" and field.startswith("messages["):
            param = field[:field.index("]") + 1]
            return error(f"{param} must be an object with a valid 'role'", param)
        if field.startswith("stream_options.include_usage"):
            return error("'stream_options.include_usage' must be a boolean", "stream_options")
        return error(_MESSAGES.get(top, f"'{top}' is not valid"), top or None)
    return refuse
