"""Who may call: API keys (revoked, expired, cached), JWT users and their upsert, the bootstrap admin key.

Token verification itself is covered in test_jwt.py; here the app is real and the rows are checked.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Settings
from tests.support.auth import JWT_ENV, KEY, token_for, user_row
from tests.support.common import MakeClient, User
from tests.support.database import fresh_database
from tests.support.fakes import parse_sse

EMPTY_PAGE = {"threads": [], "next_cursor": None}


async def list_threads(client: TestClient, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await client.get("/api/threads", headers=headers)
    return resp.status, await resp.json()


# -- API keys ---------------------------------------------------------------------------------------

async def test_api_key_authenticates_its_user(client: TestClient, user: User, db: asyncpg.Pool):
    assert await list_threads(client, user.headers) == (200, EMPTY_PAGE)
    assert await db.fetchval("SELECT count(*) FROM users WHERE id = $1", user.id) == 1
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE user_id = $1", user.id) == 1


async def test_unknown_and_malformed_credentials_are_refused(client: TestClient):
    for header in ("Bearer gwk_" + "x" * 43, "Bearer not-a-key", "Basic dXNlcjpwYXNz", "Bearer "):
        status, body = await list_threads(client, {"Authorization": header})
        assert (status, body["error"]["type"]) == (401, "unauthorized"), header


async def test_revoked_key_is_refused_by_a_fresh_app(make_client: MakeClient, user: User, db: asyncpg.Pool):
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1", user.id)
    status, body = await list_threads(await make_client(), user.headers)
    assert status == 401
    assert body["error"]["type"] == "unauthorized" and body["error"]["message"] == "API key revoked"


async def test_zero_key_cache_ttl_sees_a_revocation_on_the_next_request(make_client: MakeClient, user: User,
                                                                        db: asyncpg.Pool):
    client = await make_client(KEY_CACHE_TTL_S="0")
    assert await list_threads(client, user.headers) == (200, EMPTY_PAGE)
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1", user.id)
    status, body = await list_threads(client, user.headers)
    assert (status, body["error"]["message"]) == (401, "API key revoked")


async def test_expired_key_is_refused(client: TestClient, user: User, db: asyncpg.Pool):
    await db.execute("UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE user_id = $1", user.id)
    status, body = await list_threads(client, user.headers)
    assert (status, body["error"]["message"]) == (401, "API key expired")


async def test_key_expiring_later_still_works(client: TestClient, user: User, db: asyncpg.Pool):
    await db.execute("UPDATE api_keys SET expires_at = now() + interval '1 hour' WHERE user_id = $1", user.id)
    assert await list_threads(client, user.headers) == (200, EMPTY_PAGE)


# -- JWT users --------------------------------------------------------------------------------------

async def test_jwt_user_is_upserted_once_per_app_instance(make_client: MakeClient, db: asyncpg.Pool):
    user_id = uuid.uuid4()
    headers = token_for(user_id, "ada@example.com")
    first_app = await make_client(**JWT_ENV)

    assert await list_threads(first_app, headers) == (200, EMPTY_PAGE)
    created = await user_row(db, user_id)
    assert created is not None and created["email"] == "ada@example.com"

    # the row is fresh in this instance's cache: no second write
    assert await list_threads(first_app, headers) == (200, EMPTY_PAGE)
    assert await user_row(db, user_id) == created

    # a new instance has an empty cache and upserts again
    second_app = await make_client(**JWT_ENV)
    assert await list_threads(second_app, token_for(user_id, "ada@new.example")) == (200, EMPTY_PAGE)
    updated = await user_row(db, user_id)
    assert updated is not None and updated["xmin"] != created["xmin"]
    assert updated["last_seen_at"] > created["last_seen_at"]
    assert updated["email"] == "ada@new.example"


async def test_failed_user_upsert_is_logged_and_the_request_still_succeeds(
        make_client: MakeClient, db: asyncpg.Pool, caplog: pytest.LogCaptureFixture):
    user_id = uuid.uuid4()
    function = f"gw_test_refuse_{user_id.hex}"
    # DDL takes no parameters; the id is a UUID we generated, so formatting it in is safe
    await db.execute(f"""
        CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'users row refused by test'; END $$;
        CREATE TRIGGER {function} BEFORE INSERT OR UPDATE ON users FOR EACH ROW
            WHEN (NEW.id = '{user_id}'::uuid) EXECUTE FUNCTION {function}();""")
    try:
        client = await make_client(**JWT_ENV)
        with caplog.at_level(logging.WARNING, logger="gateway.edge.auth"):
            assert await list_threads(client, token_for(user_id)) == (200, EMPTY_PAGE)
            # not marked fresh after a failure: the next request tries again
            assert await list_threads(client, token_for(user_id)) == (200, EMPTY_PAGE)
        warnings = [r for r in caplog.records if r.name == "gateway.edge.auth" and str(user_id) in r.getMessage()]
        assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
        assert "user upsert failed" in warnings[0].getMessage()
        assert await user_row(db, user_id) is None
    finally:
        await db.execute(f"DROP TRIGGER IF EXISTS {function} ON users; DROP FUNCTION IF EXISTS {function}();")

    assert await list_threads(client, token_for(user_id)) == (200, EMPTY_PAGE)
    assert await user_row(db, user_id) is not None


async def test_api_key_still_works_when_jwt_is_configured(make_client: MakeClient, user: User):
    client = await make_client(**JWT_ENV)
    assert await list_threads(client, user.headers) == (200, EMPTY_PAGE)


async def test_jwt_is_refused_when_jwt_is_not_configured(client: TestClient):
    status, body = await list_threads(client, token_for(uuid.uuid4()))
    assert (status, body["error"]["message"]) == (401, "invalid credential")


# -- the bootstrap admin key ------------------------------------------------------------------------

async def test_first_start_prints_an_admin_key_once(make_client: MakeClient, make_settings: Callable[..., Settings],
                                                     pg_server_url: str, capsys: pytest.CaptureFixture[str]):
    async with fresh_database(pg_server_url) as url:
        settings = make_settings(DATABASE_URL=url, BOOTSTRAP_ADMIN_KEY="true")
        capsys.readouterr()
        client = await make_client(settings)
        out = capsys.readouterr().out
        keys = set(KEY.findall(out))
        assert len(keys) == 1, out
        key = keys.pop()
        assert (f"curl -N http://127.0.0.1:8080/api/chat -H 'Authorization: Bearer {key}' "
                "-H 'Content-Type: application/json'") in out

        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT prefix, scopes, revoked_at FROM api_keys")
            assert [tuple(r) for r in rows] == [(key[:12], ["chat", "arena", "admin"], None)]
        finally:
            await conn.close()

        resp = await client.post("/api/chat", json={"content": "hi", "stream": True},
                                 headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200
        assert parse_sse(await resp.read())[-1].data == "[DONE]"
        await client.close()

        again = await make_client(make_settings(DATABASE_URL=url, BOOTSTRAP_ADMIN_KEY="true"))
        assert capsys.readouterr().out == ""
        await again.close()


async def test_no_admin_key_is_made_when_jwt_is_configured(make_client: MakeClient,
                                                            make_settings: Callable[..., Settings],
                                                            pg_server_url: str, capsys: pytest.CaptureFixture[str]):
    async with fresh_database(pg_server_url) as url:
        capsys.readouterr()
        client = await make_client(make_settings(DATABASE_URL=url, BOOTSTRAP_ADMIN_KEY="true", **JWT_ENV))
        assert capsys.readouterr().out == ""
        await client.close()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM api_keys") == 0
        finally:
            await conn.close()
