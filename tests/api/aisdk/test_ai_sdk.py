"""The AI SDK door through the `ai` package's own client (DefaultChatTransport, readUIMessageStream,
validateUIMessages), run in Node against the real app, a real PostgreSQL and fake upstreams."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from gateway.state import GENERATIONS
from tests.support.ai_sdk import reconnect, run_node, send, start_node, user_message, validate
from tests.support.chat import (
    ONE_TURN,
    PROMPT_TOKENS,
    TEXTS,
    fake_client,
    gated_client,
    row,
    spend_the_day,
    usage_rows,
    wait_finished,
)
from tests.support.conformance import MODELS, SIGNATURE, THOUGHT, Upstreams

pytestmark = pytest.mark.processes  # runs Node (see pyproject.toml)


def chunks(mid: str, thread_id: str, texts: list[str], usage: dict[str, Any], model: str = "fake",
           provider: str | None = "openai", status: str = "complete") -> list[dict[str, Any]]:
    """A whole reply's chunks as the transport parses them."""
    out: list[dict[str, Any]] = [
        {"type": "start", "messageId": mid, "messageMetadata": {"threadId": thread_id, "model": model,
                                                                 "provider": provider, "category": "general",
                                                                 "auto": True}},
        {"type": "text-start", "id": mid}]
    out += [{"type": "text-delta", "id": mid, "delta": t} for t in texts]
    out.append({"type": "text-end", "id": mid})
    out.append({"type": "finish", "finishReason": "stop", "messageMetadata": {"usage": usage, "status": status}})
    return out


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"inputTokens": prompt, "outputTokens": completion, "totalTokens": prompt + completion}


def message(mid: str, thread_id: str, text: str, usage: dict[str, Any], model: str = "fake",
            provider: str = "openai") -> dict[str, Any]:
    """The assistant UIMessage readUIMessageStream ends with (and the history returns)."""
    return {"id": mid, "role": "assistant", "parts": [{"type": "text", "text": text, "state": "done"}],
            "metadata": {"threadId": thread_id, "model": model, "provider": provider, "category": "general",
                         "auto": True, "usage": usage, "status": "complete"}}


async def chat_thread(db: asyncpg.Pool, user_id: uuid.UUID, chat_id: str) -> uuid.UUID:
    found: uuid.UUID = await db.fetchval("SELECT id FROM threads WHERE user_id = $1 AND chat_id = $2",
                                         user_id, chat_id)
    assert found is not None
    return found


async def test_send_messages_streams_the_reply_and_a_retry_of_its_message_id_streams_the_same_one(
        make_client, upstream, user, db):
    client = await fake_client(make_client, upstream)
    result = await run_node(send(client, user, "chat-1", [user_message("u1", "Hi")]))
    thread_id = await chat_thread(db, user.id, "chat-1")
    mid = result["chunks"][0]["messageId"]
    saved = await row(db, mid)
    assert (saved["status"], saved["content"], saved["thread_id"]) == ("complete", "Hello", thread_id)
    assert await db.fetchval("SELECT client_message_id FROM messages WHERE id = $1", saved["reply_to"]) == "u1"
    assert result["chunks"] == chunks(mid, str(thread_id), ["Hel", "lo"], usage(9, 2))
    assert result["message"] == message(mid, str(thread_id), "Hello", usage(9, 2))
    assert result["errors"] == []
    # the same message again (a client retry): the same reply, replayed; nothing new generates or is stored
    again = await run_node(send(client, user, "chat-1", [user_message("u1", "Hi")]))
    assert again["chunks"] == result["chunks"]
    assert len(upstream.requests) == 1
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 2
    assert len(await usage_rows(db, mid)) == 1
    # the next turn goes on in the same thread, with the conversation so far upstream
    second = await run_node(send(client, user, "chat-1", [user_message("u1", "Hi"), result["message"],
                                                     user_message("u2", "More")]))
    assert second["message"]["metadata"]["threadId"] == str(thread_id)
    assert upstream.requests[1]["messages"] == [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello"},
                                                {"role": "user", "content": "More"}]


async def test_the_wire_is_the_ui_message_stream_v1(make_client, upstream, user, db):
    client = await fake_client(make_client, upstream)
    resp = await client.post("/api/ai-sdk/chat", headers=user.headers,
                             json={"id": "wire", "messages": [user_message("w1", "Hi")], "trigger": "submit-message"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
    body = await resp.read()
    saved = await row(db, (await db.fetchval(
        "SELECT m.id FROM messages m JOIN threads t ON t.id = m.thread_id WHERE t.chat_id = 'wire' "
        "AND t.user_id = $1 AND m.role = 'assistant'", user.id)))
    mid, tid = saved["id"], saved["thread_id"]
    assert body == (
        b"retry: 3000\n"
        b'data: {"type":"start","messageId":"%s","messageMetadata":{"threadId":"%s","model":"fake",'
        b'"provider":"openai","category":"general","auto":true}}\n\n'
        b'data: {"type":"text-start","id":"%s"}\n\n'
        b'data: {"type":"text-delta","id":"%s","delta":"Hel"}\n\n'
        b'data: {"type":"text-delta","id":"%s","delta":"lo"}\n\n'
        b'data: {"type":"text-end","id":"%s"}\n\n'
        b'data: {"type":"finish","finishReason":"stop","messageMetadata":{"usage":{"inputTokens":9,'
        b'"outputTokens":2,"totalTokens":11},"status":"complete"}}\n\n'
        b"data: [DONE]\n\n") % ((str(mid).encode(), str(tid).encode()) + (str(mid).encode(),) * 4)


async def test_a_client_that_aborts_after_the_first_delta_reconnects_and_gets_the_whole_reply_then_204(
        make_client, gated, user, db):
    up = await gated(TEXTS, hold_at=2)
    client = await gated_client(make_client, up)
    left = await run_node(send(client, user, "resume", [user_message("r1", "tell me")], abortAfterFirstDelta=True))
    assert left["aborted"] is True
    mid = left["chunks"][0]["messageId"]
    assert [c["type"] for c in left["chunks"][:3]] == ["start", "text-start", "text-delta"]
    assert left["chunks"][2]["delta"] == "Once "
    assert (await row(db, mid))["status"] == "streaming"  # the reply goes on without the client
    back = await start_node(reconnect(client, user, "resume"))
    await back.until("connected")
    up.release()
    result = await back.result()
    saved = await wait_finished(db, mid)
    thread_id = str(saved["thread_id"])
    whole = usage(saved["prompt_tokens"], saved["completion_tokens"])
    assert result["chunks"] == chunks(mid, thread_id, TEXTS, whole)
    assert result["message"] == message(mid, thread_id, "".join(TEXTS), whole)
    # once it has finished there is nothing to resume
    assert (await run_node(reconnect(client, user, "resume"))) == {"event": "result", "none": True}
    resp = await client.get("/api/ai-sdk/chat/resume/stream", headers=user.headers)
    assert (resp.status, await resp.read()) == (204, b"")
    assert len(await usage_rows(db, mid)) == 1


async def test_history_validates_as_ui_messages_and_a_regenerate_replaces_the_reply(make_client, upstream, user, db):
    client = await fake_client(make_client, upstream)
    first = await run_node(send(client, user, "history", [user_message("h1", "Hi")]))
    old = first["message"]
    # what useChat sends for regenerate(): the messages without the reply, and the reply's id
    regenerated = await run_node(send(client, user, "history", [user_message("h1", "Hi")],
                                 trigger="regenerate-message", messageId=old["id"]))
    new = regenerated["message"]
    assert new["id"] != old["id"] and new["parts"] == old["parts"]
    assert len(upstream.requests) == 2
    # a retry of that regenerate streams the reply it made
    again = await run_node(send(client, user, "history", [user_message("h1", "Hi")],
                           trigger="regenerate-message", messageId=old["id"]))
    assert again["message"] == new and len(upstream.requests) == 2
    result = await run_node(validate(client, user, "history"))
    assert result["status"] == 200
    assert result["messages"] == [user_message("h1", "Hi"), new]
    # both replies are kept (the native thread shows them), the newest is the chat's
    replies = await db.fetch("SELECT id FROM messages WHERE reply_to = (SELECT id FROM messages "
                             "WHERE user_id = $1 AND client_message_id = 'h1') ORDER BY seq", user.id)
    assert [str(r["id"]) for r in replies] == [old["id"], new["id"]]


async def test_stop_saves_the_reply_cancelled_with_its_usage_counted_once(make_client, gated, user, db):
    up = await gated(TEXTS, hold_at=2)
    client = await gated_client(make_client, up)
    running = await start_node(send(client, user, "stop-me", [user_message("s1", "tell me")]))
    while (await running.until("chunk"))["chunk"]["type"] != "text-delta":
        pass
    resp = await client.post("/api/ai-sdk/chat/stop-me/stop", headers=user.headers)
    assert resp.status == 200
    stopped = await resp.json()
    mid = stopped["messageId"]
    assert stopped == {"id": "stop-me", "messageId": mid, "status": "cancelled"}
    result = await running.result()
    saved = await row(db, mid)
    assert (saved["status"], saved["content"]) == ("cancelled", "Once upon ")
    spent = usage(saved["prompt_tokens"], saved["completion_tokens"]) | (
        {"estimated": True} if saved["metadata"]["estimated"] else {})
    assert result["chunks"][-3:] == [
        {"type": "text-end", "id": mid}, {"type": "abort", "reason": "cancelled"},
        {"type": "finish", "finishReason": "other", "messageMetadata": {"usage": spent, "status": "cancelled"}}]
    assert result["message"]["parts"] == [{"type": "text", "text": "Once upon ", "state": "done"}]
    records = await usage_rows(db, mid)
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in records] == [
        (saved["prompt_tokens"], saved["completion_tokens"])]
    # nothing generates any more: a second stop and a reconnect find nothing
    assert (await client.post("/api/ai-sdk/chat/stop-me/stop", headers=user.headers)).status == 204
    assert (await run_node(reconnect(client, user, "stop-me"))) == {"event": "result", "none": True}


async def test_a_refusal_is_an_error_chunk_and_a_saved_refused_row(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(ONE_TURN), DEMO_CHUNKS="10")
    await spend_the_day(client, user, db)
    result = await run_node(send(client, user, "capped", [user_message("c1", "hello")]))
    mid = result["chunks"][0]["messageId"]
    saved = await row(db, mid)
    assert saved["status"] == "refused"
    assert result["chunks"] == [
        {"type": "start", "messageId": mid, "messageMetadata": {
            "threadId": str(saved["thread_id"]), "model": "demo", "provider": None, "category": "general",
            "auto": True}},
        {"type": "error", "errorText": "daily token cap reached (user daily tokens)"}]
    assert result["errors"] == ["daily token cap reached (user daily tokens)"]
    history = await run_node(validate(client, user, "capped"))
    assert history["messages"][1] == {"id": mid, "role": "assistant", "parts": [], "metadata": {
        "threadId": str(saved["thread_id"]), "model": "demo", "provider": None, "category": "general",
        "auto": True, "status": "refused",
        "error": {"type": "policy", "message": "daily token cap reached (user daily tokens)"}}}
    assert await usage_rows(db, mid) == []


async def test_a_reply_generating_on_one_instance_resumes_from_another_through_redis(
        stepped, make_client, redis_url, user, db):
    up = await stepped(TEXTS, holds=(4,))
    env = {"OPENAI_BASE_URL": up.base_url, "OPENAI_MODEL": "fake", "SWEEP_S": "1000", "REDIS_URL": redis_url}
    a, b = await make_client(**env), await make_client(**env)
    left = await run_node(send(a, user, "fleet", [user_message("f1", "tell me")], abortAfterFirstDelta=True))
    mid = left["chunks"][0]["messageId"]
    back = await start_node(reconnect(b, user, "fleet"))
    await back.until("connected")
    assert b.app[GENERATIONS].get(uuid.UUID(mid)) is None  # generating on A, followed from B
    assert a.app[GENERATIONS].get(uuid.UUID(mid)) is not None
    up.release()
    result = await back.result()
    saved = await wait_finished(db, mid)
    whole = usage(PROMPT_TOKENS, saved["completion_tokens"])
    assert result["chunks"] == chunks(mid, str(saved["thread_id"]), TEXTS, whole)
    assert (await run_node(reconnect(b, user, "fleet"))) == {"event": "result", "none": True}


async def test_reasoning_is_a_reasoning_part_before_the_text_live_and_in_the_history(
        make_client, config_file, upstreams: Upstreams, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(upstreams.toml()))
    upstreams.script("anthropic", "reasoning")  # a thinking block with its signature, then "Hello"
    result = await run_node(send(client, user, "thinking", [user_message("t1", "Hi")],
                                 body={"model": MODELS["anthropic"]}))
    assert result["errors"] == []
    mid = result["chunks"][0]["messageId"]
    thread_id = str(await chat_thread(db, user.id, "thinking"))
    assert result["chunks"][1:] == [
        {"type": "reasoning-start", "id": f"{mid}:r0"},
        {"type": "reasoning-delta", "id": f"{mid}:r0", "delta": THOUGHT},
        {"type": "reasoning-end", "id": f"{mid}:r0", "providerMetadata": {"gateway": {"signature": SIGNATURE}}},
        {"type": "text-start", "id": f"{mid}:t1"},
        {"type": "text-delta", "id": f"{mid}:t1", "delta": "Hello"},
        {"type": "text-end", "id": f"{mid}:t1"},
        {"type": "finish", "finishReason": "stop", "messageMetadata": {"usage": usage(9, 5), "status": "complete"}}]
    reasoning = {"type": "reasoning", "id": f"{mid}:r0", "text": THOUGHT, "state": "done",
                 "providerMetadata": {"gateway": {"signature": SIGNATURE}}}
    expected = message(mid, thread_id, "Hello", usage(9, 5), model=MODELS["anthropic"], provider="claude")
    expected["metadata"].update(category=None, auto=False)  # a model named: not routed
    expected["parts"] = [reasoning, {"type": "text", "text": "Hello", "state": "done"}]
    assert result["message"] == expected
    assert (await row(db, mid))["content"] == "Hello"  # the reasoning is not the reply's text
    history = await run_node(validate(client, user, "thinking"))
    assert history["status"] == 200
    assert history["messages"] == [user_message("t1", "Hi"), expected]
