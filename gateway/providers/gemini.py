"""Google's Gemini API (`POST /models/{model}:streamGenerateContent?alt=sse`): the canonical turn
(providers/turn.py) rendered as a `GenerateContentRequest`, and its stream normalised to deltas + usage.

Differences from OpenAI that matter here: the roles are `user` and `model`, the system prompt is
`systemInstruction`, sampling parameters sit in `generationConfig`, and the key goes in
`x-goog-api-key`. Images go inline (`inlineData`); Gemini fetches none by URL. Tools are
`functionDeclarations` (the client's JSON Schema as `parametersJsonSchema`); a call comes whole in
one `functionCall` part, mostly without an id, so the adapter gives it one (`call_` and 24 hex
digits) and, on the way back, finds a tool result's function by the id of the assistant's call it
answers (a `functionResponse` is named by the function, not by a call). Thinking comes as parts
marked `thought` (when `thinkingConfig.includeThoughts` asks for them) and a `thoughtSignature` on
a part, which must go back on the same kind of part: on the first function call of the turn, else
on the thought.

Every event is a whole `GenerateContentResponse` whose `usageMetadata` is cumulative (it replaces,
never adds). There is no end marker: the event that carries `finishReason` (or a prompt's
`blockReason`) is the last one, and a stream that ends before it is truncated. `promptTokenCount`
includes the cached tokens (`cachedContentTokenCount`); the reply's tokens are
`candidatesTokenCount` plus the model's thinking (`thoughtsTokenCount`), billed as output.
"""

from __future__ import annotations

import secrets as random_ids
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import quote

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
    Unsupported,
    UpstreamProtocolError,
    UpstreamStreamError,
)
from gateway.providers.openai import SSEAdapter
from gateway.providers.sse_decoder import SSEDecoder

# finishReason as OpenAI's finish_reason; a reason not named here is passed on lower-cased
FINISH_REASONS = {
    "STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter", "LANGUAGE": "content_filter",
}
TOOL_CHOICES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
# the image types Gemini reads inline
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"})
# what Gemini's API has no field for: a turn using one is refused, never sent without it. Gemini
# fetches no image by URL (it takes them inline, as base64).
NOT_EXPRESSIBLE = (turn.IMAGE_URLS, "logit_bias", "logprobs", "top_logprobs", "functions", "function_call")
# OpenAI's sampling fields Gemini has under another name in generationConfig
GENERATION_FIELDS = {"seed": "seed", "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty"}
# What a function call made elsewhere (or whose signature the client's door had no place for)
# carries instead of a signature: the value Google documents for calls it did not sign. Gemini 3
# refuses a turn's calls without one.
SKIP_SIGNATURE = "skip_thought_signature_validator"
# OpenAI's reasoning effort as a thinking budget (the budgets Google's OpenAI compatibility uses)
THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}


def unsupported(model: ModelConfig, request: ChatRequest) -> str | None:
    """The first feature of the turn Gemini's API cannot express (turn.features), or None."""
    found = turn.features(request)
    if not found:
        return None
    for name in NOT_EXPRESSIBLE:
        if name in found:
            return name
    choice = request.extra.get("tool_choice")
    if choice is not None and tool_config_of(choice) is None:
        return f"tool_choice {orjson.dumps(choice).decode()}"
    for message in request.messages:
        content = message.get("content")
        for part in content if content.__class__ is list else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "image_url":
                continue
            if message.get("role") == "tool":
                return "images in tool results"
            parsed = turn.data_url(part["image_url"]["url"])
            if parsed is not None and parsed[0] not in IMAGE_TYPES:
                return f"images of type {parsed[0]}"
    return None


def call_id() -> str:
    """A tool call's id, made by the gateway: Gemini's calls carry none."""
    return "call_" + random_ids.token_hex(12)


def text_parts(content: Any) -> list[dict[str, Any]]:
    """A string, or the text parts of a list, as Gemini text parts (cache_control has no place there:
    Gemini caches prompt prefixes by itself)."""
    if isinstance(content, str):
        return [{"text": content}] if content else []
    return [{"text": p["text"]} for p in content or () if isinstance(p, dict) and p.get("type") == "text"]


def user_parts(content: Any) -> list[dict[str, Any]]:
    """A user's canonical content as Gemini parts: text as text, a base64 image as `inlineData`."""
    if not isinstance(content, list):
        return text_parts(content)
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"text": part["text"]})
        elif kind == "image_url":
            parsed = turn.data_url(part["image_url"]["url"])  # an image by URL was refused (`unsupported`)
            if parsed is not None:
                parts.append({"inlineData": {"mimeType": parsed[0], "data": parsed[1]}})
    return parts


def assistant_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An assistant's canonical message as Gemini parts: reasoning as thought parts, text as text,
    tool calls as `functionCall` parts. A reasoning signature goes back where Gemini put it: on
    the message's first function call when it made one (SKIP_SIGNATURE when the turn kept none),
    else on the thought part."""
    content = message.get("content")
    parts: list[dict[str, Any]] = []
    signature: str | None = None
    for part in content if isinstance(content, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"text": part["text"]})
        elif kind == "reasoning":
            thought: dict[str, Any] = {"text": part.get("text") or "", "thought": True}
            if part.get("signature") and signature is None:
                signature = part["signature"]
                if not message.get("tool_calls"):
                    thought["thoughtSignature"] = signature
            if thought["text"] or "thoughtSignature" in thought:
                parts.append(thought)
        # redacted reasoning is Anthropic's sealed thinking: nothing Gemini could read
    if isinstance(content, str) and content:
        parts.append({"text": content})
    for i, call in enumerate(message.get("tool_calls") or ()):
        function = call["function"]
        try:
            args = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):  # Gemini's args are an object; anything else is kept as text
            args = {"arguments": function.get("arguments")}
        rendered: dict[str, Any] = {"functionCall": {"name": function["name"], "args": args}}
        if i == 0:
            rendered["thoughtSignature"] = signature or SKIP_SIGNATURE
        parts.append(rendered)
    return parts


def result_of(message: dict[str, Any]) -> dict[str, Any]:
    """A tool message's content as a `functionResponse.response` (an object): a JSON object as
    itself, anything else under `output`; a result marked as an error under `error` (the keys
    Gemini's documentation names)."""
    content = message.get("content")
    text = content if isinstance(content, str) else "".join(p["text"] for p in text_parts(content))
    try:
        value: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = text
    if message.get("is_error") is True:
        return {"error": value}
    return value if isinstance(value, dict) else {"output": value}


def contents_of(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Canonical messages as (Gemini `contents`, the system instruction's parts). Consecutive
    messages of one role become one content (Gemini wants the results of parallel calls together)."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name, from the assistant turns so far

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
        if role == "user":
            add("user", user_parts(content))
        elif role == "assistant":
            for call in message.get("tool_calls") or ():
                names[call["id"]] = call["function"]["name"]
            add("model", assistant_parts(message))
        elif role == "tool":
            # turn.check refused a result whose call no earlier assistant message made
            name = names[message["tool_call_id"]]
            add("user", [{"functionResponse": {"name": name, "response": result_of(message)}}])
        elif role in ("system", "developer"):
            system.extend(text_parts(content))
    return contents, system


def tools_of(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    declarations: list[dict[str, Any]] = []
    for tool in tools:
        function = tool["function"]
        declaration: dict[str, Any] = {"name": function["name"]}
        if function.get("description") is not None:
            declaration["description"] = function["description"]
        if function.get("parameters"):
            # JSON Schema as the client wrote it: `parameters` would take only Gemini's OpenAPI subset
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}]


def tool_config_of(choice: Any) -> dict[str, Any] | None:
    """OpenAI's tool_choice as Gemini's `toolConfig` (None for a choice that is neither)."""
    if isinstance(choice, str):
        mode = TOOL_CHOICES.get(choice)
        return {"functionCallingConfig": {"mode": mode}} if mode else None
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [function["name"]]}}
    return None


def to_gemini(model: ModelConfig, request: ChatRequest) -> dict[str, Any]:
    """The canonical turn as a `GenerateContentRequest`; `Unsupported` when it cannot be one (the
    chain asks `unsupported` first and never gets here with such a turn)."""
    feature = unsupported(model, request)
    if feature is not None:
        raise Unsupported(feature, model.name)
    contents, system = contents_of(request.messages)
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
    found = turn.features(request)
    extra = request.extra
    if found:
        if turn.TOOLS in found:
            body["tools"] = tools_of(extra["tools"])
        choice = tool_config_of(extra.get("tool_choice"))
        if choice is not None:
            body["toolConfig"] = choice
        response_format = extra.get("response_format")
        if turn.JSON_OUTPUT in found and isinstance(response_format, dict):
            generation["responseMimeType"] = "application/json"
            schema = response_format.get("json_schema")
            if isinstance(schema, dict) and "schema" in schema:
                generation["responseJsonSchema"] = schema["schema"]
        for key, name in GENERATION_FIELDS.items():
            if key in found:
                generation[name] = extra[key]
        budget = request.thinking.get("budget_tokens") if request.thinking is not None else None
        if budget is None and "reasoning_effort" in found:
            budget = THINKING_BUDGETS.get(extra["reasoning_effort"])
        if budget is not None:
            generation["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": True}
        # parallel_tool_calls: Gemini decides by itself; `user`: Gemini has no field for it
    if generation:
        body["generationConfig"] = generation
    return body


class GeminiProvider(SSEAdapter):
    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, "x-goog-api-key")

    def unsupported(self, model: ModelConfig, request: ChatRequest) -> str | None:
        return unsupported(model, request)

    @staticmethod
    def path(model: ModelConfig) -> str:
        name = model.upstream.removeprefix("models/")
        return f"/models/{quote(name, safe='-._~')}:streamGenerateContent?alt=sse"

    def body(self, model: ModelConfig, request: ChatRequest) -> bytes:
        return orjson.dumps(to_gemini(model, request))

    def stream(self, model: ModelConfig, request: ChatRequest) -> AsyncGenerator[Batch, None]:
        state = _Reply()

        def read(decoder: SSEDecoder, chunk: bytes, secrets: Secrets) -> tuple[Batch, bool, ProviderError | None]:
            batch, error = read_events(decoder, chunk, state, secrets)
            return batch, state.stopped, error

        return self.relay(model, request, self.path(model), read, "upstream stream ended without a finishReason")


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
        parts = normalise.obj(candidate.get("content"), "`content`").get("parts") or []
        if parts.__class__ is not list:
            raise UpstreamProtocolError("upstream sent `parts` that is not a list")
        for part in parts:
            part = normalise.obj(part, "a part")
            signature = part.get("thoughtSignature")
            if "functionCall" in part:
                if signature:  # the thinking behind the call: closes a reasoning block before it
                    out.append(ReasoningDelta("", normalise.text(signature, "a `thoughtSignature`")))
                call = normalise.obj(part["functionCall"], "`functionCall`")
                name = normalise.text(call.get("name"), "a function call's name")
                args = normalise.obj(call.get("args"), "a function call's `args`")
                given = call.get("id")
                fragment = turn.call_fragment(state.calls, given if isinstance(given, str) and given else call_id(),
                                              name, orjson.dumps(args).decode())
                state.calls += 1
                last = out[-1] if out else None
                if isinstance(last, ToolCallDelta):  # the calls of one event go together
                    last.calls.append(fragment)
                else:
                    out.append(ToolCallDelta([fragment]))
                continue
            text = normalise.text(part.get("text"), "a part's `text`")
            if part.get("thought") is True:
                if text:
                    out.append(ReasoningDelta(text))
                if signature:
                    out.append(ReasoningDelta("", normalise.text(signature, "a `thoughtSignature`")))
                continue
            if signature:
                out.append(ReasoningDelta("", normalise.text(signature, "a `thoughtSignature`")))
            if text:
                out.append(TextDelta(text))
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
        if not report.suspect:
            report.cached_tokens = min(state.cached, report.prompt_tokens)
            report.reasoning_tokens = min(state.thoughts, report.completion_tokens)
        out.append(report)
        state.stopped = True
    return out
