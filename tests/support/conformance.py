"""The conformance matrix's parts: local upstreams of the three provider kinds that record every
request and check it against the provider's published shape, what each of them streams for each
feature, and one driver per front door that makes the same request in that door's shape (the
official `openai` and `anthropic` SDKs for the vendor doors, raw HTTP for the native one) and
reads back what a client sees, as an `Outcome`.

Published shapes: OpenAI's chat completions and Anthropic's Messages request bodies as the
official SDKs type them (`CompletionCreateParamsStreaming`, `MessageCreateParamsStreaming`),
turned into JSON Schema with every object closed (a field the SDK does not know is a departure),
and Gemini's `GenerateContentRequest` as tests/support/gemini.py checks it (google-genai's types).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import anthropic
import jsonschema_rs
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from anthropic.types.message_create_params import MessageCreateParamsStreaming
from openai.types.chat.completion_create_params import CompletionCreateParamsStreaming
from pydantic import TypeAdapter

from tests.support.fakes import FakeUpstream, Reply, openai_chunk, parse_sse, split_every
from tests.support.gemini import FakeGemini, GeminiReply, response, sse, usage

# "responses" as clients mostly call it (stored: `store` defaults to true), "responses, store: false" stateless
DOORS = ("chat.completions", "responses", "responses, store: false", "messages", "api/chat")
PROVIDERS = ("openai", "anthropic", "gemini")
FEATURES = ("text", "image", "image by URL", "tools", "reasoning", "cache usage")
MODELS = {"openai": "m-openai", "anthropic": "m-anthropic", "gemini": "m-gemini"}

PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
DATA_URL = f"data:image/png;base64,{PIXEL}"
IMAGE_URL = "https://images.example/cat.png"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
THOUGHT = "Let me think."
SIGNATURE = "c2lnLTE="
# the cache cell: 170 prompt tokens processed, 150 of them read from the upstream's cache
PROMPT_TOKENS, CACHED_TOKENS = 170, 150


# -- published shapes ---------------------------------------------------------------------------

def _closed(schema: Any) -> Any:
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            _closed(value)
    elif isinstance(schema, list):
        for value in schema:
            _closed(value)
    return schema


@cache
def _validator(kind: str) -> Any:
    typed = CompletionCreateParamsStreaming if kind == "openai" else MessageCreateParamsStreaming
    return jsonschema_rs.validator_for(_closed(TypeAdapter(typed).json_schema()))


def shape_problems(kind: str, body: Any) -> list[str]:
    """Where a request body departs from the provider's published shape ([] when it does not)."""
    return [f"/{'/'.join(map(str, e.instance_path))}: {e.message[:300]}" for e in _validator(kind).iter_errors(body)]


# -- an Anthropic upstream that takes a reply per request ---------------------------------------

def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class FakeMessages:
    """Anthropic's Messages API: records each request and streams the queued reply (split in pieces)."""

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.piece = 7
        self.server: Any = None
        self.app = web.Application()
        self.app.router.add_post("/v1/messages", self.messages)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        problems = shape_problems("anthropic", body)
        if problems:
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "; ".join(problems)}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in split_every(self.replies.pop(0), self.piece):
            await resp.write(piece)
        await resp.write_eof()
        return resp


def anthropic_reply(blocks: list[bytes], stop: str = "end_turn", input_tokens: int = 9, output: int = 2,
                    cache_read: int = 0) -> bytes:
    start = {"type": "message_start", "message": {
        "id": "msg_up", "type": "message", "role": "assistant", "content": [], "model": "claude-up",
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1, "cache_read_input_tokens": cache_read,
                  "cache_creation_input_tokens": 0}}}
    return b"".join([
        event("message_start", start), *blocks,
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                "usage": {"output_tokens": output}}),
        event("message_stop", {"type": "message_stop"})])


def anthropic_block(index: int, start: dict[str, Any], deltas: list[dict[str, Any]]) -> bytes:
    return b"".join([
        event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}),
        *[event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas],
        event("content_block_stop", {"type": "content_block_stop", "index": index})])


def anthropic_text(index: int, *texts: str) -> bytes:
    return anthropic_block(index, {"type": "text", "text": ""}, [{"type": "text_delta", "text": t} for t in texts])


# -- what each upstream streams for each feature -------------------------------------------------

def openai_reply(feature: str) -> Reply:
    head = [openai_chunk({"role": "assistant", "content": ""})]
    done = b"data: [DONE]\n\n"
    if feature == "tools":
        body = [*head,
                openai_chunk({"tool_calls": [{"index": 0, "id": "call_up", "type": "function",
                                              "function": {"name": "get_weather", "arguments": ""}}]}),
                openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
                openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Rome"}'}}]}),
                openai_chunk({}, "tool_calls"),
                openai_chunk(usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}, choices=False),
                done]
    elif feature == "reasoning":
        body = [*head, openai_chunk({"reasoning_content": THOUGHT}), openai_chunk({"content": "Hello"}),
                openai_chunk({}, "stop"),
                openai_chunk(usage={"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14,
                                    "completion_tokens_details": {"reasoning_tokens": 3}},  # type: ignore[dict-item]
                             choices=False),
                done]
    else:
        counts: dict[str, Any] = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
        if feature == "cache usage":
            counts = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": PROMPT_TOKENS + 2,
                      "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS}}
        body = [*head, openai_chunk({"content": "Hello"}), openai_chunk({"content": " world"}),
                openai_chunk({}, "stop"), openai_chunk(usage=counts, choices=False), done]
    return Reply([piece for chunk in body for piece in split_every(chunk, 11)])


def anthropic_feature_reply(feature: str) -> bytes:
    if feature == "tools":
        return anthropic_reply([anthropic_block(0, {"type": "tool_use", "id": "toolu_up", "name": "get_weather",
                                                    "input": {}},
                                                [{"type": "input_json_delta", "partial_json": '{"city":'},
                                                 {"type": "input_json_delta", "partial_json": '"Rome"}'}])],
                               stop="tool_use")
    if feature == "reasoning":
        return anthropic_reply([anthropic_block(0, {"type": "thinking", "thinking": "", "signature": ""},
                                                [{"type": "thinking_delta", "thinking": THOUGHT},
                                                 {"type": "signature_delta", "signature": SIGNATURE}]),
                                anthropic_text(1, "Hello")], output=5)
    if feature == "cache usage":
        return anthropic_reply([anthropic_text(0, "Hello", " world")], input_tokens=PROMPT_TOKENS - CACHED_TOKENS,
                               cache_read=CACHED_TOKENS)
    return anthropic_reply([anthropic_text(0, "Hello", " world")])


def gemini_reply(feature: str) -> GeminiReply:
    if feature == "tools":
        body = sse(response([{"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}], "STOP",
                            usage(prompt=9, output=2)))
    elif feature == "reasoning":
        body = sse(response([{"text": THOUGHT, "thought": True}], usage=usage(prompt=9, output=0, thoughts=3)),
                   response([{"text": "Hello", "thoughtSignature": SIGNATURE}], "STOP",
                            usage(prompt=9, output=2, thoughts=3)))
    elif feature == "cache usage":
        body = sse(response([{"text": "Hello"}], usage=usage(prompt=PROMPT_TOKENS, output=1, cached=CACHED_TOKENS)),
                   response([{"text": " world"}], "STOP", usage(prompt=PROMPT_TOKENS, output=2, cached=CACHED_TOKENS)))
    else:
        body = sse(response([{"text": "Hello"}], usage=usage(prompt=9, output=1)),
                   response([{"text": " world"}], "STOP", usage(prompt=9, output=2)))
    return GeminiReply(body, piece=13)


@dataclass
class Upstreams:
    """The three local upstreams behind the app's three models."""

    openai: FakeUpstream
    anthropic: FakeMessages
    gemini: FakeGemini

    def toml(self) -> str:
        return f"""
[providers.compat]
kind = "openai"
base_url = "{self.openai.base_url}"
api_key = "sk-compat-0123456789"
[providers.claude]
kind = "anthropic"
base_url = "{self.anthropic.base_url}"
api_key = "sk-ant-0123456789"
[providers.google]
kind = "gemini"
base_url = "{self.gemini.base_url}"
api_key = "AIza-0123456789"
[models.m-openai]
provider = "compat"
upstream = "gpt-up"
[models.m-anthropic]
provider = "claude"
upstream = "claude-up"
[models.m-gemini]
provider = "google"
upstream = "gemini-up"
"""

    def script(self, provider: str, feature: str) -> None:
        if provider == "openai":
            self.openai.queue(openai_reply(feature))
        elif provider == "anthropic":
            self.anthropic.replies.append(anthropic_feature_reply(feature))
        else:
            self.gemini.queue(gemini_reply(feature))

    def received(self, provider: str) -> list[dict[str, Any]]:
        """The request bodies the provider's upstream received."""
        if provider == "openai":
            return self.openai.requests
        if provider == "anthropic":
            return self.anthropic.requests
        return self.gemini.requests

    def problems(self, provider: str) -> list[list[str]]:
        """Each received request's departures from the provider's published shape."""
        if provider == "gemini":
            return [s.problems for s in self.gemini.seen]
        return [shape_problems(provider, body) for body in self.received(provider)]


# -- what a client sees ------------------------------------------------------------------------

@dataclass
class Outcome:
    """A reply as a client of any door reads it. `finish` in OpenAI's words (stop, tool_calls, ...);
    `prompt_tokens` is every prompt token (OpenAI's meaning), `cached_tokens` the part read from a cache."""

    status: int = 200
    error: str | None = None
    text: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    reasoning: str = ""
    signature: str | None = None
    finish: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None


def error_message(body: object) -> str | None:
    """The message of an error body: OpenAI's `error` object (as the SDK keeps it) or Anthropic's whole body."""
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict):
            return str(inner.get("message"))
        if "message" in body:
            return str(body["message"])
    return None if body is None else str(body)


def arrived(provider: str, body: dict[str, Any]) -> frozenset[str]:
    """What of the matrix's features an upstream request carries, in the provider's own shape:
    "image data" and "image url" (the matrix's image), "tools" (get_weather declared with its schema),
    "tool call" (the assistant's call_1 to get_weather with Paris), "tool result" (its output
    bound to that call), "thinking" (reasoning asked for at the low effort: 1024 tokens)."""
    found: set[str] = set()
    text = orjson.dumps(body).decode()
    if provider == "openai":
        if PIXEL in text and '"image_url":{"url":"data:image/png;base64,' in text:
            found.add("image data")
        if f'"image_url":{{"url":"{IMAGE_URL}"' in text:
            found.add("image url")
        functions = [{k: v for k, v in t["function"].items() if k != "strict"} for t in body.get("tools", ())]
        if functions == [OPENAI_TOOL["function"]]:
            found.add("tools")
        for m in body["messages"]:
            if m.get("tool_calls") == [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city":"Paris"}'}}]:
                found.add("tool call")
            if m.get("role") == "tool" and m.get("tool_call_id") == "call_1" and m.get("content") == "18C and sunny":
                found.add("tool result")
        if body.get("reasoning_effort") == "low":
            found.add("thinking")
    elif provider == "anthropic":
        blocks = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]]
        if {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}} in blocks:
            found.add("image data")
        if {"type": "image", "source": {"type": "url", "url": IMAGE_URL}} in blocks:
            found.add("image url")
        if body.get("tools") == [{"name": "get_weather", "description": "The weather in a city",
                                  "input_schema": WEATHER_SCHEMA}]:
            found.add("tools")
        if {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}} in blocks:
            found.add("tool call")
        if {"type": "tool_result", "tool_use_id": "call_1", "content": "18C and sunny"} in blocks:
            found.add("tool result")
        if body.get("thinking") == {"type": "enabled", "budget_tokens": 1024}:
            found.add("thinking")
    else:
        parts = [p for c in body["contents"] for p in c["parts"]]
        if {"inlineData": {"mimeType": "image/png", "data": PIXEL}} in parts:
            found.add("image data")
        declared = {"name": "get_weather", "description": "The weather in a city",
                    "parametersJsonSchema": WEATHER_SCHEMA}
        if body.get("tools") == [{"functionDeclarations": [declared]}]:
            found.add("tools")
        if {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                "thoughtSignature": "skip_thought_signature_validator"} in parts:
            found.add("tool call")
        if {"functionResponse": {"name": "get_weather", "response": {"output": "18C and sunny"}}} in parts:
            found.add("tool result")
        if body.get("generationConfig", {}).get("thinkingConfig") == {"thinkingBudget": 1024, "includeThoughts": True}:
            found.add("thinking")
    return frozenset(found)


# the same request in each door's shape, per feature
def image_url(feature: str) -> str:
    return IMAGE_URL if feature == "image by URL" else DATA_URL


def chat_messages(feature: str) -> list[dict[str, Any]]:
    if feature.startswith("image"):
        return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": image_url(feature)}}]}]
    if feature == "tools":
        return [{"role": "user", "content": "Weather in Paris, then Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"}]
    return [{"role": "user", "content": "Say hello"}]


OPENAI_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                "parameters": WEATHER_SCHEMA}}


async def via_chat_completions(client: TestClient, key: str, model: str, feature: str) -> Outcome:
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0)
    out = Outcome()
    kwargs: dict[str, Any] = {}
    if feature == "tools":
        kwargs["tools"] = [OPENAI_TOOL]
    if feature == "reasoning":
        kwargs["reasoning_effort"] = "low"
    calls: dict[int, list[str]] = {}
    try:
        stream = await api.chat.completions.create(model=model, messages=chat_messages(feature),  # type: ignore[arg-type]
                                                   stream=True, stream_options={"include_usage": True}, **kwargs)
        async for chunk in stream:
            for choice in chunk.choices:
                delta = choice.delta
                out.text += delta.content or ""
                extra = delta.model_extra or {}
                out.reasoning += extra.get("reasoning_content") or extra.get("reasoning") or ""
                for call in delta.tool_calls or ():
                    got = calls.setdefault(call.index, ["", ""])
                    if call.function is not None:
                        got[0] += call.function.name or ""
                        got[1] += call.function.arguments or ""
                if choice.finish_reason:
                    out.finish = choice.finish_reason
            if chunk.usage is not None:
                out.prompt_tokens = chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                out.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
    except openai.APIStatusError as e:
        out.status, out.error = e.status_code, error_message(e.body)
    except openai.APIError as e:
        out.status, out.error = 0, e.message
    finally:
        await api.close()
    out.calls = [(name, json.loads(args)) for name, args in calls.values()]
    return out


def responses_input(feature: str) -> list[dict[str, Any]]:
    if feature.startswith("image"):
        return [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                             {"type": "input_image", "image_url": image_url(feature),
                                              "detail": "auto"}]}]
    if feature == "tools":
        return [{"role": "user", "content": "Weather in Paris, then Rome?"},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "18C and sunny"}]
    return [{"role": "user", "content": "Say hello"}]


async def via_responses(client: TestClient, key: str, model: str, feature: str, store: bool = True) -> Outcome:
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0)
    out = Outcome()
    kwargs: dict[str, Any] = {} if store else {"store": False}
    if feature == "tools":
        kwargs["tools"] = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
                            "parameters": WEATHER_SCHEMA, "strict": False}]
    if feature == "reasoning":
        kwargs["reasoning"] = {"effort": "low"}
    try:
        stream = await api.responses.create(model=model, input=responses_input(feature),  # type: ignore[arg-type]
                                            stream=True, **kwargs)
        async for ev in stream:
            if ev.type == "response.output_text.delta":
                out.text += ev.delta
            elif ev.type in ("response.completed", "response.incomplete", "response.failed"):
                done = ev.response
                for item in done.output:  # the reply's items, as the client keeps them
                    if item.type == "function_call":
                        out.calls.append((item.name, json.loads(item.arguments)))
                    elif item.type == "reasoning":
                        out.reasoning += "".join(c.text for c in item.content or ())
                if done.error is not None:
                    out.status, out.error = 0, done.error.message
                out.finish = ("tool_calls" if any(i.type == "function_call" for i in done.output)
                              else "stop" if done.status == "completed" else done.status)
                if done.usage is not None:
                    out.prompt_tokens = done.usage.input_tokens
                    out.cached_tokens = done.usage.input_tokens_details.cached_tokens or 0
            elif ev.type == "error":
                out.status, out.error = 0, ev.message
    except openai.APIStatusError as e:
        out.status, out.error = e.status_code, error_message(e.body)
    except openai.APIError as e:
        out.status, out.error = 0, e.message
    finally:
        await api.close()
    return out


def anthropic_messages(feature: str) -> list[dict[str, Any]]:
    if feature.startswith("image"):
        source = ({"type": "url", "url": IMAGE_URL} if feature == "image by URL"
                  else {"type": "base64", "media_type": "image/png", "data": PIXEL})
        return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image", "source": source}]}]
    if feature == "tools":
        return [{"role": "user", "content": "Weather in Paris, then Rome?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                                   "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                              "content": "18C and sunny"}]}]
    return [{"role": "user", "content": "Say hello"}]


STOP_REASONS = {"end_turn": "stop", "tool_use": "tool_calls", "max_tokens": "length", "stop_sequence": "stop"}


async def via_messages(client: TestClient, key: str, model: str, feature: str) -> Outcome:
    api = anthropic.AsyncAnthropic(base_url=str(client.make_url("")).rstrip("/"), api_key=key, max_retries=0)
    out = Outcome()
    kwargs: dict[str, Any] = {}
    if feature == "tools":
        kwargs["tools"] = [{"name": "get_weather", "description": "The weather in a city",
                            "input_schema": WEATHER_SCHEMA}]
    if feature == "reasoning":
        kwargs["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    try:
        async with api.messages.stream(model=model, max_tokens=2048, messages=anthropic_messages(feature),  # type: ignore[arg-type]
                                       **kwargs) as stream:
            message = await stream.get_final_message()
        for block in message.content:
            if block.type == "text":
                out.text += block.text
            elif block.type == "tool_use":
                out.calls.append((block.name, dict(block.input)))  # type: ignore[call-overload]
            elif block.type == "thinking":
                out.reasoning += block.thinking
                out.signature = block.signature or None
        out.finish = STOP_REASONS.get(message.stop_reason or "", message.stop_reason)
        used = message.usage
        out.cached_tokens = used.cache_read_input_tokens or 0
        out.prompt_tokens = used.input_tokens + (used.cache_read_input_tokens or 0) + (
            used.cache_creation_input_tokens or 0)
    except anthropic.APIStatusError as e:
        out.status, out.error = e.status_code, error_message(e.body)
    except anthropic.APIError as e:
        out.status, out.error = 0, e.message
    finally:
        await api.close()
    return out


async def via_native_chat(client: TestClient, key: str, model: str, feature: str) -> Outcome:
    body: dict[str, Any] = {"model": model, "stream": True, "content": "Say hello"}
    if feature.startswith("image"):
        body["content"] = [{"type": "text", "text": "What is this?"},
                           {"type": "image_url", "image_url": {"url": image_url(feature)}}]
    elif feature == "tools":  # the native door's body has no tools: what it does with them is the cell
        body.update(content="Weather in Paris, then Rome?", tools=[OPENAI_TOOL])
    resp = await client.post("/api/chat", json=body, headers={"Authorization": f"Bearer {key}"})
    out = Outcome(status=resp.status)
    if resp.status != 200:
        out.error = (await resp.json()).get("error", {}).get("message")
        return out
    for ev in parse_sse(await resp.read()):
        if ev.data == "[DONE]":
            continue
        data = orjson.loads(ev.data)
        if ev.event == "message":
            out.text += data.get("delta", "")
        elif ev.event == "reasoning":
            out.reasoning += data.get("delta", "")
        elif ev.event == "usage":
            out.prompt_tokens = data["prompt_tokens"]
            out.cached_tokens = data.get("cached_tokens", 0)
        elif ev.event == "done":
            out.finish = data["finish_reason"]
        elif ev.event == "error":
            out.status, out.error = 0, data.get("message") or data.get("error")
    return out


async def via_stateless_responses(client: TestClient, key: str, model: str, feature: str) -> Outcome:
    return await via_responses(client, key, model, feature, store=False)


DRIVERS = {"chat.completions": via_chat_completions, "responses": via_responses,
           "responses, store: false": via_stateless_responses, "messages": via_messages, "api/chat": via_native_chat}


@pytest.fixture
async def upstreams(aiohttp_server: Any) -> Upstreams:
    """The three local upstreams, serving (a fixture: tests request it by name)."""
    made = Upstreams(FakeUpstream(), FakeMessages(), FakeGemini())
    for fake in (made.openai, made.anthropic, made.gemini):
        fake.server = await aiohttp_server(fake.app)
    return made
