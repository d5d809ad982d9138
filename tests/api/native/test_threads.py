"""Threads: create, list newest first in keyset pages, read with messages, delete.

Deleting a thread removes its content but never its accounting: usage rows have no foreign
key to messages and stay behind.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.api.native.threads import decode_cursor, encode_cursor
from gateway.providers.demo import demo_reply
from gateway.store.messages import MESSAGE_COLUMNS
from tests.support.common import wait_for
from tests.support.fakes import Reply, openai_stream

THREAD_KEYS = {"id", "title", "created_at", "updated_at"}
MESSAGE_KEYS = {c.strip() for c in MESSAGE_COLUMNS.split(",")}


def as_json(row: asyncpg.Record | dict[str, Any]) -> Any:
    """A database row as the API serialises it (orjson: UUIDs and datetimes as strings)."""
    return orjson.loads(orjson.dumps(dict(row)))


async def create_thread(client: TestClient, headers: dict[str, str], title: str | None = None) -> dict[str, Any]:
    resp = await client.post("/api/threads", json={"title": title} if title is not None else {}, headers=headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def message_count(db: asyncpg.Pool, thread_id: uuid.UUID | str) -> int:
    return await db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", uuid.UUID(str(thread_id)))


async def chat_and_wait(client: TestClient, user: Any, db: asyncpg.Pool, **body: Any) -> dict[str, Any]:
    """A non-streaming turn, returned once its reply is saved (the 202 body)."""
    resp = await client.post("/api/chat", json={"stream": False, **body}, headers=user.headers)
    assert resp.status == 202, await resp.text()
    accepted = await resp.json()
    reply_id = uuid.UUID(accepted["assistant_message_id"])

    async def saved() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE id = $1", reply_id) == "complete"

    await wait_for(saved)
    return accepted


# -- create --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/threads", "/v1/chat/sessions"])
@pytest.mark.parametrize("payload,title", [
    pytest.param({"title": "Trip plans"}, "Trip plans", id="titled"),
    pytest.param({}, None, id="untitled-empty-object"),
    pytest.param(None, None, id="untitled-no-body"),
    pytest.param({"title": None}, None, id="untitled-null"),
])
async def test_create_thread_returns_201_and_the_stored_row(client, user, db, path: str,
                                                             payload: dict[str, Any] | None, title: str | None):
    kwargs = {"json": payload} if payload is not None else {}
    resp = await client.post(path, headers=user.headers, **kwargs)
    assert resp.status == 201, await resp.text()
    thread = await resp.json()
    assert set(thread) == THREAD_KEYS
    row = await db.fetchrow("SELECT id, user_id, title, created_at, updated_at FROM threads WHERE id = $1",
                            uuid.UUID(thread["id"]))
    assert row["user_id"] == user.id and row["title"] == title
    assert thread == as_json({k: row[k] for k in THREAD_KEYS})
    assert await message_count(db, thread["id"]) == 0


# -- list ----------------------------------------------------------------------------------------

async def test_threads_are_listed_newest_first_in_keyset_pages(client, make_user):
    user = await make_user()  # fresh: the list holds exactly the threads made here
    made = [await create_thread(client, user.headers, f"t{i}") for i in range(5)]
    newest_first = [t["id"] for t in reversed(made)]

    pages: list[list[dict[str, Any]]] = []
    cursors: list[str | None] = []
    cursor: str | None = None
    while True:
        query = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        resp = await client.get("/api/threads", params=query, headers=user.headers)
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        assert set(page) == {"threads", "next_cursor"}
        pages.append(page["threads"])
        cursor = page["next_cursor"]
        cursors.append(cursor)
        if cursor is None:
            break
        assert len(pages) < 5, "pagination does not end"

    assert [len(p) for p in pages] == [2, 2, 1]
    assert all(isinstance(c, str) and c for c in cursors[:2]) and cursors[2] is None
    # no thread repeated or skipped, each exactly as created
    assert [t["id"] for p in pages for t in p] == newest_first
    assert [t for p in pages for t in p] == list(reversed(made))


async def test_a_page_that_ends_exactly_at_the_last_thread_has_no_next_cursor(client, make_user):
    user = await make_user()
    made = [await create_thread(client, user.headers) for _ in range(4)]
    resp = await client.get("/api/threads", params={"limit": "4"}, headers=user.headers)
    page = await resp.json()
    assert [t["id"] for t in page["threads"]] == [t["id"] for t in reversed(made)]
    assert page["next_cursor"] is None


async def test_listing_shows_only_the_callers_threads(client, make_user):
    alice, bob = await make_user(), await make_user()
    await create_thread(client, alice.headers, "alice's")
    resp = await client.get("/api/threads", headers=bob.headers)
    assert resp.status == 200
    assert await resp.json() == {"threads": [], "next_cursor": None}


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    pytest.param("not a cursor!", id="garbage"),
    pytest.param(b64("hello"), id="no-separator"),
    pytest.param(b64("2024-01-01T00:00:00+00:00|not-a-uuid"), id="bad-uuid"),
    pytest.param(b64(f"yesterday|{uuid.uuid4()}"), id="bad-timestamp"),
    pytest.param(b64(f"2024-01-01T00:00:00|{uuid.uuid4()}"), id="timestamp-without-zone"),
    pytest.param(base64.urlsafe_b64encode(b"\xff\xfe|x").decode(), id="not-utf8"),
    # valid timestamps whose UTC time falls outside the calendar
    pytest.param(b64(f"0001-01-01T00:00:00+14:00|{uuid.uuid4()}"), id="before-year-1-in-utc"),
    pytest.param(b64(f"9999-12-31T23:59:59-14:00|{uuid.uuid4()}"), id="after-year-9999-in-utc"),
])
async def test_bad_cursor_is_a_400(client, user, cursor: str):
    resp = await client.get("/api/threads", params={"cursor": cursor}, headers=user.headers)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request" and "cursor" in error["message"]


@pytest.mark.parametrize("limit", ["0", "101", "x", "-1", "1.5", "", "²", "9" * 5000])
async def test_limit_outside_1_to_100_is_a_400(client, user, limit: str):
    resp = await client.get("/api/threads", params={"limit": limit}, headers=user.headers)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request" and "limit" in error["message"]


@pytest.mark.parametrize("limit", ["1", "100"])
async def test_limit_bounds_are_accepted(client, user, limit: str):
    await create_thread(client, user.headers)
    resp = await client.get("/api/threads", params={"limit": limit}, headers=user.headers)
    assert resp.status == 200, await resp.text()
    assert len((await resp.json())["threads"]) == 1


# -- read ----------------------------------------------------------------------------------------

async def test_thread_returns_its_messages_in_order_with_exact_fields(client, user, db):
    accepted = await chat_and_wait(client, user, db, content="Hello there", client_message_id="turn-1")
    thread_id = accepted["thread_id"]

    resp = await client.get(f"/api/threads/{thread_id}", headers=user.headers)
    assert resp.status == 200
    thread = await resp.json()
    assert set(thread) == THREAD_KEYS | {"messages"}
    assert thread["id"] == thread_id and thread["title"] == "Hello there"

    asked, answer = thread["messages"]
    assert set(asked) == MESSAGE_KEYS and set(answer) == MESSAGE_KEYS
    assert asked == accepted["message"]  # the stored user message, as the 202 returned it
    assert {k: asked[k] for k in ("thread_id", "role", "content", "status", "reply_to", "slot",
                                  "client_message_id", "model", "error", "metadata")} == {
        "thread_id": thread_id, "role": "user", "content": "Hello there", "status": "complete",
        "reply_to": None, "slot": None, "client_message_id": "turn-1", "model": None, "error": None,
        "metadata": {}}

    usage = await db.fetchrow("SELECT prompt_tokens, completion_tokens FROM usage WHERE message_id = $1",
                              uuid.UUID(answer["id"]))
    assert answer["id"] == accepted["assistant_message_id"]
    assert {k: answer[k] for k in ("thread_id", "role", "content", "status", "reply_to", "slot",
                                   "client_message_id", "model", "provider", "prompt_tokens",
                                   "completion_tokens", "error")} == {
        "thread_id": thread_id, "role": "assistant", "content": "".join(demo_reply("Hello there", 12)),
        "status": "complete", "reply_to": asked["id"], "slot": None, "client_message_id": None,
        "model": "demo", "provider": "demo", "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": 12, "error": None}
    assert usage["completion_tokens"] == 12
    assert answer["metadata"]["finish_reason"] == "stop"
    assert answer["finished_at"] is not None

    # and every field is exactly the stored row
    rows = await db.fetch(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE thread_id = $1 ORDER BY seq",
                          uuid.UUID(thread_id))
    assert thread["messages"] == [as_json(r) for r in rows]


async def test_a_second_turn_appends_after_the_first(client, user, db):
    first = await chat_and_wait(client, user, db, content="one")
    await chat_and_wait(client, user, db, content="two", thread_id=first["thread_id"])
    resp = await client.get(f"/api/threads/{first['thread_id']}", headers=user.headers)
    messages = (await resp.json())["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "one"), ("assistant", "".join(demo_reply("one", 12))),
        ("user", "two"), ("assistant", "".join(demo_reply("two", 12)))]
    assert messages[3]["reply_to"] == messages[2]["id"]


# -- delete --------------------------------------------------------------------------------------

async def test_delete_removes_thread_and_messages_but_keeps_usage(client, user, db):
    accepted = await chat_and_wait(client, user, db, content="forget me")
    thread_id, reply_id = accepted["thread_id"], uuid.UUID(accepted["assistant_message_id"])
    usage_before = dict(await db.fetchrow("SELECT * FROM usage WHERE message_id = $1", reply_id))
    daily_before = await db.fetchval("SELECT sum(tokens) FROM daily_usage WHERE user_id = $1", user.id)

    resp = await client.delete(f"/api/threads/{thread_id}", headers=user.headers)
    assert resp.status == 204
    assert await resp.read() == b""

    resp = await client.get(f"/api/threads/{thread_id}", headers=user.headers)
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "not_found"
    assert await db.fetchval("SELECT count(*) FROM threads WHERE id = $1", uuid.UUID(thread_id)) == 0
    assert await message_count(db, thread_id) == 0
    # accounting outlives content
    assert dict(await db.fetchrow("SELECT * FROM usage WHERE message_id = $1", reply_id)) == usage_before
    assert await db.fetchval("SELECT sum(tokens) FROM daily_usage WHERE user_id = $1", user.id) == daily_before

    resp = await client.delete(f"/api/threads/{thread_id}", headers=user.headers)
    assert resp.status == 404  # a second delete finds nothing


async def test_deleting_a_thread_mid_generation_still_records_its_usage(make_client, upstream, user, db):
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_MODEL="fake")
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["Hel", "lo"], prompt_tokens=9), on_request=lambda _: release.wait()))
    resp = await client.post("/api/chat", json={"content": "hi", "stream": False}, headers=user.headers)
    assert resp.status == 202
    accepted = await resp.json()
    reply_id = uuid.UUID(accepted["assistant_message_id"])

    async def upstream_called() -> bool:
        return len(upstream.requests) == 1

    await wait_for(upstream_called)  # the reply is in flight, held by the upstream
    resp = await client.delete(f"/api/threads/{accepted['thread_id']}", headers=user.headers)
    assert resp.status == 204
    release.set()

    async def usage_saved() -> bool:
        return await db.fetchval("SELECT count(*) FROM usage WHERE message_id = $1", reply_id) == 1

    await wait_for(usage_saved)
    usage = await db.fetchrow("SELECT user_id, model, prompt_tokens, completion_tokens, total_tokens "
                              "FROM usage WHERE message_id = $1", reply_id)
    assert dict(usage) == {"user_id": user.id, "model": "fake", "prompt_tokens": 9, "completion_tokens": 2,
                           "total_tokens": 11}
    assert await message_count(db, accepted["thread_id"]) == 0


# -- somebody else's, or not an id ---------------------------------------------------------------

async def test_another_users_thread_is_not_found_and_not_deleted(client, user, make_user, db):
    owner = await make_user()
    accepted = await chat_and_wait(client, owner, db, content="mine")
    thread_id = accepted["thread_id"]
    before = dict(await db.fetchrow("SELECT * FROM threads WHERE id = $1", uuid.UUID(thread_id)))

    for method in ("GET", "DELETE"):
        resp = await client.request(method, f"/api/threads/{thread_id}", headers=user.headers)
        assert resp.status == 404, method
        error = (await resp.json())["error"]
        # the same answer as a thread that does not exist: nothing reveals that it does
        assert error["type"] == "not_found" and error["message"] == "thread not found"

    assert dict(await db.fetchrow("SELECT * FROM threads WHERE id = $1", uuid.UUID(thread_id))) == before
    assert await message_count(db, thread_id) == 2
    resp = await client.get(f"/api/threads/{thread_id}", headers=owner.headers)
    assert resp.status == 200 and len((await resp.json())["messages"]) == 2


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_unknown_thread_is_a_404(client, user, method: str):
    resp = await client.request(method, f"/api/threads/{uuid.uuid4()}", headers=user.headers)
    assert resp.status == 404
    assert (await resp.json())["error"]["message"] == "thread not found"


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("thread_id", ["not-a-uuid", "123", "00000000-0000-0000-0000-00000000000g"])
async def test_non_uuid_thread_id_is_a_400(client, user, db, method: str, thread_id: str):
    await create_thread(client, user.headers)
    resp = await client.request(method, f"/api/threads/{thread_id}", headers=user.headers)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request" and error["request_id"] == resp.headers["X-Request-Id"]
    assert await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", user.id) == 1


def test_cursor_round_trips_through_its_encoding():
    stamp, thread_id = datetime.fromisoformat("2025-03-04T05:06:07.123456+00:00"), uuid.uuid4()
    assert decode_cursor(encode_cursor(stamp, thread_id), uuid.UUID) == (stamp, thread_id)
