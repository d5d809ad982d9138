"""Google's Gemini API (`POST /models/{model}:streamGenerateContent?alt=sse`), normalised to deltas + usage.

Differences from OpenAI that matter here: the roles are `user` and `model`, the system prompt is
`systemInstruction`, sampling parameters sit in `generationConfig`, and the key goes in
`x-goog-api-key`. Tools are `functionDeclarations`; a call comes whole in one `functionCall` part
and carries no id, so the adapter gives it one (`call_` and 24 hex digits) and, on the way back,
finds a tool result's function by the id of the assistant's call it answers (`functionResponse`
is named by the function, not by a call). Every event is a whole `GenerateContentResponse` whose
`usageMetadata` is cumulative (it replaces, never adds); there is no end marker: the event that
carries `finishReason` (or a prompt's `blockReason`) is the last one, and a stream that ends
before it is truncated.

Usage: `promptTokenCount` includes the cached tokens (`cachedContentTokenCount`); the reply's
tokens are `candidatesTokenCount` plus the model's thinking (`thoughtsTokenCount`), which is
billed as output. Thought parts (`thought: true`) are not reply text.

What Gemini cannot take is refused before any call (`unsupported` says it without calling): an
image by URL (Gemini takes images inline, as base64), tools other than functions, `logit_bias`,
`logprobs`, a tool result for a call no assistant message made.
"""

from __future__ import annotations

import secrets as random_ids
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from gateway.config import ModelConfig, ProviderConfig
from gateway.observability.tracing import upstream_headers
from gateway.providers import normalise
from gateway.providers.base import (
    NO_SECRETS,
    Batch,
    ChatRequest,
    Finish,
    ProviderError,
    Secrets,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UpstreamProtocolError,
    UpstreamStreamError,
)
from gateway.providers.http import Upstream
from gateway.providers.openai import answer_error, request_headers
from gateway.providers.sse_decoder import SSEDecoder

# finishReason as OpenAI's finish_reason; a reason not named here is passed on lower-cased
FINISH_REASONS = {
    "STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter", "LANGUAGE": "content_filter",
}
TOOL_CHOICES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
# OpenAI's sampling fields Gemini has under another name in generationConfig
GENERATION_FIELDS = {"seed": "seed", "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty"}
# fields with no Gemini equivalent that change nothing the client reads back: not sent
IGNORED_FIELDS = frozenset({"user", "parallel_tool_calls"})


class GeminiRefusal(ProviderError):
    """The request holds something Gemini cannot express; the message names it and the model.
    Raised before any upstream call; another link of the chain (another kind) may take it."""

    kind = "unsupported_by_upstream"
    model_fault = False  # the request's content, not the model's health

    def __init__(self, message: str) -> None:
        super().__init__(message, status=400)


def unsupported(model: ModelConfig, request: ChatRequest) -> str | None:
    """What of `request` model `model` (on a Gemini provider) cannot take, as the client's error
    message, or None when it can take all of it."""
    try:
        to_gemini(model, request)
    except GeminiRefusal as e:
        return e.message
    return None


def refuse(model: ModelConfig, what: str) -> GeminiRefusal:
    return GeminiRefusal(f"model '{model.name}' (a Gemini upstream) cannot take {what}")


def call_id() -> str:
    """A tool call's id, made by the gateway: Gemini's calls carry none."""
    return "call_" + random_ids.token_hex(12)


def parts_of(model: ModelConfig, content: Any) -> list[dict[str, Any]]:
    """OpenAI-style content as Gemini parts: a string or text parts as text, an image's data URL
    as `inlineData`. An image by URL, or a part of another kind, is refused."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise refuse(model, f"message content of type {type(content).__name__}")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
                raise refuse(model, "an image by URL (send it inline as a base64 data URL)")
            media_type, _, data = url[len("data:"):].partition(";base64,")
            parts.append({"inlineData": {"mimeType": media_type, "data": data}})
        else:
            raise refuse(model, f"a content part of type {kind!r}")
    return parts


def arguments_of(model: ModelConfig, call: Any) -> tuple[str, dict[str, Any]]:
    """An assistant's OpenAI-style tool call as (function name, arguments object)."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise refuse(model, "a tool call without a function name")
    raw = function.get("arguments") if isinstance(function, dict) else None
    try:
        args = orjson.loads(raw) if isinstance(raw, str) and raw else {}
    except orjson.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise refuse(model, f"tool call arguments of {name!r} that are not a JSON object")
    return name, args


def result_of(content: Any) -> dict[str, Any]:
    """A tool message's content as a `functionResponse.response` (an object): a JSON object as
    itself, anything else under `output` (the key Gemini's documentation names)."""
    text = content if isinstance(content, str) else "".join(p["text"] for p in parts_text(content))
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"output": text}
    return value if isinstance(value, dict) else {"output": value}


def parts_text(content: Any) -> list[dict[str, Any]]:
    return [p for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)] \
        if isinstance(content, list) else []


def contents_of(model: ModelConfig, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                                               list[dict[str, Any]]]:
    """OpenAI-style messages as (Gemini `contents`, the system instruction's parts). Consecutive
    messages of one role become one content (Gemini wants the results of parallel calls together)."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name, from the assistant turns seen so far

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.extend(parts_of(model, content if isinstance(content, str) else parts_text(content)))
        elif role == "user":
            add("user", parts_of(model, content))
        elif role == "assistant":
            parts = parts_of(model, content if isinstance(content, str) or content is None else parts_text(content))
            for call in message.get("tool_calls") or ():
                name, args = arguments_of(model, call)
                if isinstance(call.get("id"), str):
                    names[call["id"]] = name
                parts.append({"functionCall": {"name": name, "args": args}})
            add("model", parts)
        elif role == "tool":
            call = message.get("tool_call_id")
            if call not in names:
                raise GeminiRefusal(f"a tool result answers call {call!r}, which no assistant message made")
            add("user", [{"functionResponse": {"name": names[call], "response": result_of(content)}}])
        else:
            raise refuse(model, f"a message of role {role!r}")
    return contents, system


def tools_of(model: ModelConfig, tools: Any) -> list[dict[str, Any]]:
    declarations: list[dict[str, Any]] = []
    for tool in tools if isinstance(tools, list) else ():
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise refuse(model, f"a tool of type {kind!r} (only functions)")
        declaration: dict[str, Any] = {"name": function["name"]}
        if isinstance(function.get("description"), str):
            declaration["description"] = function["description"]
        if function.get("parameters"):
            # JSON Schema as the client wrote it: `parameters` would take only Gemini's OpenAPI subset
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}] if declarations else []


def tool_config_of(model: ModelConfig, choice: Any) -> dict[str, Any]:
    if isinstance(choice, str) and choice in TOOL_CHOICES:
        return {"functionCallingConfig": {"mode": TOOL_CHOICES[choice]}}
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [function["name"]]}}
    raise refuse(model, f"tool_choice {orjson.dumps(choice).decode()}")


def to_gemini(model: ModelConfig, request: ChatRequest) -> dict[str, Any]:
    """The request as a `GenerateContentRequest`; a `GeminiRefusal` for what Gemini cannot express."""
    contents, system = contents_of(model, request.messages)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    generation: dict[str, Any] = {}
    if request.max_tokens is not None:
        generation["maxOutputTokens"] = request.max_tokens
    if request.temperature is not None:
        generation["temperature"] = request.temperature
    if request.top_p is not None:
        generation["topP"] = request.top_p
    if request.stop is not None:
        generation["stopSequences"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    extra = request.extra
    for key, value in extra.items():
        if value is None or key in IGNORED_FIELDS:
            continue
        if key == "tools":
            tools = tools_of(model, value)
            if tools:
                body["tools"] = tools
        elif key == "tool_choice":
            body["toolConfig"] = tool_config_of(model, value)
        elif key == "response_format":
            kind = value.get("type") if isinstance(value, dict) else None
            if kind == "json_object":
                generation["responseMimeType"] = "application/json"
            elif kind == "json_schema" and isinstance(value.get("json_schema"), dict):
                generation["responseMimeType"] = "application/json"
                if "schema" in value["json_schema"]:
                    generation["responseJsonSchema"] = value["json_schema"]["schema"]
            elif kind != "text":
                raise refuse(model, f"response_format of type {kind!r}")
        elif key in GENERATION_FIELDS:
            generation[GENERATION_FIELDS[key]] = value
        elif key in ("logprobs", "top_logprobs") and not value:
            continue
        else:
            raise refuse(model, f"'{key}'")
    if generation:
        body["generationConfig"] = generation
    return body


class GeminiProvider:
    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.name = config.name
        own = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if config.api_key:
            own["x-goog-api-key"] = config.api_key.reveal()
        self._headers = request_headers(config, own)
        self._secrets = Secrets.of(config)
        # the session is not used for chat: the lean client (providers/http.py) keeps a held stream small
        self._upstream = Upstream(config.base_url)

    def close(self) -> None:
        self._upstream.close()

    @staticmethod
    def path(model: ModelConfig) -> str:
        name = model.upstream.removeprefix("models/")
        return f"/models/{quote(name, safe='-._~')}:streamGenerateContent?alt=sse"

    async def stream(self, model: ModelConfig, request: ChatRequest) -> AsyncGenerator[Batch, None]:
        body = orjson.dumps(to_gemini(model, request))
        state = _Reply()
        conn = await self._upstream.post(self.path(model), upstream_headers(self._headers), body,
                                         connect_timeout_s=model.connect_timeout_s,
                                         idle_timeout_s=model.idle_timeout_s)
        finished = False  # the connection went back to the pool: never close it from here
        try:
            if conn.status >= 300:
                refused = await answer_error(conn, self._secrets)
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
                batch, error = read_events(decoder, chunk, state, self._secrets)
                if state.stopped:
                    conn.finish()  # the body's end is drained off the caller's path
                    finished = True
                if batch:  # what arrived before a failure is part of the reply
                    yield batch
                if error is not None:
                    raise error
                if state.stopped:
                    return
                del batch  # between reads a held stream keeps no events (nor the bytes they came from)
            conn.finish()
            finished = True
        finally:
            if not finished:
                conn.close()
        raise UpstreamProtocolError("upstream stream ended without a finishReason")


class _Reply:
    """What one reply's events have said so far: the latest usage, the calls made, whether it ended."""

    __slots__ = ("prompt", "output", "cached", "thoughts", "suspect", "calls", "stopped")

    def __init__(self) -> None:
        self.prompt = 0
        self.output = 0
        self.cached = 0
        self.thoughts = 0
        self.suspect = False  # a count had to be clamped (see normalise.count)
        self.calls = 0  # tool calls streamed: their index in OpenAI's `tool_calls`
        self.stopped = False

    def count(self, value: object) -> int:
        n, bad = normalise.count(value)
        self.suspect |= bad
        return n


def read_events(decoder: SSEDecoder, chunk: bytes, state: _Reply,
                secrets: Secrets = NO_SECRETS) -> tuple[Batch, ProviderError | None]:
    """The events of one upstream read, up to the last one: (the batch, the failure that stopped it)."""
    batch: Batch = []
    for event in decoder.feed(chunk):
        try:
            batch.extend(parse_event(event.data, state, secrets))
        except ProviderError as e:
            return batch, e
        if state.stopped:
            break
    return batch, None


def parse_event(data: bytes, state: _Reply, secrets: Secrets = NO_SECRETS) -> list[StreamEvent]:
    """One `GenerateContentResponse` into normalised events, checked as `normalise` says; an event
    that breaks the format is an `UpstreamProtocolError`, an `error` object an `UpstreamStreamError`."""
    try:
        obj = normalise.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError("upstream sent an event that is not JSON") from None
    if not isinstance(obj, dict):
        raise UpstreamProtocolError("upstream sent an event that is not a JSON object")
    if obj.get("error"):
        err = obj["error"] if isinstance(obj["error"], dict) else {"message": obj["error"]}
        raise UpstreamStreamError(normalise.error_text(
            f"upstream error mid-stream: {err.get('status')}: {err.get('message')}", secrets))
    out: list[StreamEvent] = []
    usage = obj.get("usageMetadata")
    if usage is not None:
        usage = normalise.obj(usage, "`usageMetadata`")
        # cumulative: each event's counts replace the last ones
        state.prompt = state.count(usage.get("promptTokenCount")) + state.count(usage.get("toolUsePromptTokenCount"))
        state.thoughts = state.count(usage.get("thoughtsTokenCount"))
        state.output = state.count(usage.get("candidatesTokenCount")) + state.thoughts
        state.cached = state.count(usage.get("cachedContentTokenCount"))
    candidates = obj.get("candidates")
    reason: str | None = None
    if candidates:
        if candidates.__class__ is not list:
            raise UpstreamProtocolError("upstream sent `candidates` that is not a list")
        candidate = normalise.obj(candidates[0], "a candidate")  # one candidate is asked for
        content = normalise.obj(candidate.get("content"), "`content`")
        parts = content.get("parts") or []
        if parts.__class__ is not list:
            raise UpstreamProtocolError("upstream sent `parts` that is not a list")
        calls: list[dict[str, Any]] = []
        for part in parts:
            part = normalise.obj(part, "a part")
            if "functionCall" in part:
                call = normalise.obj(part["functionCall"], "`functionCall`")
                name = normalise.text(call.get("name"), "a function call's name")
                args = normalise.obj(call.get("args"), "a function call's `args`")
                given = call.get("id")
                calls.append({"index": state.calls, "id": given if isinstance(given, str) and given else call_id(),
                              "type": "function", "function": {"name": name, "arguments": orjson.dumps(args).decode()}})
                state.calls += 1
            elif part.get("thought") is True:
                continue  # the model's thinking: counted in thoughtsTokenCount, not reply text
            else:
                text = normalise.text(part.get("text"), "a part's `text`")
                if text:
                    out.append(TextDelta(text))
        if calls:
            out.append(ToolCallDelta(calls))
        reason = normalise.label(candidate.get("finishReason"), "`finishReason`")
    feedback = obj.get("promptFeedback")
    # a blocked prompt: no candidate at all, only the reason it was blocked
    if reason is None and feedback is not None and normalise.label(
            normalise.obj(feedback, "`promptFeedback`").get("blockReason"), "`blockReason`"):
        reason = "SAFETY"
    if reason:
        finish = FINISH_REASONS.get(reason, reason.lower())
        if finish == "stop" and state.calls:
            finish = "tool_calls"
        out.append(Finish(finish))
        report = normalise.usage(state.prompt, state.output)  # the sum must fit too
        report.suspect |= state.suspect
        out.append(report)
        state.stopped = True
    return out
