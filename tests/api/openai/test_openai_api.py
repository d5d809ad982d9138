"""The OpenAI-compatible front door, driven by the official `openai` SDK and by raw HTTP."""

from __future__ import annotations

import asyncio
import json
import uuid

import openai
import pytest

from gateway.state import USAGE
from tests.support.common import wait_for
from tests.support.fakes import Reply, openai_chunk, openai_stream


@pytest.fixture
async def sdk():
    """The official SDK pointed at a test client; every SDK client is closed at teardown."""
    made: list[openai.AsyncOpenAI] = []

    def make(client, key: str) -> openai.AsyncOpenAI:
        made.append(openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0))
        return made[-1]

    yield make
    for api in made:
        await api.close()


async def usage_rows(db, user_id: uuid.UUID) -> list[dict]:
    rows = await db.fetch("SELECT model, provider, prompt_tokens, completion_tokens, total_tokens, estimated "
                          "FROM usage WHERE user_id = $1 ORDER BY created_at", user_id)
    return [dict(r) for r in rows]


@pytest.fixture
async def fake_client(make_client, upstream):
    return await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-up", OPENAI_MODEL="fake")


async def test_sdk_streams_with_usage_and_the_usage_is_recorded_once(sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hel", "lo", "!"], prompt_tokens=7)))
    api = sdk(fake_client, user.key)
    stream = await api.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                               stream=True, stream_options={"include_usage": True})
    texts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(texts) == "Hello!"
    assert finish == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 3, 10)
    await wait_for(lambda: _has_rows(db, user.id, 1))
    assert await usage_rows(db, user.id) == [{"model": "fake", "provider": "openai", "prompt_tokens": 7,
                                              "completion_tokens": 3, "total_tokens": 10, "estimated": False}]
    # the gateway always asks upstream for usage
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}
    assert upstream.headers[0]["Authorization"] == "Bearer sk-up"


async def _has_rows(db, user_id: uuid.UUID, n: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user_id) == n


async def test_sdk_non_streaming_completion(sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hi", " there"], prompt_tokens=4)))
    completion = await sdk(fake_client, user.key).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], temperature=0.5, top_p=0.9, max_tokens=20,
        stop=["\n"])
    assert completion.object == "chat.completion"
    assert completion.model == "fake"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hi there"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 2)
    sent = upstream.requests[0]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stop"]) == (0.5, 0.9, 20, ["\n"])
    assert sent["stream"] is True  # upstream always streams; the gateway aggregates
    await wait_for(lambda: _has_rows(db, user.id, 1))


async def test_stream_bytes_are_exact_openai_chunks(fake_client, upstream, user):
    upstream.queue(Reply(openai_stream(["a", "b"], prompt_tokens=3)))
    resp = await fake_client.post("/v1/chat/completions", headers=user.headers, json={
        "model": "fake", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    body = (await resp.read()).decode()
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    cid, created = chunks[0]["id"], chunks[0]["created"]
    assert cid.startswith("chatcmpl-")

    def chunk(delta, finish=None):
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": "fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    # no include_usage: no usage chunk and no "usage" key, as OpenAI does
    assert chunks == [chunk({"role": "assistant", "content": ""}), chunk({"content": "a"}), chunk({"content": "b"}),
                      chunk({}, "stop")]


async def test_tool_calls_pass_through_both_ways(sdk, fake_client, upstream, user):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    calls = [openai_chunk({"role": "assistant", "content": None}),
             openai_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                           "function": {"name": "get_weather", "arguments": ""}}]}),
             openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
             openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}),
             openai_chunk({}, "tool_calls"), b"data: [DONE]\n\n"]
    upstream.queue(Reply(calls), Reply(calls))
    api = sdk(fake_client, user.key)
    completion = await api.chat.completions.create(model="fake", messages=[{"role": "user", "content": "w?"}],
                                                   tools=tools, tool_choice="auto")
    call = completion.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == ("call_1", "get_weather", '{"city":"Oslo"}')
    assert completion.choices[0].finish_reason == "tool_calls"
    assert upstream.requests[0]["tools"] == tools and upstream.requests[0]["tool_choice"] == "auto"

    stream = await api.chat.completions.create(model="fake", messages=[{"role": "user", "content": "w?"}],
                                               tools=tools, stream=True)
    arguments = ""
    async for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            arguments += tc.function.arguments or ""
    assert arguments == '{"city":"Oslo"}'


async def test_models_list(sdk, client, user):
    page = await sdk(client, user.key).models.list()
    # with nothing configured, two built-in demo models (so the quickstart's arena has a pair)
    assert [m.id for m in page.data] == ["demo", "demo-alt"]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "demo", "messages": []}, 400, "messages"),
    ({"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]"),
    ({"model": "demo", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0]"),
    ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, 400, "temperature"),
    ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
])
async def test_bad_requests_get_openai_errors_and_record_nothing(client, user, db, body, status, param):
    resp = await client.post("/v1/chat/completions", json=body, headers=user.headers)
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    await client.app[USAGE].flush()  # whatever the request queued is written by now
    assert await usage_rows(db, user.id) == []


async def test_bad_key_is_401_in_openai_shape_and_the_sdk_raises(sdk, client):
    with pytest.raises(openai.AuthenticationError):
        await sdk(client, "gwk_nope").chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}])
    resp = await client.post("/v1/chat/completions", json={"model": "demo", "messages": []})
    assert resp.status == 401
    assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}


async def test_upstream_failure_before_output_is_an_http_error(sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(status=429, body=b'{"error":{"message":"slow down"}}'),
                   Reply(status=500, body=b'{"error":{"message":"boom"}}'))
    with pytest.raises(openai.RateLimitError):
        await sdk(fake_client, user.key).chat.completions.create(model="fake",
                                                                 messages=[{"role": "user", "content": "x"}])
    resp = await fake_client.post("/v1/chat/completions", headers=user.headers, json={
        "model": "fake", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_http_error"
    await fake_client.app[USAGE].flush()  # the handler queues its usage before it answers
    assert await usage_rows(db, user.id) == []  # nothing reached anyone, nothing is counted


async def test_mid_stream_failure_ends_with_an_error_event_and_the_sdk_raises(sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["par", "tial"], done=False, usage=False)[:3]))
    stream = await sdk(fake_client, user.key).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "x"}], stream=True)
    texts = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            texts.append(chunk.choices[0].delta.content or "")
    assert "".join(texts) == "partial"
    await wait_for(lambda: _has_rows(db, user.id, 1))
    rows = await usage_rows(db, user.id)
    assert rows[0]["estimated"] is True and rows[0]["completion_tokens"] == 2  # "partial" ~ 2 tokens


async def test_client_disconnect_cancels_upstream_and_records_usage_so_far(fake_client, upstream, user, db):
    seen_end = asyncio.Event()

    async def watch(_body):
        seen_end.clear()

    upstream.queue(Reply(openai_stream([f"w{i} " for i in range(50)]), piece_delay_s=0.05, on_request=watch))
    resp = await fake_client.post("/v1/chat/completions", headers=user.headers, json={
        "model": "fake", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    first = await resp.content.readline()
    assert first.startswith(b"data: ")
    resp.close()  # the client goes away mid-stream
    await wait_for(lambda: _has_rows(db, user.id, 1), timeout=5)
    row = (await usage_rows(db, user.id))[0]
    assert row["estimated"] is True
    assert row["completion_tokens"] < 50  # only what was relayed before the cut
    # the upstream connection was dropped, not read to the end: the fake's writes stop well short
    # of the 54 pieces of the whole reply (role, 50 deltas, finish, usage, [DONE])
    await wait_for(lambda: _cut(upstream), timeout=5)
    assert len(upstream.requests) == 1 and upstream.sent[0] < 40


async def _cut(upstream) -> bool:
    await asyncio.sleep(0.1)
    before = upstream.sent[0]
    await asyncio.sleep(0.2)  # 4 piece delays: a live reply would have moved on
    return upstream.sent[0] == before


async def test_a_bad_key_answers_as_openai_does_with_code_invalid_api_key(sdk, client):
    with pytest.raises(openai.AuthenticationError) as raised:
        await sdk(client, "gwk_nope").models.list()
    assert raised.value.code == "invalid_api_key"
    resp = await client.get("/v1/models", headers={"Authorization": "Bearer gwk_nope"})
    assert resp.status == 401
    assert await resp.json() == {"error": {"message": "invalid API key", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}}


async def test_models_retrieve_names_one_enabled_model_and_404s_the_rest(sdk, client, user):
    api = sdk(client, user.key)
    model = await api.models.retrieve("demo")
    assert (model.id, model.object, model.owned_by) == ("demo", "model", "demo")
    with pytest.raises(openai.NotFoundError) as raised:
        await api.models.retrieve("no-such-model")
    assert raised.value.code == "model_not_found"


async def test_a_non_streamed_completion_carries_refusal_null_as_openai_sends_it(client, user):
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    message = (await resp.json())["choices"][0]["message"]
    assert list(message) == ["role", "content", "refusal"] and message["refusal"] is None
