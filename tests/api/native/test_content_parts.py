"""Content parts in the native API: `content` in POST /api/chat may be a list of
OpenAI-style parts (text, image_url), stored as jsonb and returned exactly as sent (`parts`, with
`content` holding their text), sent to OpenAI-compatible upstreams as they are and translated into
Anthropic's content blocks."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from gateway.providers.demo import demo_reply
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream, Reply, openai_stream, parse_sse
from tests.support.gemini import FakeGemini
from tests.support.providers import FakeAnthropic

PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
         "AAAABJRU5ErkJggg==")
PARTS = [{"type": "text", "text": "What is in"},
         {"type": "image_url", "image_url": {"url": PIXEL}},
         {"type": "text", "text": "and in this one?"},
         {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}}]
TEXT = "What is in and in this one?"


async def user_row(db: Any, user_id: uuid.UUID) -> dict[str, Any]:
    return dict(await db.fetchrow("SELECT content, parts FROM messages WHERE user_id = $1 AND role = 'user' "
                                  "ORDER BY seq DESC LIMIT 1", user_id))


async def finished(db: Any, user_id: uuid.UUID) -> bool:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND role = 'assistant' "
                             "AND status = 'streaming'", user_id) == 0


async def test_parts_are_stored_and_returned_exactly_as_sent(make_client: MakeClient, user: User, db: Any):
    client = await make_client()
    resp = await client.post("/api/chat", headers=user.headers, json={"content": PARTS})
    assert resp.status == 202
    accepted = await resp.json()
    assert (accepted["message"]["content"], accepted["message"]["parts"]) == (TEXT, PARTS)
    assert await user_row(db, user.id) == {"content": TEXT, "parts": PARTS}
    got = await (await client.get(f"/api/messages/{accepted['message']['id']}", headers=user.headers)).json()
    assert got["parts"] == PARTS
    thread = await (await client.get(f"/api/threads/{accepted['thread_id']}", headers=user.headers)).json()
    assert [m["parts"] for m in thread["messages"]] == [PARTS, None]  # the reply is plain text
    assert thread["title"] == TEXT


async def test_the_demo_model_answers_about_the_text_parts(make_client: MakeClient, user: User, db: Any):
    client = await make_client()
    resp = await client.post("/api/chat", headers=user.headers, json={"content": PARTS, "stream": True})
    events = parse_sse(await resp.read())
    deltas = [orjson.loads(e.data)["delta"] for e in events if e.event == "message" and e.data != "[DONE]"]
    assert deltas == demo_reply(TEXT, 12)


async def test_an_openai_upstream_gets_the_parts_now_and_in_the_history(make_client: MakeClient,
                                                                        upstream: FakeUpstream, user: User,
                                                                        db: Any):
    upstream.queue(Reply(openai_stream(["A cat."])), Reply(openai_stream(["Yes."])))
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-up", OPENAI_MODEL="fake")
    first = await (await client.post("/api/chat", headers=user.headers, json={"content": PARTS})).json()
    await wait_for(lambda: finished(db, user.id))
    assert upstream.requests[0]["messages"] == [{"role": "user", "content": PARTS}]
    await client.post("/api/chat", headers=user.headers, json={"content": "sure?", "thread_id": first["thread_id"]})
    await wait_for(lambda: finished(db, user.id))
    assert upstream.requests[1]["messages"] == [{"role": "user", "content": PARTS},
                                                {"role": "assistant", "content": "A cat."},
                                                {"role": "user", "content": "sure?"}]


async def test_an_anthropic_upstream_gets_translated_blocks(make_client: MakeClient, config_file: Any,
                                                            aiohttp_server: Any, user: User, db: Any):
    fake = FakeAnthropic()
    server = await aiohttp_server(fake.app)
    client = await make_client(GATEWAY_CONFIG=config_file(f"""
[providers.claude]
kind = "anthropic"
base_url = "{server.make_url('/v1')}"
api_key = "sk-ant-test"

[models.claude]
provider = "claude"
upstream = "claude-x"
"""))
    resp = await client.post("/api/chat", headers=user.headers, json={"content": PARTS, "model": "claude"})
    assert resp.status == 202
    await wait_for(lambda: finished(db, user.id))
    assert fake.requests[0]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is in"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL.split(",", 1)[1]}},
        {"type": "text", "text": "and in this one?"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]}]


async def test_an_image_alone_is_a_message(make_client: MakeClient, upstream: FakeUpstream, user: User, db: Any):
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-up", OPENAI_MODEL="fake")
    image = [{"type": "image_url", "image_url": {"url": PIXEL, "detail": "high"}}]
    resp = await client.post("/api/chat", headers=user.headers, json={"content": image})
    assert resp.status == 202
    await wait_for(lambda: finished(db, user.id))
    assert await user_row(db, user.id) == {"content": "", "parts": image}
    assert upstream.requests[0]["messages"] == [{"role": "user", "content": image}]


BAD = [
    ([], "1 to 100 parts"),
    ([{"type": "text", "text": "hi"}] * 101, "1 to 100 parts"),
    ([{"type": "text", "text": "  "}], "must not be empty"),
    (["hi"], "text or image_url part"),
    ([{"type": "audio", "audio": "x"}], "text or image_url part"),
    ([{"type": "text"}], "content[0] must be"),
    ([{"type": "text", "text": 5}], "content[0] must be"),
    ([{"type": "text", "text": "hi", "extra": 1}], "content[0] must be"),
    ([{"type": "text", "text": "a\x00b"}], "NUL"),
    ([{"type": "image_url", "image_url": "https://example.com/a.png"}], "content[0] must be"),
    ([{"type": "image_url", "image_url": {}}], "content[0] must be"),
    ([{"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}], "http(s) URL"),
    ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}], "http(s) URL"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}], "http(s) URL"),
    ([{"type": "image_url", "image_url": {"url": "https://example.com/a b.png"}}], "http(s) URL"),
    ([{"type": "image_url", "image_url": {"url": PIXEL, "detail": "ultra"}}], "detail"),
    ([{"type": "image_url", "image_url": {"url": PIXEL, "size": 3}}], "content[0] must be"),
    ({"type": "text", "text": "hi"}, "string or a list"),
]


@pytest.mark.parametrize("content, words", BAD, ids=[str(i) for i in range(len(BAD))])
async def test_bad_parts_are_a_400_and_persist_nothing(make_client: MakeClient, user: User, db: Any,
                                                       content: Any, words: str):
    client = await make_client()
    resp = await client.post("/api/chat", headers=user.headers, json={"content": content})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request" and words in error["message"], error
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 0


async def test_parts_no_model_of_the_chain_can_take_are_a_400_naming_it_and_persist_nothing(
        make_client: MakeClient, config_file: Any, aiohttp_server: Any, user: User, db: Any):
    fake = FakeGemini()
    fake.server = await aiohttp_server(fake.app)
    client = await make_client(GATEWAY_CONFIG=config_file(f"""
[providers.google]
kind = "gemini"
base_url = "{fake.base_url}"
api_key = "gm-test-0123456789"

[models.gem]
provider = "google"
upstream = "gemini-up"
"""))
    for stream in (True, False):
        resp = await client.post("/api/chat", headers=user.headers,
                                 json={"content": PARTS, "model": "gem", "stream": stream})
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert (error["type"], error["message"]) == ("invalid_request", "model 'gem' cannot take images by URL")
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 0
    assert await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", user.id) == 0
    assert fake.requests == []
    resp = await client.post("/api/chat", headers=user.headers,  # an inline image it takes
                             json={"content": PARTS[:3], "model": "gem", "stream": False})
    assert resp.status == 202


async def test_the_arena_refuses_parts_rather_than_drop_the_images(make_client: MakeClient, user: User, db: Any):
    client = await make_client()
    resp = await client.post("/api/arena", headers=user.headers, json={"content": PARTS})
    assert resp.status == 400 and "arena" in (await resp.json())["error"]["message"]
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 0
