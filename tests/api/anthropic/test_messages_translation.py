"""/v1/messages to an Anthropic upstream and an OpenAI-compatible one: tools, tool_use / tool_result,
thinking with its signature, images, cache_control and cache usage, each answer parsed strictly with
the official `anthropic` SDK's types; malformed turns and what an upstream cannot take answered 400
in Anthropic's shape with nothing written."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import anthropic
import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from gateway.state import USAGE
from tests.support.fakes import Reply, openai_chunk, parse_sse
from tests.support.providers import anthropic_stream, anthropic_tool_stream, event

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
STREAM_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


@pytest.fixture
async def both(make_client, config_file, anthropic, upstream):
    _, server = anthropic
    return await make_client(GATEWAY_CONFIG=config_file(f"""
[providers.claude]
kind = "anthropic"
base_url = "{server.make_url('/v1')}"
api_key = "sk-ant-up"
[providers.oa]
kind = "openai"
base_url = "{upstream.base_url}"
api_key = "sk-oa-up"
[models.claude]
provider = "claude"
upstream = "claude-up"
input_price_per_mtok = 3.0
cached_input_price_per_mtok = 0.3
cache_write_price_per_mtok = 3.75
output_price_per_mtok = 15.0
[models.gpt]
provider = "oa"
upstream = "gpt-up"
"""))


@pytest.fixture
async def sdk():
    made: list[anthropic.AsyncAnthropic] = []

    def make(client: Any, key: str) -> anthropic.AsyncAnthropic:
        made.append(anthropic.AsyncAnthropic(base_url=str(client.make_url("")).rstrip("/"), api_key=key,
                                             max_retries=0))
        return made[-1]

    yield make
    for api in made:
        await api.close()


async def usage_rows(client: Any, db: Any, user_id: uuid.UUID) -> list[dict[str, Any]]:
    await client.app[USAGE].flush()
    rows = await db.fetch("SELECT model, prompt_tokens, input_tokens, cached_tokens, cache_write_tokens, "
                          "completion_tokens, cost_usd FROM usage WHERE user_id = $1 ORDER BY created_at", user_id)
    return [dict(r) for r in rows]


CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"},
                                 {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                                  "cache_control": {"type": "ephemeral"}}]},
    {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Two cities.", "signature": "sig-prev"},
        {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_b", "name": "weather", "input": {"city": "Rome"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_a", "content": "18C"},
                                 {"type": "tool_result", "tool_use_id": "toolu_b", "content": "24C"},
                                 {"type": "text", "text": "And now?"}]},
]
SYSTEM = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
TOOLS = [{"name": "weather", "description": "Current weather", "input_schema": WEATHER,
          "cache_control": {"type": "ephemeral"}}]


async def test_anthropic_upstream_gets_the_turn_as_sent_and_the_stream_parses_strictly(
        both, anthropic, user, db):
    fake, _ = anthropic
    fake.body = anthropic_tool_stream()
    body = {"model": "claude", "max_tokens": 2048, "stream": True, "system": SYSTEM, "tools": TOOLS,
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True}, "messages": CONVERSATION,
            "thinking": {"type": "enabled", "budget_tokens": 1024}}
    resp = await both.post("/v1/messages", json=body, headers={"x-api-key": user.key})
    assert resp.status == 200
    events = [orjson.loads(e.data) for e in parse_sse(await resp.read())]
    for e in events:
        if e["type"] != "ping":  # Anthropic's keep-alive has no SDK type
            STREAM_EVENT.validate_python(e, strict=True)
    assert fake.requests == [{
        "model": "claude-up", "max_tokens": 2048, "stream": True, "system": SYSTEM,
        "messages": CONVERSATION,
        "tools": TOOLS, "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 1024}}]
    blocks = [(e["index"], e["content_block"]) for e in events if e["type"] == "content_block_start"]
    assert blocks == [(0, {"type": "thinking", "thinking": "", "signature": ""}), (1, {"type": "text", "text": ""}),
                      (2, {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}),
                      (3, {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {}})]
    deltas = [(e["index"], e["delta"]) for e in events if e["type"] == "content_block_delta"]
    assert deltas == [(0, {"type": "thinking_delta", "thinking": "Rome is south."}),
                      (0, {"type": "signature_delta", "signature": "EqQBsig"}),
                      (1, {"type": "text_delta", "text": "Checking again."}),
                      (2, {"type": "input_json_delta", "partial_json": '{"city": "Pa'}),
                      (2, {"type": "input_json_delta", "partial_json": 'ris"}'}),
                      (3, {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'})]
    end = next(e for e in events if e["type"] == "message_delta")
    assert end["delta"]["stop_reason"] == "tool_use"
    assert end["usage"] == {"input_tokens": 20, "output_tokens": 40, "cache_creation_input_tokens": 50,
                            "cache_read_input_tokens": 100}
    assert await usage_rows(both, db, user.id) == [{
        "model": "claude", "prompt_tokens": 170, "input_tokens": 20, "cached_tokens": 100, "cache_write_tokens": 50,
        "completion_tokens": 40, "cost_usd": Decimal("0.00087750")}]


async def test_whole_message_with_thinking_and_parallel_tool_use_parses_strictly(sdk, both, anthropic, user):
    fake, _ = anthropic
    fake.body = anthropic_tool_stream()
    resp = await both.post("/v1/messages", headers={"x-api-key": user.key}, json={
        "model": "claude", "max_tokens": 2048, "tools": TOOLS, "messages": [{"role": "user", "content": "Weather?"}]})
    answer = await resp.json()
    message = Message.model_validate(answer, strict=True)
    assert [b.model_dump(exclude_none=True) for b in message.content] == [
        {"type": "thinking", "thinking": "Rome is south.", "signature": "EqQBsig"},
        {"type": "text", "text": "Checking again."},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Rome"}}]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens,
            message.usage.cache_creation_input_tokens, message.usage.output_tokens) == (20, 100, 50, 40)
    # and through the SDK itself
    again = await sdk(both, user.key).messages.create(model="claude", max_tokens=2048, tools=TOOLS,
                                                       messages=[{"role": "user", "content": "Weather?"}])
    assert [b.type for b in again.content] == ["thinking", "text", "tool_use", "tool_use"]


async def test_reasoning_from_an_openai_upstream_is_a_thinking_block(sdk, both, upstream, user):
    upstream.queue(Reply([openai_chunk({"role": "assistant", "content": None, "reasoning_content": "Hm."}),
                          openai_chunk({"content": "Yes."}), openai_chunk({}, "stop"),
                          openai_chunk(usage={"prompt_tokens": 40, "completion_tokens": 6,  # type: ignore[dict-item]
                                              "prompt_tokens_details": {"cached_tokens": 32}}, choices=False),
                          b"data: [DONE]\n\n"]))
    async with sdk(both, user.key).messages.stream(
            model="gpt", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 4000},
            messages=[{"role": "user", "content": "Sure?"}]) as stream:
        final = await stream.get_final_message()
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        {"type": "thinking", "thinking": "Hm.", "signature": ""}, {"type": "text", "text": "Yes."}]
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.output_tokens) == (8, 32, 6)
    assert upstream.requests[0]["reasoning_effort"] == "medium"
    assert "thinking" not in upstream.requests[0]


async def test_tool_round_trip_through_an_openai_upstream_keeps_cache_breakpoints_off_its_wire(both, upstream, user):
    upstream.queue(Reply([openai_chunk({"content": "Rome."}), openai_chunk({}, "stop"), b"data: [DONE]\n\n"]))
    resp = await both.post("/v1/messages", headers={"x-api-key": user.key}, json={
        "model": "gpt", "max_tokens": 100, "system": SYSTEM, "tools": TOOLS, "messages": CONVERSATION})
    assert resp.status == 200, await resp.text()
    sent = upstream.requests[0]
    assert sent["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_b", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "24C"},
        {"role": "user", "content": "And now?"}]
    assert sent["tools"] == [{"type": "function", "function": {"name": "weather", "parameters": WEATHER,
                                                                "description": "Current weather"}}]


BAD = {
    "tool result for an unknown tool use": (
        {"model": "claude", "max_tokens": 10, "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]},
        "messages[0].tool_call_id"),
    "tool without an input_schema": (
        {"model": "claude", "max_tokens": 10, "tools": [{"name": "t"}], "messages": [{"role": "user", "content": "x"}]},
        "tools.0"),
    "tool whose schema is not an object schema": (
        {"model": "claude", "max_tokens": 10, "tools": [{"name": "t", "input_schema": {"type": "array"}}],
         "messages": [{"role": "user", "content": "x"}]},
        "tools[0].function.parameters"),
    "image the upstream cannot take": (
        {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": PNG}}]}]},
        "model 'claude' cannot take images of type image/bmp"),
    "thinking budget below the least": (
        {"model": "claude", "max_tokens": 10, "thinking": {"type": "enabled", "budget_tokens": 10},
         "messages": [{"role": "user", "content": "x"}]},
        "thinking.budget_tokens"),
    "tool_use in a user message": (
        {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
        "messages.0.content.0"),
    "unknown block type": (
        {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "messages.0.content.0"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_bodies_are_400_in_anthropics_shape_and_write_nothing(both, anthropic, upstream, user, db, case):
    body, words = BAD[case]
    resp = await both.post("/v1/messages", json=body, headers={"x-api-key": user.key})
    assert resp.status == 400
    error = await resp.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert words in error["error"]["message"], error
    assert await usage_rows(both, db, user.id) == []
    assert anthropic[0].requests == [] and upstream.requests == []


async def test_a_text_only_turn_is_sent_and_answered_as_before(both, anthropic, user):
    fake, _ = anthropic
    fake.body = anthropic_stream(["Hi"], input_tokens=25, output_tokens=15)
    resp = await both.post("/v1/messages", headers={"x-api-key": user.key}, json={
        "model": "claude", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]})
    answer = await resp.json()
    Message.model_validate(answer, strict=True)
    assert answer["usage"] == {"input_tokens": 25, "output_tokens": 15}
    assert fake.requests[0] == {"model": "claude-up", "max_tokens": 100, "stream": True,
                                "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("system", [[{"text": "no type"}], [{"type": "image", "source": {"type": "url",
                                                                                         "url": "https://x/y.png"}}]])
async def test_system_blocks_must_be_text_blocks_naming_their_type(both, user, system):
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        resp = await both.post(path, headers={"x-api-key": user.key}, json={
            "model": "claude", "max_tokens": 10, "system": system, "messages": [{"role": "user", "content": "x"}]})
        assert resp.status == 400
        assert (await resp.json())["error"]["message"].startswith("system.0")


def redacted_stream() -> bytes:
    return b"".join([
        event("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-up",
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 1}}}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "redacted_thinking", "data": "EmwKAhgBEgy"}}),
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("content_block_start", {"type": "content_block_start", "index": 1,
                                      "content_block": {"type": "text", "text": ""}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                      "delta": {"type": "text_delta", "text": "Done."}}),
        event("content_block_stop", {"type": "content_block_stop", "index": 1}),
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": 3}}),
        event("message_stop", {"type": "message_stop"}),
    ])


async def test_redacted_thinking_and_tool_errors_pass_through_an_anthropic_upstream(both, anthropic, user):
    fake, _ = anthropic
    fake.body = redacted_stream()
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [
                    {"type": "redacted_thinking", "data": "EmwKprev"},
                    {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_a",
                                              "content": "no such city", "is_error": True}]}]
    resp = await both.post("/v1/messages", headers={"x-api-key": user.key}, json={
        "model": "claude", "max_tokens": 100, "tools": TOOLS, "messages": messages})
    answer = await resp.json()
    Message.model_validate(answer, strict=True)
    assert answer["content"] == [{"type": "redacted_thinking", "data": "EmwKAhgBEgy"},
                                 {"type": "text", "text": "Done."}]
    assert fake.requests[0]["messages"] == messages

    resp = await both.post("/v1/messages", headers={"x-api-key": user.key}, json={
        "model": "claude", "max_tokens": 100, "stream": True, "tools": TOOLS, "messages": messages})
    events = [orjson.loads(e.data) for e in parse_sse(await resp.read())]
    for e in events:
        if e["type"] != "ping":
            STREAM_EVENT.validate_python(e, strict=True)
    assert [e["content_block"] for e in events if e["type"] == "content_block_start"] == [
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy"}, {"type": "text", "text": ""}]


async def test_a_tool_error_mark_is_left_off_an_openai_upstreams_wire(both, upstream, user):
    upstream.queue(Reply([openai_chunk({"content": "Sorry."}), openai_chunk({}, "stop"), b"data: [DONE]\n\n"]))
    resp = await both.post("/v1/messages", headers={"x-api-key": user.key}, json={
        "model": "gpt", "max_tokens": 100, "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "boom",
                                          "is_error": True}]}]})
    assert resp.status == 200
    assert upstream.requests[0]["messages"][-1] == {"role": "tool", "tool_call_id": "t1", "content": "boom"}
