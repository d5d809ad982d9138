"""/v1/chat/completions to an Anthropic upstream and an OpenAI-compatible one, driven by the official
`openai` SDK: tools with a tool-result round trip, parallel calls streamed as tool_calls deltas,
reasoning, images, cache usage reported and priced exactly; what an upstream cannot express, and
malformed turns, answered 400 with nothing written."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest

from gateway.state import USAGE
from tests.support.fakes import Reply, openai_chunk
from tests.support.providers import anthropic_stream, anthropic_tool_stream

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Current weather", "parameters": WEATHER}}]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.fixture
async def both(make_client, config_file, anthropic, upstream):
    """A gateway with a priced Anthropic model (cache prices set), one without cache prices, and an
    OpenAI-compatible model."""
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
[models.claude-plain]
provider = "claude"
upstream = "claude-up"
input_price_per_mtok = 3.0
output_price_per_mtok = 15.0
[models.gpt]
provider = "oa"
upstream = "gpt-up"
"""))


async def usage_rows(client: Any, db: Any, user_id: uuid.UUID) -> list[dict[str, Any]]:
    await client.app[USAGE].flush()
    rows = await db.fetch("SELECT model, prompt_tokens, input_tokens, cached_tokens, cache_write_tokens, "
                          "completion_tokens, reasoning_tokens, estimated, cost_usd FROM usage WHERE user_id = $1 "
                          "ORDER BY created_at", user_id)
    return [dict(r) for r in rows]


async def test_streamed_tools_reasoning_and_cache_usage_from_anthropic(openai_sdk, both, anthropic, user, db):
    fake, _ = anthropic
    fake.body = anthropic_tool_stream()
    stream = await openai_sdk(both, user.key).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "Weather in Paris and Rome?"}], tools=TOOLS,
        tool_choice="auto", stream=True, stream_options={"include_usage": True}, max_tokens=300)
    deltas, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.model_dump(exclude_none=True))
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Rome is south."},
        {"content": "Checking again."},
        {"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "weather",
                                                                                     "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]},
        {"tool_calls": [{"index": 1, "id": "toolu_2", "type": "function", "function": {"name": "weather",
                                                                                     "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]},
        {}]
    assert finish == "tool_calls"
    assert usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 170, "completion_tokens": 40, "total_tokens": 210,
        "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 50}}
    assert fake.requests[0]["tools"] == [{"name": "weather", "description": "Current weather",
                                          "input_schema": WEATHER}]
    assert fake.requests[0]["tool_choice"] == {"type": "auto"}
    # priced by kind: 20 input at 3, 100 cached at 0.3, 50 written at 3.75, 40 output at 15 (per million)
    assert await usage_rows(both, db, user.id) == [{
        "model": "claude", "prompt_tokens": 170, "input_tokens": 20, "cached_tokens": 100, "cache_write_tokens": 50,
        "completion_tokens": 40, "reasoning_tokens": 0, "estimated": False, "cost_usd": Decimal("0.00087750")}]


async def test_whole_answer_merges_parallel_calls_and_a_cache_price_not_set_is_the_input_price(
        openai_sdk, both, anthropic, user, db):
    fake, _ = anthropic
    fake.body = anthropic_tool_stream()
    answer = await openai_sdk(both, user.key).chat.completions.create(
        model="claude-plain", messages=[{"role": "user", "content": "Weather in Paris and Rome?"}], tools=TOOLS)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("toolu_1", "weather", '{"city": "Paris"}'), ("toolu_2", "weather", '{"city": "Rome"}')]
    assert message.content == "Checking again."
    assert message.model_extra["reasoning_content"] == "Rome is south."
    assert answer.usage.prompt_tokens_details.cached_tokens == 100
    # 170 prompt tokens at 3 (no cache prices: the input price), 40 output at 15
    assert [r["cost_usd"] for r in await usage_rows(both, db, user.id)] == [Decimal("0.00111000")]


async def test_tool_result_round_trip_reaches_anthropic_as_blocks(openai_sdk, both, anthropic, user):
    fake, _ = anthropic
    fake.body = anthropic_stream(["Rome is warmer."])
    answer = await openai_sdk(both, user.key).chat.completions.create(model="claude", tools=TOOLS, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "24C"}])
    assert answer.choices[0].message.content == "Rome is warmer."
    assert fake.requests[0]["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Weather in Paris and Rome?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                                     {"type": "tool_result", "tool_use_id": "toolu_2", "content": "24C"}]}]


async def test_reasoning_and_usage_details_from_an_openai_compatible_upstream(openai_sdk, both, upstream, user, db):
    upstream.queue(Reply([
        openai_chunk({"role": "assistant", "content": "", "reasoning_content": "Hm."}),
        openai_chunk({"content": "Yes."}),
        openai_chunk({}, "stop"),
        openai_chunk(usage={"prompt_tokens": 50, "completion_tokens": 9,  # type: ignore[dict-item]
                            "prompt_tokens_details": {"cached_tokens": 32},
                            "completion_tokens_details": {"reasoning_tokens": 7}}, choices=False),
        b"data: [DONE]\n\n"]))
    answer = await openai_sdk(both, user.key).chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": "Sure?"}], response_format={"type": "json_object"},
        reasoning_effort="low")
    assert answer.choices[0].message.content == "Yes."
    assert answer.choices[0].message.model_extra["reasoning_content"] == "Hm."
    assert answer.usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59,
        "prompt_tokens_details": {"cached_tokens": 32, "cache_write_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 7}}
    assert (upstream.requests[0]["response_format"], upstream.requests[0]["reasoning_effort"]) == (
        {"type": "json_object"}, "low")
    rows = await usage_rows(both, db, user.id)
    assert [(r["prompt_tokens"], r["input_tokens"], r["cached_tokens"], r["reasoning_tokens"]) for r in rows] == [
        (50, 18, 32, 7)]


BAD = {
    "tool result for an unknown call": (
        {"model": "claude", "messages": [{"role": "user", "content": "x"},
                                         {"role": "tool", "tool_call_id": "call_nope", "content": "1"}]},
        "messages[1].tool_call_id", None),
    "malformed tool schema": (
        {"model": "claude", "messages": [{"role": "user", "content": "x"}],
         "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools[0].function.parameters", None),
    "tool without a name": (
        {"model": "gpt", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function",
                                                                                   "function": {}}]},
        "tools[0].function.name", None),
    "image the upstream cannot take": (
        {"model": "claude", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/bmp;base64,{PNG}"}}]}]},
        "images of type image/bmp", "model 'claude' cannot take images of type image/bmp"),
    "json output to anthropic": (
        {"model": "claude", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
        "response_format", "model 'claude' cannot take response_format"),
    "image URL that is neither http nor data": (
        {"model": "gpt", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
        "messages[0].content[0].image_url.url", None),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_turns_are_400_naming_the_field_and_write_nothing(both, anthropic, upstream, user, db, case):
    body, param, message = BAD[case]
    resp = await both.post("/v1/chat/completions", json=body, headers=user.headers)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    if message is not None:
        assert (error["message"], error["code"]) == (message, "unsupported_feature")
    assert await usage_rows(both, db, user.id) == []
    assert anthropic[0].requests == [] and upstream.requests == []
