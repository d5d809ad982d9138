"""The canonical turn: what every front door parses into and every provider adapter renders from.

A turn is a `ChatRequest` (providers/base.py) whose messages and fields have the shapes below:
OpenAI's chat completions shapes, the lingua franca most clients and upstreams already speak, with
a few additions for what other APIs carry (reasoning with its signature, cache breakpoints). An
OpenAI-compatible upstream takes a text-only turn exactly as it came: nothing is rebuilt per turn.

    message          {"role": system | developer | user | assistant | tool, "content": str | [part] | None}
    text part        {"type": "text", "text": str, "cache_control"?: {"type": "ephemeral", ...}}
    image part       {"type": "image_url", "image_url": {"url": "https://..." | "data:<type>;base64,<data>",
                      "detail"?: str}, "cache_control"?: {...}}
    reasoning part   {"type": "reasoning", "text": str, "signature"?: str}           (assistant only)
    redacted part    {"type": "redacted_reasoning", "data": str}                    (assistant only)
    assistant calls  "tool_calls": [{"id": str, "type": "function",
                                      "function": {"name": str, "arguments": JSON text}}]
    tool result      {"role": "tool", "tool_call_id": str, "content": str | [text or image parts],
                      "is_error"?: true}

    extra["tools"]            [{"type": "function", "function": {"name", "description"?, "parameters"?,
                               "strict"?}, "cache_control"?: {...}}]
    extra["tool_choice"]      "auto" | "none" | "required" | {"type": "function", "function": {"name": str}}
    extra["parallel_tool_calls"]  bool
    extra["response_format"]  {"type": "text" | "json_object" | "json_schema", "json_schema"?: {...}}
    extra["reasoning_effort"] "minimal" | "low" | "medium" | "high"
    request.thinking          {"type": "enabled", "budget_tokens": int} (Anthropic's extended thinking)
    request.stop              str | [str]

What comes back is a stream of `TextDelta`, `ToolCallDelta` (OpenAI `delta.tool_calls` fragments:
index, then id/name on a call's first fragment, argument text in pieces), `ReasoningDelta` (text,
or the block's closing signature), `UsageReport` (prompt, cached, cache-write, completion and
reasoning tokens) and `Finish` (stop | length | tool_calls | content_filter).

`features` names what a turn uses beyond plain text; an adapter's `unsupported` names the first of
them its upstream cannot express, and the chain answers that as `base.Unsupported` (a 400 naming the
feature and the model) instead of sending it. `check` refuses a malformed turn, whatever the upstream.
`merge_calls` makes whole tool calls of the streamed fragments; `closed_rounds` keeps of a stored
thread's history only the tool rounds that were finished (each call answered, each result answering).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal, NotRequired, TypedDict

from gateway.providers.base import ChatRequest

# -- the shapes (for readers and type checkers: at run time a turn is plain dicts) --------------


class CacheControl(TypedDict):
    type: str


class TextPart(TypedDict):
    type: Literal["text"]
    text: str
    cache_control: NotRequired[CacheControl]


class ImageURL(TypedDict):
    url: str
    detail: NotRequired[str]


class ImagePart(TypedDict):
    type: Literal["image_url"]
    image_url: ImageURL
    cache_control: NotRequired[CacheControl]


class ReasoningPart(TypedDict):
    type: Literal["reasoning"]
    text: str
    signature: NotRequired[str]


class RedactedReasoningPart(TypedDict):
    type: Literal["redacted_reasoning"]
    data: str


class FunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(TypedDict):
    role: str
    content: str | list[dict[str, Any]] | None
    tool_calls: NotRequired[list[ToolCall]]
    tool_call_id: NotRequired[str]
    name: NotRequired[str]
    is_error: NotRequired[bool]


class FunctionDefinition(TypedDict):
    name: str
    description: NotRequired[str]
    parameters: NotRequired[dict[str, Any]]
    strict: NotRequired[bool]


class Tool(TypedDict):
    type: Literal["function"]
    function: FunctionDefinition
    cache_control: NotRequired[CacheControl]


# -- features ---------------------------------------------------------------------------------

TOOLS = "tools"
TOOL_CALLS = "tool calls"
TOOL_RESULTS = "tool results"
TOOL_ERRORS = "tool results marked as errors"
IMAGE_URLS = "images by URL"
IMAGE_DATA = "base64 images"
REASONING = "reasoning blocks"
CACHE_CONTROL = "cache_control"
THINKING = "thinking"
# request fields named as themselves when a turn uses them (a falsy value is not a use)
FIELDS = ("tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort", "seed", "logit_bias",
          "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "functions", "function_call", "user")
JSON_OUTPUT = "response_format"  # response_format other than {"type": "text"}

NONE: frozenset[str] = frozenset()
_BASE64 = re.compile(r"[A-Za-z0-9+/=_-]*")


def features(request: ChatRequest) -> frozenset[str]:
    """What `request` uses beyond plain text, worked out once (kept on the request). A text-only
    turn costs one look at each message."""
    found = request.features
    if found is not None:
        return found
    names: set[str] = set()
    for message in request.messages:
        content = message.get("content")
        if len(message) == 2 and content.__class__ is str:
            continue  # the common case: a role and a string
        if message.get("tool_calls") is not None:
            names.add(TOOL_CALLS)
        if message.get("role") == "tool":
            names.add(TOOL_RESULTS)
            if message.get("is_error") is True:
                names.add(TOOL_ERRORS)
        if content.__class__ is list:
            for part in content:
                _part_features(part, names)
    extra = request.extra
    if extra:
        tools = extra.get("tools")
        if tools:
            names.add(TOOLS)  # whatever it holds: `check` refuses what is not a list of tools
            for tool in tools if tools.__class__ is list else ():
                if isinstance(tool, dict) and "cache_control" in tool:
                    names.add(CACHE_CONTROL)
        for key in FIELDS:
            value = extra.get(key)
            if value is None or value is False or (key == "response_format" and _text_format(value)):
                continue
            names.add(key)
    if request.thinking is not None:
        names.add(THINKING)
    request.features = found = frozenset(names) if names else NONE
    return found


def _part_features(part: Any, names: set[str]) -> None:
    if not isinstance(part, dict):
        return
    kind = part.get("type")
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
        names.add(IMAGE_DATA if isinstance(url, str) and url.startswith("data:") else IMAGE_URLS)
    elif kind == "reasoning" or kind == "redacted_reasoning":
        names.add(REASONING)
    if "cache_control" in part:
        names.add(CACHE_CONTROL)


def _text_format(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == "text"


# -- checks every door makes -------------------------------------------------------------------

class TurnError(Exception):
    """A malformed turn: `message` says what is wrong, `param` names the field (OpenAI's notation:
    `messages[2].tool_call_id`, `tools[0].function.parameters`). Each door answers it in its shape."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def check(request: ChatRequest, calls: Iterable[str] = ()) -> None:
    """What no upstream would take, refused before anything is decided or written: a tool without
    a name or with a schema that is not an object, an assistant tool call that is not one, a tool
    result for a call id no earlier assistant message made (nor `calls`: the ids of the calls made
    before these messages, by a stored reply they continue), an image that is neither an http(s)
    URL nor base64 data."""
    found = features(request)
    if not found:
        return
    if TOOLS in found:
        check_tools(request.extra["tools"])
    if found & {TOOL_CALLS, TOOL_RESULTS, IMAGE_URLS, IMAGE_DATA}:
        check_messages(request.messages, calls)


def check_tools(tools: Any) -> None:
    if not isinstance(tools, list):
        raise TurnError("'tools' must be an array of function tools", "tools")
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise TurnError(f"{at} must be {{\"type\": \"function\", \"function\": {{...}}}}", at)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise TurnError(f"{at}.function.name must be a non-empty string", f"{at}.function.name")
        parameters = function.get("parameters")
        if parameters is not None and (not isinstance(parameters, dict) or
                                       parameters.get("type", "object") != "object"):
            raise TurnError(f"{at}.function.parameters must be a JSON Schema object with type \"object\"",
                            f"{at}.function.parameters")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise TurnError(f"{at}.function.description must be a string", f"{at}.function.description")


def check_messages(messages: list[dict[str, Any]], made: Iterable[str] = ()) -> None:
    calls: set[str] = set(made)
    for i, message in enumerate(messages):
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and tool_calls.__class__ is not list:
            raise TurnError(f"messages[{i}].tool_calls must be an array", f"messages[{i}].tool_calls")
        for j, call in enumerate(tool_calls or ()):
            at = f"messages[{i}].tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(call.get("id"), str) or not call["id"]:
                raise TurnError(f"{at} must have an id and a function", at)
            if not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
                raise TurnError(f"{at}.function must have a name and arguments (JSON text)", f"{at}.function")
            calls.add(call["id"])
        if message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise TurnError(f"messages[{i}].tool_call_id {call_id!r} answers no tool call of an earlier "
                                "assistant message", f"messages[{i}].tool_call_id")
        content = message.get("content")
        if content.__class__ is list:
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    check_image(part, f"messages[{i}].content[{j}]")


def check_image(part: dict[str, Any], at: str) -> None:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str):
        raise TurnError(f"{at}.image_url.url must be a string", f"{at}.image_url.url")
    if url.startswith("data:"):
        if data_url(url) is None:
            raise TurnError(f"{at}.image_url.url is not a base64 data URL (data:<type>;base64,<data>)",
                            f"{at}.image_url.url")
    elif not url.startswith(("https://", "http://")):
        raise TurnError(f"{at}.image_url.url must be an http(s) URL or a base64 data URL", f"{at}.image_url.url")


def data_url(url: str) -> tuple[str, str] | None:
    """A base64 data URL's (media type, data), or None when it is not one (or the data is not base64)."""
    head, sep, data = url[len("data:"):].partition(";base64,")
    if not sep or "/" not in head or not data or not _BASE64.fullmatch(data, 0, 4096):
        return None
    return head, data


def call_fragment(index: int, call_id: str | None = None, name: str | None = None,
                  arguments: str = "") -> dict[str, Any]:
    """One OpenAI `delta.tool_calls` fragment: a call's first (with id and name) or a later one."""
    if call_id is None:
        return {"index": index, "function": {"arguments": arguments}}
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name or "", "arguments": arguments}}


def merge_calls(fragments: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed tool-call fragments (by index, arguments in pieces) into whole tool calls (an id the
    upstream gave none stays None)."""
    calls: dict[int, dict[str, Any]] = {}
    for fragment in fragments:
        call = calls.setdefault(fragment.get("index", 0), {"id": None, "type": "function",
                                                           "function": {"name": "", "arguments": ""}})
        call["id"] = fragment.get("id") or call["id"]
        function = fragment.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def closed_rounds(history: list[dict[str, Any]], following: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stored thread's `history` with only the tool rounds that were finished: of an assistant's
    tool calls, those answered by the tool results right after it (in the history, or first thing in
    `following`, the turn's own messages); of tool results, those answering a call kept before them.
    An assistant message left with neither text nor calls goes too. A thread holds unfinished rounds
    when the conversation went on in words after a reply's calls (POST /api/chat) or a call's turn
    was deleted; no upstream takes a call without its result, or a result without its call. A
    history without tool calls or results is returned as it is."""
    for message in history:
        if message.get("tool_calls") or message.get("role") == "tool":
            break
    else:
        return history
    seq = history + following
    kept: list[dict[str, Any]] = []
    open_calls: set[str] = set()
    for i, message in enumerate(history):
        if message.get("role") == "tool":
            if message.get("tool_call_id") in open_calls:
                kept.append(message)
            continue
        open_calls = set()
        calls = message.get("tool_calls")
        if calls:
            answered = set()
            for later in seq[i + 1:]:
                if later.get("role") != "tool":
                    break
                answered.add(later.get("tool_call_id"))
            made = [call for call in calls if call.get("id") in answered]
            if len(made) != len(calls):
                message = {k: v for k, v in message.items() if k != "tool_calls"} | (
                    {"tool_calls": made} if made else {})
                if not made and not message.get("content"):
                    continue
            open_calls = {call["id"] for call in made}
        kept.append(message)
    return kept
