"""The Anthropic Messages front door: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Any Anthropic SDK works by changing `base_url` (the key goes in `x-api-key` or a bearer header;
`anthropic-version` is accepted, whatever its value). Stateless like the OpenAI route: the same
auth, router, policy and chain, no thread or message rows, and exactly one usage record per
request (`Turns.begin_completion` / `finish_completion`). The request is translated to the
provider-neutral (OpenAI-style) `ChatRequest`, so any upstream answers it: tools reach the
OpenAI-compatible ones (translated both ways), the others answer with text.

A stream is Anthropic's exact event sequence: `message_start`, then per content block
`content_block_start` / `content_block_delta`... / `content_block_stop` (a `ping` after the first
block's start), `message_delta` with the stop reason and the usage, `message_stop`. A failure
after the first byte is an `error` event in Anthropic's shape, and the stream ends there.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway.api.common import SSE_HEADERS, caller, read_json
from gateway.api.content import MAX_TOKENS_LIMIT
from gateway.errors import GatewayError, TooManyRequests
from gateway.providers.base import (
    Batch,
    ChatRequest,
    Finish,
    ProviderError,
    TextDelta,
    ToolCallDelta,
    UpstreamHTTPError,
    UpstreamTimeout,
    UsageReport,
)
from gateway.service.router import AUTO
from gateway.service.turns import Completion, charged_usage, prompt_tokens
from gateway.state import MODELS, TIMINGS, TURNS

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}
# the chain's normalised finish reasons as Anthropic's stop reasons
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


class AnthropicError(GatewayError):
    """An error in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""

    def __init__(self, status: int, message: str, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_ or ERROR_TYPES.get(status, "api_error")

    def body(self) -> bytes:
        return orjson.dumps({"type": "error", "error": {"type": self.type, "message": self.message}})

    def response(self) -> web.Response:
        return web.Response(body=self.body(), status=self.status, content_type="application/json")


def provider_error(e: ProviderError) -> AnthropicError:
    """An upstream failure before any output, as the HTTP status a proxy should give."""
    if isinstance(e, UpstreamHTTPError) and e.status in (429, 529):
        return AnthropicError(e.status, e.message)
    if isinstance(e, UpstreamTimeout):
        return AnthropicError(504, e.message)
    return AnthropicError(502, e.message, "api_error")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def anthropic_errors(handler: Handler) -> Handler:
    """This front door's errors in Anthropic's shape, whatever raised them (auth, body, limits)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except AnthropicError as e:
            return e.response()
        except TooManyRequests as e:
            resp = AnthropicError(429, e.message).response()
            resp.headers.update(e.headers())
            return resp
        except GatewayError as e:
            return AnthropicError(e.status, e.message).response()

    return wrapped


# -- the request ------------------------------------------------------------------------------

def bad(message: str) -> AnthropicError:
    return AnthropicError(400, message)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise bad(f"{where} must be a string")
    if "\x00" in value:
        raise bad(f"{where} must not contain NUL")
    return value


def _texts(content: Any, where: str) -> str:
    """A string, or an array of text blocks, as one string (blocks joined by a blank line)."""
    if isinstance(content, str):
        return _text(content, where)
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or an array of text blocks")
    parts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad(f"{where}[{i}] must be a text block")
        parts.append(_text(block.get("text"), f"{where}[{i}].text"))
    return "\n\n".join(parts)


def _message(message: Any, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI-style messages: tool_use blocks become the assistant's
    tool_calls, tool_result blocks `tool` messages (ahead of the rest of the user's turn)."""
    where = f"messages.{i}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise bad(f"{where} must be an object with role 'user' or 'assistant'")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": _text(content, f"{where}.content")}]
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or an array of content blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text(block.get("text"), f"{at}.text"))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("input"), dict):
                raise bad(f"{at}.input must be an object")
            calls.append({"id": _text(block.get("id"), f"{at}.id"), "type": "function",
                          "function": {"name": _text(block.get("name"), f"{at}.name"),
                                       "arguments": orjson.dumps(block["input"]).decode()}})
        elif kind == "tool_result" and role == "user":
            result = block.get("content", "")
            results.append({"role": "tool", "tool_call_id": _text(block.get("tool_use_id"), f"{at}.tool_use_id"),
                            "content": _texts(result, f"{at}.content")})
        else:
            raise bad(f"{at}: only text blocks (and tool_use from the assistant, tool_result from the user) "
                      "are supported")
    text = "\n\n".join(texts)
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": text if texts or not calls else None}
        if calls:
            out["tool_calls"] = calls
        return [out]
    return results + ([{"role": "user", "content": text}] if texts or not results else [])


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    """`tools` and `tool_choice` in OpenAI's shape, for the upstreams that take them."""
    extra: dict[str, Any] = {}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools must be an array")
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("input_schema"), dict):
                raise bad(f"tools.{i} must be an object with a name and an input_schema object")
            function: dict[str, Any] = {"name": _text(tool.get("name"), f"tools.{i}.name"),
                                        "parameters": tool["input_schema"]}
            if tool.get("description") is not None:
                function["description"] = _text(tool["description"], f"tools.{i}.description")
            converted.append({"type": "function", "function": function})
        if converted:
            extra["tools"] = converted
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "tool":
            extra["tool_choice"] = {"type": "function", "function": {"name": _text(choice.get("name"),
                                                                                   "tool_choice.name")}}
        elif isinstance(kind, str) and kind in TOOL_CHOICES:
            extra["tool_choice"] = TOOL_CHOICES[kind]
        else:
            raise bad("tool_choice.type must be one of auto, any, tool, none")
        parallel = choice.get("disable_parallel_tool_use")
        if parallel is not None and not isinstance(parallel, bool):
            raise bad("tool_choice.disable_parallel_tool_use must be a boolean")
        if parallel and "tools" in extra:
            extra["parallel_tool_calls"] = False
    return extra


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise bad(f"{key} must be a number from 0 to 1")
    return value


@dataclass(slots=True, kw_only=True)
class MessagesRequest:
    """A validated Messages request, translated."""

    model: str
    chat: ChatRequest
    stream: bool


def parse_request(body: dict[str, Any], known_model: Callable[[str], bool],
                  counting: bool = False) -> MessagesRequest:
    """The request, or an AnthropicError naming what is wrong. `counting`: for count_tokens, which
    takes no max_tokens, stream or sampling parameters."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model: field required (a string)")
    if model != AUTO and not known_model(model):
        raise AnthropicError(404, f"model: {model}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages: a non-empty array is required")
    chat_messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        chat_messages.append({"role": "system", "content": _texts(system, "system")})
    for i, message in enumerate(messages):
        chat_messages.extend(_message(message, i))
    chat = ChatRequest(chat_messages, extra=_tools(body))
    if counting:
        return MessagesRequest(model=model, chat=chat, stream=False)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise bad(f"max_tokens: an integer from 1 to {MAX_TOKENS_LIMIT} is required")
    stop = body.get("stop_sequences")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("stop_sequences must be an array of strings")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream must be a boolean")
    chat.max_tokens, chat.temperature, chat.top_p = max_tokens, _number(body, "temperature"), _number(body, "top_p")
    chat.stop = stop or None
    return MessagesRequest(model=model, chat=chat, stream=stream)


# -- the reply -------------------------------------------------------------------------------

def frame(event: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), orjson.dumps(data))


PING = frame("ping", {"type": "ping"})
MESSAGE_STOP = frame("message_stop", {"type": "message_stop"})


class _Reply:
    """What went out so far, for the usage record however the request ends, and the content
    blocks (a stream writes them as it goes; a complete reply keeps them to send at the end)."""

    __slots__ = ("chars", "usage", "started", "finish", "text", "calls")

    def __init__(self) -> None:
        self.chars = 0
        self.usage: UsageReport | None = None
        self.started = False
        self.finish = "stop"
        self.text: list[str] = []
        self.calls: list[dict[str, Any]] = []


class _Blocks:
    """A stream's content blocks: a text block, or one tool_use block per OpenAI tool call index,
    each started before its first delta and stopped before the next one starts."""

    __slots__ = ("out", "index", "kind", "tool", "_text_head")

    def __init__(self, out: list[bytes]) -> None:
        self.out = out
        self.index = -1  # the open block's index
        self.kind: str | None = None  # "text" | "tool_use" | None (no block open)
        self.tool: int | None = None  # the open tool_use block's OpenAI index
        self._text_head = b""

    def _start(self, block: dict[str, Any], kind: str) -> None:
        self.stop()
        self.index += 1
        self.kind = kind
        self.out.append(frame("content_block_start", {"type": "content_block_start", "index": self.index,
                                                      "content_block": block}))
        if self.index == 0:
            self.out.append(PING)

    def text(self, text: str) -> None:
        if self.kind != "text":
            self._start({"type": "text", "text": ""}, "text")
            self._text_head = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                               b'"delta":{"type":"text_delta","text":' % self.index)
        self.out.append(b"%s%s}}\n\n" % (self._text_head, orjson.dumps(text)))

    def tool_call(self, fragment: dict[str, Any]) -> None:
        index = fragment.get("index", 0)
        function = fragment.get("function") or {}
        if self.kind != "tool_use" or self.tool != index:
            self._start({"type": "tool_use", "id": fragment.get("id") or f"toolu_{uuid.uuid4().hex}",
                         "name": function.get("name") or "", "input": {}}, "tool_use")
            self.tool = index
        arguments = function.get("arguments")
        if arguments:
            self.out.append(frame("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                          "delta": {"type": "input_json_delta",
                                                                    "partial_json": arguments}}))

    def stop(self) -> None:
        if self.kind is not None:
            self.out.append(frame("content_block_stop", {"type": "content_block_stop", "index": self.index}))
            self.kind = None

    def close(self) -> None:
        if self.index < 0:  # an empty reply still has its (empty) text block
            self._start({"type": "text", "text": ""}, "text")
        self.stop()


def _message_head(message_id: str, model: str, input_tokens: int) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0}}


def _usage(usage: UsageReport) -> dict[str, int]:
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}


@anthropic_errors
async def create_message(request: web.Request) -> web.StreamResponse:
    principal = await caller(request, "chat")
    app = request.app
    parsed = parse_request(await read_json(request), app[MODELS].chat_model)
    turns = app[TURNS]
    completion = await turns.begin_completion(principal, parsed.model, parsed.chat, request[TIMINGS].start)
    reply = _Reply()
    try:
        async with aclosing(completion.chain.stream(parsed.chat, whole=not parsed.stream)) as events:
            if parsed.stream:
                return await _stream(request, events, completion, reply)
            return await _complete(events, completion, reply)
    except ProviderError as e:
        if reply.started:
            raise  # a streamed failure was already reported in the stream
        raise provider_error(e) from None
    finally:
        turns.finish_completion(completion, reply.usage, reply.chars, reply.started)


def _take(batch: Batch, reply: _Reply, blocks: _Blocks | None) -> None:
    for event in batch:
        if isinstance(event, TextDelta):
            reply.chars += len(event.text)
            if blocks is None:
                reply.text.append(event.text)
            else:
                blocks.text(event.text)
        elif isinstance(event, ToolCallDelta):
            for fragment in event.calls:
                if blocks is None:
                    reply.calls.append(fragment)
                else:
                    blocks.tool_call(fragment)
        elif isinstance(event, Finish):
            reply.finish = event.reason
        elif isinstance(event, UsageReport):
            reply.usage = event


async def _stream(request: web.Request, events: AsyncIterator[Batch], completion: Completion,
                  reply: _Reply) -> web.StreamResponse:
    # nothing is sent until the chain has committed to a model: until then a failure is a clean
    # HTTP error, and message_start names the model that actually answers
    batch = await anext(events)
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    reply.started = True
    request[TIMINGS].mark("first_token")
    chat = completion.request
    # the upstream's input count comes at the end (in message_delta); until then, the estimate
    out = [frame("message_start", {"type": "message_start", "message": _message_head(
        f"msg_{completion.id.hex}", completion.chain.used.name, prompt_tokens(chat.messages, chat.extra))})]
    blocks = _Blocks(out)
    try:
        while True:
            _take(batch, reply, blocks)
            if out:  # one write per upstream read
                await resp.write(b"".join(out) if len(out) > 1 else out[0])
                out.clear()
            try:
                batch = await anext(events)
            except StopAsyncIteration:
                break
        blocks.close()
        usage = charged_usage(chat, reply.usage, reply.chars)
        out.append(frame("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": STOP_REASONS.get(reply.finish, "end_turn"),
                                                     "stop_sequence": None},
                                           "usage": _usage(usage)}))
        out.append(MESSAGE_STOP)
    except ProviderError as e:
        kind = "timeout_error" if isinstance(e, UpstreamTimeout) else "api_error"
        out.append(frame("error", {"type": "error", "error": {"type": kind, "message": e.message}}))
    await resp.write(b"".join(out))
    await resp.write_eof()
    return resp


async def _complete(events: AsyncIterator[Batch], completion: Completion, reply: _Reply) -> web.Response:
    async for batch in events:
        _take(batch, reply, None)
    usage = charged_usage(completion.request, reply.usage, reply.chars)
    content: list[dict[str, Any]] = []
    if reply.text or not reply.calls:
        content.append({"type": "text", "text": "".join(reply.text)})
    content.extend(tool_use_blocks(reply.calls))
    body = {**_message_head(f"msg_{completion.id.hex}", completion.chain.used.name, usage.prompt_tokens),
            "content": content, "stop_reason": STOP_REASONS.get(reply.finish, "end_turn"), "usage": _usage(usage)}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def tool_use_blocks(fragments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed OpenAI tool-call fragments (by index, arguments in pieces) as whole tool_use blocks."""
    calls: dict[int, dict[str, Any]] = {}
    for fragment in fragments:
        call = calls.setdefault(fragment.get("index", 0), {"id": None, "name": "", "arguments": ""})
        call["id"] = fragment.get("id") or call["id"]
        function = fragment.get("function") or {}
        call["name"] += function.get("name") or ""
        call["arguments"] += function.get("arguments") or ""
    blocks = []
    for i in sorted(calls):
        call = calls[i]
        try:
            arguments = orjson.loads(call["arguments"] or "{}")
        except orjson.JSONDecodeError:
            arguments = {}  # the upstream's arguments were not JSON: the tool gets no input
        blocks.append({"type": "tool_use", "id": call["id"] or f"toolu_{uuid.uuid4().hex}", "name": call["name"],
                       "input": arguments if isinstance(arguments, dict) else {}})
    return blocks


@anthropic_errors
async def count_tokens(request: web.Request) -> web.Response:
    """The gateway's own estimate: the number the policy reserves for the same request's prompt."""
    await caller(request, "chat")
    parsed = parse_request(await read_json(request), request.app[MODELS].chat_model, counting=True)
    return web.Response(body=orjson.dumps({"input_tokens": prompt_tokens(parsed.chat.messages, parsed.chat.extra)}),
                        content_type="application/json")
