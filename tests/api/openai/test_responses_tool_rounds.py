"""Tool round trips through the stored Responses API (`store` left at its default, true), chained by
`previous_response_id`, to each provider kind: the reply's calls come back as `function_call` items
and are kept with it, the tools' outputs are kept in the thread, the next turn's upstream gets the
whole round in its own shape, `GET` gives back the same items, and each reply is counted once.
Bad input (an output for no call of the previous response, a call left unanswered, someone else's
response) is refused before anything is written."""

from __future__ import annotations

import re
import uuid
from typing import Any

import openai
import orjson
import pytest
from openai.types.responses import Response

from tests.support.conformance import (
    MODELS,
    WEATHER_SCHEMA,
    Upstreams,
    anthropic_block,
    anthropic_reply,
    anthropic_text,
)
from tests.support.fakes import Reply, openai_chunk, openai_stream, parse_sse
from tests.support.gemini import GeminiReply, response, sse, usage

TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
        "parameters": WEATHER_SCHEMA, "strict": False}
QUESTION = "What's the weather in Paris?"
OUTPUT = "18C and sunny"
ARGUMENTS = '{"city":"Paris"}'
# the call id each upstream gives its call (Gemini gives none: the adapter makes one)
CALL_IDS = {"openai": "call_up", "anthropic": "toolu_up", "gemini": None}


def script_call(upstreams: Upstreams, provider: str) -> None:
    """The upstream's first reply: a call to get_weather for Paris (20 prompt tokens, 5 out)."""
    if provider == "openai":
        upstreams.openai.queue(Reply([
            openai_chunk({"role": "assistant", "content": ""}),
            openai_chunk({"tool_calls": [{"index": 0, "id": "call_up", "type": "function",
                                          "function": {"name": "get_weather", "arguments": ""}}]}),
            openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ARGUMENTS}}]}),
            openai_chunk({}, "tool_calls"),
            openai_chunk(usage={"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}, choices=False),
            b"data: [DONE]\n\n"]))
    elif provider == "anthropic":
        upstreams.anthropic.replies.append(anthropic_reply([anthropic_block(
            0, {"type": "tool_use", "id": "toolu_up", "name": "get_weather", "input": {}},
            [{"type": "input_json_delta", "partial_json": ARGUMENTS}])], stop="tool_use", input_tokens=20, output=5))
    else:
        call = {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}
        upstreams.gemini.queue(GeminiReply(sse(response([call], "STOP", usage(prompt=20, output=5)))))


def script_text(upstreams: Upstreams, provider: str) -> None:
    """The upstream's answer once it has the tool's output: "Sunny, 18C." (40 prompt tokens, 4 out)."""
    if provider == "openai":
        upstreams.openai.queue(Reply(openai_stream(["Sunny, ", "18C."], prompt_tokens=40, completion_tokens=4)))
    elif provider == "anthropic":
        upstreams.anthropic.replies.append(anthropic_reply([anthropic_text(0, "Sunny, ", "18C.")], input_tokens=40,
                                                          output=4))
    else:
        upstreams.gemini.queue(GeminiReply(sse(response([{"text": "Sunny, "}], usage=usage(prompt=40, output=2)),
                                               response([{"text": "18C."}], "STOP", usage(prompt=40, output=4)))))


def second_request(provider: str, call_id: str) -> dict[str, Any]:
    """What the upstream gets for the second turn: the thread's round (question, call, output)."""
    if provider == "openai":
        return {"model": "gpt-up", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": QUESTION},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"id": call_id, "type": "function",
                                  "function": {"name": "get_weather", "arguments": ARGUMENTS}}]},
                             {"role": "tool", "tool_call_id": call_id, "content": OUTPUT}],
                "tools": [{"type": "function", "function": {"name": "get_weather",
                                                            "description": "The weather in a city",
                                                            "parameters": WEATHER_SCHEMA, "strict": False}}]}
    if provider == "anthropic":
        return {"model": "claude-up", "max_tokens": 4096, "stream": True,
                "messages": [{"role": "user", "content": QUESTION},
                             {"role": "assistant", "content": [{"type": "tool_use", "id": call_id,
                                                                "name": "get_weather", "input": {"city": "Paris"}}]},
                             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id,
                                                           "content": OUTPUT}]}],
                "tools": [{"name": "get_weather", "description": "The weather in a city",
                           "input_schema": WEATHER_SCHEMA}]}
    return {"contents": [{"role": "user", "parts": [{"text": QUESTION}]},
                         {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
                                                                       "args": {"city": "Paris"}},
                                                      "thoughtSignature": "skip_thought_signature_validator"}]},
                         {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                                                          "response": {"output": OUTPUT}}}]}],
            "tools": [{"functionDeclarations": [{"name": "get_weather", "description": "The weather in a city",
                                                 "parametersJsonSchema": WEATHER_SCHEMA}]}]}


@pytest.fixture
async def gateway(upstreams, make_client, config_file):
    return await make_client(GATEWAY_CONFIG=config_file(upstreams.toml()))


@pytest.fixture
async def api(gateway, user):
    client = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=user.key, max_retries=0)
    yield client
    await client.close()


async def create(api: openai.AsyncOpenAI, stream: bool, **kwargs: Any) -> dict[str, Any]:
    """A stored response made with the SDK, as the gateway wrote it (streamed: the `response.completed`
    event's), checked against the SDK's published type."""
    raw = await api.responses.with_raw_response.create(stream=stream, **kwargs)
    body = await raw.http_response.aread()
    if stream:
        events = [orjson.loads(e.data) for e in parse_sse(body)]
        assert events[-1]["type"] == "response.completed"
        answer = events[-1]["response"]
    else:
        answer = orjson.loads(body)
    Response.model_validate(answer)
    return answer


async def retrieved(gateway, user, response_id: str) -> dict[str, Any]:
    resp = await gateway.get(f"/v1/responses/{response_id}", headers=user.headers)
    assert resp.status == 200
    body = await resp.json()
    Response.model_validate(body)
    return body


def message_id(response_id: str) -> uuid.UUID:
    """A stored response's assistant message."""
    return uuid.UUID(response_id[len("resp_"):])


async def counts(db, user_id) -> dict[str, int]:
    return {table: await db.fetchval(f"SELECT count(*) FROM {table} WHERE user_id = $1", user_id)
            for table in ("threads", "messages", "usage")}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_a_stored_tool_round_trip_reaches_each_provider_in_its_shape(
        upstreams, gateway, api, user, db, provider, stream):
    model = MODELS[provider]
    script_call(upstreams, provider)
    first = await create(api, stream, model=model, input=QUESTION, tools=[TOOL])
    hex1 = first["id"][len("resp_"):]
    call_id = first["output"][0]["call_id"]
    if CALL_IDS[provider] is not None:
        assert call_id == CALL_IDS[provider]
    else:
        assert re.fullmatch(r"call_[0-9a-f]{24}", call_id)
    assert first["status"] == "completed"
    assert first["output"] == [{"id": f"fc_{hex1}_0", "type": "function_call", "status": "completed",
                                "call_id": call_id, "name": "get_weather", "arguments": ARGUMENTS}]
    assert first["usage"]["input_tokens"] == 20 and first["usage"]["output_tokens"] == 5
    assert (await retrieved(gateway, user, first["id"]))["output"] == first["output"]

    script_text(upstreams, provider)
    second = await create(api, stream, model=model, previous_response_id=first["id"], tools=[TOOL],
                          input=[{"type": "function_call_output", "call_id": call_id, "output": OUTPUT}])
    hex2 = second["id"][len("resp_"):]
    assert second["status"] == "completed"
    assert second["previous_response_id"] == first["id"]
    assert second["output"] == [{"id": f"msg_{hex2}", "type": "message", "status": "completed", "role": "assistant",
                                 "content": [{"type": "output_text", "text": "Sunny, 18C.", "annotations": [],
                                              "logprobs": []}]}]
    assert second["output_text"] == "Sunny, 18C."
    assert (await retrieved(gateway, user, second["id"]))["output"] == second["output"]
    assert (await retrieved(gateway, user, first["id"]))["output"] == first["output"]
    replay = await gateway.get(f"/v1/responses/{first['id']}", params={"stream": "true"}, headers=user.headers)
    events = [orjson.loads(e.data) for e in parse_sse(await replay.read())]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert events[-1]["response"]["output"] == first["output"]

    received = upstreams.received(provider)
    assert len(received) == 2
    assert received[1] == second_request(provider, call_id)
    assert upstreams.problems(provider) == [[], []]  # the provider's published request shape

    # one usage row per reply, each with the upstream's counts
    rows = await db.fetch("SELECT message_id, prompt_tokens, completion_tokens FROM usage WHERE user_id = $1 "
                          "ORDER BY prompt_tokens", user.id)
    assert [(r["message_id"].hex, r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (hex1, 20, 5), (hex2, 40, 4)]
    # the thread: the question and the call, the tool's output and the answer
    thread = await db.fetch("SELECT role, content, metadata -> 'messages' AS messages, "
                            "metadata -> 'tool_calls' AS tool_calls FROM messages WHERE user_id = $1 ORDER BY seq",
                            user.id)
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    assert [tuple(r) for r in thread] == [
        ("user", QUESTION, None, None), ("assistant", "", None, [call]),
        ("user", "", [{"role": "tool", "tool_call_id": call_id, "content": OUTPUT}], None),
        ("assistant", "Sunny, 18C.", None, None)]


async def first_turn(upstreams: Upstreams, api: openai.AsyncOpenAI) -> dict[str, Any]:
    """A stored response of m-openai that called get_weather (call_up)."""
    script_call(upstreams, "openai")
    return await create(api, False, model=MODELS["openai"], input=QUESTION, tools=[TOOL])


async def refused(gateway, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await gateway.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"})
    return resp.status, (await resp.json())["error"]


async def test_an_output_for_no_call_of_the_previous_response_is_400_naming_it_and_writes_nothing(
        upstreams, gateway, api, user, db):
    first = await first_turn(upstreams, api)
    before = await counts(db, user.id)
    status, error = await refused(gateway, user.key, {
        "model": MODELS["openai"], "previous_response_id": first["id"], "tools": [TOOL], "input": [
            {"type": "function_call_output", "call_id": "call_up", "output": OUTPUT},
            {"type": "function_call_output", "call_id": "call_nope", "output": OUTPUT}]})
    assert status == 400
    assert (error["type"], error["param"]) == ("invalid_request_error", "input[1].tool_call_id")
    assert error["message"] == ("input[1].tool_call_id 'call_nope' answers no tool call of an earlier assistant "
                                "message")
    assert await counts(db, user.id) == before == {"threads": 1, "messages": 2, "usage": 1}
    assert len(upstreams.openai.requests) == 1


async def test_a_call_of_the_previous_response_left_unanswered_is_400_and_writes_nothing(
        upstreams, gateway, api, user, db):
    first = await first_turn(upstreams, api)
    before = await counts(db, user.id)
    for stored in (True, False):
        status, error = await refused(gateway, user.key, {
            "model": MODELS["openai"], "previous_response_id": first["id"], "input": "Never mind.", "store": stored})
        assert status == 400
        assert (error["message"], error["param"]) == ("No tool output found for function call call_up.", "input")
    assert await counts(db, user.id) == before
    assert len(upstreams.openai.requests) == 1


async def test_continuing_someone_elses_response_is_404_and_writes_nothing(upstreams, gateway, api, user,
                                                                         make_user, db):
    first = await first_turn(upstreams, api)
    other = await make_user()
    before = await counts(db, user.id)
    status, error = await refused(gateway, other.key, {
        "model": MODELS["openai"], "previous_response_id": first["id"], "tools": [TOOL],
        "input": [{"type": "function_call_output", "call_id": "call_up", "output": OUTPUT}]})
    assert status == 404
    assert (error["code"], error["param"]) == ("previous_response_not_found", "previous_response_id")
    assert await counts(db, user.id) == before
    assert await counts(db, other.id) == {"threads": 0, "messages": 0, "usage": 0}
    assert len(upstreams.openai.requests) == 1


async def test_a_tool_round_sent_whole_is_stored_whole_and_listed_as_its_input_items(upstreams, gateway, api, user,
                                                                                    db):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    script_text(upstreams, "openai")
    answer = await create(api, False, model=MODELS["openai"], tools=[TOOL], instructions="Be brief.", input=[
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": ARGUMENTS},
        {"type": "function_call_output", "call_id": "call_1", "output": OUTPUT}])
    assert answer["output_text"] == "Sunny, 18C."
    round_ = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "call_1", "content": OUTPUT}]
    assert upstreams.openai.requests[0]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"}, *round_]
    # the round is the stored prompt; the greeting before it was for this turn only
    rows = await db.fetch("SELECT id, role, content, metadata -> 'messages' AS messages FROM messages "
                          "WHERE user_id = $1 ORDER BY seq", user.id)
    assert [(r["role"], r["content"], r["messages"]) for r in rows] == [
        ("user", QUESTION, round_), ("assistant", "Sunny, 18C.", None)]
    prompt = rows[0]["id"].hex
    page = await api.responses.input_items.list(answer["id"], order="asc")
    assert [item.model_dump(mode="json", exclude_none=True) for item in page.data] == [
        {"id": f"msg_{prompt}_0", "type": "message", "role": "user", "status": "completed",
         "content": [{"type": "input_text", "text": QUESTION}]},
        {"id": f"fc_{prompt}_1_0", "type": "function_call", "status": "completed", "call_id": "call_1",
         "name": "get_weather", "arguments": ARGUMENTS},
        {"id": f"fco_{prompt}_2", "type": "function_call_output", "status": "completed", "call_id": "call_1",
         "output": OUTPUT}]

    upstreams.openai.queue(Reply(openai_stream(["You're welcome."], prompt_tokens=50, completion_tokens=3)))
    await create(api, True, model=MODELS["openai"], previous_response_id=answer["id"], input="Thanks!")
    assert upstreams.openai.requests[1]["messages"] == [
        *round_, {"role": "assistant", "content": "Sunny, 18C."}, {"role": "user", "content": "Thanks!"}]


async def native_turn(gateway, user, thread_id: str, content: str, provider: str = "openai") -> list[Any]:
    resp = await gateway.post("/api/chat", headers=user.headers,
                              json={"thread_id": thread_id, "content": content, "model": MODELS[provider],
                                    "stream": True})
    assert resp.status == 200
    return [e for e in parse_sse(await resp.read()) if e.event == "done"]


async def test_the_native_door_continues_a_thread_with_its_finished_tool_rounds_only(upstreams, gateway, api, user,
                                                                                   db):
    first = await first_turn(upstreams, api)
    thread_id = str(await db.fetchval("SELECT thread_id FROM messages WHERE user_id = $1 LIMIT 1", user.id))
    call = {"id": "call_up", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    # the reply's calls ride in its done event, live and replayed
    stream = await gateway.get(f"/api/messages/{message_id(first['id'])}/stream", headers=user.headers)
    done = [orjson.loads(e.data) for e in parse_sse(await stream.read()) if e.event == "done"]
    assert done[0]["finish_reason"] == "tool_calls" and done[0]["tool_calls"] == [call]

    # a call left unanswered is no part of the next turn's history (no upstream takes it)
    upstreams.openai.queue(Reply(openai_stream(["OK."])))
    await native_turn(gateway, user, thread_id, "Never mind.")
    assert upstreams.openai.requests[1]["messages"] == [{"role": "user", "content": QUESTION},
                                                         {"role": "user", "content": "Never mind."}]

    # a finished round is
    script_call(upstreams, "openai")
    second = await create(api, False, model=MODELS["openai"], input=QUESTION, tools=[TOOL])
    thread_id = str(await db.fetchval("SELECT thread_id FROM messages WHERE id = $1", message_id(second["id"])))
    script_text(upstreams, "openai")
    await create(api, False, model=MODELS["openai"], previous_response_id=second["id"], tools=[TOOL],
                 input=[{"type": "function_call_output", "call_id": "call_up", "output": OUTPUT}])
    upstreams.openai.queue(Reply(openai_stream(["Cooler."])))
    await native_turn(gateway, user, thread_id, "And tomorrow?")
    assert upstreams.openai.requests[-1]["messages"] == [
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_up", "content": OUTPUT},
        {"role": "assistant", "content": "Sunny, 18C."}, {"role": "user", "content": "And tomorrow?"}]
    assert "tools" not in upstreams.openai.requests[-1]
    resp = await gateway.get(f"/api/threads/{thread_id}", headers=user.headers)
    assert resp.status == 200
    shown = [(m["role"], m["content"]) for m in (await resp.json())["messages"]]
    assert shown == [("user", QUESTION), ("assistant", ""), ("user", ""), ("assistant", "Sunny, 18C."),
                     ("user", "And tomorrow?"), ("assistant", "Cooler.")]


async def test_a_native_turn_on_a_tool_thread_declares_the_called_tools_to_anthropic_and_forbids_calls(
        upstreams, gateway, api, user, db):
    # Anthropic refuses tool_use blocks in a request that declares no tools; a native turn has no
    # tools to declare, so the adapter declares those the history called, with tool_choice none
    script_call(upstreams, "anthropic")
    first = await create(api, False, model=MODELS["anthropic"], input=QUESTION, tools=[TOOL])
    script_text(upstreams, "anthropic")
    await create(api, False, model=MODELS["anthropic"], previous_response_id=first["id"], tools=[TOOL],
                 input=[{"type": "function_call_output", "call_id": "toolu_up", "output": OUTPUT}])
    thread_id = str(await db.fetchval("SELECT thread_id FROM messages WHERE id = $1", message_id(first["id"])))
    upstreams.anthropic.replies.append(anthropic_reply([anthropic_text(0, "Cooler.")]))
    done = await native_turn(gateway, user, thread_id, "And tomorrow?", provider="anthropic")
    assert orjson.loads(done[0].data)["finish_reason"] == "stop"
    sent = upstreams.anthropic.requests[-1]
    assert (sent["tools"], sent["tool_choice"]) == ([{"name": "get_weather", "input_schema": {"type": "object"}}],
                                                    {"type": "none"})
    assert sent["messages"] == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_up", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_up", "content": OUTPUT}]},
        {"role": "assistant", "content": "Sunny, 18C."}, {"role": "user", "content": "And tomorrow?"}]


async def test_regenerating_a_stored_tool_round_sends_the_round_again(upstreams, gateway, api, user, db):
    first = await first_turn(upstreams, api)
    script_text(upstreams, "openai")
    second = await create(api, False, model=MODELS["openai"], previous_response_id=first["id"], tools=[TOOL],
                          input=[{"type": "function_call_output", "call_id": "call_up", "output": OUTPUT}])
    prompt = await db.fetchval("SELECT reply_to FROM messages WHERE id = $1", message_id(second["id"]))
    upstreams.openai.queue(Reply(openai_stream(["Still sunny."])))
    resp = await gateway.post(f"/api/messages/{prompt}/regenerate", headers=user.headers, json={"stream": True})
    assert resp.status == 200
    await resp.read()
    assert upstreams.openai.requests[-1]["messages"] == upstreams.openai.requests[1]["messages"] == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_up", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}]},
        {"role": "tool", "tool_call_id": "call_up", "content": OUTPUT}]
