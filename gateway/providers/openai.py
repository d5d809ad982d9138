"""OpenAI-compatible chat completions (OpenAI, Groq, vLLM, Ollama, llama.cpp, LM Studio...)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Callable
from typing import Any

import aiohttp
import orjson

from gateway.config import ModelConfig, ProviderConfig
from gateway.observability.tracing import upstream_headers
from gateway.providers import normalise, turn
from gateway.providers.base import (
    NO_SECRETS,
    Batch,
    ChatRequest,
    Finish,
    ProviderError,
    ReasoningDelta,
    Secrets,
    TextDelta,
    ToolCallDelta,
    UpstreamConnectionError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamStreamError,
    UpstreamTimeout,
    UsageReport,
)
from gateway.providers.http import Connection, Upstream
from gateway.providers.sse_decoder import SSEDecoder

_DONE = b"[DONE]"
NUL = normalise.NUL
ERROR_BODY_BYTES = 1 << 16  # of a non-2xx body: enough for any error message, bounded against a hostile one


def retry_after_seconds(headers: Any) -> float | None:
    raw = headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None  # an HTTP date: too rare upstream to be worth parsing


async def raise_for_status(resp: aiohttp.ClientResponse, secrets: Secrets = NO_SECRETS) -> None:
    """A non-2xx answer of aiohttp's client as an `UpstreamHTTPError` (for callers on the app's session)."""
    if resp.status < 300:
        return
    body = await read_at_most(resp, ERROR_BODY_BYTES)
    raise http_error(resp.status, body, resp.headers, secrets)


async def answer_error(conn: Connection, secrets: Secrets = NO_SECRETS) -> UpstreamHTTPError:
    """A non-2xx answer on a lean connection as an `UpstreamHTTPError`: its body (the first
    ERROR_BODY_BYTES) names what is at fault. The connection is handed back (reused when the body ended)."""
    body = await conn.read_at_most(ERROR_BODY_BYTES)
    status, retry_after = conn.status, conn.retry_after
    conn.finish()
    return http_error(status, body, {"Retry-After": retry_after}, secrets)


def http_error(status: int, body: bytes, headers: Any, secrets: Secrets = NO_SECRETS) -> UpstreamHTTPError:
    """A non-2xx answer as an `UpstreamHTTPError`, from its error body (scrubbed of `secrets`: a
    body may echo the request's headers) and its Retry-After."""
    message = f"upstream answered {status}"
    detail: dict[str, Any] = {}
    try:
        error = normalise.loads(body).get("error")  # OpenAI's and Anthropic's error bodies alike
        if isinstance(error, dict):
            detail = error
        elif isinstance(error, str):
            detail = {"message": error}
        if detail.get("message"):
            message += f": {detail['message']}"
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return UpstreamHTTPError(normalise.error_text(message, secrets), status=status,
                             retry_after=retry_after_seconds(headers), blames=blames(detail))


# What a 4xx error body says is at fault, read from its `param`, `code`, `type` and message:
# a parameter (one this model rejects, or a prompt beyond its context) or the model itself
# (unknown, retired). Either way another model may serve the request. The messages themselves
# (`param: "messages[1].content"`) are the request's own fault.
_PARAMETER = re.compile(r"param|unsupported|not supported|unrecognized|unknown (?:field|argument)|"
                        r"context(?:[ _]length|[ _]window)|too many tokens|maximum .*tokens|"
                        r"\b(?:max_tokens|max_completion_tokens|temperature|top_p|stop|stream_options|tools?|"
                        r"tool_choice|response_format|seed|logprobs|n)\b\s*[:=']", re.I)
_MODEL = re.compile(r"model", re.I)
_REQUEST_PARAMS = ("messages", "input", "prompt", "system")


def blames(detail: dict[str, Any]) -> str | None:
    """"parameter", "model" or None (the request itself, as far as the body says)."""
    param = str(detail.get("param") or "")
    if param.startswith(_REQUEST_PARAMS):
        return None
    words = " ".join(str(detail.get(k) or "") for k in ("code", "type", "message"))
    if param or _PARAMETER.search(words):
        return "parameter"
    if _MODEL.search(words):
        return "model"
    return None


async def read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body's first `limit` bytes (all of it when shorter)."""
    body = b""
    while len(body) < limit:
        chunk = await resp.content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return body


def transport_error(e: asyncio.TimeoutError | aiohttp.ClientError) -> ProviderError:
    """What the HTTP client raised, as the provider error the chain understands."""
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout("connect")
    if isinstance(e, asyncio.TimeoutError):  # sock_read: nothing between chunks for idle_timeout_s
        return UpstreamTimeout("idle")
    return UpstreamConnectionError(f"upstream connection failed: {type(e).__name__}")


def request_headers(config: ProviderConfig, own: dict[str, str]) -> dict[str, str]:
    """The adapter's own headers, then the provider's configured ones (which may replace them)."""
    return {**own, **{name: value.reveal() for name, value in config.headers.items()}}


class SSEAdapter:
    """What every adapter on the lean client shares (OpenAI-compatible, Anthropic, Gemini): its
    request headers (`own`, then the key in `key_header` as `key_prefix` + key, then the configured
    ones), the provider's secrets to scrub from upstream text, its pool of upstream connections,
    and the streaming of one reply (`relay`, posting what the adapter's `body` makes)."""

    def __init__(self, config: ProviderConfig, key_header: str, key_prefix: str = "",
                 own: dict[str, str] | None = None) -> None:
        self.name = config.name
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **(own or {})}
        if config.api_key:
            headers[key_header] = key_prefix + config.api_key.reveal()
        self._headers = request_headers(config, headers)
        self._secrets = Secrets.of(config)
        # the aiohttp session is not used for chat: the lean client (providers/http.py) keeps a held stream small
        self._upstream = Upstream(config.base_url)

    def close(self) -> None:
        self._upstream.close()

    def body(self, model: ModelConfig, request: ChatRequest) -> bytes:
        """The upstream request's body for `request` to `model`."""
        raise NotImplementedError

    async def relay(self, model: ModelConfig, request: ChatRequest, path: str, read: ReadEvents,
                    unfinished: str) -> AsyncGenerator[Batch, None]:
        """One streamed upstream reply as batches of events: `body(model, request)` posted to `path`
        when the reply is first read, each upstream read parsed by `read`; an error status is the
        upstream's error (its text scrubbed of the provider's secrets), a body that ends before `read`
        says the reply did is `unfinished`. A method with plain arguments, not closures: a held
        stream keeps this generator for its whole life, and each closure would be a few hundred bytes."""
        secrets = self._secrets
        conn = await self._upstream.post(path, upstream_headers(self._headers), self.body(model, request),
                                         connect_timeout_s=model.connect_timeout_s,
                                         idle_timeout_s=model.idle_timeout_s)
        finished = False  # the connection went back to the pool: never close it from here
        try:
            if conn.status >= 300:
                refused = await answer_error(conn, secrets)
                finished = True
                raise refused
            decoder = SSEDecoder()
            while True:
                chunk = conn.take()
                if chunk is None:
                    await conn.readable()  # a bare future: a held stream keeps no read frame
                    continue
                if not chunk:
                    break
                batch, done, error = read(decoder, chunk, secrets)
                if done:
                    conn.finish()  # the body's end is drained off the caller's path
                    finished = True
                if batch:  # what arrived before a failure is part of the reply
                    yield batch
                if error is not None:
                    raise error
                if done:
                    return
                del batch  # between reads a held stream keeps no events (nor the bytes they came from)
            conn.finish()
            finished = True
        finally:
            if not finished:
                conn.close()
        raise UpstreamProtocolError(unfinished)


class OpenAIProvider(SSEAdapter):
    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, "Authorization", "Bearer ")
        self._stream_options = config.send_stream_options
        self._max_completion_tokens = config.send_max_completion_tokens

    def unsupported(self, model: ModelConfig, request: ChatRequest) -> str | None:
        return None  # the canonical turn is OpenAI's shape: what it adds is rendered (see `messages_of`)

    def body(self, model: ModelConfig, request: ChatRequest) -> bytes:
        body: dict[str, Any] = dict(request.extra)
        found = turn.features(request)
        messages = messages_of(request.messages) if found & RENDERED else request.messages
        body.update(model=model.upstream, messages=messages, stream=True)
        if turn.CACHE_CONTROL in found and "tools" in body:
            body["tools"] = [{k: v for k, v in tool.items() if k != "cache_control"} for tool in body["tools"]]
        if request.thinking is not None and "reasoning_effort" not in body:
            body["reasoning_effort"] = reasoning_effort(request.thinking)
        if self._stream_options:  # usage always, so it is never guessed (where the server allows)
            body["stream_options"] = {"include_usage": True}
        if request.max_tokens is not None:
            key = request.max_tokens_key
            if key == "max_completion_tokens" and not self._max_completion_tokens:
                key = "max_tokens"
            body[key] = request.max_tokens
        for key in ("temperature", "top_p", "stop"):
            value = getattr(request, key)
            if value is not None:
                body[key] = value
        return orjson.dumps(body)

    def stream(self, model: ModelConfig, request: ChatRequest) -> AsyncGenerator[Batch, None]:
        return self.relay(model, request, "/chat/completions", read_batch, "upstream stream ended without [DONE]")


# one upstream read through an adapter's parser, with the provider's secrets to scrub from its text:
# (its events, whether the reply ended, the failure that stopped it)
ReadEvents = Callable[[SSEDecoder, bytes, Secrets], tuple[Batch, bool, ProviderError | None]]


# what the canonical turn adds to OpenAI's shape, rendered away for an OpenAI-compatible upstream
RENDERED = frozenset({turn.REASONING, turn.CACHE_CONTROL, turn.TOOL_ERRORS})


def messages_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages without what OpenAI's chat completions has no field for: an assistant's earlier
    reasoning (OpenAI's API does not take it back; its text was the model's, not the conversation's)
    and cache breakpoints (OpenAI-compatible upstreams cache prompts by their own rules), and the
    error mark of a tool result (its content says what went wrong)."""
    out = []
    for message in messages:
        if "is_error" in message:
            message = {k: v for k, v in message.items() if k != "is_error"}
        content = message.get("content")
        if content.__class__ is list:
            parts = [{k: v for k, v in part.items() if k != "cache_control"} if isinstance(part, dict) else part
                     for part in content
                     if not (isinstance(part, dict) and part.get("type") in ("reasoning", "redacted_reasoning"))]
            message = {**message, "content": parts if parts or message.get("role") != "assistant" else None}
        out.append(message)
    return out


def reasoning_effort(thinking: dict[str, Any]) -> str:
    """Anthropic's thinking budget as OpenAI's reasoning effort."""
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or budget <= 2048:
        return "low"
    return "medium" if budget <= 8192 else "high"


def read_batch(decoder: SSEDecoder, chunk: bytes,
               secrets: Secrets = NO_SECRETS) -> tuple[Batch, bool, ProviderError | None]:
    """The events of one upstream read: (the batch, whether [DONE] ended it, the failure that stopped it)."""
    batch: Batch = []
    for event in decoder.feed(chunk):
        if event.data == _DONE:
            return batch, True, None
        try:
            parse_chunk(event.event, event.data, batch, secrets)
        except ProviderError as e:
            return batch, False, e
    return batch, False, None


def parse_chunk(event: str, data: bytes, out: Batch, secrets: Secrets = NO_SECRETS) -> Batch:
    """One `chat.completion.chunk` (or an error event) into normalised events, appended to `out`.

    What it appends is checked (see `normalise`): text is a string without NUL, usage counts fit
    the usage columns; a chunk that breaks the format is an `UpstreamProtocolError`; an error's
    text is scrubbed of the provider's `secrets`.
    """
    try:
        obj = normalise.loads(data)
    except orjson.JSONDecodeError:
        if event != "error":
            raise UpstreamProtocolError("upstream sent a chunk that is not JSON") from None
        obj = data.decode("utf-8", "replace")  # `event: error` reports a failure whatever its data looks like
    if event == "error" or (isinstance(obj, dict) and obj.get("error")):
        err = (obj.get("error") or obj) if isinstance(obj, dict) else obj
        message = err.get("message") if isinstance(err, dict) else str(err)
        raise UpstreamStreamError(normalise.error_text(f"upstream error mid-stream: {message}", secrets))
    if not isinstance(obj, dict):
        raise UpstreamProtocolError("upstream sent a chunk that is not a JSON object")
    choices = obj.get("choices")
    if choices:
        if choices.__class__ is not list:
            raise UpstreamProtocolError("upstream sent `choices` that is not a list")
        for choice in choices:
            # the per-chunk path: class checks inline, a call only for what is unusual
            if choice.__class__ is not dict:
                choice = normalise.obj(choice, "a choice")
            delta = choice.get("delta")
            if delta.__class__ is not dict:
                delta = normalise.obj(delta, "`delta`")
            text = delta.get("content")
            if text.__class__ is not str or NUL in text:
                text = normalise.text(text, "`delta.content`")
            if text:
                out.append(TextDelta(text))
            if len(delta) > 1 or not text:  # more than the text: tool calls, reasoning, a role
                calls = delta.get("tool_calls")
                if calls:
                    out.append(ToolCallDelta(tool_calls(calls)))
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    out.append(ReasoningDelta(normalise.text(reasoning, "`delta.reasoning_content`")))
            reason = choice.get("finish_reason")
            if reason is not None:
                reason = normalise.label(reason, "`finish_reason`")
                if reason:
                    out.append(Finish(reason))
    usage = obj.get("usage")
    if usage:
        usage = normalise.obj(usage, "`usage`")
        out.append(usage_report(usage))
    return out


def usage_report(usage: dict[str, Any]) -> UsageReport:
    """OpenAI's `usage`, with its details: cached prompt tokens, cache writes (where an upstream
    reports them) and reasoning tokens, each a part of its total."""
    report = normalise.usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    if prompt.__class__ is dict or completion.__class__ is dict:
        cached, write, reasoning = 0, 0, 0
        if prompt.__class__ is dict:
            cached, bad_cached = normalise.count(prompt.get("cached_tokens") or 0)
            write, bad_write = normalise.count(prompt.get("cache_write_tokens") or 0)
            report.suspect |= bad_cached or bad_write
        if completion.__class__ is dict:
            reasoning, bad = normalise.count(completion.get("reasoning_tokens") or 0)
            report.suspect |= bad
        if cached + write > report.prompt_tokens or reasoning > report.completion_tokens:
            report.suspect = True  # parts larger than their whole: not believed
        elif not report.suspect:
            report.cached_tokens, report.cache_write_tokens, report.reasoning_tokens = cached, write, reasoning
    return report


def tool_calls(calls: object) -> list[dict[str, Any]]:
    """`delta.tool_calls` as sent, once checked to have the shape the OpenAI route merges them by."""
    if calls.__class__ is not list:
        raise UpstreamProtocolError("upstream sent `delta.tool_calls` that is not a list")
    for call in calls:
        call = normalise.obj(call, "a tool call")
        index = call.get("index", 0)
        if index.__class__ is not int:
            raise UpstreamProtocolError("upstream sent a tool call whose `index` is not an integer")
        function = normalise.obj(call.get("function"), "a tool call's `function`")
        normalise.text(function.get("name"), "a tool call's name")
        normalise.text(function.get("arguments"), "a tool call's arguments")
    return calls
