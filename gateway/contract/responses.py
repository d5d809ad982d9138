"""The Responses door's request body as a typed struct: POST /v1/responses.

Lenient where OpenAI is (unknown fields are ignored: its SDKs send fields this gateway does not
use); the scalars are typed here, the input items and tools (whose shapes depend on their `type`,
and a message item may have none) are checked by the door as it translates them, in the words of
its errors. Their shapes are structs too, which the body's schema refers to (`extra_json_schema`:
stated in GET /openapi.json, not decoded through). A refused body answers in OpenAI's shape, with
`param` naming the field. The answers (response object, input item page, deletion) are structs
that state what the door writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from gateway.contract import decoding
from gateway.contract.native import IMAGE_URL, MAX_TOKENS_LIMIT, NO_NUL, NOT_BLANK
from gateway.contract.operations import ref
from gateway.errors import GatewayError

Text = Annotated[str, Meta(pattern=NO_NUL)]


# -- what the door checks of items and tools by code (api/openai/responses.py), as schemas --------

class InputText(Struct, tag="input_text", tag_field="type"):
    text: Text


class OutputText(Struct, tag="output_text", tag_field="type"):
    text: Text


class InputImage(Struct, tag="input_image", tag_field="type"):
    image_url: Annotated[str, Meta(pattern=IMAGE_URL, description="An http(s) URL, or a base64 data:image/... URL")]
    detail: Literal["auto", "low", "high"] | None = None


class InputMessage(Struct):
    """A message item; its `type` may be left out."""

    role: Literal["user", "assistant", "system", "developer"]
    content: Text | Annotated[list[InputText | OutputText | InputImage], Meta(min_length=1)]
    type: Literal["message"] = "message"


class FunctionCall(Struct, tag="function_call", tag_field="type"):
    """The model's tool call, sent back as context."""

    call_id: Text
    name: Text
    arguments: Text


class FunctionCallOutput(Struct, tag="function_call_output", tag_field="type"):
    """A tool's result for a call of an earlier item."""

    call_id: Text
    output: Text


# a JSON Schema object whose type, when given, is "object" (what the upstreams take as a tool's parameters)
ToolParameters = Annotated[dict[str, Any], Meta(extra_json_schema={"properties": {"type": {"const": "object"}}})]


class FunctionTool(Struct, tag="function", tag_field="type"):
    """Translated and passed through (its other fields too: strict, ...)."""

    name: Annotated[str, Meta(min_length=1)]
    description: str | None = None
    parameters: ToolParameters | None = None


class ToolChoiceFunction(Struct, tag="function", tag_field="type"):
    name: str


DOCUMENTED: tuple[type[Struct], ...] = (InputMessage, FunctionCall, FunctionCallOutput, FunctionTool,
                                        ToolChoiceFunction)
_ITEMS = {"type": "array", "minItems": 1, "items": {"anyOf": [ref(s.__name__) for s in DOCUMENTED[:3]]},
          "description": "Message items and the tool loop's function_call / function_call_output items; with "
                         "store: true the last must be a user message or a function_call_output (the prompt "
                         "stored: that user message with the tools' outputs right before it, or the tool round "
                         "the input ends with; the others are sent for this turn only)"}
Checked = Annotated[str, Meta(extra_json_schema={"pattern": NO_NUL})]  # NUL refused by the door


class Reasoning(Struct):
    effort: str | None = None
    summary: str | None = None


class CreateResponse(Struct):
    """Unknown fields are ignored."""

    model: Annotated[str, Meta(min_length=1)]
    input: (Annotated[str, Meta(extra_json_schema={"pattern": NOT_BLANK, "description": "One user message"})]
            | Annotated[list[Any], Meta(extra_json_schema=_ITEMS)])
    instructions: Annotated[Checked, Meta(description="A system message for this turn only (never stored)")] | None = (
        None)
    max_output_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    # an int stays an int: it is passed upstream as sent
    temperature: Annotated[int, Meta(ge=0, le=2)] | Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[int, Meta(ge=0, le=1)] | Annotated[float, Meta(ge=0, le=1)] | None = None
    stream: bool | None = None
    store: Annotated[bool, Meta(description="Default true: the turn is kept in a thread")] | None = None
    previous_response_id: Annotated[Checked, Meta(description="Continue that stored response's thread")] | None = None
    metadata: Annotated[dict[str, Any], Meta(description="Echoed in the response, not stored")] | None = None
    tools: Annotated[list[Any], Meta(extra_json_schema={"items": ref(FunctionTool.__name__)})] | None = None
    tool_choice: Annotated[Any, Meta(extra_json_schema={"anyOf": [
        {"enum": ["auto", "none", "required"]}, ref(ToolChoiceFunction.__name__), {"type": "null"}]})] = None
    parallel_tool_calls: bool | None = None
    user: Checked | None = None
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


# -- answers (the door writes its JSON itself; these state its shape for GET /openapi.json) --------

class InputTokensDetails(Struct):
    cached_tokens: int
    cache_write_tokens: int


class OutputTokensDetails(Struct):
    reasoning_tokens: int


class ResponseUsage(Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(Struct):
    code: str
    message: str


class Response(Struct, kw_only=True):
    """The response object: POST /v1/responses' answer when `stream` is not true, GET's, and the
    object its stream events carry."""

    id: Annotated[str, Meta(pattern="^resp_", description="resp_<hex>: a stored response's id is its assistant "
                                                         "message's")]
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "failed", "in_progress", "cancelled", "incomplete"]
    background: bool
    completed_at: int | None
    error: ResponseError | None
    incomplete_details: dict[str, Any] | None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, Any]
    model: str
    output: list[dict[str, Any]]  # message, reasoning and function_call items
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: dict[str, Any]
    store: bool
    temperature: float | None
    text: dict[str, Any]
    tool_choice: Any
    tools: list[Any]
    top_p: float | None
    truncation: str
    usage: ResponseUsage | None
    output_text: Annotated[str, Meta(description="The output's text, joined (as the SDKs compute it)")]
    user: str | None = None  # present when the request named one


class ResponseItemList(Struct, kw_only=True):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(Struct):
    id: str
    object: Literal["response.deleted"]
    deleted: Literal[True]


ANSWERS: tuple[type[Struct], ...] = (Response, ResponseItemList, ResponseDeleted)
