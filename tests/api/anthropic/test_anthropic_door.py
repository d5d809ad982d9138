"""The Anthropic Messages front door, driven by the official `anthropic` SDK and by raw HTTP, against the
built-in demo model and a fake OpenAI-compatible upstream (the request is translated both ways)."""

from __future__ import annotations

import json
import uuid

import anthropic
import pytest

from gateway.providers.base import estimate_tokens
from gateway.providers.demo import demo_reply
from gateway.state import USAGE
from tests.support.common import wait_for
from tests.support.fakes import Reply, openai_chunk, openai_stream, parse_sse

CHUNKS = 4
PROMPT = "Tell me about rivers"
SYSTEM = "Be brief."


@pytest.fixture
async def sdk():
    """The official SDK pointed at a test client (the server's root: the SDK adds /v1/messages);
    every SDK client is closed at teardown."""
    made: list[anthropic.AsyncAnthropic] = []

    def make(client, key: str | None = None, auth_token: str | None = None) -> anthropic.AsyncAnthropic:
        made.append(anthropic.AsyncAnthropic(base_url=str(client.make_url("")).rstrip("/"), api_key=key,
                                             auth_token=auth_token, max_retries=0))
        return made[-1]

    yield make
    for api in made:
        await api.close()


@pytest.fixture
async def demo_client(make_client):
    return await make_client(DEMO_CHUNKS=str(CHUNKS))


@pytest.fixture
async def fake_client(make_client, upstream):
    return await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-up", OPENAI_MODEL="fake")


async def usage_rows(db, user_id: uuid.UUID) -> list[dict]:
    rows = await db.fetch("SELECT model, provider, prompt_tokens, completion_tokens, estimated "
                          "FROM usage WHERE user_id = $1 ORDER BY created_at", user_id)
    return [dict(r) for r in rows]


async def _has_rows(db, user_id: uuid.UUID, n: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user_id) == n


def demo_text(prompt: str = PROMPT) -> str:
    return "".join(demo_reply(prompt, CHUNKS))


# the demo model counts the prompt as it reads it: the system prompt and the user's text
DEMO_INPUT = estimate_tokens(SYSTEM) + estimate_tokens(PROMPT)


async def test_sdk_create_with_the_demo_model_answers_a_whole_message_and_records_usage_once(
        sdk, demo_client, user, db):
    message = await sdk(demo_client, user.key).messages.create(
        model="demo", max_tokens=100, system=SYSTEM, messages=[{"role": "user", "content": PROMPT}])
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "demo"
    assert [(block.type, block.text) for block in message.content] == [("text", demo_text())]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (DEMO_INPUT, CHUNKS)
    await demo_client.app[USAGE].flush()
    assert await usage_rows(db, user.id) == [{"model": "demo", "provider": "demo", "prompt_tokens": DEMO_INPUT,
                                              "completion_tokens": CHUNKS, "estimated": False}]


async def test_sdk_stream_with_the_demo_model_gets_the_exact_event_sequence(sdk, demo_client, user, db):
    api = sdk(demo_client, user.key)
    content = [{"type": "text", "text": PROMPT}]
    async with api.messages.stream(model="demo", max_tokens=100, system=SYSTEM,
                                   messages=[{"role": "user", "content": content}]) as stream:
        # the SDK drops `ping` (the raw-bytes test sees it) and adds a `text` event after each text delta
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds == ["message_start", "content_block_start", *["content_block_delta", "text"] * CHUNKS,
                     "content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == demo_text()
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (DEMO_INPUT, CHUNKS)
    await wait_for(lambda: _has_rows(db, user.id, 1))
    await demo_client.app[USAGE].flush()
    assert await usage_rows(db, user.id) == [{"model": "demo", "provider": "demo", "prompt_tokens": DEMO_INPUT,
                                              "completion_tokens": CHUNKS, "estimated": False}]


async def test_stream_bytes_are_anthropics_exact_events(fake_client, upstream, user):
    upstream.queue(Reply(openai_stream(["Hel", "lo"], prompt_tokens=7)))
    resp = await fake_client.post("/v1/messages", headers={"x-api-key": user.key, "anthropic-version": "2023-06-01"},
                                  json={"model": "fake", "max_tokens": 50, "stream": True,
                                        "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    raw = await resp.read()
    events = parse_sse(raw)
    message_id = json.loads(events[0].data)["message"]["id"]
    assert message_id.startswith("msg_")
    assert [(e.event, json.loads(e.data)) for e in events] == [
        ("message_start", {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "content": [], "model": "fake",
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 0}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hel"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "lo"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        # the upstream's own counts, once known (input_tokens replaces message_start's estimate)
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"input_tokens": 7, "output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    # exact framing: `event:` then `data:` (compact JSON), a blank line after each
    assert raw.startswith(b'event: message_start\ndata: {"type":"message_start","message":{"id":"')
    assert raw.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


async def test_sdk_stream_through_an_openai_upstream_is_translated_and_counted_once(
        sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hel", "lo", "!"], prompt_tokens=7, finish_reason="length")))
    api = sdk(fake_client, user.key)
    async with api.messages.stream(model="fake", max_tokens=3, system=[{"type": "text", "text": SYSTEM}],
                                   stop_sequences=["\n\n"],
                                   # this SDK version no longer names them (newer models refuse them)
                                   extra_body={"temperature": 0.5, "top_p": 0.9},
                                   messages=[{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"},
                                             {"role": "user", "content": "more"}]) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == "Hello!"
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 3)
    sent = upstream.requests[0]
    assert sent["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["stop"]) == (3, 0.5, 0.9, ["\n\n"])
    assert sent["stream"] is True and "tools" not in sent
    assert upstream.headers[0]["Authorization"] == "Bearer sk-up"  # the upstream's key, never the caller's
    await wait_for(lambda: _has_rows(db, user.id, 1))
    await fake_client.app[USAGE].flush()
    assert await usage_rows(db, user.id) == [{"model": "fake", "provider": "openai", "prompt_tokens": 7,
                                              "completion_tokens": 3, "estimated": False}]


async def test_sdk_create_through_an_openai_upstream(sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hi", " there"], prompt_tokens=4)))
    message = await sdk(fake_client, user.key).messages.create(
        model="fake", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert message.model == "fake"
    assert [(b.type, b.text) for b in message.content] == [("text", "Hi there")]
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == ("end_turn", 4, 2)
    await fake_client.app[USAGE].flush()
    assert len(await usage_rows(db, user.id)) == 1


TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
TOOL_CALL = [openai_chunk({"role": "assistant", "content": None}),
             openai_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                           "function": {"name": "get_weather", "arguments": ""}}]}),
             openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
             openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}),
             openai_chunk({}, "tool_calls"), b"data: [DONE]\n\n"]


async def test_tools_pass_through_to_an_openai_upstream_both_ways(sdk, fake_client, upstream, user):
    upstream.queue(Reply(TOOL_CALL), Reply(TOOL_CALL), Reply(openai_stream(["Sunny"])))
    api = sdk(fake_client, user.key)
    message = await api.messages.create(model="fake", max_tokens=50, tools=TOOLS,
                                        tool_choice={"type": "tool", "name": "get_weather"},
                                        messages=[{"role": "user", "content": "weather?"}])
    assert message.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in message.content] == [
        ("tool_use", "call_1", "get_weather", {"city": "Oslo"})]
    assert upstream.requests[0]["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": TOOLS[0]["input_schema"], "description": "The weather in a city"}}]
    assert upstream.requests[0]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}

    async with api.messages.stream(model="fake", max_tokens=50, tools=TOOLS,
                                   messages=[{"role": "user", "content": "weather?"}]) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert [k for k in kinds if k not in ("input_json",)] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert [(b.type, b.id, b.name, b.input) for b in final.content] == [
        ("tool_use", "call_1", "get_weather", {"city": "Oslo"})]
    assert final.stop_reason == "tool_use"

    # the tool's result goes back as OpenAI's tool message
    message = await api.messages.create(model="fake", max_tokens=50, tools=TOOLS, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                           "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "12C, sun"}]}])
    assert message.content[0].text == "Sunny"
    assert upstream.requests[2]["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12C, sun"}]


async def test_count_tokens_is_the_gateways_estimate(sdk, demo_client, user, db):
    counted = await sdk(demo_client, user.key).messages.count_tokens(
        model="demo", system=SYSTEM, messages=[{"role": "user", "content": PROMPT}])
    assert counted.input_tokens == DEMO_INPUT
    await demo_client.app[USAGE].flush()
    assert await usage_rows(db, user.id) == []  # counting is not a completion


async def test_bearer_auth_works_too(sdk, demo_client, user):
    message = await sdk(demo_client, auth_token=user.key).messages.create(
        model="demo", max_tokens=100, messages=[{"role": "user", "content": PROMPT}])
    assert message.content[0].text == demo_text()


async def test_bad_key_is_401_in_anthropics_shape_and_the_sdk_raises(sdk, demo_client, db):
    with pytest.raises(anthropic.AuthenticationError) as raised:
        await sdk(demo_client, "gwk_nope").messages.create(model="demo", max_tokens=10,
                                                            messages=[{"role": "user", "content": "x"}])
    assert raised.value.status_code == 401
    assert raised.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                            "message": "invalid API key"}}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        resp = await demo_client.post(path, json={"model": "demo", "max_tokens": 10, "messages": []})
        assert resp.status == 401
        body = await resp.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("body, status, kind", [
    ({"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": "nope", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}, 404, "not_found_error"),
    ({"model": "demo", "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": "demo", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, 400,
     "invalid_request_error"),
    ({"model": "demo", "max_tokens": 10, "messages": []}, 400, "invalid_request_error"),
    ({"model": "demo", "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]}, 400,
     "invalid_request_error"),
    ({"model": "demo", "max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400,
     "invalid_request_error"),
    ({"model": "demo", "max_tokens": 10, "messages": [{"role": "user", "content": "a\u0000b"}]}, 400,
     "invalid_request_error"),
    ({"model": "demo", "max_tokens": 10, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}, 400,
     "invalid_request_error"),
    ({"model": "demo", "max_tokens": 10, "stop_sequences": "x", "messages": [{"role": "user", "content": "x"}]},
     400, "invalid_request_error"),
    ({"model": "demo", "max_tokens": 10, "tools": [{"name": "t"}], "messages": [{"role": "user", "content": "x"}]},
     400, "invalid_request_error"),
])
async def test_bad_bodies_get_anthropic_errors_and_write_nothing(demo_client, user, db, body, status, kind):
    resp = await demo_client.post("/v1/messages", json=body, headers={"x-api-key": user.key})
    assert resp.status == status
    error = await resp.json()
    assert set(error) == {"type", "error"} and error["type"] == "error"
    assert error["error"]["type"] == kind and error["error"]["message"]
    await demo_client.app[USAGE].flush()  # whatever the request queued is written by now
    assert await usage_rows(db, user.id) == []


async def test_sdk_raises_on_a_bad_body(sdk, demo_client, user):
    with pytest.raises(anthropic.BadRequestError) as raised:
        await sdk(demo_client, user.key).messages.create(model="demo", max_tokens=10, messages=[])
    assert raised.value.body["error"]["type"] == "invalid_request_error"


async def test_upstream_failure_before_output_is_an_http_error_and_counts_nothing(sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(status=429, body=b'{"error":{"message":"slow down"}}'),
                   Reply(status=500, body=b'{"error":{"message":"boom"}}'))
    api = sdk(fake_client, user.key)
    with pytest.raises(anthropic.RateLimitError):
        await api.messages.create(model="fake", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.APIStatusError) as raised:
        async with api.messages.stream(model="fake", max_tokens=10,
                                       messages=[{"role": "user", "content": "x"}]) as stream:
            await stream.get_final_message()
    assert raised.value.status_code == 502 and raised.value.body["error"]["type"] == "api_error"
    await fake_client.app[USAGE].flush()
    assert await usage_rows(db, user.id) == []  # nothing reached anyone, nothing is counted


async def test_mid_stream_failure_is_an_anthropic_error_event_and_usage_is_recorded_once(
        sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["par", "tial"], done=False, usage=False)[:3]),
                   Reply(openai_stream(["par", "tial"], done=False, usage=False)[:3]))
    resp = await fake_client.post("/v1/messages", headers={"x-api-key": user.key}, json={
        "model": "fake", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    events = parse_sse(await resp.read())
    assert [e.event for e in events] == ["message_start", "content_block_start", "ping", "content_block_delta",
                                         "content_block_delta", "error"]
    error = json.loads(events[-1].data)
    assert error["type"] == "error" and error["error"]["type"] == "api_error" and error["error"]["message"]

    texts = []
    with pytest.raises(anthropic.APIStatusError):
        async with sdk(fake_client, user.key).messages.stream(
                model="fake", max_tokens=10, messages=[{"role": "user", "content": "x"}]) as stream:
            async for text in stream.text_stream:
                texts.append(text)
    assert "".join(texts) == "partial"
    await wait_for(lambda: _has_rows(db, user.id, 2))
    rows = await usage_rows(db, user.id)
    assert [(r["estimated"], r["completion_tokens"]) for r in rows] == [(True, 2), (True, 2)]  # "partial" ~ 2
