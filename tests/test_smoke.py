from __future__ import annotations

import orjson

from .fakes import parse_sse


async def test_streaming_chat_saves_the_reply(client, user, db):
    resp = await client.post("/api/chat", json={"content": "Hello", "stream": True}, headers=user.headers)
    assert resp.status == 200
    events = parse_sse(await resp.read())
    assert [e.event for e in events] == ["metadata"] + ["message"] * 12 + ["usage", "done", "message"]
    meta = orjson.loads(events[0].data)
    text = "".join(orjson.loads(e.data)["delta"] for e in events[1:13])
    row = await db.fetchrow("SELECT status, content FROM messages WHERE id = $1", __import__("uuid").UUID(meta["message_id"]))
    assert row["status"] == "complete" and row["content"] == text
