"""Anthropic Messages API (`POST /v1/messages`, streaming), normalised to deltas + usage.

Differences from OpenAI that matter here: the system prompt is a top-level field, `max_tokens`
is required, tool calls are `tool_use` blocks and their results `tool_result` blocks of a user
message, reasoning comes as `thinking` blocks closed by a signature, input tokens (uncached, read
from the cache, written to it) come in `message_start` and output tokens cumulatively in
`message_delta`, and the stream ends with `message_stop` (a stream without it is truncated).
What it cannot express at all (`response_format`, logprobs, seeds, penalties) is refused
(`unsupported`) before anything is sent.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from gateway.config import ModelConfig, ProviderConfig
from gateway.providers import normalise, turn
from gateway.providers.base import (
    NO_SECRETS,
    Batch,
    ChatRequest,
    Finish,
    ProviderError,
    ReasoningDelta,
    Secrets,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UpstreamProtocolError,
    UpstreamStreamError,
    UsageReport,
)
from gateway.providers.openai import SSEAdapter
from gateway.providers.sse_decoder import SSEDecoder

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # required by the API; used when the request names none
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# what Anthropic's Messages API has no field for: a turn using one is refused, never sent without it
NOT_EXPRESSIBLE = ("response_format", "logprobs", "top_logprobs", "logit_bias", "seed", "presence_penalty",
                   "frequency_penalty", "functions", "function_call")
TOOL_CHOICES = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}
# OpenAI's reasoning effort as a thinking budget (Anthropic's least is 1024)
THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}


def unsupported(model: ModelConfig, request: ChatRequest) -> str | None:
    """The first feature of the turn Anthropic's API cannot express (turn.features), or None."""
    found = turn.features(request)
    if not found:
        return None
    for name in NOT_EXPRESSIBLE:
        if name in found:
            return name
    if turn.IMAGE_DATA in found:
        for message in request.messages:
            content = message.get("content")
            for part in content if content.__class__ is list else ():
                media = image_media_type(part)
                if media is not None and media not in IMAGE_TYPES:
                    return f"images of type {media}"
    return None


def image_media_type(part: Any) -> str | None:
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return None
    url = part["image_url"]["url"]
    parsed = turn.data_url(url) if url.startswith("data:") else None
    return parsed[0] if parsed else None


def content_blocks(content: Any) -> Any:
    """Canonical content parts as Anthropic content blocks: text as text; an image_url's data URL
    as a base64 image source, an http(s) URL as a url source; reasoning as thinking blocks (with
    their signature); cache_control kept on each. A string stays a string."""
    if not isinstance(content, list):
        return content
    blocks: list[Any] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            url = part["image_url"]["url"]
            parsed = turn.data_url(url) if url.startswith("data:") else None
            if parsed is not None:
                block: dict[str, Any] = {"type": "image", "source": {"type": "base64", "media_type": parsed[0],
                                                                     "data": parsed[1]}}
            else:
                block = {"type": "image", "source": {"type": "url", "url": url}}
            if "cache_control" in part:
                block["cache_control"] = part["cache_control"]
            blocks.append(block)
        elif kind == "reasoning":
            block = {"type": "thinking", "thinking": part.get("text", "")}
            if part.get("signature") is not None:
                block["signature"] = part["signature"]
            blocks.append(block)
        elif kind == "redacted_reasoning":
            blocks.append({"type": "redacted_thinking", "data": part.get("data", "")})
        else:
            blocks.append(part)  # text parts are the same in both APIs (cache_control included)
    return blocks


def tool_use_block(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    try:
        arguments = orjson.loads(function.get("arguments") or "{}")
    except orjson.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):  # Anthropic's input is an object; anything else is kept as text
        arguments = {"arguments": function.get("arguments")}
    return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments}


def tool_result_block(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message["tool_call_id"],
                             "content": content_blocks(content) if content is not None else ""}
    if message.get("is_error") is True:
        block["is_error"] = True
    return block


def messages_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation (system messages aside) as Anthropic messages: an assistant's tool calls as
    tool_use blocks after its text (never a null content), tool results as tool_result blocks of one
    user message, with the user's next words in the same message."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        content = m.get("content")
        if role == "user" and len(m) == 2:
            if out and out[-1]["role"] == "user" and out[-1].get("_results"):
                blocks = content_blocks(content)
                out[-1]["content"].extend([{"type": "text", "text": blocks}] if isinstance(blocks, str) else blocks)
                continue
            out.append({"role": "user", "content": content_blocks(content if content is not None else "")})
        elif role == "assistant":
            calls = m.get("tool_calls")
            if not calls:
                out.append({"role": "assistant", "content": content_blocks(content if content is not None else "")})
                continue
            blocks = content_blocks(content) if content else []
            if isinstance(blocks, str):
                blocks = [{"type": "text", "text": blocks}]
            blocks.extend(tool_use_block(call) for call in calls)
            out.append({"role": "assistant", "content": blocks})
        elif role == "tool":
            if out and out[-1]["role"] == "user" and out[-1].get("_results"):
                out[-1]["content"].append(tool_result_block(m))
            else:
                out.append({"role": "user", "content": [tool_result_block(m)], "_results": True})
        elif role == "user":
            out.append({"role": "user", "content": content_blocks(content if content is not None else "")})
    for message in out:
        message.pop("_results", None)
    return out


def system_of(messages: list[dict[str, Any]]) -> str | list[dict[str, Any]] | None:
    """The system and developer messages: joined text, or text blocks when any carries cache_control."""
    system = [m.get("content") for m in messages if m.get("role") in ("system", "developer")]
    if not system:
        return None
    if all(isinstance(c, str) for c in system):
        return "\n\n".join(str(c) for c in system)
    blocks: list[dict[str, Any]] = []
    for content in system:
        if isinstance(content, list):
            blocks.extend(p for p in content if isinstance(p, dict) and p.get("type") == "text")
        elif content:
            blocks.append({"type": "text", "text": str(content)})
    return blocks


def tools_of(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        function = tool["function"]
        rendered: dict[str, Any] = {"name": function["name"]}
        if function.get("description") is not None:
            rendered["description"] = function["description"]
        rendered["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
        if "cache_control" in tool:
            rendered["cache_control"] = tool["cache_control"]
        out.append(rendered)
    return out


def to_anthropic(model: ModelConfig, request: ChatRequest) -> dict[str, Any]:
    found = turn.features(request)
    simple = not found
    body: dict[str, Any] = {
        "model": model.upstream,
        "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
        "messages": ([{"role": m["role"], "content": m.get("content", "")} for m in request.messages
                      if m.get("role") in ("user", "assistant")] if simple else messages_of(request.messages)),
        "stream": True,
    }
    system = system_of(request.messages)
    if system is not None:
        body["system"] = system
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop is not None:
        body["stop_sequences"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    if simple:
        return body
    extra = request.extra
    if turn.TOOLS in found:
        body["tools"] = tools_of(extra["tools"])
    elif turn.TOOL_CALLS in found:
        # a history with tool calls but a turn that declares no tools (a native turn continuing a
        # thread with a tool round): Anthropic refuses tool_use blocks without tools, so the tools
        # the history called are declared, and the model may not call them (nothing here runs them)
        called = dict.fromkeys(call["function"]["name"] for m in request.messages for call in m.get("tool_calls") or ())
        body["tools"] = [{"name": name, "input_schema": {"type": "object"}} for name in called]
        body["tool_choice"] = {"type": "none"}
    choice = extra.get("tool_choice")
    if choice is not None:
        body["tool_choice"] = dict(TOOL_CHOICES[choice]) if isinstance(choice, str) and choice in TOOL_CHOICES \
            else {"type": "tool", "name": choice["function"]["name"]}
    if extra.get("parallel_tool_calls") is False and "tools" in body:
        body.setdefault("tool_choice", {"type": "auto"})["disable_parallel_tool_use"] = True
    if isinstance(extra.get("user"), str):
        body["metadata"] = {"user_id": extra["user"]}
    if request.thinking is not None:
        body["thinking"] = request.thinking
    elif isinstance(extra.get("reasoning_effort"), str) and extra["reasoning_effort"] in THINKING_BUDGETS:
        body["thinking"] = {"type": "enabled", "budget_tokens": THINKING_BUDGETS[extra["reasoning_effort"]]}
    return body


class AnthropicProvider(SSEAdapter):
    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, "x-api-key", own={"anthropic-version": API_VERSION})

    def unsupported(self, model: ModelConfig, request: ChatRequest) -> str | None:
        return unsupported(model, request)

    def body(self, model: ModelConfig, request: ChatRequest) -> bytes:
        return orjson.dumps(to_anthropic(model, request))

    def stream(self, model: ModelConfig, request: ChatRequest) -> AsyncGenerator[Batch, None]:
        state = _Usage()

        def read(decoder: SSEDecoder, chunk: bytes, secrets: Secrets) -> tuple[Batch, bool, ProviderError | None]:
            batch, error = read_events(decoder, chunk, state, secrets)
            return batch, state.stopped, error

        return self.relay(model, request, "/messages", read, "upstream stream ended without message_stop")


class _Usage:
    """A stream's running state: its counts (cumulative, as Anthropic reports them), whether it
    stopped, and which content block is which tool call (block index -> OpenAI tool call index)."""

    __slots__ = ("input", "output", "cache_read", "cache_write", "suspect", "stopped", "tools")

    def __init__(self) -> None:
        self.input = 0
        self.output = 0
        self.cache_read = 0
        self.cache_write = 0
        self.suspect = False  # a count had to be clamped (see normalise.count)
        self.stopped = False
        self.tools: dict[int, int] = {}

    def count(self, value: object) -> int:
        n, bad = normalise.count(value)
        self.suspect |= bad
        return n

    def counts(self, usage: dict[str, Any]) -> None:
        """The input side of a `usage` object: what it names replaces what was known."""
        value = usage.get("input_tokens")
        if value is not None:
            self.input = self.count(value)
        value = usage.get("cache_read_input_tokens")
        if value is not None:
            self.cache_read = self.count(value)
        value = usage.get("cache_creation_input_tokens")
        if value is not None:
            self.cache_write = self.count(value)
        value = usage.get("output_tokens")
        if value is not None:
            self.output = self.count(value)

    def report(self) -> UsageReport:
        # Anthropic's input_tokens leaves out what was read from or written to the cache
        report = normalise.usage(self.input + self.cache_read + self.cache_write, self.output)
        report.suspect |= self.suspect
        if not report.suspect:
            report.cached_tokens, report.cache_write_tokens = self.cache_read, self.cache_write
        return report


def read_events(decoder: SSEDecoder, chunk: bytes, state: _Usage,
                secrets: Secrets = NO_SECRETS) -> tuple[Batch, ProviderError | None]:
    """The events of one upstream read, up to message_stop: (the batch, the failure that stopped it)."""
    batch: Batch = []
    for event in decoder.feed(chunk):
        try:
            batch.extend(parse_event(event.event, event.data, state, secrets))
        except ProviderError as e:
            return batch, e
        if state.stopped:
            break
    return batch, None


def parse_event(name: str, data: bytes, state: _Usage, secrets: Secrets = NO_SECRETS) -> list[StreamEvent]:
    """One event into normalised events, checked as `normalise` says (text a string without NUL,
    counts that fit the usage columns, an error's text scrubbed of the provider's `secrets`); an
    event that breaks the format is an `UpstreamProtocolError`."""
    try:
        obj = normalise.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError("upstream sent an event that is not JSON") from None
    if not isinstance(obj, dict):
        raise UpstreamProtocolError("upstream sent an event that is not a JSON object")
    kind = obj.get("type", name)
    if kind == "content_block_delta":
        delta = normalise.obj(obj.get("delta"), "`delta`")
        delta_kind = delta.get("type")
        if delta_kind == "text_delta":
            text = normalise.text(delta.get("text"), "`delta.text`")
            if text:
                return [TextDelta(text)]
        elif delta_kind == "input_json_delta":
            index = state.tools.get(obj.get("index"))  # type: ignore[arg-type]
            if index is None:
                raise UpstreamProtocolError("upstream sent input_json_delta outside a tool_use block")
            arguments = normalise.text(delta.get("partial_json"), "`delta.partial_json`")
            if arguments:
                return [ToolCallDelta([turn.call_fragment(index, arguments=arguments)])]
        elif delta_kind == "thinking_delta":
            text = normalise.text(delta.get("thinking"), "`delta.thinking`")
            if text:
                return [ReasoningDelta(text)]
        elif delta_kind == "signature_delta":
            return [ReasoningDelta("", normalise.text(delta.get("signature"), "`delta.signature`"))]
    elif kind == "content_block_start":
        block = normalise.obj(obj.get("content_block"), "`content_block`")
        if block.get("type") == "tool_use":
            index = len(state.tools)
            state.tools[obj.get("index")] = index  # type: ignore[index]
            call = turn.call_fragment(index, normalise.text(block.get("id"), "a tool_use block's id"),
                                      normalise.text(block.get("name"), "a tool_use block's name"))
            return [ToolCallDelta([call])]
        if block.get("type") == "redacted_thinking":
            return [ReasoningDelta("", redacted=normalise.text(block.get("data"), "a redacted_thinking block's data"))]
    elif kind == "message_start":
        usage = normalise.obj(normalise.obj(obj.get("message"), "`message`").get("usage"), "`usage`")
        state.counts(usage)
    elif kind == "message_delta":
        # the counts here are cumulative: they replace, never add
        raw_usage = obj.get("usage")
        if raw_usage is not None:
            state.counts(normalise.obj(raw_usage, "`usage`"))
        reason = normalise.label(normalise.obj(obj.get("delta"), "`delta`").get("stop_reason"), "`stop_reason`")
        if reason:
            return [Finish(STOP_REASONS.get(reason, reason))]
    elif kind == "message_stop":
        state.stopped = True
        return [state.report()]  # the sum must fit too
    elif kind == "error":
        err = obj.get("error")
        err = err if isinstance(err, dict) else {"message": err}
        raise UpstreamStreamError(normalise.error_text(
            f"upstream error mid-stream: {err.get('type')}: {err.get('message')}", secrets))
    # ping, content_block_stop and event types added later are tolerated
    return []
