"""What a thread's history carries counts as much as the new message: a turn continued on a model
whose upstream cannot express an earlier message of the thread (an image by URL, on Gemini) is a
400 naming the feature and the model, with nothing written, exactly as if the new message carried
it; a fallback chain skips that model and the turn runs on the next link, history and all."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream
from tests.support.gemini import FakeGemini

IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
FIRST = [{"type": "text", "text": "What is this?"}, IMAGE]


def config(openai: FakeUpstream, gemini: FakeGemini) -> str:
    return f"""
[providers.up]
kind = "openai"
base_url = "{openai.base_url}"
api_key = "sk-test-0123456789"

[providers.google]
kind = "gemini"
base_url = "{gemini.base_url}"
api_key = "gm-test-0123456789"

[models.m-openai]
provider = "up"
upstream = "gpt-up"

[models.m-gemini]
provider = "google"
upstream = "gemini-up"

[models.m-gemini-first]
provider = "google"
upstream = "gemini-up"
fallbacks = ["m-openai"]
"""


async def served(aiohttp_server: Any) -> tuple[FakeUpstream, FakeGemini]:
    """The two local upstreams, serving."""
    openai, gemini = FakeUpstream(), FakeGemini()
    for fake in (openai, gemini):
        fake.server = await aiohttp_server(fake.app)
    return openai, gemini


async def counts(db: asyncpg.Pool, user: User) -> tuple[int, int, int, Any]:
    """Rows a turn writes: messages, usage, threads, and the thread's last touch."""
    return (await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id),
            await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id),
            await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", user.id),
            await db.fetchval("SELECT max(updated_at) FROM threads WHERE user_id = $1", user.id))


async def settled(db: asyncpg.Pool, user: User) -> None:
    async def no_live() -> bool:
        return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 "
                                 "AND status IN ('pending', 'streaming')", user.id) == 0

    await wait_for(no_live)


async def image_thread(client: Any, db: asyncpg.Pool, user: User) -> str:
    """A thread whose first message has an image by URL, answered by the OpenAI-compatible model."""
    resp = await client.post("/api/chat", headers=user.headers, json={"content": FIRST, "model": "m-openai"})
    assert resp.status == 202, await resp.text()
    thread_id: str = (await resp.json())["thread_id"]
    await settled(db, user)
    return thread_id


NO_IMAGE_URLS = "model 'm-gemini' cannot take images by URL"


async def refused(resp: Any, message: str, db: asyncpg.Pool, user: User, before: Any) -> None:
    """A 400 invalid_request saying `message`, and nothing written (the user's row counts as `before`)."""
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert (error["type"], error["message"]) == ("invalid_request", message)
    assert await counts(db, user) == before  # nothing written, not even the thread's touch


async def test_a_thread_with_an_image_by_url_continued_on_gemini_is_a_400_and_writes_nothing(
        make_client: MakeClient, config_file: Any, aiohttp_server: Any, user: User, db: asyncpg.Pool) -> None:
    openai, gemini = await served(aiohttp_server)
    client = await make_client(GATEWAY_CONFIG=config_file(config(openai, gemini)))
    thread_id = await image_thread(client, db, user)
    before = await counts(db, user)
    assert before[:3] == (2, 1, 1)

    # a plain text message: only the history holds the image
    for body in ({"stream": True}, {"stream": False}, {"client_message_id": "again-1"}):
        resp = await client.post("/api/chat", headers=user.headers,
                                 json={"content": "And now?", "thread_id": thread_id, "model": "m-gemini", **body})
        await refused(resp, NO_IMAGE_URLS, db, user, before)
    assert gemini.requests == [] and len(openai.requests) == 1

    # the same message in a thread without the image is Gemini's to answer, and so is its next one
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "And now?", "model": "m-gemini"})
    assert resp.status == 202
    text_thread = (await resp.json())["thread_id"]
    await settled(db, user)
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "More?", "thread_id": text_thread, "model": "m-gemini"})
    assert resp.status == 202
    await settled(db, user)
    assert len(gemini.requests) == 2
    assert [c["role"] for c in gemini.requests[-1]["contents"]] == ["user", "model", "user"]


async def test_a_fallback_chain_skips_gemini_for_the_history_and_runs_the_turn_on_the_next_link(
        make_client: MakeClient, config_file: Any, aiohttp_server: Any, user: User, db: asyncpg.Pool) -> None:
    openai, gemini = await served(aiohttp_server)
    client = await make_client(GATEWAY_CONFIG=config_file(config(openai, gemini)))
    thread_id = await image_thread(client, db, user)
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "And now?", "thread_id": thread_id, "model": "m-gemini-first"})
    assert resp.status == 202, await resp.text()
    message_id = uuid.UUID((await resp.json())["assistant_message_id"])
    await settled(db, user)
    assert gemini.requests == []
    # the OpenAI-compatible upstream got the whole conversation, the image where it was
    assert [m["content"] for m in openai.requests[-1]["messages"]] == [FIRST, "Hello", "And now?"]
    reply = await db.fetchrow("SELECT status, model, content, metadata FROM messages WHERE id = $1", message_id)
    assert (reply["status"], reply["model"], reply["content"]) == ("complete", "m-openai", "Hello")
    assert reply["metadata"]["fallback_from"] == "m-gemini-first"
    assert [(a["model"], a["outcome"]) for a in reply["metadata"]["attempts"]] == [
        ("m-gemini-first", "unsupported_feature"), ("m-openai", "ok")]


async def test_a_regenerate_on_gemini_of_a_turn_after_an_image_by_url_is_a_400_and_writes_nothing(
        make_client: MakeClient, config_file: Any, aiohttp_server: Any, user: User, db: asyncpg.Pool) -> None:
    openai, gemini = await served(aiohttp_server)
    client = await make_client(GATEWAY_CONFIG=config_file(config(openai, gemini)))
    thread_id = await image_thread(client, db, user)
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "And now?", "thread_id": thread_id, "model": "m-openai"})
    user_message_id = (await resp.json())["message"]["id"]
    await settled(db, user)
    before = await counts(db, user)
    resp = await client.post(f"/api/messages/{user_message_id}/regenerate", headers=user.headers,
                             json={"model": "m-gemini"})
    await refused(resp, NO_IMAGE_URLS, db, user, before)
    assert gemini.requests == []
    assert openai.requests[-1]["messages"][0]["content"] == FIRST  # the turn before it went there, image and all


async def arena(client: Any, user: User, thread_id: str, models: list[str] | None = None) -> Any:
    body: dict[str, Any] = {"content": "And now?", "thread_id": thread_id}
    if models is not None:
        body["models"] = models
    return await client.post("/api/arena", headers=user.headers, json=body)


async def test_an_arena_on_an_image_thread_refuses_a_slot_that_cannot_take_it_and_draws_among_those_that_can(
        make_client: MakeClient, config_file: Any, aiohttp_server: Any, user: User, db: asyncpg.Pool) -> None:
    openai, gemini = await served(aiohttp_server)
    client = await make_client(GATEWAY_CONFIG=config_file(config(openai, gemini)))
    thread_id = await image_thread(client, db, user)
    before = await counts(db, user)
    resp = await arena(client, user, thread_id, ["m-openai", "m-gemini"])  # asked for: a 400, as a chat turn
    await refused(resp, NO_IMAGE_URLS, db, user, before)
    # drawn: only models whose chain can take the thread (m-gemini-first falls back to m-openai; the
    # built-in demo model takes anything), never m-gemini
    for _ in range(6):
        resp = await arena(client, user, thread_id)
        assert resp.status == 202, await resp.text()
        await settled(db, user)
    pairs = await db.fetch("SELECT model_a, model_b FROM comparisons c JOIN messages m ON m.id = c.message_a "
                           "WHERE m.user_id = $1", user.id)
    assert len(pairs) == 6
    assert {r["model_a"] for r in pairs} | {r["model_b"] for r in pairs} <= {"m-openai", "m-gemini-first", "demo"}
    assert gemini.requests == []
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND role = 'assistant' "
                             "AND status <> 'complete'", user.id) == 0


async def test_an_arena_draw_with_fewer_than_two_models_that_can_take_the_thread_is_a_400_naming_why(
        make_client: MakeClient, config_file: Any, aiohttp_server: Any, user: User, db: asyncpg.Pool) -> None:
    openai, gemini = await served(aiohttp_server)
    only_one = config(openai, gemini).split("[models.m-gemini-first]")[0] + '[models.demo]\nprovider = "demo"\n' \
        'enabled = false\n'  # m-openai alone can take the thread
    client = await make_client(GATEWAY_CONFIG=config_file(only_one))
    thread_id = await image_thread(client, db, user)
    before = await counts(db, user)
    resp = await arena(client, user, thread_id)
    await refused(resp, f"the arena's pairing needs two models that can take this turn: {NO_IMAGE_URLS}", db, user,
                  before)
    assert gemini.requests == []
