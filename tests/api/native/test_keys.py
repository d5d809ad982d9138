"""API keys over HTTP: create (shown once), list, revoke; revocation on every instance; last_used_at;
isolation between users; no plaintext key anywhere in the database. Managing keys with an API key
needs `admin` (tests/test_key_tree.py has the rest of that model: trees, shared limits, cascades)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.fleet.instance import lock_key
from gateway.state import AUTH, INSTANCE, LAST_USED
from tests.support.auth import JWT_ENV, KEY, token_for
from tests.support.common import MakeClient, User, wait_for

MakeUser = Callable[..., Awaitable[User]]
PUBLIC_FIELDS = {"id", "user_id", "parent_id", "name", "prefix", "scopes", "limits", "expires_at", "revoked_at",
                 "last_used_at", "created_at"}
LISTED_FIELDS = PUBLIC_FIELDS | {"spend"}  # a listed key carries its spend (docs/budgets.md)
ADMIN = ("chat", "arena", "admin")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def create(client: TestClient, headers: dict[str, str], **body: Any) -> tuple[int, Any]:
    resp = await client.post("/api/keys", json=body, headers=headers)
    return resp.status, await resp.json()


async def listing(client: TestClient, headers: dict[str, str], query: str = "") -> list[dict[str, Any]]:
    resp = await client.get("/api/keys" + query, headers=headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["keys"]


async def status_with(client: TestClient, key: str) -> int:
    resp = await client.get("/api/threads", headers=bearer(key))
    await resp.read()
    return resp.status


async def key_count(db: asyncpg.Pool, user_id: uuid.UUID) -> int:
    return await db.fetchval("SELECT count(*) FROM api_keys WHERE user_id = $1", user_id)


@pytest.fixture
async def admin(make_user: MakeUser) -> User:
    """A user whose key has `admin`: what managing keys with an API key takes."""
    return await make_user(scopes=ADMIN)


# -- create -----------------------------------------------------------------------------------------

async def test_created_key_is_shown_once_stored_hashed_and_works(client: TestClient, admin: User, db: asyncpg.Pool):
    status, body = await create(client, admin.headers, name="laptop")
    assert status == 201, body
    key = body.pop("key")
    assert KEY.fullmatch(key)
    assert set(body) == PUBLIC_FIELDS
    assert body["name"] == "laptop" and body["user_id"] == str(admin.id)
    assert body["parent_id"] == str(await db.fetchval("SELECT id FROM api_keys WHERE key_hash = $1",
                                                      hashlib.sha256(admin.key.encode()).digest()))
    assert body["prefix"] == key[:12]
    assert body["scopes"] == ["chat", "arena"]
    assert body["limits"] is None and body["expires_at"] is None
    assert body["revoked_at"] is None and body["last_used_at"] is None
    row = await db.fetchrow("SELECT user_id, key_hash, prefix FROM api_keys WHERE id = $1", uuid.UUID(body["id"]))
    assert row["user_id"] == admin.id
    assert bytes(row["key_hash"]) == hashlib.sha256(key.encode()).digest()
    assert await status_with(client, key) == 200
    # the listing never shows it again
    listed = {k["id"]: k for k in await listing(client, admin.headers)}
    assert set(listed[body["id"]]) == LISTED_FIELDS


@pytest.mark.parametrize("body", [
    {},
    {"name": ""},
    {"name": "   "},
    {"name": 7},
    {"name": "x" * 101},
    {"name": "a\x00b"},
    {"name": "k", "scopes": []},
    {"name": "k", "scopes": "chat"},
    {"name": "k", "scopes": ["chat", "root"]},
    {"name": "k", "scopes": [1]},
    {"name": "k", "expires_at": "2999-01-01T00:00:00"},  # no timezone
    {"name": "k", "expires_at": "tomorrow"},
    {"name": "k", "expires_at": 4102444800},
    {"name": "k", "expires_at": "2001-01-01T00:00:00+00:00"},  # already past
    {"name": "k", "limits": []},
    {"name": "k", "limits": {"requests_per_minute": 0}},
    {"name": "k", "limits": {"daily_tokens": -5}},
    {"name": "k", "limits": {"daily_tokens": True}},
    {"name": "k", "limits": {"max_tokens": 1.5}},
    {"name": "k", "limits": {"max_concurrent_streams": "2"}},
    {"name": "k", "limits": {"requests_per_minute": 2**31}},
    {"name": "k", "limits": {"models": "demo"}},
    {"name": "k", "limits": {"models": [1]}},
    {"name": "k", "limits": {"models": []}},
    {"name": "k", "limits": {"burst": 3}},
    {"name": "k", "user_id": "not-a-uuid"},
], ids=lambda b: repr(b)[:60])
async def test_malformed_key_requests_are_refused_and_create_nothing(client: TestClient, admin: User,
                                                                    db: asyncpg.Pool, body: dict[str, Any]):
    status, answer = await create(client, admin.headers, **body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request"
    assert await key_count(db, admin.id) == 1  # only the fixture's key


async def test_creating_a_key_needs_a_credential(client: TestClient):
    status, answer = await create(client, {}, name="k")
    assert status == 401 and answer["error"]["type"] == "unauthorized"


async def test_limits_and_expiry_are_stored_and_reach_the_principal(client: TestClient, admin: User,
                                                                   db: asyncpg.Pool):
    limits = {"requests_per_minute": 30, "daily_tokens": 5000, "max_concurrent_streams": 2, "max_tokens": 256,
              "models": ["demo", "fast", "demo"]}
    expires = (datetime.now(UTC) + timedelta(days=7)).replace(microsecond=0)
    status, body = await create(client, admin.headers, name="ci", scopes=["chat"], limits=limits,
                                expires_at=expires.isoformat().replace("+00:00", "Z"))
    assert status == 201, body
    stored = {"requests_per_minute": 30, "daily_tokens": 5000, "max_concurrent_streams": 2, "max_tokens": 256,
              "models": ["demo", "fast"]}
    assert body["limits"] == stored and body["scopes"] == ["chat"]
    assert datetime.fromisoformat(body["expires_at"]) == expires
    row = await db.fetchrow("SELECT limits, expires_at, scopes FROM api_keys WHERE id = $1", uuid.UUID(body["id"]))
    assert row["limits"] == stored and row["expires_at"] == expires and row["scopes"] == ["chat"]
    principal = await client.app[AUTH].authenticate_token(body["key"])
    assert principal.limits == stored and principal.expires_at == expires
    assert principal.scopes == frozenset({"chat"}) and principal.api_key_id == uuid.UUID(body["id"])


async def test_only_an_admin_may_grant_admin(client: TestClient, make_user: MakeUser):
    plain, admin = await make_user(), await make_user(scopes=ADMIN)
    status, answer = await create(client, plain.headers, name="sneaky", scopes=["chat", "admin"])
    assert status == 403 and answer["error"]["type"] == "forbidden"
    status, body = await create(client, admin.headers, name="ops", scopes=["admin", "chat"])
    assert status == 201 and body["scopes"] == ["chat", "admin"]
    status, body = await create(client, admin.headers, name="default")
    assert status == 201 and body["scopes"] == ["chat", "arena"]  # admin is never granted by default


async def test_a_key_grants_only_scopes_it_holds(client: TestClient, make_user: MakeUser, db: asyncpg.Pool):
    # (a key without admin creates no key at all: tests/test_key_tree.py)
    chat_admin = await make_user(scopes=("chat", "admin"))
    status, answer = await create(client, chat_admin.headers, name="arena", scopes=["arena"])
    assert status == 403, answer
    status, body = await create(client, chat_admin.headers, name="default")
    assert status == 201 and body["scopes"] == ["chat"]
    assert await key_count(db, chat_admin.id) == 2


async def test_a_key_cannot_mint_a_key_beyond_its_own_limits_or_expiry(client: TestClient, admin: User):
    expires = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    status, parent = await create(client, admin.headers, name="parent", expires_at=expires.isoformat(),
                                  scopes=list(ADMIN), limits={"daily_tokens": 1000, "models": ["demo", "fast"]})
    assert status == 201, parent
    limited = bearer(parent["key"])
    # nothing asked: the child is bounded by the parent's limits through the tree (shared with it,
    # never copied: tests/test_key_tree.py), and the parent's expiry is its own
    status, child = await create(client, limited, name="child")
    assert status == 201, child
    assert child["limits"] is None and child["parent_id"] == parent["id"]
    assert datetime.fromisoformat(child["expires_at"]) == expires
    principal = await client.app[AUTH].authenticate_token(child["key"])
    assert (principal.ancestors[0].id, principal.ancestors[0].limits) == (uuid.UUID(parent["id"]), parent["limits"])
    # stricter is fine
    status, child = await create(client, limited, name="stricter", limits={"daily_tokens": 10, "max_tokens": 5,
                                                                           "models": ["demo"]})
    assert status == 201 and child["limits"] == {"daily_tokens": 10, "max_tokens": 5, "models": ["demo"]}
    later = (expires + timedelta(days=1)).isoformat()
    for body in ({"limits": {"daily_tokens": 1001}}, {"limits": {"models": ["strong"]}}, {"expires_at": later}):
        status, answer = await create(client, limited, name="wider", **body)
        assert status == 403, (body, answer)


async def test_only_an_admin_creates_keys_for_another_user(make_client: MakeClient, make_user: MakeUser,
                                                          db: asyncpg.Pool):
    client = await make_client(**JWT_ENV)
    plain, other, admin = await make_user(), await make_user(), await make_user(scopes=ADMIN)
    status, answer = await create(client, plain.headers, name="theirs", user_id=str(other.id))
    assert status == 403, answer
    status, answer = await create(client, token_for(plain.id), name="theirs", user_id=str(other.id))
    assert status == 403, answer  # signed in as the user: their own keys only
    assert await key_count(db, other.id) == 1
    status, mine = await create(client, token_for(plain.id), name="mine", user_id=str(plain.id))
    assert status == 201 and mine["user_id"] == str(plain.id)
    # an admin may provision a user who has no row yet (as `keys create --user-id` does)
    newcomer = uuid.uuid4()
    status, body = await create(client, admin.headers, name="provisioned", user_id=str(newcomer))
    assert status == 201 and body["user_id"] == str(newcomer)
    assert await db.fetchval("SELECT count(*) FROM users WHERE id = $1", newcomer) == 1
    principal = await client.app[AUTH].authenticate_token(body["key"])
    assert principal.user_id == newcomer


async def test_a_jwt_user_creates_keys_of_their_own(make_client: MakeClient, db: asyncpg.Pool):
    client = await make_client(**JWT_ENV)
    user_id = uuid.uuid4()
    status, body = await create(client, token_for(user_id), name="from the browser")
    assert status == 201, body
    assert body["user_id"] == str(user_id) and body["scopes"] == ["chat", "arena"] and body["expires_at"] is None
    assert await status_with(client, body["key"]) == 200
    assert [k["id"] for k in await listing(client, token_for(user_id))] == [body["id"]]


# -- list -------------------------------------------------------------------------------------------

async def test_listing_shows_own_keys_newest_first_without_secrets(client: TestClient, admin: User,
                                                                   db: asyncpg.Pool):
    first_id = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", admin.id)
    _, second = await create(client, admin.headers, name="second")
    _, third = await create(client, admin.headers, name="third")
    keys = await listing(client, admin.headers)
    assert [k["id"] for k in keys] == [third["id"], second["id"], str(first_id)]
    assert [k["name"] for k in keys] == ["third", "second", "test"]
    for k in keys:
        assert set(k) == LISTED_FIELDS
        assert k["user_id"] == str(admin.id) and k["revoked_at"] is None
    assert keys[0]["prefix"] == third["key"][:12]


async def test_admin_lists_every_key_only_when_asked(client: TestClient, make_user: MakeUser):
    plain, admin = await make_user(), await make_user(scopes=ADMIN)
    own = await listing(client, admin.headers)
    assert {k["user_id"] for k in own} == {str(admin.id)}
    everything = await listing(client, admin.headers, "?all=true")
    assert str(plain.id) in {k["user_id"] for k in everything}
    created = [datetime.fromisoformat(k["created_at"]) for k in everything]
    assert created == sorted(created, reverse=True)
    resp = await client.get("/api/keys?all=true", headers=plain.headers)
    assert resp.status == 403
    resp = await client.get("/api/keys?all=yes", headers=admin.headers)
    assert resp.status == 400


# -- revoke -----------------------------------------------------------------------------------------

async def test_revoked_key_stops_at_once_and_revoking_twice_is_204(client: TestClient, admin: User,
                                                                   db: asyncpg.Pool):
    user = admin
    _, body = await create(client, user.headers, name="doomed")
    key_id = uuid.UUID(body["id"])
    assert await status_with(client, body["key"]) == 200  # now cached
    resp = await client.delete(f"/api/keys/{key_id}", headers=user.headers)
    assert resp.status == 204 and await resp.read() == b""
    assert await status_with(client, body["key"]) == 401
    revoked_at = await db.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", key_id)
    assert revoked_at is not None
    resp = await client.delete(f"/api/keys/{key_id}", headers=user.headers)
    assert resp.status == 204
    assert await db.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", key_id) == revoked_at
    listed = {k["id"]: k for k in await listing(client, user.headers)}
    assert datetime.fromisoformat(listed[str(key_id)]["revoked_at"]) == revoked_at
    assert await status_with(client, user.key) == 200  # the caller's other key is untouched


async def test_a_key_may_revoke_itself(client: TestClient, user: User):
    key_id = (await listing(client, user.headers))[0]["id"]
    resp = await client.delete(f"/api/keys/{key_id}", headers=user.headers)
    assert resp.status == 204
    assert await status_with(client, user.key) == 401


async def test_revoking_unknown_or_malformed_ids(client: TestClient, user: User, admin: User):
    resp = await client.delete(f"/api/keys/{uuid.uuid4()}", headers=admin.headers)
    assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found"
    # without admin, another key is refused whether it exists or not: nothing to learn
    resp = await client.delete(f"/api/keys/{uuid.uuid4()}", headers=user.headers)
    assert resp.status == 403 and (await resp.json())["error"]["type"] == "forbidden"
    for headers in (user.headers, admin.headers):
        resp = await client.delete("/api/keys/not-a-uuid", headers=headers)
        assert resp.status == 400


async def test_admin_revokes_anybodys_key(client: TestClient, make_user: MakeUser):
    victim, admin = await make_user(), await make_user(scopes=ADMIN)
    key_id = (await listing(client, victim.headers))[0]["id"]
    resp = await client.delete(f"/api/keys/{key_id}", headers=admin.headers)
    assert resp.status == 204
    assert await status_with(client, victim.key) == 401


# -- isolation and secrets --------------------------------------------------------------------------

async def test_users_never_see_or_revoke_each_others_keys(make_client: MakeClient, make_user: MakeUser,
                                                         db: asyncpg.Pool):
    client = await make_client(**JWT_ENV)
    alice, bob = await make_user(), await make_user()
    _, extra = await create(client, token_for(bob.id), name="bob's second")
    bob_ids = {str(i) for i in await db.fetchval("SELECT array_agg(id) FROM api_keys WHERE user_id = $1", bob.id)}
    assert {k["user_id"] for k in await listing(client, alice.headers)} == {str(alice.id)}
    assert {k["user_id"] for k in await listing(client, token_for(alice.id))} == {str(alice.id)}
    for key_id in bob_ids:
        resp = await client.delete(f"/api/keys/{key_id}", headers=alice.headers)
        assert resp.status == 403, key_id  # her key has no admin: it may revoke only itself
        resp = await client.delete(f"/api/keys/{key_id}", headers=token_for(alice.id))
        assert resp.status == 404, key_id  # signed in, her own keys: bob's are not found
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL", bob.id) == 2
    assert await status_with(client, bob.key) == 200
    assert await status_with(client, extra["key"]) == 200


async def test_no_plaintext_key_is_stored_anywhere(client: TestClient, admin: User, db: asyncpg.Pool):
    user = admin
    _, body = await create(client, user.headers, name="secret")
    key = body["key"]
    # use it: a chat turn, a listing with the key smuggled into the query string, a refused call
    resp = await client.post("/api/chat", json={"content": "hello"}, headers=bearer(key))
    assert resp.status == 202, await resp.text()
    resp = await client.get(f"/api/threads?key={key}", headers=bearer(key))
    assert resp.status == 200
    resp = await client.get("/api/keys?all=true", headers=bearer(key))
    assert resp.status == 403
    await wait_for(lambda: db.fetchval("SELECT count(*) >= 3 FROM activity_log WHERE api_key_id = $1",
                                       uuid.UUID(body["id"])))
    tables = await db.fetch("SELECT quote_ident(table_name) AS name FROM information_schema.tables "
                            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")
    assert {"api_keys", "activity_log", "messages"} <= {t["name"] for t in tables}
    for t in tables:  # the whole row as text, every table: not the key, nor its secret part
        found = await db.fetchval(f"SELECT count(*) FROM {t['name']} t WHERE strpos(t::text, $1) > 0", key[12:])
        assert found == 0, t["name"]


# -- revocation across instances ------------------------------------------------------------------

async def test_revocation_reaches_another_instance_within_a_second(make_client: MakeClient, admin: User,
                                                                   db: asyncpg.Pool):
    user = admin
    a = await make_client(KEY_CACHE_TTL_S="3600")
    b = await make_client(KEY_CACHE_TTL_S="3600")
    _, quiet = await create(a, user.headers, name="revoked behind the cache's back")
    _, loud = await create(a, user.headers, name="revoked through the API")
    for client in (a, b):
        for key in (quiet["key"], loud["key"]):
            assert await status_with(client, key) == 200  # cached on both instances
    # a change the caches are not told about stays invisible for the TTL: b really is caching
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", uuid.UUID(quiet["id"]))
    assert await status_with(b, quiet["key"]) == 200
    resp = await a.delete(f"/api/keys/{loud['id']}", headers=user.headers)
    assert resp.status == 204
    assert await status_with(a, loud["key"]) == 401
    await wait_for(lambda: _refused(b, loud["key"]), timeout=1.0)


async def _refused(client: TestClient, key: str) -> bool:
    return await status_with(client, key) == 401


async def test_cached_keys_are_dropped_when_the_listen_connection_comes_back(make_client: MakeClient, user: User,
                                                                             db: asyncpg.Pool):
    client = await make_client(KEY_CACHE_TTL_S="3600", SWEEP_S="0.05")
    assert await status_with(client, user.key) == 200  # cached
    # cut the instance's LISTEN connection (the backend holding its liveness lock), then revoke
    # while nobody listens: the notification is lost, the reconnect must not trust the cache
    unsigned = lock_key(client.app[INSTANCE].id) & 0xFFFF_FFFF_FFFF_FFFF
    pid = await db.fetchval("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid "
                            "AND objid = $2::oid AND objsubid = 1 AND granted", unsigned >> 32, unsigned & 0xFFFF_FFFF)
    assert pid is not None
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1", user.id)
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
    await wait_for(lambda: _refused(client, user.key), timeout=3.0)


# -- last_used_at -----------------------------------------------------------------------------------

async def test_last_used_at_is_written_in_a_batch_once_per_key(client: TestClient, user: User, db: asyncpg.Pool):
    writer = client.app[LAST_USED]
    before = writer.written
    assert await db.fetchval("SELECT last_used_at FROM api_keys WHERE user_id = $1", user.id) is None
    started = datetime.now(UTC)
    for _ in range(5):
        assert await status_with(client, user.key) == 200
    await wait_for(lambda: db.fetchval("SELECT last_used_at IS NOT NULL FROM api_keys WHERE user_id = $1", user.id))
    used = await db.fetchval("SELECT last_used_at FROM api_keys WHERE user_id = $1", user.id)
    assert started - timedelta(seconds=1) <= used <= datetime.now(UTC)
    # five requests, one queued touch: the throttle keeps the queue small, and the writer wrote it
    assert writer.written - before == 1
    listed = await listing(client, user.headers)
    assert datetime.fromisoformat(listed[0]["last_used_at"]) == used
