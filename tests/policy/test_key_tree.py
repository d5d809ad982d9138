"""Keys form trees: a key made by another key is its child; the family shares the
ancestors' limits (never multiplies them), even under concurrency; revoking a key revokes its
descendants on every instance; only admin keys manage keys, and any key may see and revoke itself."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.config import LimitsConfig
from gateway.policy.admission import Policy
from gateway.state import AUTH, POLICY
from gateway.store import limits as store_limits
from gateway.store.limits import KeyCap, Limit, LimitReached
from gateway.store.usage import UsageRecord, record_usage_many
from tests.support.common import MakeClient, User, wait_for

MakeUser = Callable[..., Awaitable[User]]
ADMIN = ["chat", "arena", "admin"]
# every turn below: prompt "hello" (2 tokens, estimated) + max_tokens 10 = a worst case of 12, and
# the demo reply is exactly 10 chunks = 10 completion tokens: actual use = reservation
TURN = {"content": "hello", "max_tokens": 10}
TODAY = datetime.now(UTC).date()
# the policy's clock, pinned to a minute of today: per-minute windows step only when a test says so
EARLY = datetime.combine(TODAY, time(1, 0), UTC)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def create(client: TestClient, headers: dict[str, str], **body: Any) -> tuple[int, Any]:
    resp = await client.post("/api/keys", json=body, headers=headers)
    return resp.status, await resp.json()


async def child_of(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    status, created = await create(client, headers, **body)
    assert status == 201, created
    return created


async def chat(client: TestClient, key: str) -> tuple[int, str | None]:
    """One demo turn: its status, and the refusal's message: a 429's (a per-minute limit, at the
    edge), or the refused reply's (a daily cap, decided after the user message is saved)."""
    resp = await client.post("/api/chat", json=TURN, headers=bearer(key))
    body = await resp.json()
    if resp.status >= 400:
        return resp.status, body["error"]["message"]
    reply = await (await client.get(f"/api/messages/{body['assistant_message_id']}", headers=bearer(key))).json()
    return resp.status, reply["error"]["message"] if reply["status"] == "refused" else None


async def status_with(client: TestClient, key: str) -> int:
    resp = await client.get("/api/threads", headers=bearer(key))
    await resp.read()
    return resp.status


async def key_day(db: asyncpg.Pool, key_id: str | uuid.UUID, day: date = TODAY) -> tuple[int, int, int] | None:
    row = await db.fetchrow("SELECT tokens, reserved, requests FROM key_daily_usage WHERE api_key_id = $1 "
                            "AND day = $2", uuid.UUID(str(key_id)), day)
    return (row["tokens"], row["reserved"], row["requests"]) if row else None


async def all_finished(db: asyncpg.Pool, user_id: uuid.UUID) -> bool:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND status IN ('pending', 'streaming')",
                             user_id) == 0


async def root_id(db: asyncpg.Pool, user: User) -> uuid.UUID:
    return await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1 AND parent_id IS NULL", user.id)


def pin_clock(client: TestClient, at: datetime) -> None:
    client.app[POLICY].clock = lambda: at


@pytest.fixture
async def root(make_user: MakeUser) -> User:
    """A user whose first key (made as the CLI makes it: no parent) has admin."""
    return await make_user(scopes=tuple(ADMIN))


# -- the family shares the parent's limits ----------------------------------------------------------

async def test_children_share_the_parents_daily_tokens_and_requests_per_minute(make_client: MakeClient, root: User,
                                                                                db: asyncpg.Pool):
    client = await make_client(DEMO_CHUNKS="10")
    pin_clock(client, EARLY)
    parent = await child_of(client, root.headers, name="parent", scopes=ADMIN,
                            limits={"daily_tokens": 100, "requests_per_minute": 2})
    c1 = await child_of(client, bearer(parent["key"]), name="c1")
    c2 = await child_of(client, bearer(parent["key"]), name="c2")
    c3 = await child_of(client, bearer(parent["key"]), name="c3", limits={"daily_tokens": 100})  # as much: fine
    assert {c["parent_id"] for c in (c1, c2, c3)} == {parent["id"]}
    rpm = "rate limit: key requests per minute"
    daily = "daily token cap reached (key daily tokens)"
    # minute 0: two requests for the whole family, whoever sends them
    assert [await chat(client, k["key"]) for k in (c1, c2, c3, parent)] == [(202, None), (202, None),
                                                                           (429, rpm), (429, rpm)]
    # minutes 1 to 3: two each; 8 turns of 12 tokens: 96 of the parent's 100
    for minute, pair in ((1, (c3, c1)), (2, (c2, c3)), (3, (c1, c2))):
        pin_clock(client, EARLY + timedelta(minutes=minute))
        assert [await chat(client, k["key"]) for k in pair] == [(202, None), (202, None)]
    # minute 4: the 4 tokens left go to one reply (clamped to 2 completion tokens), then nothing is left
    pin_clock(client, EARLY + timedelta(minutes=4))
    assert [await chat(client, k["key"]) for k in (c3, c1)] == [(202, None), (202, daily)]
    pin_clock(client, EARLY + timedelta(minutes=5))
    assert [await chat(client, k["key"]) for k in (c2, parent)] == [(202, daily), (202, daily)]
    await wait_for(lambda: all_finished(db, root.id))
    # the family used exactly the parent's budget; the parent's row (and its root's) counts all of it
    assert await key_day(db, parent["id"]) == (100, 0, 9)
    assert await key_day(db, await root_id(db, root)) == (100, 0, 9)
    assert [await key_day(db, c["id"]) for c in (c1, c2, c3)] == [(36, 0, 3), (36, 0, 3), (28, 0, 3)]
    assert await db.fetchval("SELECT sum(total_tokens) FROM usage WHERE user_id = $1", root.id) == 100
    windows = await db.fetch("SELECT count FROM rate_windows WHERE subject = $1 ORDER BY window_start",
                             f"k:{parent['id']}")
    # minutes 0 to 3 full; a request refused by the daily cap was still saved and answered: it took
    # its slot in minutes 4 and 5 (a 429 at the edge, as in minute 0, takes none)
    assert [w["count"] for w in windows] == [2, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("limits, fits", [({"daily_tokens": 60}, 5), ({"requests_per_minute": 3}, 3)],
                         ids=["daily_tokens", "requests_per_minute"])
async def test_concurrent_requests_from_the_children_never_exceed_the_parents_limit(
        make_client: MakeClient, root: User, db: asyncpg.Pool, limits: dict[str, int], fits: int):
    client = await make_client(DEMO_CHUNKS="10")
    pin_clock(client, EARLY)
    parent = await child_of(client, root.headers, name="parent", scopes=ADMIN, limits=limits)
    children = [await child_of(client, bearer(parent["key"]), name=f"c{i}") for i in range(3)]
    senders = [children[i % 3]["key"] for i in range(20)]
    answers = await asyncio.gather(*(chat(client, key) for key in senders))
    if "daily_tokens" in limits:  # decided after the commit: every turn kept, the rest refused
        assert sorted(answers, key=lambda a: a[1] or "") == [(202, None)] * fits + [
            (202, "daily token cap reached (key daily tokens)")] * (20 - fits)
    else:  # an abuse limit, at the edge: a 429 that saves nothing
        assert sorted(status for status, _ in answers) == [202] * fits + [429] * (20 - fits)
    await wait_for(lambda: all_finished(db, root.id))
    assert await key_day(db, parent["id"]) == (12 * fits, 0, fits)
    assert sum([(await key_day(db, c["id"]) or (0, 0, 0))[0] for c in children]) == 12 * fits
    kept = 20 if "daily_tokens" in limits else fits
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND role = 'user'", root.id) == kept
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", root.id) == fits  # generations


async def test_a_child_is_bounded_by_its_ancestors_other_limits(client: TestClient, root: User):
    parent = await child_of(client, root.headers, name="parent", scopes=ADMIN,
                            limits={"max_tokens": 50, "max_concurrent_streams": 2, "models": ["demo", "other"]})
    middle = await child_of(client, bearer(parent["key"]), name="middle", scopes=ADMIN,
                            limits={"models": ["demo"]})
    leaf = await child_of(client, bearer(middle["key"]), name="leaf")
    assert leaf["limits"] is None
    me = await (await client.get("/api/me", headers=bearer(leaf["key"]))).json()
    assert (me["limits"]["max_tokens"], me["limits"]["max_concurrent_streams"], me["limits"]["models"]) == \
        (50, 2, ["demo"])


# -- who may manage keys ----------------------------------------------------------------------------

async def test_a_chat_only_key_sees_only_itself_and_cannot_touch_its_users_other_keys(client: TestClient,
                                                                                      root: User, db: asyncpg.Pool):
    main_id = await root_id(db, root)
    sibling = await child_of(client, root.headers, name="sibling")
    script = await child_of(client, root.headers, name="script", scopes=["chat"], limits={"daily_tokens": 50})
    headers = bearer(script["key"])
    before = await db.fetch("SELECT id, revoked_at FROM api_keys WHERE user_id = $1 ORDER BY id", root.id)
    # it lists itself alone, never everybody's
    resp = await client.get("/api/keys", headers=headers)
    assert resp.status == 200 and [k["id"] for k in (await resp.json())["keys"]] == [script["id"]]
    resp = await client.get("/api/keys?all=true", headers=headers)
    assert resp.status == 403
    # it revokes nobody else, and creates nothing
    for other in (main_id, sibling["id"]):
        resp = await client.delete(f"/api/keys/{other}", headers=headers)
        assert resp.status == 403 and (await resp.json())["error"]["type"] == "forbidden"
    status, answer = await create(client, headers, name="more", scopes=["chat"])
    assert status == 403, answer
    assert await db.fetch("SELECT id, revoked_at FROM api_keys WHERE user_id = $1 ORDER BY id", root.id) == before
    assert await status_with(client, root.key) == 200 and await status_with(client, sibling["key"]) == 200
    # but it may revoke itself
    resp = await client.delete(f"/api/keys/{script['id']}", headers=headers)
    assert resp.status == 204
    assert await status_with(client, script["key"]) == 401
    assert await status_with(client, root.key) == 200


async def test_a_child_gets_no_broader_scopes_nor_higher_limits_than_its_ancestors(client: TestClient, root: User,
                                                                                 db: asyncpg.Pool):
    expires = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    parent = await child_of(client, root.headers, name="parent", scopes=["chat", "admin"],
                            expires_at=expires.isoformat(),
                            limits={"daily_tokens": 100, "requests_per_minute": 2, "max_tokens": 50,
                                    "models": ["demo"]})
    headers = bearer(parent["key"])
    count = await db.fetchval("SELECT count(*) FROM api_keys")
    later = (expires + timedelta(minutes=1)).isoformat()
    for body in ({"scopes": ["chat", "arena"]}, {"limits": {"daily_tokens": 101}},
                 {"limits": {"requests_per_minute": 3}}, {"limits": {"max_tokens": 51}},
                 {"limits": {"models": ["demo", "other"]}}, {"expires_at": later}):
        status, answer = await create(client, headers, name="wider", **body)
        assert status == 403 and answer["error"]["type"] == "forbidden", (body, answer)
    # a grandchild is held to every ancestor's ceiling, not only its parent's
    middle = await child_of(client, headers, name="middle", scopes=["chat", "admin"])
    status, answer = await create(client, bearer(middle["key"]), name="wider", limits={"daily_tokens": 101})
    assert status == 403 and "100" in answer["error"]["message"], answer
    assert await db.fetchval("SELECT count(*) FROM api_keys") == count + 1  # only the middle key
    # equal or stricter is fine; a limit no ancestor has is the child's to set
    same = await child_of(client, headers, name="same", scopes=["chat"],
                          limits={"daily_tokens": 100, "requests_per_minute": 2, "max_concurrent_streams": 9})
    assert same["scopes"] == ["chat"] and datetime.fromisoformat(same["expires_at"]) == expires


# -- revocation takes the subtree -------------------------------------------------------------------

async def test_revoking_a_key_revokes_its_descendants_on_every_instance_within_a_second(
        make_client: MakeClient, root: User, db: asyncpg.Pool):
    a = await make_client(KEY_CACHE_TTL_S="3600")
    b = await make_client(KEY_CACHE_TTL_S="3600")
    parent = await child_of(a, root.headers, name="parent", scopes=ADMIN)
    sibling = await child_of(a, root.headers, name="sibling", scopes=ADMIN)
    c1 = await child_of(a, bearer(parent["key"]), name="c1", scopes=ADMIN)
    c2 = await child_of(a, bearer(parent["key"]), name="c2")
    grandchild = await child_of(a, bearer(c1["key"]), name="grandchild")
    cousin = await child_of(a, bearer(sibling["key"]), name="cousin")
    doomed, spared = [parent, c1, c2, grandchild], [sibling, cousin]
    for client in (a, b):
        for k in doomed + spared:
            assert await status_with(client, k["key"]) == 200  # cached on both instances
    resp = await a.delete(f"/api/keys/{parent['id']}", headers=root.headers)
    assert resp.status == 204
    assert [await status_with(a, k["key"]) for k in doomed] == [401] * 4  # at once here

    async def all_refused_on_b() -> bool:
        return [await status_with(b, k["key"]) for k in doomed] == [401] * 4

    await wait_for(all_refused_on_b, timeout=1.0)
    for client in (a, b):
        assert [await status_with(client, k["key"]) for k in spared] == [200, 200]
        assert await status_with(client, root.key) == 200
    rows = await db.fetch("SELECT id, revoked_at FROM api_keys WHERE user_id = $1", root.id)
    revoked = {str(r["id"]): r["revoked_at"] for r in rows}
    assert revoked[parent["id"]] is not None
    assert {revoked[k["id"]] for k in doomed} == {revoked[parent["id"]]}  # one statement, one time
    assert [revoked[k["id"]] for k in spared] == [None, None]


async def test_a_key_revoking_itself_takes_its_descendants_and_nothing_above(client: TestClient, root: User,
                                                                           db: asyncpg.Pool):
    parent = await child_of(client, root.headers, name="parent", scopes=ADMIN)
    child = await child_of(client, bearer(parent["key"]), name="child", scopes=["chat"])
    resp = await client.delete(f"/api/keys/{parent['id']}", headers=bearer(parent["key"]))
    assert resp.status == 204
    assert [await status_with(client, k) for k in (parent["key"], child["key"], root.key)] == [401, 401, 200]


async def test_a_key_stops_with_a_revoked_ancestor_even_unheard(make_client: MakeClient, root: User,
                                                                db: asyncpg.Pool):
    client = await make_client(KEY_CACHE_TTL_S="3600")
    parent = await child_of(client, root.headers, name="parent", scopes=ADMIN)
    child = await child_of(client, bearer(parent["key"]), name="child")
    assert await status_with(client, parent["key"]) == 200  # cached
    # revoked behind the API's back (no cascade, no notification): the child, read afresh, sees its
    # ancestor's revocation; the parent, still cached, cannot mint a child any more
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", uuid.UUID(parent["id"]))
    assert await status_with(client, child["key"]) == 401
    count = await db.fetchval("SELECT count(*) FROM api_keys")
    status, answer = await create(client, bearer(parent["key"]), name="late")
    assert status == 401, answer
    assert await db.fetchval("SELECT count(*) FROM api_keys") == count


async def test_a_keys_place_in_its_tree_never_changes(client: TestClient, root: User, db: asyncpg.Pool):
    parent = await child_of(client, root.headers, name="parent", scopes=ADMIN)
    child = await child_of(client, bearer(parent["key"]), name="child")
    row = await db.fetchrow("SELECT parent_id, ancestors FROM api_keys WHERE id = $1", uuid.UUID(child["id"]))
    assert (row["parent_id"], row["ancestors"]) == (uuid.UUID(parent["id"]), [uuid.UUID(parent["id"]),
                                                                              await root_id(db, root)])
    for change in ("parent_id = NULL, ancestors = '{}'", "ancestors = ancestors[1:1]"):
        with pytest.raises(asyncpg.PostgresError):
            await db.execute(f"UPDATE api_keys SET {change} WHERE id = $1", uuid.UUID(child["id"]))
    assert await db.fetchrow("SELECT parent_id, ancestors FROM api_keys WHERE id = $1", uuid.UUID(child["id"])) == row


# -- the SQL underneath: admission, release and settlement over the chain --------------------------

async def test_gateway_admit_chain_refuses_for_an_ancestor_with_the_key_sqlstates_and_changes_nothing(
        db: asyncpg.Pool):
    user_id, leaf, parent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    day, window = date(2030, 2, 3), datetime(2030, 2, 3, 4, 5, tzinfo=UTC)
    for limit, keys in ((Limit.KEY_REQUESTS_PER_MINUTE, [KeyCap(key_id=leaf, rpm=5, daily=None),
                                                         KeyCap(key_id=parent, rpm=1, daily=None)]),
                        (Limit.KEY_DAILY_TOKENS, [KeyCap(key_id=leaf, rpm=None, daily=50),
                                                  KeyCap(key_id=parent, rpm=None, daily=5)])):
        args = dict(user_id=user_id, keys=keys, day=day, window=window, user_rpm=None, want=5, user_cap=None,
                    share=1)
        assert await store_limits.admit(db, **args) == 5
        before = [tuple(r) for r in await db.fetch(
            "SELECT api_key_id, tokens, reserved FROM key_daily_usage WHERE api_key_id = ANY($1) ORDER BY api_key_id",
            [leaf, parent])] + [tuple(r) for r in await db.fetch(
                "SELECT subject, count FROM rate_windows WHERE subject = ANY($1) ORDER BY subject",
                [f"k:{leaf}", f"k:{parent}"])]
        with pytest.raises(LimitReached) as refused:
            await store_limits.admit(db, **args)
        assert refused.value.limit is limit
        after = [tuple(r) for r in await db.fetch(
            "SELECT api_key_id, tokens, reserved FROM key_daily_usage WHERE api_key_id = ANY($1) ORDER BY api_key_id",
            [leaf, parent])] + [tuple(r) for r in await db.fetch(
                "SELECT subject, count FROM rate_windows WHERE subject = ANY($1) ORDER BY subject",
                [f"k:{leaf}", f"k:{parent}"])]
        assert after == before


async def test_every_capped_key_of_the_chain_reserves_what_was_granted(db: asyncpg.Pool):
    user_id, leaf, middle, top = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    day, window = date(2030, 3, 4), datetime(2030, 3, 4, 5, 6, tzinfo=UTC)
    keys = [KeyCap(key_id=leaf, rpm=None, daily=1000), KeyCap(key_id=middle, rpm=None, daily=None),
            KeyCap(key_id=top, rpm=None, daily=7)]
    # the leaf reserves 10 first, then the top grants only 7 and the leaf hands 3 back; the user's cap
    # (6) is tighter still: every cap ends holding 6
    granted = await store_limits.admit(db, user_id=user_id, keys=keys, day=day, window=window, user_rpm=None,
                                       want=10, user_cap=6, share=1)
    assert granted == 6
    rows = {r["api_key_id"]: r["reserved"] for r in await db.fetch(
        "SELECT api_key_id, reserved FROM key_daily_usage WHERE day = $1 AND api_key_id = ANY($2)", day,
        [leaf, middle, top])}
    assert rows == {leaf: 6, top: 6}
    assert await db.fetchval("SELECT reserved FROM daily_usage WHERE user_id = $1 AND day = $2", user_id, day) == 6


async def test_release_and_settlement_move_every_ancestor_once(client: TestClient, root: User, db: asyncpg.Pool):
    parent = await child_of(client, root.headers, name="parent", scopes=ADMIN, limits={"daily_tokens": 1000})
    middle = await child_of(client, bearer(parent["key"]), name="middle", scopes=ADMIN)  # no cap of its own
    leaf = await child_of(client, bearer(middle["key"]), name="leaf", limits={"daily_tokens": 500})
    principal = await client.app[AUTH].authenticate_token(leaf["key"])
    assert [a.id for a in principal.ancestors] == [uuid.UUID(middle["id"]), uuid.UUID(parent["id"]),
                                                   await root_id(db, root)]
    day = date(2030, 4, 5)
    policy = Policy(LimitsConfig(), db, clock=lambda: datetime.combine(day, time(9), UTC))
    ids = [leaf["id"], middle["id"], parent["id"], await root_id(db, root)]
    # released: every capped key gets its reservation back
    dropped = await policy.admit(principal, "demo", prompt_tokens=2, max_tokens=10)
    assert (dropped.user_reserved, dropped.key_reserved) == (0, 12)
    assert [await key_day(db, i, day) for i in ids] == [(0, 12, 0), None, (0, 12, 0), None]
    await policy.release(dropped, principal.user_id, principal.api_key_id)
    assert [await key_day(db, i, day) for i in ids] == [(0, 0, 0), None, (0, 0, 0), None]
    # settled: the usage counts on the key and every ancestor, once, however often it is replayed
    kept = await policy.admit(principal, "demo", prompt_tokens=2, max_tokens=10)
    record = UsageRecord(message_id=uuid.uuid4(), user_id=root.id, api_key_id=principal.api_key_id, model="demo",
                         provider="demo", prompt_tokens=2, completion_tokens=7, estimated=False, cost_usd=0.0,
                         day=day, key_reserved=kept.key_reserved)
    assert await record_usage_many(db, [record]) == 1
    assert await record_usage_many(db, [record]) == 0
    assert [await key_day(db, i, day) for i in ids] == [(9, 0, 1)] * 4
    kept.done()
