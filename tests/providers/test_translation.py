"""The canonical turn rendered to each upstream's wire format and parsed back, against real local
upstreams that record what they received: tools, tool results, images, reasoning with its
signature, cache breakpoints and cache usage; and what an upstream cannot express, refused unsent."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.config import Settings
from gateway.providers import turn
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import (
    ChatRequest,
    Finish,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    Unsupported,
    UsageReport,
)
from gateway.providers.chain import Chain
from gateway.providers.openai import OpenAIProvider
from tests.support.fakes import FakeUpstream, Reply, openai_chunk
from tests.support.providers import anthropic_tool_stream, collect, trail

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

# a conversation using everything the canonical turn carries
FULL_TURN = [
    {"role": "system", "content": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome? See the map."},
                                 {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                                 {"type": "image_url", "image_url": {"url": "https://example.com/map.jpg"}}]},
    {"role": "assistant", "content": [{"type": "reasoning", "text": "Two cities: two calls.", "signature": "sig-1"},
                                      {"type": "text", "text": "Checking."}],
     "tool_calls": [{"id": "call_a", "type": "function",
                     "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
                    {"id": "call_b", "type": "function",
                     "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "24C"},
    {"role": "user", "content": "Which is warmer?"},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Current weather", "parameters": WEATHER},
          "cache_control": {"type": "ephemeral"}}]


def settings_for(config_file: Any, kind: str, url: str) -> Settings:
    path = config_file(f"""
[providers.up]
kind = "{kind}"
base_url = "{url}"
api_key = "sk-test-key"
[models.m]
provider = "up"
upstream = "up-model"
""")
    return Settings.from_env({"GATEWAY_CONFIG": path})


async def run_anthropic(server: Any, config_file: Any, request: ChatRequest) -> list[StreamEvent]:
    settings = settings_for(config_file, "anthropic", str(server.make_url("/v1")))
    async with aiohttp.ClientSession() as session:
        provider = AnthropicProvider(settings.providers["up"], session)
        try:
            return [e async for batch in provider.stream(settings.models["m"], request) for e in batch]
        finally:
            provider.close()


async def run_openai(upstream: FakeUpstream, config_file: Any, request: ChatRequest) -> list[StreamEvent]:
    settings = settings_for(config_file, "openai", upstream.base_url)
    async with aiohttp.ClientSession() as session:
        provider = OpenAIProvider(settings.providers["up"], session)
        try:
            return [e async for batch in provider.stream(settings.models["m"], request) for e in batch]
        finally:
            provider.close()


WEATHER_CALL = {"type": "function", "function": {"name": "weather", "arguments": ""}}
ANTHROPIC_TOOL_EVENTS = [
    ReasoningDelta("Rome is south."), ReasoningDelta("", "EqQBsig"), TextDelta("Checking again."),
    ToolCallDelta([{"index": 0, "id": "toolu_1", **WEATHER_CALL}]),
    ToolCallDelta([{"index": 0, "function": {"arguments": '{"city": "Pa'}}]),
    ToolCallDelta([{"index": 0, "function": {"arguments": 'ris"}'}}]),
    ToolCallDelta([{"index": 1, "id": "toolu_2", **WEATHER_CALL}]),
    ToolCallDelta([{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]),
    Finish("tool_calls"),
    UsageReport(170, 40, cached_tokens=100, cache_write_tokens=50),
]


async def test_anthropic_receives_the_whole_turn_rendered(anthropic, config_file):
    fake, server = anthropic
    request = ChatRequest([dict(m) for m in FULL_TURN], max_tokens=300,
                          extra={"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
                                 "user": "u-42"},
                          thinking={"type": "enabled", "budget_tokens": 1024})
    await run_anthropic(server, config_file, request)
    assert fake.requests == [{
        "model": "up-model", "max_tokens": 300, "stream": True,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris and Rome? See the map."},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/map.jpg"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Two cities: two calls.", "signature": "sig-1"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_a", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_b", "name": "weather", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_a", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_b", "content": "24C"},
                {"type": "text", "text": "Which is warmer?"}]}],
        "tools": [{"name": "weather", "description": "Current weather", "input_schema": WEATHER,
                   "cache_control": {"type": "ephemeral"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "u-42"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }]


async def test_anthropic_assistant_with_only_tool_calls_never_sends_null_content(anthropic, config_file):
    fake, server = anthropic
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_a", "content": [{"type": "text", "text": "18C"}]}]
    await run_anthropic(server, config_file, ChatRequest(messages, extra={
        "tools": [{"type": "function", "function": {"name": "weather"}}],
        "tool_choice": {"type": "function", "function": {"name": "weather"}}}))
    body = fake.requests[0]
    assert body["messages"] == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_a", "name": "weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_a",
                                      "content": [{"type": "text", "text": "18C"}]}]}]
    assert body["tools"] == [{"name": "weather", "input_schema": {"type": "object", "properties": {}}}]
    assert body["tool_choice"] == {"type": "tool", "name": "weather"}


@pytest.mark.parametrize("piece", [0, 1, 7])
async def test_anthropic_tool_use_thinking_and_cache_usage_parse_into_canonical_events(anthropic, config_file, piece):
    fake, server = anthropic
    fake.body, fake.piece = anthropic_tool_stream(), piece
    events = await run_anthropic(server, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))
    merged: list[StreamEvent] = []
    for e in events:  # byte-split reads batch differently: compare the same events, merged per kind
        if merged and type(e) is ReasoningDelta and type(merged[-1]) is ReasoningDelta and e.signature is None \
                and merged[-1].signature is None:
            merged[-1] = ReasoningDelta(merged[-1].text + e.text)
        else:
            merged.append(e)
    assert merged == ANTHROPIC_TOOL_EVENTS


async def test_anthropic_text_only_turn_is_sent_as_before(anthropic, config_file):
    fake, server = anthropic
    await run_anthropic(server, config_file, ChatRequest([{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Hello"},
                                                          {"role": "user", "content": "Bye"}], max_tokens=5))
    assert fake.requests[0] == {"model": "up-model", "max_tokens": 5, "stream": True, "system": "Be brief.",
                                "messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"},
                                             {"role": "user", "content": "Bye"}]}


@pytest.mark.parametrize(("extra", "content", "feature"), [
    ({"response_format": {"type": "json_object"}}, "Hi", "response_format"),
    ({"logprobs": True}, "Hi", "logprobs"),
    ({"seed": 7}, "Hi", "seed"),
    ({}, [{"type": "image_url", "image_url": {"url": f"data:image/bmp;base64,{PNG}"}}], "images of type image/bmp"),
])
async def test_what_anthropic_cannot_express_is_refused_unsent(anthropic, config_file, registry, extra, content,
                                                               feature):
    fake, server = anthropic
    models = registry(f"""
[providers.up]
kind = "anthropic"
base_url = "{server.make_url('/v1')}"
api_key = "sk-test-key"
[models.m]
provider = "up"
upstream = "up-model"
""")
    chain = Chain(models, models.chain("m"))
    events, error = await collect(chain.stream(ChatRequest([{"role": "user", "content": content}], extra=extra)))
    assert events == []
    assert isinstance(error, Unsupported)
    assert (error.message, error.status, error.feature) == (f"model 'm' cannot take {feature}", 400, feature)
    assert trail(chain) == [("m", "unsupported_feature")]
    assert fake.requests == []


async def test_an_unsupported_feature_falls_back_to_a_link_that_takes_it(anthropic, config_file, registry, upstream):
    fake, server = anthropic
    models = registry(f"""
[providers.up]
kind = "anthropic"
base_url = "{server.make_url('/v1')}"
[providers.oa]
kind = "openai"
base_url = "{upstream.base_url}"
[models.m]
provider = "up"
upstream = "up-model"
fallbacks = ["o"]
[models.o]
provider = "oa"
upstream = "o-model"
""")
    chain = Chain(models, models.chain("m"))
    events, error = await collect(chain.stream(ChatRequest([{"role": "user", "content": "Hi"}],
                                                           extra={"response_format": {"type": "json_object"}})))
    assert error is None
    assert [e for e in events if type(e) is TextDelta] == [TextDelta("Hel"), TextDelta("lo")]
    assert trail(chain) == [("m", "unsupported_feature"), ("o", "ok")]
    assert fake.requests == []
    assert upstream.requests[0]["response_format"] == {"type": "json_object"}


async def test_openai_upstream_gets_tools_and_format_unchanged_and_canonical_additions_rendered(upstream, config_file):
    request = ChatRequest([dict(m) for m in FULL_TURN], extra={"tools": TOOLS, "tool_choice": "auto",
                                                               "response_format": {"type": "json_object"}},
                          thinking={"type": "enabled", "budget_tokens": 4000})
    await run_openai(upstream, config_file, request)
    sent = upstream.requests[0]
    assert sent["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        FULL_TURN[1],
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}],
         "tool_calls": FULL_TURN[2]["tool_calls"]},
        FULL_TURN[3], FULL_TURN[4], FULL_TURN[5]]
    assert sent["tools"] == [{"type": "function", "function": {"name": "weather", "description": "Current weather",
                                                                "parameters": WEATHER}}]
    assert (sent["tool_choice"], sent["response_format"], sent["reasoning_effort"]) == (
        "auto", {"type": "json_object"}, "medium")


async def test_openai_reasoning_and_usage_details_are_kept(upstream, config_file):
    upstream.queue(Reply([
        openai_chunk({"role": "assistant", "content": None, "reasoning_content": "Think"}),
        openai_chunk({"reasoning": "ing."}),
        openai_chunk({"content": "Done."}),
        openai_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "f", "arguments": ""}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        openai_chunk({}, "tool_calls"),
        openai_chunk(usage={"prompt_tokens": 170, "completion_tokens": 30,  # type: ignore[dict-item]
                            "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 50},
                            "completion_tokens_details": {"reasoning_tokens": 12}}, choices=False),
        b"data: [DONE]\n\n"]))
    events = await run_openai(upstream, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))
    assert events == [
        ReasoningDelta("Think"), ReasoningDelta("ing."), TextDelta("Done."),
        ToolCallDelta([{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]),
        ToolCallDelta([{"index": 0, "function": {"arguments": "{}"}}]),
        Finish("tool_calls"),
        UsageReport(170, 30, cached_tokens=100, cache_write_tokens=50, reasoning_tokens=12)]


async def test_openai_usage_details_larger_than_their_total_are_not_believed(upstream, config_file):
    upstream.queue(Reply([openai_chunk({"content": "x"}, "stop"),
                          openai_chunk(usage={"prompt_tokens": 10, "completion_tokens": 1,  # type: ignore[dict-item]
                                              "prompt_tokens_details": {"cached_tokens": 11}}, choices=False),
                          b"data: [DONE]\n\n"]))
    events = await run_openai(upstream, config_file, ChatRequest([{"role": "user", "content": "Hi"}]))
    assert events[-1] == UsageReport(10, 1, suspect=True)


@pytest.mark.parametrize(("messages", "extra", "param"), [
    ([{"role": "user", "content": "x"}],
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": "no"}}]},
     "tools[0].function.parameters"),
    ([{"role": "user", "content": "x"}], {"tools": [{"type": "function", "function": {"description": "d"}}]},
     "tools[0].function.name"),
    ([{"role": "user", "content": "x"}], {"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_zz", "content": "1"}], {},
     "messages[1].tool_call_id"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}], {},
     "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}], {},
     "messages[0].content[0].image_url.url"),
])
def test_malformed_turns_name_the_field(messages, extra, param):
    with pytest.raises(turn.TurnError) as raised:
        turn.check(ChatRequest(messages, extra=extra))
    assert raised.value.param == param


def test_a_text_only_turn_has_no_features():
    request = ChatRequest([{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
                          extra={"response_format": {"type": "text"}, "parallel_tool_calls": False})
    assert turn.features(request) == frozenset()
    assert request.features is turn.NONE


# -- a stored thread's tool rounds --------------------------------------------------------------

def _call(call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _result(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "ok"}


def test_closed_rounds_keeps_a_history_without_tool_rounds_as_it_is():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert turn.closed_rounds(history, [{"role": "user", "content": "c"}]) is history


def test_closed_rounds_keeps_calls_answered_in_the_history_or_by_the_turn():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [_call("1")]},
               _result("1"), {"role": "assistant", "content": None, "tool_calls": [_call("2")]}]
    assert turn.closed_rounds(history, [_result("2")]) == history


def test_closed_rounds_drops_unanswered_calls_and_results_without_their_call():
    history = [_result("0"),  # its call's turn was deleted
               {"role": "assistant", "content": "x"},
               {"role": "user", "content": "a"},
               {"role": "assistant", "content": "Let me look.", "tool_calls": [_call("1"), _call("2")]},
               _result("2"),
               {"role": "user", "content": "b"},
               {"role": "assistant", "content": None, "tool_calls": [_call("3")]}]
    assert turn.closed_rounds(history, [{"role": "user", "content": "never mind"}]) == [
        {"role": "assistant", "content": "x"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [_call("2")]}, _result("2"),
        {"role": "user", "content": "b"}]
