"""/v1/responses to an Anthropic upstream: function tools, parallel calls as function_call items,
reasoning as reasoning items, cache usage as OpenAI's published `ResponseUsage` names it; `user` only
when given; malformed turns and what the upstream cannot take answered 400 with nothing written."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.responses import Response

from gateway.state import USAGE
from tests.support.fakes import parse_sse
from tests.support.providers import anthropic_tool_stream

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "name": "weather", "description": "Current weather", "parameters": WEATHER}]
# components.schemas.ResponseUsage of openai/openai-openapi (openapi.yaml): its required fields
USAGE_REQUIRED = {"input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details", "total_tokens"}
INPUT_DETAILS_REQUIRED = {"cached_tokens", "cache_write_tokens"}
OUTPUT_DETAILS_REQUIRED = {"reasoning_tokens"}


@pytest.fixture
async def claude(make_client, config_file, anthropic):
    _, server = anthropic
    return await make_client(GATEWAY_CONFIG=config_file(f"""
[providers.claude]
kind = "anthropic"
base_url = "{server.make_url('/v1')}"
[models.claude]
provider = "claude"
upstream = "claude-up"
"""))


def check_usage(usage: dict[str, Any]) -> None:
    assert set(usage) >= USAGE_REQUIRED
    assert set(usage["input_tokens_details"]) >= INPUT_DETAILS_REQUIRED
    assert set(usage["output_tokens_details"]) >= OUTPUT_DETAILS_REQUIRED
    assert all(type(v) is int for v in (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"],
                                        *usage["input_tokens_details"].values(),
                                        *usage["output_tokens_details"].values()))


async def test_tools_reasoning_and_cache_usage_through_anthropic(claude, anthropic, user, db):
    fake, _ = anthropic
    fake.body = anthropic_tool_stream()
    resp = await claude.post("/v1/responses", headers=user.headers, json={
        "model": "claude", "store": False, "tools": TOOLS, "tool_choice": "required",
        "input": "Weather in Paris and Rome?", "reasoning": {"effort": "high"}})
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    Response.model_validate(answer)
    assert "user" not in answer
    check_usage(answer["usage"])
    assert answer["usage"] == {"input_tokens": 170, "input_tokens_details": {"cached_tokens": 100,
                                                                           "cache_write_tokens": 50},
                               "output_tokens": 40, "output_tokens_details": {"reasoning_tokens": 0},
                               "total_tokens": 210}
    hexid = answer["id"][len("resp_"):]
    assert [{k: v for k, v in item.items() if k != "id"} for item in answer["output"]] == [
        {"type": "message", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Checking again.", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "status": "completed", "call_id": "toolu_1", "name": "weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "status": "completed", "call_id": "toolu_2", "name": "weather",
         "arguments": '{"city": "Rome"}'},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Rome is south."}],
         "encrypted_content": "EqQBsig", "status": "completed"}]
    assert answer["output"][3]["id"] == f"rs_{hexid}_0"
    sent = fake.requests[0]
    assert (sent["tools"], sent["tool_choice"], sent["thinking"]) == (
        [{"name": "weather", "description": "Current weather", "input_schema": WEATHER}], {"type": "any"},
        {"type": "enabled", "budget_tokens": 16384})
    await claude.app[USAGE].flush()
    assert [tuple(r) for r in await db.fetch("SELECT prompt_tokens, cached_tokens, cache_write_tokens FROM usage "
                                             "WHERE user_id = $1", user.id)] == [(170, 100, 50)]


async def test_streamed_response_carries_the_reasoning_item_and_a_user_when_given(openai_sdk, claude, anthropic, user):
    fake, _ = anthropic
    fake.body = anthropic_tool_stream()
    stream = await openai_sdk(claude, user.key).responses.create(model="claude", store=False, tools=TOOLS, stream=True,
                                                          input="Weather?", user="u-7")
    events = [e async for e in stream]
    done = [e.item.type for e in events if e.type == "response.output_item.done"]
    assert done == ["message", "function_call", "function_call", "reasoning"]
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.user == "u-7"
    assert final.response.usage.input_tokens_details.cached_tokens == 100
    assert fake.requests[0]["metadata"] == {"user_id": "u-7"}


async def test_a_created_event_omits_user_when_not_given(claude, anthropic, user):
    fake, _ = anthropic
    fake.body = anthropic_tool_stream()
    resp = await claude.post("/v1/responses", headers=user.headers, json={
        "model": "claude", "store": False, "stream": True, "input": "Weather?", "tools": TOOLS})
    events = [orjson.loads(e.data) for e in parse_sse(await resp.read())]
    assert all("user" not in e["response"] for e in events if "response" in e)
    check_usage(events[-1]["response"]["usage"])


@pytest.mark.parametrize("body, param", [
    ({"model": "claude", "store": False, "input": [
        {"type": "function_call_output", "call_id": "call_nope", "output": "1"},
        {"role": "user", "content": "and?"}]}, "input[0].tool_call_id"),
    ({"model": "claude", "store": False, "input": "x",
      "tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}, "tools[0].function.parameters"),
    ({"model": "claude", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/bmp;base64,AAAA"}]}]}, "images of type image/bmp"),
    ({"model": "claude", "input": "x", "temperature": "hot"}, "temperature"),
    ({"model": "claude", "input": "x", "reasoning": "high"}, "reasoning"),
    ({"model": "claude", "input": "x", "user": 7}, "user"),
])
async def test_bad_turns_are_400_and_write_nothing(claude, anthropic, user, db, body, param):
    resp = await claude.post("/v1/responses", headers=user.headers, json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert param in (error["param"] or "") or param in error["message"], error
    await claude.app[USAGE].flush()
    for table in ("usage", "messages", "threads"):
        assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE user_id = $1", user.id) == 0
    assert anthropic[0].requests == []
