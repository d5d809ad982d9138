"""User sync is non-fatal for chat: a JWT user whose users row is missing (its
upsert failed, or the row went away while the instance's cache still calls it fresh) keeps their
message: the turn's own statement makes the row."""

from __future__ import annotations

import uuid

import asyncpg

from tests.support.auth import JWT_ENV, token_for, user_row
from tests.support.chat import first_metadata, wait_finished
from tests.support.common import MakeClient, wait_for


async def test_a_chat_turn_makes_the_users_row_its_failed_upsert_did_not(make_client: MakeClient,
                                                                        db: asyncpg.Pool):
    user_id = uuid.uuid4()
    function = f"gw_test_no_email_{user_id.hex}"
    # the sign-in upsert (which writes the email) fails for this user; a bare row would not
    # (DDL takes no parameters; the id is a UUID made here, so formatting it in is safe)
    await db.execute(f"""
        CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'users upsert refused by test'; END $$;
        CREATE TRIGGER {function} BEFORE INSERT OR UPDATE ON users FOR EACH ROW
            WHEN (NEW.id = '{user_id}'::uuid AND NEW.email IS NOT NULL) EXECUTE FUNCTION {function}();""")
    try:
        client = await make_client(**JWT_ENV, DEMO_CHUNKS="3")
        headers = token_for(user_id, "grace@example.com")
        resp = await client.post("/api/chat", headers=headers, json={"content": "hello", "stream": True})
        assert resp.status == 200
        body = await resp.read()
        assert b"event: done" in body and body.endswith(b"data: [DONE]\n\n")
        meta = first_metadata(body)
        created = await user_row(db, user_id)
        assert created is not None and created["email"] is None
        rows = await db.fetch("SELECT role, status FROM messages WHERE user_id = $1 ORDER BY seq", user_id)
        assert [tuple(r) for r in rows] == [("user", "complete"), ("assistant", "complete")]
        assert await db.fetchval("SELECT count(*) FROM usage WHERE message_id = $1::uuid", meta["message_id"]) == 1
    finally:
        await db.execute(f"DROP TRIGGER {function} ON users; DROP FUNCTION {function}();")
    # once the upsert works again (a new instance: an empty cache), the row gets its email
    later = await make_client(**JWT_ENV)
    assert (await later.get("/api/threads", headers=token_for(user_id, "grace@example.com"))).status == 200
    updated = await user_row(db, user_id)
    assert updated is not None and updated["email"] == "grace@example.com"


async def test_a_row_gone_while_the_cache_calls_it_fresh_is_made_again_by_the_turn(make_client: MakeClient,
                                                                                 config_file, db: asyncpg.Pool):
    client = await make_client(**JWT_ENV, DEMO_CHUNKS="2",
                               GATEWAY_CONFIG=config_file('[models.other]\nprovider = "demo"\n'))
    user_id = uuid.uuid4()
    headers = token_for(user_id, "lin@example.com")
    assert (await client.get("/api/threads", headers=headers)).status == 200  # upserted, cached as fresh
    await db.execute("DELETE FROM users WHERE id = $1", user_id)
    thread = await client.post("/api/threads", headers=headers, json={"title": "mine"})
    assert thread.status == 201  # an empty thread, likewise
    await db.execute("DELETE FROM users WHERE id = $1", user_id)
    chat = await client.post("/api/chat", headers=headers, json={"content": "still me"})
    assert chat.status == 202
    await wait_finished(db, (await chat.json())["assistant_message_id"])
    assert await user_row(db, user_id) is not None
    # an arena turn, likewise
    await db.execute("DELETE FROM users WHERE id = $1", user_id)
    arena = await client.post("/api/arena", headers=headers, json={"content": "both", "models": ["demo", "other"]})
    assert arena.status == 202, await arena.text()
    answer = await arena.json()

    async def both_done() -> bool:
        return await db.fetchval("SELECT count(*) FROM messages WHERE reply_to = $1::uuid AND status = 'complete'",
                                 answer["message"]["id"]) == 2

    await wait_for(both_done)
    assert await user_row(db, user_id) is not None and answer["message"]["content"] == "both"
