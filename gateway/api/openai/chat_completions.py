"""The OpenAI-compatible front door: `POST /v1/chat/completions` and `GET /v1/models`.

Any OpenAI SDK works by changing `base_url`. Same auth, router, chain and accounting as the
native API, but stateless like OpenAI's own endpoint: no thread or message rows, and the
reply belongs to the request — when the client goes, the upstream call is cancelled and the
usage so far is recorded (through the batched usage writer, off the request path).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.api.common import caller, read_body, sse_stream
from gateway.api.openai.ratelimits import RateLimitHeaders
from gateway.contract import decoding
from gateway.contract.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Model,
    ModelList,
    check_messages,
    pass_through,
    refusal,
)
from gateway.contract.operations import (
    errors,
    json_content,
    ok,
    openai_error_answers,
    operation,
    path_string,
    response,
    sse_content,
)
from gateway.edge.held import hold_open
from gateway.edge.middleware import error_shape
from gateway.errors import GatewayError, TooManyRequests, Unauthorized
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
from gateway.providers.chain import Chain, refused_by_chain
from gateway.service.router import AUTO
from gateway.service.turns import charged_usage
from gateway.state import MODELS, TIMINGS, TURNS


class OpenAIError(GatewayError):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return web.Response(body=orjson.dumps(body), status=self.status, content_type="application/json")


def provider_error(e: ProviderError) -> OpenAIError:
    """An upstream failure before any output, as the HTTP status a proxy should give."""
    if isinstance(e, Unsupported):
        return OpenAIError(400, e.message, param=e.feature, code="unsupported_feature")
    if isinstance(e, UpstreamHTTPError) and e.status == 429:
        return OpenAIError(429, e.message, "rate_limit_error", code="rate_limit_exceeded")
    if isinstance(e, UpstreamTimeout):
        return OpenAIError(504, e.message, "timeout_error", code="upstream_timeout")
    return OpenAIError(502, e.message, "upstream_error", code=e.kind)


def number_in(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise OpenAIError(400, f"'{key}' must be a number from {low} to {high}", param=key)
    return value


def parse_request(raw: bytes, known_model: Any, refusal_of: Callable[[str, ChatRequest], Unsupported | None]
                  = lambda model, request: None) -> tuple[str, ChatRequest, bool, bool]:
    """(model, request, stream, include_usage), or an OpenAIError naming the bad parameter (or the
    feature no model of the chain can take: `refusal_of`, ModelRegistry.refusal)."""
    body = decoding.decode(raw, ChatCompletionRequest, _refuse, _not_json)
    model = body.model
    if model != AUTO and not known_model(model):
        raise OpenAIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    extra = pass_through(body)
    if check_messages(body.messages, _invalid) or (extra and decoding.wide_int(extra)):
        # an integer orjson cannot encode on its way upstream: read as before (orjson makes it a float)
        body = decoding.reread(raw, ChatCompletionRequest, _refuse)
        extra = pass_through(body)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    # both are checked (while decoding), whichever is used: an invalid one is never silently ignored
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    request = ChatRequest(body.messages, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          stop=body.stop, extra=extra,
                          max_tokens_key="max_completion_tokens" if body.max_completion_tokens is not None
                          else "max_tokens")
    try:
        turn.check(request)
    except turn.TurnError as e:
        raise OpenAIError(400, e.message, param=e.param) from None
    if model != AUTO:
        refused = refusal_of(model, request)
        if refused is not None:
            raise provider_error(refused)
    return model, request, body.stream, bool(include_usage)


def _invalid(message: str, param: str | None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def _not_json() -> OpenAIError:
    return OpenAIError(400, "body is not valid JSON")


_refuse = refusal(_invalid)


class ChunkEncoder:
    """Pre-encoded `chat.completion.chunk` frames: one orjson call per delta, the rest is bytes.

    Per stream only the head (id, created, model) is its own; the rest are shared constants (a held
    stream keeps one prefix, not three)."""

    __slots__ = ("head", "tail", "_content_tail")

    TAIL = b"}\n\n"
    TAIL_WITH_USAGE = b',"usage":null}\n\n'
    # a content chunk is the head, then these two around the text's JSON string: the per-token path
    CONTENT = b'[{"index":0,"delta":{"content":'
    CONTENT_TAIL = b'},"logprobs":null,"finish_reason":null}]' + TAIL
    CONTENT_TAIL_WITH_USAGE = b'},"logprobs":null,"finish_reason":null}]' + TAIL_WITH_USAGE

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.head = (b'data: {"id":"' + completion_id.encode() + b'","object":"chat.completion.chunk","created":'
                     + str(created).encode() + b',"model":' + orjson.dumps(model) + b',"choices":')
        self.tail = self.TAIL_WITH_USAGE if include_usage else self.TAIL
        self._content_tail = self.CONTENT_TAIL_WITH_USAGE if include_usage else self.CONTENT_TAIL

    def delta(self, delta: bytes, finish_reason: str | None = None) -> bytes:
        reason = orjson.dumps(finish_reason)
        return (self.head + b'[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":' + reason
                + b"}]" + self.tail)

    def content(self, text: str) -> bytes:
        return b"%s%s%s%s" % (self.head, self.CONTENT, orjson.dumps(text), self._content_tail)

    def batch(self, batch: Batch, reply: _Reply, out: list[bytes]) -> str | None:
        """One upstream read's frames, appended to `out`, counted in `reply`; its finish reason, if any."""
        finish = None
        for event in batch:
            if type(event) is TextDelta:
                reply.chars += len(event.text)
                out.append(self.content(event.text))
            elif type(event) is ToolCallDelta:
                out.append(self.delta(b'{"tool_calls":' + orjson.dumps(event.calls) + b"}"))
            elif type(event) is ReasoningDelta:
                if event.text:  # a signature has no field here
                    out.append(self.delta(b'{"reasoning_content":' + orjson.dumps(event.text) + b"}"))
            elif type(event) is Finish:
                finish = event.reason
            elif type(event) is UsageReport:
                reply.usage = event
        return finish

    def usage(self, usage: UsageReport) -> bytes:
        return self.head + b'[],"usage":' + orjson.dumps(usage_json(usage)) + b"}\n\n"


def usage_json(usage: UsageReport) -> dict[str, Any]:
    """OpenAI's `usage`: prompt_tokens counts every prompt token (uncached, read from the cache and
    written to it); the details are there when a cache or reasoning was involved."""
    body: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                            "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    if usage.cached_tokens or usage.cache_write_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens,
                                         "cache_write_tokens": usage.cache_write_tokens}
    if usage.reasoning_tokens:
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return body


def openai_error(e: GatewayError) -> web.Response:
    """Any gateway error (auth, body, limits) as OpenAI's error body."""
    if isinstance(e, OpenAIError):
        return e.response()
    if isinstance(e, TooManyRequests):
        resp = OpenAIError(429, e.message, "rate_limit_error", code="rate_limit_exceeded").response()
        resp.headers.update(e.headers())
        return resp
    if isinstance(e, Unauthorized):  # as OpenAI answers a bad key: the SDKs read `code`
        return OpenAIError(401, e.message, "invalid_request_error", code="invalid_api_key").response()
    return OpenAIError(e.status, e.message, e.type).response()


# This front door's errors in OpenAI's shape, whatever raised them: the error middleware answers
# them with `openai_error` (the handler is marked, not wrapped: a held stream keeps a frame less)
openai_errors = error_shape(openai_error)


@operation("OpenAI-compatible chat completion (stream and non-stream)", "openai",
           {"200": response("The completion; `chat.completion.chunk` events when `stream` is true",
                            {**json_content(ChatCompletion), **sse_content("ChatCompletionEvent")}),
            **openai_error_answers(400, 401, 403, 404, 413, 429)},
           body=ChatCompletionRequest,
           description="Stateless like OpenAI's endpoint: no thread or message rows; usage is recorded. "
                       "Errors are in OpenAI's shape (a database outage answers the native 503).")
@openai_errors
async def chat_completions(request: web.Request) -> web.StreamResponse:
    # One frame from the request to the last write: a held stream is suspended in every frame of
    # its handler chain, so the streaming loop is here rather than in a function of its own.
    principal = await caller(request, "chat")
    app = request.app
    models = app[MODELS]
    model_name, chat, stream, include_usage = parse_request(await read_body(request), models.chat_model,
                                                            functools.partial(refused_by_chain, models))
    turns = app[TURNS]
    completion = await turns.begin_completion(principal, model_name, chat, request[TIMINGS].start)
    reply = _Reply()
    limits = RateLimitHeaders(request, principal)
    events = completion.chain.stream(chat, whole=not stream)
    try:
        try:  # not `async with aclosing(...)`: a context manager is two more objects a held stream keeps
            if not stream:
                answer = await _complete(events, completion.chain, chat, completion.id, reply)
                await limits.apply(answer)
                return answer
            # nothing is sent until the chain has committed to a model: until then a failure is a
            # clean HTTP error and the response's "model" names the model that actually answers
            batch = await anext(events)
            resp = sse_stream()
            await limits.apply(resp)
            await resp.prepare(request)
            hold_open(request, resp)
            reply.started = True
            request[TIMINGS].mark("first_token")  # in hand, and written just below
            enc = ChunkEncoder(f"chatcmpl-{completion.id.hex}", int(time.time()), completion.chain.used.name,
                               include_usage)
            out = [enc.delta(b'{"role":"assistant","content":""}')]
            finish = "stop"
            try:
                while True:
                    finish = enc.batch(batch, reply, out) or finish
                    del batch  # between reads a held stream keeps no events
                    if out:  # one write per upstream read
                        await resp.write(b"".join(out) if len(out) > 1 else out[0])
                        out.clear()
                    try:
                        batch = await anext(events)
                    except StopAsyncIteration:
                        break
                out.append(enc.delta(b"{}", finish))
                if include_usage:
                    out.append(enc.usage(charged_usage(chat, reply.usage, reply.chars)))
            except ProviderError as e:
                out.append(b"data: " + orjson.dumps({"error": {"message": e.message, "type": "upstream_error",
                                                               "param": None, "code": e.kind}}) + b"\n\n")
            out.append(b"data: [DONE]\n\n")
            await resp.write(b"".join(out))
            await resp.write_eof()
            return resp
        finally:
            await events.aclose()
    except ProviderError as e:
        if reply.started:
            raise  # a streamed failure was already reported in the stream
        raise provider_error(e) from None
    finally:
        limits.close()
        turns.finish_completion(completion, reply.usage, reply.chars, reply.started)


class _Reply:
    """What went out so far: for the usage record however the request ends. A reply keeps only its
    length (a streamed reply's text is the client's; a non-streamed one is collected by _complete)."""

    __slots__ = ("chars", "usage", "started")

    def __init__(self) -> None:
        self.chars = 0
        self.usage: UsageReport | None = None
        self.started = False


async def _complete(events: AsyncIterator[Batch], chain: Chain, chat: ChatRequest, completion_id: uuid.UUID,
                    reply: _Reply) -> web.Response:
    finish = "stop"
    parts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    async for batch in events:
        for event in batch:
            if type(event) is TextDelta:
                parts.append(event.text)
                reply.chars += len(event.text)
            elif type(event) is ToolCallDelta:
                calls.extend(event.calls)
            elif type(event) is ReasoningDelta:
                reasoning.append(event.text)
            elif type(event) is Finish:
                finish = event.reason
            elif type(event) is UsageReport:
                reply.usage = event
    usage = charged_usage(chat, reply.usage, reply.chars)
    # `refusal` is always there in OpenAI's answer (and required by its published schema)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(parts) or None, "refusal": None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = turn.merge_calls(calls)
    body = {"id": f"chatcmpl-{completion_id.hex}", "object": "chat.completion", "created": int(time.time()),
            "model": chain.used.name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage_json(usage)}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


@operation("The enabled models, OpenAI-style", "openai",
           {**ok(200, "The models", ModelList), **errors(401, openai=True), **errors(503)})
@openai_errors
async def list_models(request: web.Request) -> web.Response:
    await caller(request)
    models = request.app[MODELS]
    data = [model_json(m.name, m.provider) for m in models.models.values() if m.enabled]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


@operation("One enabled model, OpenAI-style", "openai",
           {**ok(200, "The model", Model), **errors(401, 404, openai=True), **errors(503)},
           parameters=[path_string("model")])
@openai_errors
async def get_model(request: web.Request) -> web.Response:
    """`GET /v1/models/{model}`: one enabled model, as in the list; else OpenAI's 404."""
    await caller(request)
    name = request.match_info["model"]
    model = request.app[MODELS].models.get(name)
    if model is None or not model.enabled:
        raise OpenAIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    return web.Response(body=orjson.dumps(model_json(model.name, model.provider)), content_type="application/json")


def model_json(name: str, provider: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": provider}

