"""The Responses door's request body as a typed struct: POST /v1/responses.

Lenient where OpenAI is (unknown fields are ignored: its SDKs send fields this gateway does not
use); the scalars are typed here, the input items and tools (whose shapes depend on their `type`,
and a message item may have none) are checked by the door as it translates them. A refused body
answers in OpenAI's shape, with `param` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from msgspec import Meta, Struct

from gateway.contract import decoding
from gateway.contract.native import MAX_TOKENS_LIMIT
from gateway.errors import GatewayError


class Reasoning(Struct):
    effort: str | None = None
    summary: str | None = None


class CreateResponse(Struct):
    """Unknown fields are ignored."""

    model: Annotated[str, Meta(min_length=1)]
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    # an int stays an int: it is passed upstream as sent
    temperature: Annotated[int, Meta(ge=0, le=2)] | Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[int, Meta(ge=0, le=1)] | Annotated[float, Meta(ge=0, le=1)] | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    reasoning: Reasoning | None = None


_MESSAGES = {
    "": "the body must be a JSON object",
    "model": "'model' is required and must be a string",
    "input": "'input' must be a string or a non-empty array of items",
    "instructions": "'instructions' must be a string",
    "max_output_tokens": f"'max_output_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}",
    "temperature": "'temperature' must be a number from 0 to 2",
    "top_p": "'top_p' must be a number from 0 to 1",
    "stream": "'stream' must be a boolean",
    "store": "'store' must be a boolean",
    "parallel_tool_calls": "'parallel_tool_calls' must be a boolean",
    "previous_response_id": "'previous_response_id' must be a string",
    "metadata": "'metadata' must be an object",
    "tools": "'tools' must be an array",
    "user": "'user' must be a string",
    "reasoning": "'reasoning' must be an object with an `effort` string",
}


def refusal(error: Callable[[str, str | None], GatewayError]) -> decoding.Refusal:
    """msgspec's complaint as OpenAI's message and `param` (`error(message, param)`)."""
    def refuse(field: str, message: str, body: Any) -> GatewayError:
        top = decoding.top_field(field)
        return error(_MESSAGES.get(top, f"'{top}' is not valid"), top or None)
    return refuse
