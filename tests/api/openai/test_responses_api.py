"""The OpenAI Responses API front door, driven by the official `openai` SDK (and raw HTTP for bytes)."""

from __future__ import annotations

import asyncio
import uuid

import openai
import pytest

from gateway.providers.demo import demo_reply
from tests.support.common import wait_for
from tests.support.fakes import Reply, openai_chunk, openai_stream

TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
CLOSING_EVENTS = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                  "response.completed"]


@pytest.fixture
async def fake_client(make_client, upstream):
    return await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-up", OPENAI_MODEL="fake")


async def rows(db, user_id: uuid.UUID) -> dict[str, list[dict]]:
    threads = await db.fetch("SELECT id FROM threads WHERE user_id = $1", user_id)
    messages = await db.fetch("SELECT thread_id, role, content, status FROM messages WHERE user_id = $1 ORDER BY seq",
                              user_id)
    usage = await db.fetch("SELECT message_id, prompt_tokens, completion_tokens FROM usage WHERE user_id = $1 "
                           "ORDER BY created_at", user_id)
    return {"threads": [dict(r) for r in threads], "messages": [dict(r) for r in messages],
            "usage": [dict(r) for r in usage]}


def message_id_of(response_id: str) -> uuid.UUID:
    assert response_id.startswith("resp_")
    return uuid.UUID(hex=response_id[5:])


async def test_create_non_streaming_stores_the_turn_once(openai_sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hel", "lo", "!"], prompt_tokens=7)))
    response = await openai_sdk(fake_client, user.key).responses.create(
        model="fake", input="hi", instructions="Be brief.", max_output_tokens=50, temperature=0.5, top_p=0.9)
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == "fake"
    assert response.output_text == "Hello!"
    assert [(o.type, o.role, o.status) for o in response.output] == [("message", "assistant", "completed")]
    assert response.output[0].id == "msg_" + response.id[5:]
    assert response.output[0].content[0].text == "Hello!"
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (7, 3, 10)
    assert response.instructions == "Be brief."
    sent = upstream.requests[0]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (50, 0.5, 0.9)
    # the turn is a thread with its two messages; the instructions are not stored
    found = await rows(db, user.id)
    thread = found["threads"][0]["id"]
    assert len(found["threads"]) == 1
    assert found["messages"] == [{"thread_id": thread, "role": "user", "content": "hi", "status": "complete"},
                                 {"thread_id": thread, "role": "assistant", "content": "Hello!",
                                  "status": "complete"}]
    assert found["usage"] == [{"message_id": message_id_of(response.id), "prompt_tokens": 7, "completion_tokens": 3}]


async def test_create_stream_sends_the_semantic_events_in_order(openai_sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hel", "lo", "!"], prompt_tokens=7)))
    stream = await openai_sdk(fake_client, user.key).responses.create(model="fake", input="hi", stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events] == TEXT_EVENTS + ["response.output_text.delta"] * 3 + CLOSING_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    response_id = events[0].response.id
    assert all(e.response.id == response_id for e in events if e.type.startswith("response.") and
               hasattr(e, "response"))
    assert events[0].response.status == "in_progress"
    item_id = "msg_" + response_id[5:]
    assert events[2].item.id == item_id and events[2].output_index == 0
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [(e.delta, e.item_id, e.output_index, e.content_index) for e in deltas] == [
        ("Hel", item_id, 0, 0), ("lo", item_id, 0, 0), ("!", item_id, 0, 0)]
    assert events[-4].text == "Hello!"
    completed = events[-1].response
    assert completed.status == "completed"
    assert completed.output_text == "Hello!"
    assert (completed.usage.input_tokens, completed.usage.output_tokens) == (7, 3)
    await wait_for(lambda: _usage_count(db, user.id, 1))
    assert [m["content"] for m in (await rows(db, user.id))["messages"]] == ["hi", "Hello!"]


async def _usage_count(db, user_id: uuid.UUID, n: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user_id) == n


async def test_stream_helper_against_the_demo_model(openai_sdk, client, user):
    api = openai_sdk(client, user.key)
    texts = []
    async with api.responses.stream(model="demo", input="tell me a story") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                texts.append(event.delta)
        final = await stream.get_final_response()
    expected = "".join(demo_reply("tell me a story", 12))
    assert "".join(texts) == expected
    assert final.output_text == expected
    assert final.status == "completed"
    assert final.usage.output_tokens == 12
    # the stored response reads back the same
    again = await api.responses.retrieve(final.id)
    assert (again.id, again.status, again.output_text, again.model) == (final.id, "completed", expected, "demo")
    assert (again.usage.input_tokens, again.usage.output_tokens) == (final.usage.input_tokens, 12)


async def test_retrieve_returns_the_stored_response(openai_sdk, fake_client, upstream, user):
    upstream.queue(Reply(openai_stream(["Hi", " there"], prompt_tokens=4)))
    api = openai_sdk(fake_client, user.key)
    created = await api.responses.create(model="fake", input="hi")
    got = await api.responses.retrieve(created.id)
    assert got.id == created.id
    assert got.created_at == created.created_at
    assert got.status == "completed"
    assert got.output_text == "Hi there"
    assert got.output[0].id == created.output[0].id
    assert (got.usage.input_tokens, got.usage.output_tokens, got.usage.total_tokens) == (4, 2, 6)


async def test_previous_response_id_continues_the_thread(openai_sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hello!"])), Reply(openai_stream(["Fine."])))
    api = openai_sdk(fake_client, user.key)
    first = await api.responses.create(model="fake", input="hi")
    second = await api.responses.create(model="fake", input=[{"role": "user", "content": "how are you?"}],
                                        previous_response_id=first.id, instructions="Be kind.")
    assert second.output_text == "Fine."
    assert second.previous_response_id == first.id
    # the upstream got the thread's history, this turn's instructions first
    assert upstream.requests[1]["messages"] == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "how are you?"}]
    found = await rows(db, user.id)
    assert len(found["threads"]) == 1
    assert [(m["role"], m["content"]) for m in found["messages"]] == [
        ("user", "hi"), ("assistant", "Hello!"), ("user", "how are you?"), ("assistant", "Fine.")]


async def test_input_items_are_sent_for_this_turn_and_only_the_last_is_stored(openai_sdk, fake_client, upstream, user,
                                                                               db):
    upstream.queue(Reply(openai_stream(["4"])))
    await openai_sdk(fake_client, user.key).responses.create(model="fake", input=[
        {"role": "developer", "content": "Answer with a number."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "2+2?"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "4"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "and 2+"}, {"type": "input_text", "text": "2?"}]},
    ])
    assert upstream.requests[0]["messages"] == [
        {"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 2+2?"}]
    assert [(m["role"], m["content"]) for m in (await rows(db, user.id))["messages"]] == [
        ("user", "and 2+2?"), ("assistant", "4")]


async def test_previous_response_of_another_user_is_not_found(openai_sdk, fake_client, upstream, user, make_user, db):
    first = await openai_sdk(fake_client, user.key).responses.create(model="fake", input="hi")
    other = await make_user()
    with pytest.raises(openai.NotFoundError) as caught:
        await openai_sdk(fake_client, other.key).responses.create(model="fake", input="again",
                                                            previous_response_id=first.id)
    assert caught.value.body["code"] == "previous_response_not_found"
    assert caught.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        await openai_sdk(fake_client, other.key).responses.retrieve(first.id)
    assert await rows(db, other.id) == {"threads": [], "messages": [], "usage": []}
    assert len(upstream.requests) == 1


async def test_store_false_writes_no_thread_rows(openai_sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hel", "lo"], prompt_tokens=5)), Reply(openai_stream(["Yo"])))
    api = openai_sdk(fake_client, user.key)
    response = await api.responses.create(model="fake", input="hi", store=False, instructions="Short.")
    assert response.output_text == "Hello"
    assert response.store is False
    assert upstream.requests[0]["messages"] == [{"role": "system", "content": "Short."},
                                                {"role": "user", "content": "hi"}]
    stream = await api.responses.create(model="fake", input="hey", store=False, stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events] == [*TEXT_EVENTS, "response.output_text.delta", *CLOSING_EVENTS]
    assert events[-1].response.output_text == "Yo"
    await wait_for(lambda: _usage_count(db, user.id, 2))
    found = await rows(db, user.id)
    assert (found["threads"], found["messages"]) == ([], [])
    # both usage rows may land in one batch (one created_at): find the first by its id
    by_id = {u["message_id"]: u for u in found["usage"]}
    assert by_id[message_id_of(response.id)] == {"message_id": message_id_of(response.id), "prompt_tokens": 5,
                                                 "completion_tokens": 2}
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(response.id)


async def test_store_false_passes_tools_and_returns_function_calls(openai_sdk, fake_client, upstream, user):
    pieces = [openai_chunk({"role": "assistant", "content": None}),
              openai_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                            "function": {"name": "weather", "arguments": ""}}]}),
              openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":\"Oslo\"}"}}]}),
              openai_chunk({}, "tool_calls"), b"data: [DONE]\n\n"]
    upstream.queue(Reply(pieces))
    tool = {"type": "function", "name": "weather", "description": "The weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    response = await openai_sdk(fake_client, user.key).responses.create(
        model="fake", input="weather in Oslo?", store=False, tools=[tool],
        tool_choice={"type": "function", "name": "weather"})
    sent = upstream.requests[0]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "The weather", "parameters": tool["parameters"]}}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert [(o.type, o.call_id, o.name, o.arguments) for o in response.output] == [
        ("function_call", "call_1", "weather", "{\"city\":\"Oslo\"}")]


async def test_delete_removes_the_turn_and_then_the_empty_thread(openai_sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["A"])), Reply(openai_stream(["B"])))
    api = openai_sdk(fake_client, user.key)
    first = await api.responses.create(model="fake", input="one")
    second = await api.responses.create(model="fake", input="two", previous_response_id=first.id)
    assert await api.responses.delete(second.id) is None
    found = await rows(db, user.id)
    assert len(found["threads"]) == 1
    assert [m["content"] for m in found["messages"]] == ["one", "A"]
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        await api.responses.delete(second.id)
    raw = await fake_client.delete(f"/v1/responses/{first.id}", headers={"Authorization": f"Bearer {user.key}"})
    assert raw.status == 200
    assert await raw.json() == {"id": first.id, "object": "response.deleted", "deleted": True}
    found = await rows(db, user.id)
    assert (found["threads"], found["messages"]) == ([], [])
    assert len(found["usage"]) == 2  # accounting outlives content


async def test_a_failure_mid_stream_ends_with_response_failed(openai_sdk, fake_client, upstream, user, db):
    # content, then the upstream stream ends without its terminal marker
    upstream.queue(Reply(openai_stream(["Hel"], done=False, usage=False)[:2]))
    stream = await openai_sdk(fake_client, user.key).responses.create(model="fake", input="hi", stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events] == [*TEXT_EVENTS, "response.output_text.delta", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed"
    assert failed.error.code == "server_error"
    assert failed.output[0].content[0].text == "Hel"
    got = await openai_sdk(fake_client, user.key).responses.retrieve(failed.id)
    assert (got.status, got.error.code) == ("failed", "server_error")


async def test_a_failure_before_any_output_is_an_http_error(openai_sdk, fake_client, upstream, user):
    upstream.queue(Reply(status=500, body=b'{"error":{"message":"boom"}}'))
    with pytest.raises(openai.APIStatusError) as caught:
        await openai_sdk(fake_client, user.key).responses.create(model="fake", input="hi", stream=True)
    assert caught.value.status_code == 502
    assert caught.value.body["type"] == "upstream_error"


async def test_errors_in_openai_shape_write_nothing(openai_sdk, fake_client, upstream, user, db):
    with pytest.raises(openai.AuthenticationError) as caught:
        await openai_sdk(fake_client, "gw-not-a-key").responses.create(model="fake", input="hi")
    assert caught.value.status_code == 401
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    api = openai_sdk(fake_client, user.key)
    with pytest.raises(openai.NotFoundError) as caught:
        await api.responses.create(model="nope", input="hi")
    assert (caught.value.body["code"], caught.value.body["param"]) == ("model_not_found", "model")
    bad_bodies = [{"model": "fake", "input": 3}, {"model": "fake", "input": ""},
                  {"model": "fake", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
                  {"model": "fake", "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
                  {"model": "fake", "input": [{"role": "assistant", "content": "only me"}]},
                  {"model": "fake", "input": "hi", "temperature": 3},
                  {"model": "fake", "input": "hi", "max_output_tokens": 0},
                  {"model": "fake", "input": "hi", "store": "yes"},
                  {"model": "fake", "input": "hi", "tools": [{"type": "web_search"}]},
                  {"model": "fake", "input": "hi\x00"}, {"input": "hi"}]
    for body in bad_bodies:
        resp = await fake_client.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {user.key}"})
        assert resp.status == 400, body
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] is not None, body
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve("resp_not-hex")
    assert await rows(db, user.id) == {"threads": [], "messages": [], "usage": []}
    assert upstream.requests == []


# -- replayed events, input items, tool-loop items -------------------

async def test_retrieve_with_stream_replays_the_semantic_events_of_a_stored_response(openai_sdk, fake_client, upstream,
                                                                                     user):
    upstream.queue(Reply(openai_stream(["Hel", "lo", "!"], prompt_tokens=7)))
    api = openai_sdk(fake_client, user.key)
    live = [e async for e in await api.responses.create(model="fake", input="hi", stream=True)]
    response_id = live[0].response.id
    replayed = [e async for e in await api.responses.retrieve(response_id, stream=True)]
    assert [e.type for e in replayed] == [e.type for e in live]
    assert [e.sequence_number for e in replayed] == list(range(len(live)))
    assert [e.delta for e in replayed if e.type == "response.output_text.delta"] == ["Hel", "lo", "!"]
    done = replayed[-1].response
    assert (done.id, done.status, done.output_text) == (response_id, "completed", "Hello!")
    assert (done.usage.input_tokens, done.usage.output_tokens) == (7, 3)
    # resumed after a sequence_number: exactly the events after it
    rest = [e async for e in await api.responses.retrieve(response_id, stream=True, starting_after=4)]
    assert [(e.type, e.sequence_number) for e in rest] == [(e.type, e.sequence_number) for e in replayed[5:]]
    for params, param in (({"stream": "true", "starting_after": bad}, "starting_after")
                          for bad in ("x", "--5", "+5", "1e3", "99999999999", "-2")):
        resp = await fake_client.get(f"/v1/responses/{response_id}", params=params, headers=user.headers)
        assert resp.status == 400 and (await resp.json())["error"]["param"] == param, params
    resp = await fake_client.get(f"/v1/responses/{response_id}", params={"stream": "yes"}, headers=user.headers)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "stream"


async def test_retrieve_with_stream_of_a_failed_response_is_created_then_failed(openai_sdk, fake_client, upstream, user,
                                                                                db):
    upstream.queue(Reply(status=400, body=b'{"error":{"message":"no such thing"}}'))
    api = openai_sdk(fake_client, user.key)
    with pytest.raises(openai.APIStatusError):
        await api.responses.create(model="fake", input="hi")
    message_id = await db.fetchval("SELECT id FROM messages WHERE user_id = $1 AND role = 'assistant'", user.id)
    events = [e async for e in await api.responses.retrieve("resp_" + message_id.hex, stream=True)]
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.failed"]
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"


async def test_input_items_list_the_stored_user_message(openai_sdk, fake_client, upstream, user):
    api = openai_sdk(fake_client, user.key)
    created = await api.responses.create(model="fake", input=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi there"}])
    page = await api.responses.input_items.list(created.id)
    assert [(i.type, i.role, i.status, [c.text for c in i.content]) for i in page.data] == [
        ("message", "user", "completed", ["hi there"])]
    assert page.data[0].id.startswith("msg_") and page.data[0].id != created.output[0].id
    resp = await fake_client.get(f"/v1/responses/{created.id}/input_items", params={"order": "asc", "limit": "1"},
                                 headers=user.headers)
    body = await resp.json()
    assert (body["object"], body["has_more"], body["first_id"], body["last_id"]) == (
        "list", False, page.data[0].id, page.data[0].id)
    after = await api.responses.input_items.list(created.id, after=page.data[0].id)
    assert after.data == []
    for params, param in (({"limit": "0"}, "limit"), ({"order": "up"}, "order")):
        resp = await fake_client.get(f"/v1/responses/{created.id}/input_items", params=params, headers=user.headers)
        assert resp.status == 400 and (await resp.json())["error"]["param"] == param
    with pytest.raises(openai.NotFoundError):
        await api.responses.input_items.list("resp_" + uuid.uuid4().hex)


async def test_function_call_items_are_the_tool_loop_context(openai_sdk, fake_client, upstream, user):
    upstream.queue(Reply(openai_stream(["Sunny."])))
    response = await openai_sdk(fake_client, user.key).responses.create(model="fake", store=False, input=[
        {"role": "user", "content": "weather in Oslo and Bergen?"},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{\"city\":\"Oslo\"}"},
        {"type": "function_call", "call_id": "call_2", "name": "weather", "arguments": "{\"city\":\"Bergen\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sun"},
        {"type": "function_call_output", "call_id": "call_2", "output": "sun"},
    ])
    assert response.output_text == "Sunny."
    assert upstream.requests[0]["messages"] == [
        {"role": "user", "content": "weather in Oslo and Bergen?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}},
            {"id": "call_2", "type": "function",
             "function": {"name": "weather", "arguments": "{\"city\":\"Bergen\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sun"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sun"}]


@pytest.mark.parametrize("item, param, words", [
    ({"type": "reasoning", "id": "rs_1", "summary": []}, "input[0]", "'reasoning' item"),
    ({"type": "item_reference", "id": "msg_1"}, "input[0]", "'item_reference' item"),
    ({"type": "function_call", "call_id": "c", "name": "f"}, "input[0].arguments", "must be a string"),
    ({"type": "function_call_output", "call_id": "c", "output": 5}, "input[0].output", "must be a string"),
])
async def test_other_input_items_are_refused_by_name(fake_client, upstream, user, item, param, words):
    resp = await fake_client.post("/v1/responses", headers=user.headers, json={
        "model": "fake", "store": False, "input": [item, {"role": "user", "content": "hi"}]})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == param and words in error["message"]
    assert upstream.requests == []


async def test_retrieve_with_stream_follows_a_response_still_generating(openai_sdk, fake_client, upstream, user, db):
    release = asyncio.Event()  # the upstream holds after "Hel" until both listeners are attached
    upstream.queue(Reply(openai_stream(["Hel", "lo", "!"], prompt_tokens=7), hold_at=2, release=release))
    api = openai_sdk(fake_client, user.key)
    live = await api.responses.create(model="fake", input="hi", stream=True)
    first = [await anext(live) for _ in range(5)]  # created, in_progress, item added, part added, "Hel"
    assert first[-1].delta == "Hel"
    response_id = first[0].response.id
    follower = await api.responses.retrieve(response_id, stream=True)
    head = [await anext(follower) for _ in range(5)]  # the same five, replayed from the live generation
    assert [(e.type, e.sequence_number) for e in head] == [(e.type, e.sequence_number) for e in first]
    release.set()
    rest_live = [e async for e in live]
    rest_followed = [e async for e in follower]
    assert [e.type for e in rest_followed] == [e.type for e in rest_live] == (
        ["response.output_text.delta"] * 2 + CLOSING_EVENTS)
    assert rest_followed[-1].response.output_text == rest_live[-1].response.output_text == "Hello!"


PIXEL = "data:image/png;base64,iVBORw0KGgo="


async def test_input_image_parts_reach_the_upstream_and_are_stored(openai_sdk, fake_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["A pixel."])))
    api = openai_sdk(fake_client, user.key)
    response = await api.responses.create(model="fake", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": PIXEL, "detail": "low"}]}])
    parts = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}}]
    assert upstream.requests[0]["messages"] == [{"role": "user", "content": parts}]
    assert response.output_text == "A pixel."
    assert dict(await db.fetchrow("SELECT content, parts FROM messages WHERE user_id = $1 AND role = 'user'",
                                  user.id)) == {"content": "what is this?", "parts": parts}
    items = (await api.responses.input_items.list(response.id)).data
    assert [(c.type, getattr(c, "text", None), getattr(c, "image_url", None)) for c in items[0].content] == [
        ("input_text", "what is this?", None), ("input_image", None, PIXEL)]
    resp = await fake_client.post("/v1/responses", headers=user.headers, json={"model": "fake", "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x/y.png", "detail": "auto"}]}]})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["param"], error["type"]) == ("input[0].content", "invalid_request_error")
    assert "input[0].content[0].image_url must be an http(s) URL" in error["message"]
