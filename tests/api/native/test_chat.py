"""POST /api/chat and the message endpoints: the SSE wire bytes, persist-first, idempotency,
threads, the single finish write, failures, keep-alives, replay and resume.

Expected streams are built here from the protocol in DESIGN.md ("SSE protocol"), independently
of the gateway's own encoder, and compared with the whole body byte for byte.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import orjson
from aiohttp.test_utils import TestClient

from gateway.providers.base import estimate_tokens
from gateway.providers.demo import demo_reply
from tests.support.chat import (
    DONE,
    RETRY,
    accept_chat,
    expected_stream,
    fake_client,
    first_metadata,
    frame,
    metadata,
    ok_attempt,
    row,
    usage_rows,
    wait_finished,
)
from tests.support.common import User
from tests.support.fakes import Reply, openai_stream, parse_sse

PING = b": ping\n\n"
DEMO_CHUNKS = 12  # the default demo reply length of the `client` fixture


# -- building the expected wire bytes -------------------------------------------------------------


def failed_stream(meta: dict[str, Any], model: str, provider: str, texts: list[str],
                  error: dict[str, Any]) -> bytes:
    mid = meta["message_id"]
    frames = [frame(mid, 0, metadata(meta, model, provider), "metadata")]
    frames += [frame(mid, i, {"delta": t}) for i, t in enumerate(texts, 1)]
    frames.append(frame(mid, len(texts) + 1, error, "error"))
    return RETRY + b"".join(frames) + DONE


def split_frames(body: bytes) -> list[bytes]:
    """The body's blocks, each with its blank-line terminator (frames..., [DONE]; the first frame
    starts with the retry line)."""
    return [block + b"\n\n" for block in body.split(b"\n\n") if block]


# -- shared set-up --------------------------------------------------------------------------------


async def stream_chat(client: TestClient, user: User, **body: Any) -> tuple[bytes, dict[str, Any]]:
    resp = await client.post("/api/chat", json={"stream": True, **body}, headers=user.headers)
    assert resp.status == 200, await resp.text()
    raw = await resp.read()
    return raw, first_metadata(raw)


# -- 1. streaming: headers and exact bytes --------------------------------------------------------

async def check_demo_stream(resp: Any, db: asyncpg.Pool, user: User, prompt: str) -> None:
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert "no-cache" in resp.headers["Cache-Control"]
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["X-Request-Id"]
    body = await resp.read()
    meta = first_metadata(body)
    saved = await row(db, meta["message_id"])
    user_row = await row(db, meta["user_message_id"])
    assert (user_row["user_id"], user_row["role"], user_row["content"]) == (user.id, "user", prompt)
    assert saved["thread_id"] == user_row["thread_id"] == uuid.UUID(meta["thread_id"])
    texts = demo_reply(prompt, DEMO_CHUNKS)
    assert body == expected_stream(meta, "demo", "demo", texts, estimate_tokens(prompt), DEMO_CHUNKS,
                                   ok_attempt(saved, "demo", "demo"))


async def test_stream_true_sends_sse_headers_and_the_exact_event_bytes(client, user, db):
    resp = await client.post("/api/chat", json={"content": "Hello there", "stream": True}, headers=user.headers)
    await check_demo_stream(resp, db, user, "Hello there")


async def test_accept_event_stream_without_stream_field_streams(client, user, db):
    resp = await client.post("/api/chat", json={"content": "Tell me something"},
                             headers={**user.headers, "Accept": "text/event-stream"})
    await check_demo_stream(resp, db, user, "Tell me something")


async def test_explicit_stream_false_wins_over_accept_event_stream(client, user):
    resp = await client.post("/api/chat", json={"content": "no stream", "stream": False},
                             headers={**user.headers, "Accept": "text/event-stream"})
    assert resp.status == 202
    assert (await resp.json())["status"] == "accepted"


# -- 2. non-streaming ------------------------------------------------------------------------------

async def test_non_streaming_chat_answers_202_and_finishes_in_the_background(client, user, db):
    answer = await accept_chat(client, user, content="Hello in the background", client_message_id="bg-1")
    message = answer["message"]
    assert answer["status"] == "accepted" and answer["duplicate"] is False
    assert (message["role"], message["content"], message["status"], message["client_message_id"]) == (
        "user", "Hello in the background", "complete", "bg-1")
    assert answer["thread_id"] == message["thread_id"]
    stored = await row(db, message["id"])
    assert (stored["user_id"], str(stored["thread_id"])) == (user.id, answer["thread_id"])

    saved = await wait_finished(db, answer["assistant_message_id"])
    assert saved["status"] == "complete"
    assert saved["content"] == "".join(demo_reply("Hello in the background", DEMO_CHUNKS))
    assert saved["reply_to"] == uuid.UUID(message["id"])


# -- 3. a client that leaves stops nothing ---------------------------------------------------------

async def test_client_disconnect_mid_stream_lets_the_generation_finish(make_client, upstream, user, db):
    texts = ["one ", "two ", "three ", "four"]
    release = asyncio.Event()
    pieces = openai_stream(texts, prompt_tokens=5)
    upstream.queue(Reply(pieces, hold_at=2, release=release))  # the role chunk and "one ", then held
    client = await fake_client(make_client, upstream)
    resp = await client.post("/api/chat", json={"content": "count", "stream": True}, headers=user.headers)
    first = await resp.content.readuntil(b"\n\n")
    assert first.startswith(RETRY + b"id: ")
    meta = orjson.loads(parse_sse(first)[0].data)
    assert parse_sse(await resp.content.readuntil(b"\n\n"))[0].data == '{"delta":"one "}'
    resp.close()  # drops the connection with the reply mostly unsent
    assert (await row(db, meta["message_id"]))["status"] == "streaming"  # gone before the reply was done
    release.set()

    saved = await wait_finished(db, meta["message_id"])
    assert (saved["status"], saved["content"]) == ("complete", "one two three four")
    assert upstream.sent == [len(pieces)]  # read to its end after the client had gone
    assert [(u["prompt_tokens"], u["completion_tokens"]) for u in await usage_rows(db, meta["message_id"])] == [
        (5, 4)]


# -- 4. persist first ------------------------------------------------------------------------------

async def test_user_message_is_committed_before_the_provider_is_called(make_client, upstream, user, db):
    seen: list[dict[str, Any] | None] = []

    async def look_for_user_message(_: dict[str, Any]) -> None:
        found = await db.fetchrow("SELECT role, status, content FROM messages "
                                  "WHERE user_id = $1 AND client_message_id = $2", user.id, "persist-1")
        seen.append(dict(found) if found else None)

    upstream.queue(Reply(openai_stream(["ok"]), on_request=look_for_user_message))
    client = await fake_client(make_client, upstream)
    await stream_chat(client, user, content="keep me", client_message_id="persist-1")
    assert seen == [{"role": "user", "status": "complete", "content": "keep me"}]


# -- 5. idempotency on (user, client_message_id) ---------------------------------------------------

async def test_duplicate_client_message_id_starts_no_second_generation(make_client, upstream, user, db):
    client = await fake_client(make_client, upstream)
    first = await accept_chat(client, user, content="once", client_message_id="dup-1")
    await wait_finished(db, first["assistant_message_id"])
    again = await accept_chat(client, user, content="once", client_message_id="dup-1")
    assert again["duplicate"] is True
    assert again["message"] == first["message"]
    assert (again["assistant_message_id"], again["thread_id"]) == (first["assistant_message_id"],
                                                                 first["thread_id"])
    assert len(upstream.requests) == 1
    assert len(await usage_rows(db, first["assistant_message_id"])) == 1


async def test_twenty_concurrent_identical_requests_make_one_turn(make_client, upstream, user, db):
    release = asyncio.Event()  # the reply is held before its first byte: still generating while they land
    upstream.default = Reply(openai_stream(["Hel", "lo"]), on_request=lambda _: release.wait())
    client = await fake_client(make_client, upstream)
    answers = await asyncio.gather(*(accept_chat(client, user, content="race", client_message_id="race-1")
                                     for _ in range(20)))
    assert len({(a["message"]["id"], a["assistant_message_id"], a["thread_id"]) for a in answers}) == 1
    assert sorted(a["duplicate"] for a in answers) == [False] + [True] * 19

    mid = answers[0]["assistant_message_id"]
    assert (await row(db, mid))["status"] == "streaming"
    release.set()
    await wait_finished(db, mid)
    user_rows = await db.fetch("SELECT id FROM messages WHERE user_id = $1 AND client_message_id = $2",
                               user.id, "race-1")
    assert [str(r["id"]) for r in user_rows] == [answers[0]["message"]["id"]]
    replies = await db.fetch("SELECT id, status FROM messages WHERE reply_to = $1", user_rows[0]["id"])
    assert [(str(r["id"]), r["status"]) for r in replies] == [(mid, "complete")]
    assert len(await usage_rows(db, mid)) == 1
    assert await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", user.id) == 1
    assert len(upstream.requests) == 1


async def test_same_client_message_id_from_another_user_is_independent(make_client, make_user, upstream, db):
    client = await fake_client(make_client, upstream)
    alice, bob = await make_user(), await make_user()
    a = await accept_chat(client, alice, content="shared id", client_message_id="shared-1")
    b = await accept_chat(client, bob, content="shared id", client_message_id="shared-1")
    assert (a["duplicate"], b["duplicate"]) == (False, False)
    assert a["message"]["id"] != b["message"]["id"]
    assert a["assistant_message_id"] != b["assistant_message_id"]
    assert a["thread_id"] != b["thread_id"]
    for answer, owner in ((a, alice), (b, bob)):
        saved = await wait_finished(db, answer["assistant_message_id"])
        assert (saved["user_id"], saved["status"], saved["content"]) == (owner.id, "complete", "Hello")
    assert len(upstream.requests) == 2


# -- 6. threads --------------------------------------------------------------------------------------

async def test_thread_is_created_then_continued_with_its_history(make_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hi ", "Ann"])), Reply(openai_stream(["Ann", "."])))
    client = await fake_client(make_client, upstream)
    _, first = await stream_chat(client, user, content="I am Ann")
    thread = await db.fetchrow("SELECT user_id, title FROM threads WHERE id = $1", uuid.UUID(first["thread_id"]))
    assert (thread["user_id"], thread["title"]) == (user.id, "I am Ann")

    _, second = await stream_chat(client, user, content="Who am I?", thread_id=first["thread_id"])
    assert second["thread_id"] == first["thread_id"]
    assert [m["messages"] for m in upstream.requests] == [
        [{"role": "user", "content": "I am Ann"}],
        [{"role": "user", "content": "I am Ann"}, {"role": "assistant", "content": "Hi Ann"},
         {"role": "user", "content": "Who am I?"}],
    ]
    rows = await db.fetch("SELECT id, role, content, status FROM messages WHERE thread_id = $1 ORDER BY seq",
                          uuid.UUID(first["thread_id"]))
    assert [(str(r["id"]), r["role"], r["content"], r["status"]) for r in rows] == [
        (first["user_message_id"], "user", "I am Ann", "complete"),
        (first["message_id"], "assistant", "Hi Ann", "complete"),
        (second["user_message_id"], "user", "Who am I?", "complete"),
        (second["message_id"], "assistant", "Ann.", "complete"),
    ]


async def test_another_users_thread_is_not_found_and_nothing_is_written(make_client, make_user, upstream, db):
    client = await fake_client(make_client, upstream)
    owner, intruder = await make_user(), await make_user()
    _, meta = await stream_chat(client, owner, content="mine")
    resp = await client.post("/api/chat", json={"content": "let me in", "thread_id": meta["thread_id"],
                                                "client_message_id": "intrude-1"}, headers=intruder.headers)
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "not_found"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", intruder.id) == 0
    assert len(upstream.requests) == 1


# -- 7. the saved reply and its accounting ----------------------------------------------------------

async def test_finished_reply_saves_row_usage_and_daily_totals_once(make_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hel", "lo"], prompt_tokens=9, completion_tokens=2)),
                   Reply(openai_stream(["again"], prompt_tokens=20, completion_tokens=7)))
    client = await fake_client(make_client, upstream)

    async def daily() -> tuple[int, int]:
        got = await db.fetchrow("SELECT coalesce(sum(tokens), 0) AS t, coalesce(sum(requests), 0) AS r "
                                "FROM daily_usage WHERE user_id = $1", user.id)
        return got["t"], got["r"]

    assert await daily() == (0, 0)
    _, meta = await stream_chat(client, user, content="count me")
    saved = await row(db, meta["message_id"])
    assert (saved["role"], saved["status"], saved["content"], saved["model"], saved["provider"]) == (
        "assistant", "complete", "Hello", "fake", "openai")
    assert (saved["prompt_tokens"], saved["completion_tokens"]) == (9, 2)
    assert saved["latency_ms"] >= 0 and saved["ttft_ms"] is not None and saved["ttft_ms"] >= 0
    assert saved["error"] is None and saved["finished_at"] is not None
    usage = await usage_rows(db, meta["message_id"])
    assert [(u["user_id"], u["model"], u["provider"], u["prompt_tokens"], u["completion_tokens"],
             u["total_tokens"], u["estimated"]) for u in usage] == [(user.id, "fake", "openai", 9, 2, 11, False)]
    assert await daily() == (11, 1)

    _, meta2 = await stream_chat(client, user, content="and me")
    assert [u["total_tokens"] for u in await usage_rows(db, meta2["message_id"])] == [27]
    assert await daily() == (11 + 27, 2)


# -- 8. provider failures ----------------------------------------------------------------------------

async def test_upstream_500_before_content_streams_an_error_and_saves_a_failed_row(make_client, upstream, user,
                                                                                   db):
    upstream.queue(Reply(status=500, body=b'{"error":{"message":"overloaded"}}'))
    client = await fake_client(make_client, upstream)
    body, meta = await stream_chat(client, user, content="fail please")
    error = {"type": "upstream_http_error", "message": "upstream answered 500: overloaded", "retryable": True}
    assert body == failed_stream(meta, "fake", "openai", [], error)
    saved = await row(db, meta["message_id"])
    assert (saved["status"], saved["content"], saved["error"]) == ("failed", "", error)


async def test_upstream_error_mid_stream_keeps_the_partial_reply_as_failed(make_client, upstream, user, db):
    pieces = [*openai_stream(["Hel", "lo"])[:3], b'data: {"error":{"message":"boom"}}\n\n']
    upstream.queue(Reply(pieces))
    client = await fake_client(make_client, upstream)
    body, meta = await stream_chat(client, user, content="break midway")
    error = {"type": "upstream_stream_error", "message": "upstream error mid-stream: boom", "retryable": True}
    assert body == failed_stream(meta, "fake", "openai", ["Hel", "lo"], error)
    saved = await row(db, meta["message_id"])
    assert (saved["status"], saved["content"], saved["error"]) == ("failed", "Hello", error)


async def test_truncated_upstream_stream_is_a_failure_with_partial_content(make_client, upstream, user, db):
    upstream.queue(Reply(openai_stream(["Hel", "lo"])[:3]))  # role + two deltas, then the body just ends
    client = await fake_client(make_client, upstream)
    body, meta = await stream_chat(client, user, content="cut me off")
    error = {"type": "upstream_protocol_error", "message": "upstream stream ended without [DONE]",
             "retryable": True}
    assert body == failed_stream(meta, "fake", "openai", ["Hel", "lo"], error)
    saved = await row(db, meta["message_id"])
    assert (saved["status"], saved["content"], saved["error"]) == ("failed", "Hello", error)


# -- 9. keep-alive ----------------------------------------------------------------------------------

async def test_ping_comments_keep_the_stream_alive_while_waiting(make_client, upstream, user, db):
    release = asyncio.Event()  # the upstream says nothing until the client has had a ping
    upstream.queue(Reply(openai_stream(["Hel", "lo"], prompt_tokens=4), on_request=lambda _: release.wait()))
    client = await fake_client(make_client, upstream, SSE_PING_S="0.05")
    resp = await client.post("/api/chat", json={"stream": True, "content": "slow one"}, headers=user.headers)
    assert resp.status == 200
    async with asyncio.timeout(10):  # no ping, no release: fail rather than wait on each other
        head = [await resp.content.readuntil(b"\n\n") for _ in range(2)]
    release.set()
    body = b"".join(head) + await resp.read()
    meta = first_metadata(body)
    assert head == [PING, PING]  # the upstream is silent until released: the retry line waits for the first event
    assert body.index(PING) < body.index(b"event: metadata")
    # the pings are whole comment blocks between frames: without them the stream is exact
    saved = await row(db, meta["message_id"])
    assert body.replace(PING, b"") == expected_stream(meta, "fake", "openai", ["Hel", "lo"], 4, 2,
                                                      ok_attempt(saved, "fake", "openai"))


# -- 10. replay, polling and resume ------------------------------------------------------------------

async def test_duplicate_streaming_post_replays_the_same_bytes_from_the_database(client, make_client, user):
    original, _meta = await stream_chat(client, user, content="replay me", client_message_id="replay-1")
    # a second app instance has no live generation: whatever it sends comes from the database
    other = await make_client()
    replayed, _ = await stream_chat(other, user, content="replay me", client_message_id="replay-1")
    assert replayed == original
    assert [e.event for e in parse_sse(original)] == ["metadata"] + ["message"] * DEMO_CHUNKS + [
        "usage", "done", "message"]


async def test_get_message_returns_the_row_only_to_its_owner(client, make_user, user, db):
    _, meta = await stream_chat(client, user, content="poll me")
    resp = await client.get(f"/api/messages/{meta['message_id']}", headers=user.headers)
    assert resp.status == 200
    got = await resp.json()
    saved = await row(db, meta["message_id"])
    assert (got["id"], got["role"], got["status"], got["content"], got["reply_to"], got["thread_id"]) == (
        meta["message_id"], "assistant", "complete", saved["content"], meta["user_message_id"], meta["thread_id"])

    stranger = await make_user()
    resp = await client.get(f"/api/messages/{meta['message_id']}", headers=stranger.headers)
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "not_found"
    resp = await client.get("/api/messages/not-a-uuid", headers=user.headers)
    assert resp.status == 400


async def test_message_stream_resumes_after_last_event_id(client, user):
    original, meta = await stream_chat(client, user, content="resume me")
    mid = meta["message_id"]
    frames = split_frames(original.removeprefix(RETRY))[:-1]  # without retry and [DONE]: index = event seq
    assert len(frames) == DEMO_CHUNKS + 3
    url = f"/api/messages/{mid}/stream"

    resp = await client.get(url, headers={**user.headers, "Last-Event-ID": f"{mid}:3"})
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    assert await resp.read() == RETRY + b"".join(frames[4:]) + DONE
    resp = await client.get(url, params={"lastEventId": f"{mid}:3"}, headers=user.headers)
    assert await resp.read() == RETRY + b"".join(frames[4:]) + DONE
    resp = await client.get(url, headers=user.headers)
    assert await resp.read() == original

    resp = await client.get(url, headers={**user.headers, "Last-Event-ID": f"{mid}:{len(frames) - 1}"})
    assert resp.status == 204
    assert await resp.read() == b""
