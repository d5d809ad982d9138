"""The Anthropic Messages adapter against a real local server speaking the exact stream format."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.config import Settings
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import (
    ChatRequest,
    Finish,
    TextDelta,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamStreamError,
    UsageReport,
)
from tests.support.fakes import parse_sse
from tests.support.providers import anthropic_stream, event


async def run(fake_server: Any, config_file: Any, request: ChatRequest) -> list[Any]:
    path = config_file(f"""
[providers.claude]
kind = "anthropic"
base_url = "{fake_server.make_url('/v1')}"
api_key = "sk-ant-test"
[models.claude]
provider = "claude"
upstream = "claude-x"
""")
    settings = Settings.from_env({"GATEWAY_CONFIG": path})
    async with aiohttp.ClientSession() as session:
        provider = AnthropicProvider(settings.providers["claude"], session)
        return [e async for batch in provider.stream(settings.models["claude"], request) for e in batch]


async def test_anthropic_stream_normalised_with_cumulative_usage(anthropic, config_file):
    fake, server = anthropic
    events = await run(server, config_file, ChatRequest([{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Hi"}], max_tokens=50))
    assert events == [TextDelta("Hello"), TextDelta(" world"), Finish("stop"), UsageReport(25, 15)]
    body = fake.requests[0]
    assert body == {"model": "claude-x", "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}],
                    "stream": True, "system": "Be brief."}
    assert fake.headers[0]["x-api-key"] == "sk-ant-test"
    assert fake.headers[0]["anthropic-version"] == "2023-06-01"


async def test_anthropic_max_tokens_always_sent(anthropic, config_file):
    fake, server = anthropic
    await run(server, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))
    assert fake.requests[0]["max_tokens"] == 4096
    assert "system" not in fake.requests[0]


async def test_anthropic_events_split_at_every_byte(anthropic, config_file):
    fake, server = anthropic
    fake.piece = 1
    events = await run(server, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))
    assert events == [TextDelta("Hello"), TextDelta(" world"), Finish("stop"), UsageReport(25, 15)]


async def test_anthropic_stream_without_message_stop_is_a_failure(anthropic, config_file):
    fake, server = anthropic
    fake.body = anthropic_stream(["Hel"], stop=False)
    with pytest.raises(UpstreamProtocolError):
        await run(server, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))


async def test_anthropic_error_event_mid_stream(anthropic, config_file):
    fake, server = anthropic
    fake.body = anthropic_stream(["Hel"], stop=False).split(b"event: some_future_event")[0] + event(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    with pytest.raises(UpstreamStreamError, match="overloaded_error"):
        await run(server, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))


async def test_anthropic_http_529_is_retryable_http_error(anthropic, config_file):
    fake, server = anthropic
    fake.status = 529
    with pytest.raises(UpstreamHTTPError) as info:
        await run(server, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))
    assert info.value.status == 529 and info.value.retryable


async def test_chat_through_anthropic_model_is_saved(anthropic, config_file, make_client, user, db):
    _fake, server = anthropic
    path = config_file(f"""
[providers.claude]
kind = "anthropic"
base_url = "{server.make_url('/v1')}"
api_key = "k"
[models.claude]
provider = "claude"
upstream = "claude-x"
""")
    client = await make_client(GATEWAY_CONFIG=path)
    resp = await client.post("/api/chat", json={"content": "Hi", "model": "claude", "stream": True},
                             headers=user.headers)
    events = parse_sse(await resp.read())
    meta = orjson.loads(events[0].data)
    assert (meta["model"], meta["provider"]) == ("claude", "claude")
    row = await db.fetchrow("SELECT status, content, prompt_tokens, completion_tokens FROM messages "
                            "WHERE id = $1::uuid", meta["message_id"])
    assert dict(row) == {"status": "complete", "content": "Hello world", "prompt_tokens": 25, "completion_tokens": 15}


async def test_anthropic_counts_out_of_range_are_clamped_and_flagged(anthropic, config_file):
    fake, server = anthropic
    fake.body = anthropic_stream(["Hi"], input_tokens=-4, output_tokens=2**40)
    events = await run(server, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))
    assert events == [TextDelta("Hi"), Finish("stop"), UsageReport(0, 2**31 - 1, True)]


async def test_anthropic_text_with_nul_is_replaced(anthropic, config_file):
    fake, server = anthropic
    fake.body = anthropic_stream(["a\u0000b"])
    events = await run(server, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))
    assert events == [TextDelta("a\ufffdb"), Finish("stop"), UsageReport(25, 15)]


@pytest.mark.parametrize(("bad", "message"), [
    ({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 7}},
     "`delta.text` that is not a string (int)"),
    ({"type": "content_block_delta", "index": 0, "delta": ["x"]}, "`delta` that is not a JSON object (list)"),
    ({"type": "message_delta", "delta": {"stop_reason": ["end_turn"]}}, "`stop_reason` that is not a string (list)"),
    ({"type": "message_delta", "delta": {}, "usage": 5}, "`usage` that is not a JSON object (int)"),
])
async def test_anthropic_event_that_breaks_the_format_is_a_protocol_error(bad, message, anthropic, config_file):
    fake, server = anthropic
    fake.body = anthropic_stream(["Hel"]).replace(b"event: some_future_event", event(bad["type"], bad)
                                                  + b"event: some_future_event")
    with pytest.raises(UpstreamProtocolError) as info:
        await run(server, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))
    assert info.value.message == "upstream sent " + message
