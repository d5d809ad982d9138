"""Provider configs and registries over local fake upstreams (OpenAI-compatible and Anthropic)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.config import Settings
from gateway.providers.base import (
    ProviderError,
    StreamEvent,
)
from gateway.providers.chain import Chain
from gateway.providers.registry import ModelRegistry
from tests.support.fakes import FakeUpstream, split_every

ERROR_BODY = b'{"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}'


PROMPT = [{"role": "user", "content": "Say hello"}]


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openai_provider_toml(name: str, base_url: str, key: str | None = None) -> str:
    key_line = f'api_key = "{key}"\n' if key else ""
    return f'[providers.{name}]\nkind = "openai"\nbase_url = "{base_url}"\n{key_line}\n'


def model_toml(name: str, provider: str, upstream: str, fallbacks: tuple[str, ...] = (), **timeouts: float) -> str:
    lines = [f"[models.{name}]", f'provider = "{provider}"', f'upstream = "{upstream}"']
    if fallbacks:
        lines.append("fallbacks = [" + ", ".join(f'"{f}"' for f in fallbacks) + "]")
    lines += [f"{k} = {v}" for k, v in timeouts.items()]
    return "\n".join(lines) + "\n\n"


def chain_toml(primary_url: str, backup_url: str | None, **primary_timeouts: float) -> str:
    """primary (provider a) falls back to backup (provider b), or to the built-in demo model."""
    text = openai_provider_toml("a", primary_url, "sk-a")
    if backup_url is None:
        return text + model_toml("primary", "a", "up-primary", ("demo",), **primary_timeouts)
    return (text + openai_provider_toml("b", backup_url, "sk-b")
            + model_toml("primary", "a", "up-primary", ("backup",), **primary_timeouts)
            + model_toml("backup", "b", "up-backup"))


async def collect(stream: AsyncIterator[list[StreamEvent]]) -> tuple[list[StreamEvent], ProviderError | None]:
    """Every event a stream yields (its batches flattened, none empty), and the ProviderError it
    ended with (None for a clean end)."""
    events: list[StreamEvent] = []
    try:
        async for batch in stream:
            assert batch, "a stream never yields an empty batch"
            events.extend(batch)
    except ProviderError as e:
        return events, e
    return events, None


def trail(chain: Chain) -> list[tuple[str, str]]:
    return [(a.model, a.outcome) for a in chain.attempts]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def registry(http: aiohttp.ClientSession, config_file: Callable[[str], str]) -> Callable[..., ModelRegistry]:
    """A ModelRegistry from TOML text (and env overrides), on a real client session."""

    def make(toml: str = "", **env: str) -> ModelRegistry:
        env = {"DEMO_DELAY_MS": "0", **env}
        if toml:
            env["GATEWAY_CONFIG"] = config_file(toml)
        return ModelRegistry(Settings.from_env(env), http)

    return make


@pytest.fixture
async def upstream_b(aiohttp_server: Any) -> FakeUpstream:
    """A second fake upstream, for the fallback link."""
    fake = FakeUpstream()
    fake.server = await aiohttp_server(fake.app)
    return fake


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


# status, body: every one of them is the upstream's (or this model's) problem, not the request's
FALLS_BACK = {
    "401_expired_key": (401, error_body("Invalid API Key", code="invalid_api_key")),
    "403_forbidden": (403, error_body("Project does not have access", type_="permission_error")),
    "404_retired_model": (404, error_body("The model `up-primary` does not exist", code="model_not_found")),
    "404_without_body": (404, b"not found"),
    "410_gone": (410, b""),
    "429_rate_limited": (429, error_body("Rate limit reached", type_="requests", code="rate_limit_exceeded")),
    "500": (500, ERROR_BODY),
    "502": (502, b"<html>bad gateway</html>"),
    "503": (503, ERROR_BODY),
    "400_decommissioned_model": (400, error_body("The model `up-primary` has been decommissioned",
                                                 code="model_decommissioned")),
    "400_context_length": (400, error_body("This model's maximum context length is 8192 tokens",
                                           code="context_length_exceeded")),
    "400_unsupported_parameter": (400, error_body("Unsupported parameter: 'tools' is not supported with this model.",
                                                  param="tools", code="unsupported_parameter")),
    "422_unknown_field": (422, error_body("Unrecognized request argument supplied: stream_options")),
}


TWO_WEIGHTED = """
[providers.local]
kind = "demo"

[models.heavy]
provider = "local"
weight = 3

[models.light]
provider = "local"
weight = 1

[models.off]
provider = "local"
enabled = false

[models.never]
provider = "local"
weight = 0
"""


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def anthropic_stream(texts: list[str], input_tokens: int = 25, output_tokens: int = 15,
                     stop: bool = True) -> bytes:
    out = [event("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-x",
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}),
        event("ping", {"type": "ping"})]
    for text in texts:
        out.append(event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "text_delta", "text": text}}))
    out.append(event("some_future_event", {"type": "some_future_event", "x": 1}))  # must be tolerated
    out.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                          "stop_sequence": None},
                                       "usage": {"output_tokens": output_tokens - 5}}))
    # cumulative: a second message_delta replaces the count, it does not add to it
    out.append(event("message_delta", {"type": "message_delta", "delta": {},
                                       "usage": {"output_tokens": output_tokens}}))
    if stop:
        out.append(event("message_stop", {"type": "message_stop"}))
    return b"".join(out)


def anthropic_tool_stream() -> bytes:
    """Thinking with its signature, text, then two parallel tool_use blocks whose input arrives in
    pieces; stop_reason tool_use; usage with cache reads and writes."""
    return b"".join([
        event("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "up-model",
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50,
                      "output_tokens": 1}}}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "thinking_delta", "thinking": "Rome is south."}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "signature_delta", "signature": "EqQBsig"}}),
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("content_block_start", {"type": "content_block_start", "index": 1,
                                      "content_block": {"type": "text", "text": ""}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                      "delta": {"type": "text_delta", "text": "Checking again."}}),
        event("content_block_stop", {"type": "content_block_stop", "index": 1}),
        event("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 2,
                                      "delta": {"type": "input_json_delta", "partial_json": ""}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 2,
                                      "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 2,
                                      "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}}),
        event("content_block_stop", {"type": "content_block_stop", "index": 2}),
        event("content_block_start", {"type": "content_block_start", "index": 3, "content_block": {
            "type": "tool_use", "id": "toolu_2", "name": "weather", "input": {}}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 3,
                                      "delta": {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'}}),
        event("content_block_stop", {"type": "content_block_stop", "index": 3}),
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                "usage": {"output_tokens": 40}}),
        event("message_stop", {"type": "message_stop"}),
    ])


class FakeAnthropic:
    def __init__(self) -> None:
        self.body = anthropic_stream(["Hello", " world"])
        self.piece = 0  # 0: one write; n: n-byte writes
        self.status = 200
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/messages", self.messages)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        if self.status != 200:
            return web.json_response({"type": "error", "error": {"type": "overloaded_error",
                                                                 "message": "Overloaded"}}, status=self.status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in (split_every(self.body, self.piece) if self.piece else [self.body]):
            await resp.write(piece)
        await resp.write_eof()
        return resp


@pytest.fixture
async def anthropic(aiohttp_server: Any) -> tuple[FakeAnthropic, Any]:
    fake = FakeAnthropic()
    server = await aiohttp_server(fake.app)
    return fake, server
