"""Bad input gets a clear JSON error and changes nothing.

Every case asserts the exact error shape (`{"error": {"type", "message", "request_id"}}`, the
request id equal to the `X-Request-Id` header) and that the caller's threads, messages and
usage rows are exactly as they were before. Path ids and list parameters of the thread
endpoints are covered in test_threads.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import ClientResponse

ERROR_TYPES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large"}


async def assert_error(resp: ClientResponse, status: int) -> dict[str, Any]:
    """The response is `status` with exactly the documented JSON error body; returns that body."""
    raw = await resp.read()
    assert resp.status == status, raw
    assert resp.content_type == "application/json"
    body = orjson.loads(raw)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"type", "message", "request_id"}
    assert error["type"] == ERROR_TYPES[status]
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] == resp.headers["X-Request-Id"] and error["request_id"]
    return error


async def footprint(db: asyncpg.Pool, user_id: uuid.UUID) -> tuple[int, int, int]:
    """(threads, messages, usage rows) of one user."""
    row = await db.fetchrow("""
        SELECT (SELECT count(*) FROM threads WHERE user_id = $1) AS threads,
               (SELECT count(*) FROM messages WHERE user_id = $1) AS messages,
               (SELECT count(*) FROM usage WHERE user_id = $1) AS usage""", user_id)
    return row["threads"], row["messages"], row["usage"]


def body(obj: Any) -> bytes:
    return orjson.dumps(obj)


BAD_CHAT_BODIES = [
    pytest.param(b'{"content": "hi"', id="invalid-json"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b'{"content": "\xff"}', id="invalid-utf8"),
    pytest.param(b'[{"content": "hi"}]', id="array"),
    pytest.param(b'"hi"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(body({}), id="content-missing"),
    pytest.param(body({"content": None}), id="content-null"),
    pytest.param(body({"content": 5}), id="content-number"),
    pytest.param(body({"content": ["hi"]}), id="content-list"),
    pytest.param(body({"content": ""}), id="content-empty"),
    pytest.param(body({"content": " \n\t "}), id="content-whitespace"),
    pytest.param(body({"content": "a\u0000b"}), id="content-nul"),  # PostgreSQL text cannot hold NUL
    pytest.param(body({"content": "hi", "stream": "yes"}), id="stream-string"),
    pytest.param(body({"content": "hi", "stream": 1}), id="stream-number"),
    pytest.param(body({"content": "hi", "max_tokens": 0}), id="max-tokens-zero"),
    pytest.param(body({"content": "hi", "max_tokens": -5}), id="max-tokens-negative"),
    pytest.param(body({"content": "hi", "max_tokens": "5"}), id="max-tokens-string"),
    pytest.param(body({"content": "hi", "max_tokens": True}), id="max-tokens-true"),
    pytest.param(body({"content": "hi", "max_tokens": 1.5}), id="max-tokens-float"),
    pytest.param(body({"content": "hi", "temperature": "hot"}), id="temperature-string"),
    pytest.param(body({"content": "hi", "model": 5}), id="model-number"),
    pytest.param(body({"content": "hi", "model": "no-such-model"}), id="model-unknown"),
    pytest.param(body({"content": "hi", "client_message_id": ""}), id="client-id-empty"),
    pytest.param(body({"content": "hi", "client_message_id": "x" * 201}), id="client-id-too-long"),
    pytest.param(body({"content": "hi", "client_message_id": 7}), id="client-id-number"),
    pytest.param(body({"content": "hi", "client_message_id": "a\u0000b"}), id="client-id-nul"),
    pytest.param(body({"content": "hi", "thread_id": 7}), id="thread-id-number"),
    pytest.param(body({"content": "hi", "thread_id": "not-a-uuid"}), id="thread-id-not-uuid"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("raw", BAD_CHAT_BODIES)
async def test_bad_chat_body_is_a_400_and_writes_nothing(client, user, db, raw: bytes, stream: bool):
    before = await footprint(db, user.id)
    # the SSE variant asks by Accept header: a 400 must still be JSON, never an event stream
    headers = {**user.headers, "Content-Type": "application/json",
               **({"Accept": "text/event-stream"} if stream else {})}
    resp = await client.post("/api/chat", data=raw, headers=headers)
    await assert_error(resp, 400)
    assert await footprint(db, user.id) == before


async def test_client_message_id_of_exactly_200_characters_is_accepted(client, user, db):
    # the boundary next to the too-long case above: it must not be off by one
    client_id = "x" * 200
    resp = await client.post("/api/chat", json={"content": "hi", "client_message_id": client_id},
                             headers=user.headers)
    assert resp.status == 202, await resp.text()
    rows = await db.fetch("SELECT client_message_id FROM messages WHERE user_id = $1 AND role = 'user'", user.id)
    assert [r["client_message_id"] for r in rows] == [client_id]


async def test_chat_in_an_unknown_thread_is_a_404_and_writes_nothing(client, user, db):
    before = await footprint(db, user.id)
    resp = await client.post("/api/chat", json={"content": "hi", "thread_id": str(uuid.uuid4())},
                             headers=user.headers)
    await assert_error(resp, 404)
    assert await footprint(db, user.id) == before


async def test_chat_in_another_users_thread_is_a_404_and_touches_neither_user(client, user, make_user, db):
    other = await make_user()
    resp = await client.post("/api/threads", json={"title": "private"}, headers=other.headers)
    assert resp.status == 201
    thread_id = uuid.UUID((await resp.json())["id"])
    thread_before = dict(await db.fetchrow("SELECT * FROM threads WHERE id = $1", thread_id))
    mine, theirs = await footprint(db, user.id), await footprint(db, other.id)

    resp = await client.post("/api/chat", json={"content": "let me in", "thread_id": str(thread_id),
                                                "client_message_id": "intruder-1"}, headers=user.headers)
    await assert_error(resp, 404)
    assert await footprint(db, user.id) == mine
    assert await footprint(db, other.id) == theirs
    # not even the thread's updated_at moved
    assert dict(await db.fetchrow("SELECT * FROM threads WHERE id = $1", thread_id)) == thread_before


BAD_THREAD_BODIES = [
    pytest.param(b'{"title": ', id="invalid-json"),
    pytest.param(b'["a"]', id="array"),
    pytest.param(b'"a"', id="string"),
    pytest.param(body({"title": 5}), id="title-number"),
    pytest.param(body({"title": "x" * 201}), id="title-too-long"),
    pytest.param(body({"title": "a\u0000b"}), id="title-nul"),
]


@pytest.mark.parametrize("path", ["/api/threads", "/v1/chat/sessions"])
@pytest.mark.parametrize("raw", BAD_THREAD_BODIES)
async def test_bad_thread_body_is_a_400_and_creates_no_thread(client, user, db, raw: bytes, path: str):
    before = await footprint(db, user.id)
    resp = await client.post(path, data=raw, headers={**user.headers, "Content-Type": "application/json"})
    await assert_error(resp, 400)
    assert await footprint(db, user.id) == before


LIMIT = 2048
OVERSIZED = body({"content": "x" * 3000})  # valid JSON: only its size is wrong


async def chunked(data: bytes, size: int = 500):
    # an async generator body makes the client send Transfer-Encoding: chunked, no Content-Length
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("path", ["/api/chat", "/api/threads"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_the_limit_is_a_413_and_writes_nothing(make_client, user, db, path: str, framing: str):
    client = await make_client(MAX_BODY_BYTES=str(LIMIT))
    assert len(OVERSIZED) > 3000
    before = await footprint(db, user.id)
    headers = {**user.headers, "Content-Type": "application/json"}
    data = OVERSIZED if framing == "content-length" else chunked(OVERSIZED)
    resp = await client.post(path, data=data, headers=headers)
    if framing == "chunked":
        assert "Content-Length" not in resp.request_info.headers
        assert resp.request_info.headers["Transfer-Encoding"] == "chunked"
    await assert_error(resp, 413)
    assert await footprint(db, user.id) == before


async def test_body_just_under_the_limit_is_accepted(make_client, user, db):
    client = await make_client(MAX_BODY_BYTES=str(LIMIT))
    raw = body({"content": "x" * (LIMIT - 20)})
    assert len(raw) <= LIMIT
    resp = await client.post("/api/chat", data=raw, headers={**user.headers, "Content-Type": "application/json"})
    assert resp.status == 202, await resp.text()
    assert (await footprint(db, user.id))[:2] == (1, 2)  # a thread, the user message, the placeholder


BAD_AUTH = [
    pytest.param(None, id="missing"),
    pytest.param("Basic x", id="basic"),
    pytest.param("Bearer", id="bearer-without-token"),
    pytest.param("Bearer ", id="bearer-blank"),
    pytest.param("Bearer gwk_unknown", id="unknown-key"),
    pytest.param("gwk_unknown", id="no-scheme"),
    # shaped like a JWT, but this gateway has no JWT secret or JWKS configured
    pytest.param("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", id="jwt-not-configured"),
]

THREAD = "00000000-0000-4000-8000-000000000000"
ENDPOINTS = [
    pytest.param("POST", "/api/chat", id="chat"),
    pytest.param("POST", "/api/threads", id="create-thread"),
    pytest.param("POST", "/v1/chat/sessions", id="create-session"),
    pytest.param("GET", "/api/threads", id="list-threads"),
    pytest.param("GET", f"/api/threads/{THREAD}", id="get-thread"),
    pytest.param("DELETE", f"/api/threads/{THREAD}", id="delete-thread"),
]


@pytest.mark.parametrize("method,path", ENDPOINTS)
@pytest.mark.parametrize("authorization", BAD_AUTH)
async def test_bad_credential_is_a_401_and_writes_nothing(client, db, method: str, path: str,
                                                          authorization: str | None):
    marker = "no-auth-" + uuid.uuid4().hex  # a valid body, recognisable if anything were written
    headers = {"Authorization": authorization} if authorization is not None else {}
    resp = await client.request(method, path, headers=headers,
                                json={"content": "hi", "client_message_id": marker, "title": marker})
    await assert_error(resp, 401)
    assert await db.fetchval("SELECT count(*) FROM messages WHERE client_message_id = $1", marker) == 0
    assert await db.fetchval("SELECT count(*) FROM threads WHERE title = $1", marker) == 0


@pytest.mark.parametrize("path", ["/api/chat", "/api/threads"])
async def test_key_without_chat_scope_is_a_403_and_writes_nothing(client, make_user, db, path: str):
    arena_only = await make_user(scopes=("arena",))
    resp = await client.post(path, json={"content": "hi", "title": "t"}, headers=arena_only.headers)
    error = await assert_error(resp, 403)
    assert "chat" in error["message"]
    assert await footprint(db, arena_only.id) == (0, 0, 0)


async def test_unknown_route_is_a_404_json_error(client, user):
    resp = await client.get("/api/nothing-here", headers=user.headers)
    await assert_error(resp, 404)


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/api/chat", "POST"),
    ("PUT", "/api/chat", "POST"),
    ("PATCH", "/api/threads", "GET,POST"),
    ("POST", f"/api/threads/{THREAD}", "DELETE,GET"),
])
async def test_wrong_method_is_a_405_json_error_with_allow(client, user, db, method: str, path: str, allow: str):
    before = await footprint(db, user.id)
    resp = await client.request(method, path, headers=user.headers, json={"content": "hi"})
    await assert_error(resp, 405)
    # HEAD rides along with GET in aiohttp's router
    assert set(resp.headers["Allow"].split(",")) - {"HEAD"} == set(allow.split(","))
    assert await footprint(db, user.id) == before


async def test_incoming_request_id_is_echoed_in_the_error(client):
    resp = await client.post("/api/chat", json={"content": "hi"}, headers={"X-Request-Id": "trace-123"})
    error = await assert_error(resp, 401)
    assert error["request_id"] == "trace-123"
