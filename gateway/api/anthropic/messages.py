"""The Anthropic Messages front door: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Any Anthropic SDK works by changing `base_url` (the key goes in `x-api-key` or a bearer header;
`anthropic-version` is accepted, whatever its value). Stateless like the OpenAI route: the same
auth, router, policy and chain, no thread or message rows, and exactly one usage record per
request (`Turns.begin_completion` / `finish_completion`). The body is decoded by the structs of
gateway/contract/anthropic.py and translated to the canonical turn (providers/turn.py), so any
upstream answers it: tools, tool results, images, thinking with its signature and cache
breakpoints reach each upstream as it expresses them, and what one cannot express is a 400
naming the feature and the model, before anything is reserved or written.

A stream is Anthropic's exact event sequence: `message_start`, then per content block
`content_block_start` / `content_block_delta`... / `content_block_stop` (a `ping` after the first
block's start), `message_delta` with the stop reason and the usage, `message_stop`. A failure
after the first byte is an `error` event in Anthropic's shape, and the stream ends there.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway.api.common import caller, read_body, sse_stream
from gateway.api.content import MAX_TOKENS_LIMIT
from gateway.contract import anthropic as contract
from gateway.contract import decoding
from gateway.contract.operations import (
    ANTHROPIC_SECURITY,
    anthropic_error_answers,
    json_content,
    ok,
    operation,
    response,
    sse_content,
)
from gateway.errors import GatewayError, TooManyRequests
from gateway.providers import turn
from gateway.providers.base import (
    Batch,
    ChatRequest,
    Finish,
    ProviderError,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Unsupported,
    UpstreamHTTPError,
    UpstreamTimeout,
    UsageReport,
)
from gateway.providers.chain import refused_by_chain
from gateway.service.router import AUTO
from gateway.service.turns import Completion, charged_usage, prompt_tokens
from gateway.state import MODELS, TIMINGS, TURNS

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}
# the chain's normalised finish reasons as Anthropic's stop reasons
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
TOOL_CHOICES = {"ToolChoiceAuto": "auto", "ToolChoiceAny": "required", "ToolChoiceNone": "none"}


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
    if isinstance(e, Unsupported):
        return AnthropicError(400, e.message)
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


_refuse = contract.refusal(bad)


def _not_json() -> AnthropicError:
    return bad("body is not valid JSON")


def _cache(part: dict[str, Any], cache_control: dict[str, Any] | None) -> dict[str, Any]:
    if cache_control is not None:
        part["cache_control"] = cache_control
    return part


def _part(block: contract.TextBlock | contract.ImageBlock) -> dict[str, Any]:
    """A text or image block as a canonical content part."""
    if isinstance(block, contract.TextBlock):
        return _cache({"type": "text", "text": block.text}, block.cache_control)
    source = block.source
    url = source.url if isinstance(source, contract.URLSource) else f"data:{source.media_type};base64,{source.data}"
    return _cache({"type": "image_url", "image_url": {"url": url}}, block.cache_control)


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text parts without cache breakpoints as one string (joined by a blank line), else the parts."""
    if all(p["type"] == "text" and "cache_control" not in p for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def _message(message: contract.MessageParam, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as canonical messages: tool_use blocks become the assistant's
    tool_calls, thinking blocks its reasoning parts, tool_result blocks `tool` messages (ahead of
    the rest of the user's turn)."""
    role, content = message.role, message.content
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"messages.{i}.content.{j}"
        if isinstance(block, (contract.TextBlock, contract.ImageBlock)):
            parts.append(_part(block))
        elif isinstance(block, contract.ToolUseBlock) and role == "assistant":
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": orjson.dumps(block.input).decode()}})
        elif isinstance(block, contract.ThinkingBlock) and role == "assistant":
            parts.append({"type": "reasoning", "text": block.thinking, "signature": block.signature})
        elif isinstance(block, contract.RedactedThinkingBlock) and role == "assistant":
            parts.append({"type": "redacted_reasoning", "data": block.data})
        elif isinstance(block, contract.ToolResultBlock) and role == "user":
            result = block.content
            results.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": result if isinstance(result, str) else _content([_part(b) for b in result])})
            if block.is_error:
                results[-1]["is_error"] = True
        else:
            raise bad(f"{at}: a {role} message cannot hold a {type(block).__name__} block")
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": _content(parts) if parts or not calls else None}
        if calls:
            out["tool_calls"] = calls
        return [out]
    return results + ([{"role": "user", "content": _content(parts)}] if parts or not results else [])


def _tools(body: contract.CountTokensRequest) -> dict[str, Any]:
    """`tools` and `tool_choice` in the canonical (OpenAI) shape."""
    extra: dict[str, Any] = {}
    if body.tools:
        converted = []
        for tool in body.tools:
            function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
            if tool.description is not None:
                function["description"] = tool.description
            converted.append(_cache({"type": "function", "function": function}, tool.cache_control))
        extra["tools"] = converted
    choice = body.tool_choice
    if choice is not None:
        if isinstance(choice, contract.ToolChoiceTool):
            extra["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            extra["tool_choice"] = TOOL_CHOICES[type(choice).__name__]
        if not isinstance(choice, contract.ToolChoiceNone) and choice.disable_parallel_tool_use and "tools" in extra:
            extra["parallel_tool_calls"] = False
    return extra


_LONG_NUMBER = re.compile(rb"[0-9]{19}")  # what an integer beyond 64 bits needs


def _passed_on(body: contract.CountTokensRequest) -> list[Any]:
    """The body's untyped values (passed on as sent): tool inputs and schemas, cache_control."""
    values: list[Any] = []
    for tool in body.tools or ():
        values += (tool.input_schema, tool.cache_control)
    blocks: list[Any] = list(body.system) if isinstance(body.system, list) else []
    for message in body.messages:
        if isinstance(message.content, list):
            blocks += message.content
    for block in blocks:
        values.append(getattr(block, "cache_control", None))
        if isinstance(block, contract.ToolUseBlock):
            values.append(block.input)
        elif isinstance(block, contract.ToolResultBlock) and isinstance(block.content, list):
            values += (part.cache_control for part in block.content)
    return values


@dataclass(slots=True, kw_only=True)
class MessagesRequest:
    """A validated Messages request, translated."""

    model: str
    chat: ChatRequest
    stream: bool


def parse_request(raw: bytes, known_model: Callable[[str], bool], counting: bool = False,
                  refused: Callable[[str, ChatRequest], Unsupported | None] = lambda model, request: None
                  ) -> MessagesRequest:
    """The request, or an AnthropicError naming what is wrong (or the feature no model of the
    chain can take: `refused`). `counting`: for count_tokens, which takes no max_tokens, stream or
    sampling parameters."""
    kind = contract.CountTokensRequest if counting else contract.MessagesRequest
    body = decoding.decode(raw, kind, _refuse, _not_json)
    if _LONG_NUMBER.search(raw) and decoding.wide_int(_passed_on(body)):
        # an integer beyond 64 bits in what is passed on as sent: read again as orjson reads it (a float),
        # so that it can be encoded
        body = decoding.reread(raw, kind, _refuse)
    model = body.model
    if model != AUTO and not known_model(model):
        raise AnthropicError(404, f"model: {model}")
    chat_messages: list[dict[str, Any]] = []
    system = body.system
    if system is not None:
        for i, block in enumerate(system if isinstance(system, list) else ()):
            if not isinstance(block, contract.TextBlock):
                raise bad(f"system.{i}: only text blocks are allowed in the system prompt")
        chat_messages.append({"role": "system", "content": system if isinstance(system, str)
                              else _content([_part(b) for b in system])})
    for i, message in enumerate(body.messages):
        chat_messages.extend(_message(message, i))
    chat = ChatRequest(chat_messages, extra=_tools(body))
    if isinstance(body.thinking, contract.ThinkingEnabled):
        chat.thinking = {"type": "enabled", "budget_tokens": body.thinking.budget_tokens}
    if isinstance(body, contract.MessagesRequest):
        if not body.max_tokens:
            raise bad(f"max_tokens: an integer from 1 to {MAX_TOKENS_LIMIT} is required")
        chat.max_tokens, chat.temperature, chat.top_p = body.max_tokens, body.temperature, body.top_p
        chat.stop = body.stop_sequences or None
        if body.metadata is not None and body.metadata.user_id is not None:
            chat.extra["user"] = body.metadata.user_id
    try:
        turn.check(chat)
    except turn.TurnError as e:
        raise bad(f"{e.param}: {e.message}") from None
    if not counting and model != AUTO:
        refusal = refused(model, chat)
        if refusal is not None:
            raise provider_error(refusal)
    stream = isinstance(body, contract.MessagesRequest) and bool(body.stream)
    return MessagesRequest(model=model, chat=chat, stream=stream)


# -- the reply -------------------------------------------------------------------------------

def frame(event: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), orjson.dumps(data))


PING = frame("ping", {"type": "ping"})
MESSAGE_STOP = frame("message_stop", {"type": "message_stop"})


class _Reply:
    """What went out so far, for the usage record however the request ends, and the content
    blocks (a stream writes them as it goes; a complete reply keeps them to send at the end)."""

    __slots__ = ("chars", "usage", "started", "finish", "text", "calls", "thinking")

    def __init__(self) -> None:
        self.chars = 0
        self.usage: UsageReport | None = None
        self.started = False
        self.finish = "stop"
        self.text: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.thinking: list[dict[str, Any]] = []  # whole thinking blocks, their signatures included

    def reasoning(self, event: ReasoningDelta) -> None:
        if event.redacted is not None:
            self.thinking.append({"type": "redacted_thinking", "data": event.redacted})
            return
        if not self.thinking or self.thinking[-1].get("signature", True):
            self.thinking.append({"type": "thinking", "thinking": "", "signature": ""})
        block = self.thinking[-1]
        block["thinking"] += event.text
        if event.signature:
            block["signature"] = event.signature


class _Blocks:
    """A stream's content blocks: a text block, or one tool_use block per OpenAI tool call index,
    each started before its first delta and stopped before the next one starts."""

    __slots__ = ("out", "index", "kind", "tool", "_text_head")

    def __init__(self, out: list[bytes]) -> None:
        self.out = out
        self.index = -1  # the open block's index
        self.kind: str | None = None  # "text" | "thinking" | "tool_use" | None (no block open)
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

    def reasoning(self, event: ReasoningDelta) -> None:
        """Thinking text, or the signature that closes the thinking block, or a redacted block."""
        if event.redacted is not None:
            self._start({"type": "redacted_thinking", "data": event.redacted}, "redacted_thinking")
            self.stop()
            return
        if self.kind != "thinking":
            self._start({"type": "thinking", "thinking": "", "signature": ""}, "thinking")
        if event.text:
            self.out.append(frame("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                          "delta": {"type": "thinking_delta", "thinking": event.text}}))
        if event.signature:
            self.out.append(frame("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                          "delta": {"type": "signature_delta",
                                                                    "signature": event.signature}}))
            self.stop()

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
    """Anthropic's usage: input_tokens leaves out the prompt tokens read from or written to a cache
    (reported beside it when there were any)."""
    body = {"input_tokens": usage.input_tokens, "output_tokens": usage.completion_tokens}
    if usage.cached_tokens or usage.cache_write_tokens:
        body["cache_creation_input_tokens"] = usage.cache_write_tokens
        body["cache_read_input_tokens"] = usage.cached_tokens
    return body


@operation("Anthropic Messages API (stream and non-stream)", "anthropic",
           {"200": response("The message; Anthropic's stream events when `stream` is true: `message_start`, "
                            "`content_block_start`, `ping`, `content_block_delta`..., `content_block_stop`, "
                            "`message_delta` (stop reason, usage), `message_stop`; or an `error` event",
                            {**json_content(contract.AnthropicMessage), **sse_content("AnthropicStreamEvent")}),
            **anthropic_error_answers(400, 401, 403, 404, 413, 429, 502, 504, 529)},
           body=contract.MessagesRequest, security=ANTHROPIC_SECURITY,
           description="Stateless: no thread or message rows; usage is recorded once. The key goes in "
                       "`x-api-key` or `Authorization: Bearer`; `anthropic-version` is accepted, whatever "
                       "its value. Any configured model answers (OpenAI-compatible ones are translated). "
                       "Errors are in Anthropic's shape (a database outage answers the native 503).")
@anthropic_errors
async def create_message(request: web.Request) -> web.StreamResponse:
    principal = await caller(request, "chat")
    app = request.app
    models = app[MODELS]
    parsed = parse_request(await read_body(request), models.chat_model,
                           refused=functools.partial(refused_by_chain, models))
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
        elif isinstance(event, ReasoningDelta):
            if blocks is None:
                reply.reasoning(event)
            else:
                blocks.reasoning(event)
        elif isinstance(event, Finish):
            reply.finish = event.reason
        elif isinstance(event, UsageReport):
            reply.usage = event


async def _stream(request: web.Request, events: AsyncIterator[Batch], completion: Completion,
                  reply: _Reply) -> web.StreamResponse:
    # nothing is sent until the chain has committed to a model: until then a failure is a clean
    # HTTP error, and message_start names the model that actually answers
    batch = await anext(events)
    resp = sse_stream()
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
    content: list[dict[str, Any]] = list(reply.thinking)
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


@operation("The gateway's estimate of a Messages request's input tokens (what the policy reserves)", "anthropic",
           {**ok(200, "The estimate", contract.AnthropicTokenCount),
            **anthropic_error_answers(400, 401, 403, 404, 413)},
           body=contract.CountTokensRequest, security=ANTHROPIC_SECURITY)
@anthropic_errors
async def count_tokens(request: web.Request) -> web.Response:
    """The gateway's own estimate: the number the policy reserves for the same request's prompt."""
    await caller(request, "chat")
    parsed = parse_request(await read_body(request), request.app[MODELS].chat_model, counting=True)
    return web.Response(body=orjson.dumps({"input_tokens": prompt_tokens(parsed.chat.messages, parsed.chat.extra)}),
                        content_type="application/json")
