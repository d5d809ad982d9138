"""The AI SDK door's bad input: a 400 that names the field, and nothing written. And the chat
id is the caller's own: another user's chat of the same id is not theirs to read, resume or stop."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.support.ai_sdk import API, user_message
from tests.support.auth import JWT_ENV, token_for
from tests.support.chat import fake_client

HI = user_message("u1", "Hi")


async def rows_of(db: Any, user_id: Any) -> tuple[int, int]:
    return (await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", user_id),
            await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user_id))


@pytest.mark.parametrize(("body", "message"), [
    ({"id": "c"}, "messages must be a non-empty list of UI messages"),
    ({"id": "c", "messages": []}, "messages must be a non-empty list of UI messages"),
    ({"id": "c", "messages": [HI, {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "x"}]}]},
     "messages[1].role must be user: the last message is the turn"),
    ({"id": "c", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "video", "url": "x"}]}]},
     "messages[0].parts[0].type must be a UI message part type (text, file, reasoning, tool-*, data-*, ...)"),
    ({"id": "c", "messages": [{"id": "a0", "role": "assistant", "parts": [{"type": "thinking"}]}, HI]},
     "messages[0].parts[0].type must be a UI message part type (text, file, reasoning, tool-*, data-*, ...)"),
    ({"id": "x" * 201, "messages": [HI]}, "id must be a chat id of 1 to 200 characters"),
    ({"id": "", "messages": [HI]}, "id must be a chat id of 1 to 200 characters"),
    ({"messages": [HI]}, "id must be a chat id of 1 to 200 characters"),
    ({"id": "c", "messages": [{"id": "u1", "role": "user", "parts": []}]},
     "messages[0].parts must have a text or an image part"),
    ({"id": "c", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "  "}]}]},
     "messages[0].parts: content must not be empty"),
    ({"id": "c", "messages": [{"id": "u1", "role": "user", "parts": [
        {"type": "file", "mediaType": "application/pdf", "url": "data:application/pdf;base64,AAAA"}]}]},
     "messages[0].parts[0] must be an image: mediaType image/... and a url"),
    ({"id": "c", "messages": [{"role": "user", "parts": [{"type": "text", "text": "Hi"}]}]},
     "messages[0].id must be a string"),
    ({"id": "c", "messages": [HI], "trigger": "resume-stream"},
     "trigger must be submit-message or regenerate-message"),
    ({"id": "c", "messages": [HI], "model": "nope"}, "unknown model 'nope'"),
])
async def test_bad_input_is_a_400_naming_the_field_and_writes_nothing(make_client, upstream, user, db, body, message):
    client = await fake_client(make_client, upstream)
    resp = await client.post(API, headers=user.headers, json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["type"], error["message"]) == ("invalid_request", message)
    assert await rows_of(db, user.id) == (0, 0)
    assert upstream.requests == []


async def test_a_chat_id_over_200_characters_in_the_path_is_a_400(make_client, upstream, user):
    client = await fake_client(make_client, upstream)
    for method, path in (("GET", "stream"), ("GET", "messages"), ("POST", "stop")):
        resp = await client.request(method, f"{API}/{'x' * 201}/{path}", headers=user.headers)
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == "chat id must be a chat id of 1 to 200 characters"


async def test_another_users_chat_of_the_same_id_is_not_theirs(make_client, upstream, make_user, db):
    client = await fake_client(make_client, upstream)
    owner, stranger = await make_user(), await make_user()
    resp = await client.post(API, headers=owner.headers, json={"id": "shared", "messages": [HI]})
    assert resp.status == 200
    await resp.read()
    assert (await client.get(f"{API}/shared/messages", headers=stranger.headers)).status == 200
    assert await (await client.get(f"{API}/shared/messages", headers=stranger.headers)).json() == []
    assert (await client.get(f"{API}/shared/stream", headers=stranger.headers)).status == 204
    assert (await client.post(f"{API}/shared/stop", headers=stranger.headers)).status == 204
    # the stranger's own chat of that id is a thread of theirs; the owner's message id there is theirs to use too
    resp = await client.post(API, headers=stranger.headers, json={"id": "shared", "messages": [HI]})
    assert resp.status == 200
    await resp.read()
    owned = await db.fetch("SELECT user_id FROM threads WHERE chat_id = 'shared' ORDER BY created_at")
    assert [r["user_id"] for r in owned] == [owner.id, stranger.id]


async def test_a_message_id_of_another_chat_is_a_409_and_writes_nothing(make_client, upstream, user, db):
    client = await fake_client(make_client, upstream)
    resp = await client.post(API, headers=user.headers, json={"id": "one", "messages": [HI]})
    await resp.read()
    before = await rows_of(db, user.id)
    resp = await client.post(API, headers=user.headers, json={"id": "two", "messages": [HI]})
    assert resp.status == 409
    assert (await resp.json())["error"]["message"] == "the last message's id is a message of another chat"
    assert await rows_of(db, user.id) == before


async def test_a_turn_over_the_per_minute_limit_is_a_429_and_leaves_no_chat(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file("[limits]\nrequests_per_minute = 1\n"))
    resp = await client.post(API, headers=user.headers, json={"id": "first", "messages": [HI]})
    assert resp.status == 200
    await resp.read()
    before = await rows_of(db, user.id)
    resp = await client.post(API, headers=user.headers, json={"id": "second", "messages": [user_message("u2", "Hi")]})
    assert resp.status == 429
    assert await rows_of(db, user.id) == before
    assert await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1 AND chat_id = 'second'", user.id) == 0


async def test_without_a_credential_it_is_a_401(make_client, upstream):
    client = await fake_client(make_client, upstream)
    resp = await client.post(API, json={"id": "c", "messages": [HI]})
    assert resp.status == 401


async def test_a_jwt_user_chats_and_reads_the_chat_back(make_client, upstream, db):
    client = await fake_client(make_client, upstream, **JWT_ENV)
    user_id = uuid.uuid4()
    resp = await client.post(API, headers=token_for(user_id), json={"id": "signed", "messages": [HI]})
    assert resp.status == 200
    assert (await resp.read()).endswith(b'"status":"complete"}}\n\ndata: [DONE]\n\n')
    history = await (await client.get(f"{API}/signed/messages", headers=token_for(user_id))).json()
    assert [(m["role"], m["parts"][0]["text"]) for m in history] == [("user", "Hi"), ("assistant", "Hello")]
    assert await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1 AND chat_id = 'signed'", user_id) == 1


async def test_a_chat_id_with_slashes_and_spaces_is_found_through_its_encoded_path(make_client, upstream, user):
    client = await fake_client(make_client, upstream)
    resp = await client.post(API, headers=user.headers, json={"id": "team/a b?", "messages": [HI]})
    await resp.read()
    # as reconnectToStream and an app build the path: encodeURIComponent(id)
    url = client.make_url("/").with_path(f"{API}/team%2Fa%20b%3F/messages", encoded=True)
    history = await (await client.session.get(url, headers=user.headers)).json()
    assert [m["role"] for m in history] == ["user", "assistant"]


async def test_a_browser_app_on_an_allowed_origin_gets_cors(make_client, upstream, user):
    client = await fake_client(make_client, upstream, CORS_ORIGINS="https://app.example")
    pre = await client.options(API, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert pre.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    resp = await client.post(API, headers={**user.headers, "Origin": "https://app.example"},
                             json={"id": "c", "messages": [HI]})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    await resp.read()
