"""The Anthropic door's request bodies as typed structs: POST /v1/messages and /v1/messages/count_tokens.

Lenient where Anthropic is about what it does not need (unknown fields are ignored: SDKs add new
ones); strict about what it reads. Content blocks are told apart by their `type`. A refused body
answers in Anthropic's shape, its message naming the field as Anthropic does (`messages.0.content.1`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from gateway.contract import decoding
from gateway.contract.native import MAX_TOKENS_LIMIT, NO_NUL
from gateway.errors import GatewayError

Str = Annotated[str, Meta(pattern=NO_NUL)]  # PostgreSQL text and the upstreams take no NUL
Name = Annotated[str, Meta(min_length=1, pattern=NO_NUL)]
CacheControl = dict[str, Any]  # {"type": "ephemeral", "ttl"?: ...}: passed on as sent


class TextBlock(Struct, tag="text", tag_field="type"):
    text: Str
    cache_control: CacheControl | None = None


class Base64Source(Struct, tag="base64", tag_field="type"):
    media_type: Annotated[str, Meta(pattern="^[a-z]+/[a-z0-9.+-]+$")]
    data: Annotated[str, Meta(min_length=1, pattern="^[A-Za-z0-9+/]+={0,2}$")]


class URLSource(Struct, tag="url", tag_field="type"):
    url: Annotated[str, Meta(pattern="^https?://[\\x21-\\x7e]+$")]


class ImageBlock(Struct, tag="image", tag_field="type"):
    source: Base64Source | URLSource
    cache_control: CacheControl | None = None


class ToolUseBlock(Struct, tag="tool_use", tag_field="type"):
    id: Name
    name: Name
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(Struct, tag="tool_result", tag_field="type"):
    tool_use_id: Name
    content: Str | list[TextBlock | ImageBlock] = ""
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class ThinkingBlock(Struct, tag="thinking", tag_field="type"):
    thinking: Str
    signature: Str


class RedactedThinkingBlock(Struct, tag="redacted_thinking", tag_field="type"):
    data: Str


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock


class MessageParam(Struct):
    role: Literal["user", "assistant"]
    content: Str | list[Block]


class Tool(Struct):
    name: Name
    input_schema: dict[str, Any]
    description: Str | None = None
    cache_control: CacheControl | None = None
    type: Literal["custom"] | None = None


class ToolChoiceAuto(Struct, tag="auto", tag_field="type"):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(Struct, tag="any", tag_field="type"):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(Struct, tag="tool", tag_field="type"):
    name: Name
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(Struct, tag="none", tag_field="type"):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class ThinkingEnabled(Struct, tag="enabled", tag_field="type"):
    budget_tokens: Annotated[int, Meta(ge=1024, le=MAX_TOKENS_LIMIT)]


class ThinkingDisabled(Struct, tag="disabled", tag_field="type"):
    pass


class Metadata(Struct):
    user_id: Str | None = None


Unit = Annotated[int, Meta(ge=0, le=1)] | Annotated[float, Meta(ge=0, le=1)]


class CountTokensRequest(Struct):
    """POST /v1/messages/count_tokens: the prompt alone. Unknown fields are ignored."""

    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    # a union, so that each block must name its type (msgspec takes a lone tagged struct without it);
    # the door refuses an image here
    system: Str | list[TextBlock | ImageBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingEnabled | ThinkingDisabled | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages. Unknown fields are ignored."""

    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] = 0  # 0: not given (refused as required)
    stream: bool | None = None
    stop_sequences: list[Str] | None = None
    temperature: Unit | None = None
    top_p: Unit | None = None
    metadata: Metadata | None = None


def refusal(error: type[GatewayError] | Any) -> decoding.Refusal:
    """msgspec's complaint as Anthropic words it: `messages.0.content.1.source: ...` (`error(message)`)."""
    def refuse(field: str, message: str, body: Any) -> GatewayError:
        where = dotted(field)
        detail = message.split(" - at `", 1)[0]
        if where == "model" or (not where and "`model`" in message):
            return error("model: field required (a string)")
        if where == "max_tokens" or "`max_tokens`" in message:
            return error(f"max_tokens: an integer from 1 to {MAX_TOKENS_LIMIT} is required")
        if where == "messages" or "`messages`" in message:
            return error("messages: a non-empty array is required")
        return error(f"{where}: {detail}" if where else detail)
    return refuse


def dotted(path: str) -> str:
    """`messages[0].content[1]` as Anthropic names it: `messages.0.content.1`."""
    return path.replace("[", ".").replace("]", "")
