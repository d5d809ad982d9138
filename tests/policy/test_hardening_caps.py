"""Quota caps that refuse and clamp only when the budget is really spent, admissions settled whole on
every door, and quota slices that never release more than they reserved. Real PostgreSQL, the real
app factory (two on one database for two instances), the demo provider or a fake upstream on loopback."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.service.turns import prompt_tokens
from gateway.state import INSTANCE, POLICY, USAGE
from gateway.store import limits as store
from gateway.store.keys import issue_key
from gateway.store.usage import UsageRecord, record_usage_many
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream
from tests.support.quota import busy, caller, quiet, settled

HI = [{"role": "user", "content": "hi"}]
HI_TOKENS = prompt_tokens(HI)


async def key_of(db: asyncpg.Pool, user: User) -> uuid.UUID:
    key_id: uuid.UUID = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    return key_id


async def key_day(db: asyncpg.Pool, key_id: uuid.UUID) -> tuple[int, int]:
    row = await db.fetchrow("SELECT tokens, reserved FROM key_daily_usage WHERE api_key_id = $1 AND day = $2",
                            key_id, datetime.now(UTC).date())
    return (row["tokens"], row["reserved"]) if row else (0, 0)


async def user_day(db: asyncpg.Pool, user_id: uuid.UUID) -> tuple[int, int, float, float]:
    row = await db.fetchrow("SELECT tokens, reserved, cost_usd::float8 AS c, cost_reserved::float8 AS cr "
                            "FROM daily_usage WHERE user_id = $1 AND day = $2", user_id, datetime.now(UTC).date())
    return (row["tokens"], row["reserved"], row["c"], row["cr"]) if row else (0, 0, 0.0, 0.0)


async def slices_hold(db: asyncpg.Pool, user: User) -> tuple[int, int]:
    row = await db.fetchrow("SELECT coalesce(sum(user_tokens), 0)::bigint AS u, "
                            "coalesce(sum(key_tokens), 0)::bigint AS k FROM quota_leases WHERE user_id = $1", user.id)
    return row["u"], row["k"]


async def completion(client: TestClient, user: User, **body: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/v1/chat/completions", headers=user.headers, json={"model": "demo", "messages": HI,
                                                                                  **body})
    return resp.status, await resp.json()


# -- a cap refuses only once it is spent -----------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [200, 30])
async def test_back_to_back_completions_under_a_key_cap_are_refused_only_once_it_is_spent(
        make_client: MakeClient, user: User, db: asyncpg.Pool, max_tokens: int) -> None:
    """Each reply uses 19 tokens ("hi" and 18 demo tokens). max_tokens 200 is more than the cap: every
    request is clamped to what is left, and reserves all of it until its usage record is written
    (batched, after the answer); max_tokens 30 lets the busy caller take quota slices."""
    key_id = await key_of(db, user)
    await db.execute("UPDATE api_keys SET limits = $2 WHERE id = $1", key_id, {"daily_tokens": 100})
    client = await make_client(DEMO_CHUNKS=str(19 - HI_TOKENS))
    statuses, used = [], []
    for _ in range(12):
        status, body = await completion(client, user, max_tokens=max_tokens)
        statuses.append(status)
        if status == 200:
            used.append(body["usage"]["total_tokens"])
    # every request the cap fits runs, the last one clamped to the 5 tokens left; then only refusals
    assert statuses == [200] * 6 + [429] * 6
    assert used == [19] * 5 + [5]
    await client.app[USAGE].flush()
    await client.close()  # whatever a slice still held goes back
    assert await key_day(db, key_id) == (100, 0)


async def test_me_shows_an_api_keys_own_remaining_budget(make_client: MakeClient, user: User,
                                                         db: asyncpg.Pool) -> None:
    """The user spends 140 tokens with an unlimited key; a second key capped at 100 spends 28, and
    its child (capped at 60) 28 more: each key reports what its own chain leaves it, not the user's."""
    capped, capped_key = await issue_key(db, user.id, "capped", ["chat"], limits={"daily_tokens": 100})
    _, child_key = await issue_key(db, user.id, "child", ["chat"], limits={"daily_tokens": 60},
                                       parent_id=capped["id"])
    client = await make_client(DEMO_CHUNKS=str(28 - HI_TOKENS))
    for key in [user.key] * 5 + [capped_key, child_key]:
        resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": "demo", "messages": HI, "max_tokens": 27})
        assert resp.status == 200
        assert (await resp.json())["usage"]["total_tokens"] == 28
    await client.app[USAGE].flush()

    async def remaining(key: str) -> Any:
        me = await (await client.get("/api/me", headers={"Authorization": f"Bearer {key}"})).json()
        assert me["today"]["tokens"] == 7 * 28  # the user's day, whichever key asks
        return me["remaining"]["daily_tokens"]

    assert await remaining(user.key) is None  # no cap applies
    assert await remaining(capped_key) == 100 - 2 * 28  # its subtree spent 56
    assert await remaining(child_key) == 60 - 28  # tighter than its parent's 44


# -- every door settles the whole admission -------------------------------------------------------

PRICED = """
[models.{name}]
provider = "demo"
input_price_per_mtok = 1000000
output_price_per_mtok = 1000000

[limits]
daily_cost_usd = 1000
"""


async def test_embeddings_give_back_their_stream_place_and_cost_reservation(
        make_client: MakeClient, config_file: Any, user: User, db: asyncpg.Pool) -> None:
    key_id = await key_of(db, user)
    await db.execute("UPDATE api_keys SET limits = $2 WHERE id = $1", key_id, {"max_concurrent_streams": 2})
    name = f"priced_{uuid.uuid4().hex[:8]}"
    client = await make_client(GATEWAY_CONFIG=config_file(PRICED.format(name=name)), DEMO_CHUNKS="3")
    for _ in range(3):
        resp = await client.post("/v1/embeddings", headers=user.headers, json={"model": name, "input": [1, 2, 3]})
        assert resp.status == 200, await resp.text()
    status, body = await completion(client, user, model=name, max_tokens=3)
    assert status == 200, body
    await client.close()  # usage written, slices (and the stream places they made ahead) given back
    # $1 a token: three embeddings of 3 tokens and a reply of 1 + 3; nothing held any more
    assert await user_day(db, user.id) == (13, 0, 13.0, 0.0)
    assert await db.fetchval("SELECT streams FROM stream_counts WHERE subject = $1", f"k:{key_id}") == 0
    assert await db.fetchval("SELECT count(*) FROM stream_leases") == 0
    assert await db.fetchval("SELECT count(*) FROM quota_leases WHERE user_id = $1", user.id) == 0


async def test_many_quick_embeddings_then_a_shutdown_leave_nothing_held_and_stay_under_the_cap(
        make_client: MakeClient, user: User, db: asyncpg.Pool) -> None:
    """A rolling deploy: 150 quick embedding calls (served from quota slices) against a key capped at
    1000 tokens, the instance shuts down, the next one starts and sweeps."""
    key_id = await key_of(db, user)
    await db.execute("UPDATE api_keys SET limits = $2 WHERE id = $1", key_id, {"daily_tokens": 1000})
    body = {"model": "demo", "input": [7] * 9}  # 9 tokens: each call reserves 10, uses 9
    a = await make_client(SWEEP_S="1000")
    statuses = [(await a.post("/v1/embeddings", headers=user.headers, json=body)).status for _ in range(150)]
    assert statuses == [200] * 111 + [429] * 39  # 999 tokens: the last one left fits no call
    assert a.app[POLICY].quota is not None and a.app[POLICY].quota.stats.from_slice > 0
    await a.close()
    assert await key_day(db, key_id) == (999, 0)
    # the slices' rows hold nothing any more: every request took its share off, the rest went back
    assert await slices_hold(db, user) == (0, 0)
    b = await make_client(SWEEP_S="1000")
    await b.app[INSTANCE].sweep()  # a's rows (emptied, not all deleted: settlements only empty them) go
    assert await db.fetchval("SELECT count(*) FROM quota_leases WHERE user_id = $1", user.id) == 0
    assert await key_day(db, key_id) == (999, 0)
    assert (await b.post("/v1/embeddings", headers=user.headers, json=body)).status == 429
    assert await key_day(db, key_id) == (999, 0)


async def test_a_slice_never_releases_more_than_it_reserved(db: asyncpg.Pool, user: User) -> None:
    """At the SQL: a slice of 100 tokens, another request's 50 reserved beside it, two requests
    served from the slice (10 each). Its unused part goes back twice, then the two requests settle:
    100 released in all, the other request's 50 still held. And a slice the sweep reclaimed (its
    instance taken for dead) releases nothing more when its requests' records arrive after all."""
    today = datetime.now(UTC).date()
    window = datetime.now(UTC).replace(second=0, microsecond=0)

    async def lease(instance: uuid.UUID) -> uuid.UUID:
        slice_id = uuid.uuid4()
        grant = await store.lease_quota(
            db, lease=slice_id, instance_id=instance, user_id=user.id, api_key_id=None, keys=[], day=today,
            window=window, user_rpm=None, requests=None, want=100, least=10, user_cap=10_000, want_cost=0.0,
            least_cost=0.0, user_cost_cap=None, user_streams=None, streams=0)
        assert grant.tokens == 100
        return slice_id

    def record(slice_id: uuid.UUID) -> UsageRecord:  # a request served from the slice: 10 held, 7 used
        return UsageRecord(message_id=uuid.uuid4(), user_id=user.id, api_key_id=None, model="demo", provider="demo",
                           prompt_tokens=3, completion_tokens=4, estimated=False, cost_usd=0.0, day=today,
                           user_reserved=10, quota_id=slice_id)

    grant = await store.admit_full(db, user_id=user.id, keys=[], day=today, window=window, user_rpm=None, want=50,
                                   user_cap=10_000, share=1)
    assert grant.tokens == 50
    returned = await lease(uuid.uuid4())
    for _ in range(2):
        await store.return_quota(db, lease=returned, tokens=80, cost=0.0, window=None, subjects=[], requests=0,
                                 streams=[])
    assert await record_usage_many(db, [record(returned), record(returned)]) == 2
    assert await user_day(db, user.id) == (14, 50, 0.0, 0.0)

    dead = uuid.uuid4()
    reclaimed = await lease(dead)
    assert (await user_day(db, user.id))[1] == 150
    async with db.acquire() as conn:
        assert await store.reclaim_quota(conn, dead) == 1
    assert await record_usage_many(db, [record(reclaimed)]) == 1
    await store.release(db, user_id=user.id, api_key_id=None, day=today, user_tokens=10, key_tokens=0,
                        quota=reclaimed)
    assert await user_day(db, user.id) == (21, 50, 0.0, 0.0)
    assert await db.fetchval("SELECT count(*) FROM quota_leases WHERE user_id = $1", user.id) == 0


# -- a slice elsewhere never clamps a reply -------------------------------------------------------

TWO = """
[providers.up]
kind = "openai"
base_url = "{url}"
api_key = "k"

[models.up]
provider = "up"
upstream = "fake-up"

[models.{name}]
provider = "demo"

[limits]
requests_per_minute = 1000
daily_tokens = 600
"""


async def test_a_slice_on_another_instance_is_recalled_before_a_reply_is_clamped(
        make_client: MakeClient, config_file: Any, upstream: FakeUpstream, user: User, db: asyncpg.Pool) -> None:
    name = f"warm_{uuid.uuid4().hex[:8]}"
    path = config_file(TWO.format(url=upstream.base_url, name=name))
    a = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10")
    b = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10")
    warm = await busy(a, user, name)  # native turns of 12 tokens each: "hello" and max_tokens 10
    await wait_for(lambda: settled(db, user))
    await wait_for(lambda: quiet(a))
    held = caller(a, user)
    assert held is not None
    unused = held.tokens
    tokens, reserved, _, _ = await user_day(db, user.id)
    assert tokens == warm * 12 and reserved == unused
    # a reply that may use all the cap has left: more than B finds outside A's slice
    max_tokens = 600 - tokens - HI_TOKENS
    status, body = await completion(b, user, model="up", max_tokens=max_tokens)
    assert status == 200, body
    assert upstream.requests[-1]["max_tokens"] == max_tokens  # not clamped to 600 - tokens - unused
    assert caller(a, user) is None  # A gave its slice back
    await b.app[USAGE].flush()
    # the fake upstream's reply: 9 prompt and 2 completion tokens; nothing held any more
    assert await user_day(db, user.id) == (warm * 12 + 11, 0, 0.0, 0.0)
