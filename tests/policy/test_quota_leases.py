"""Quota leases: a busy caller is admitted from a slice of its quota leased ahead
and spent in memory (no database call per request); the caps stay exact across instances, an idle
caller leases nothing, unused slices go back at shutdown or, when their instance died, by the sweep."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg

from gateway.policy.quota import LEASE_WITHIN_S
from gateway.service.turns import prompt_tokens
from gateway.state import INSTANCE, POLICY
from tests.support.common import wait_for
from tests.support.quota import TOML, WORST, app, busy, caller, day, dead, quiet, settled, turn
from tests.support.statements import log_statements, on_the_path

assert prompt_tokens([{"role": "user", "content": "hello"}]) + 10 == WORST


async def slices_held(db: asyncpg.Pool) -> tuple[int, float]:
    row = await db.fetchrow("SELECT coalesce(sum(user_tokens), 0)::bigint AS t, "
                            "coalesce(sum(user_cost), 0)::float8 AS c FROM quota_leases")
    return row["t"], row["c"]


async def test_fifty_concurrent_requests_on_two_instances_with_slices_run_exactly_what_the_caps_fit(
        make_client, config_file, user, db):
    model = f"leased_{uuid.uuid4().hex[:8]}"
    path = config_file(TOML.format(name=model, tokens=20 * WORST))
    a = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10")
    b = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10")
    assert a.app[INSTANCE].id != b.app[INSTANCE].id
    warm = await busy(a, user, model) + await busy(b, user, model)
    assert caller(a, user) is not None and caller(b, user) is not None  # both hold a slice
    outcomes = await asyncio.gather(*(turn(a if i % 2 else b, user, model) for i in range(50)))
    assert outcomes.count("ran") == 20 - warm  # exactly what the caps fit, not one more or less
    served = a.app[POLICY].quota.stats.from_slice + b.app[POLICY].quota.stats.from_slice
    assert served >= 2  # the slices served requests (a native turn takes a window slot, then its reservation)
    await wait_for(lambda: settled(db, user))
    # every token and dollar of the caps consumed, nothing left reserved, each reply counted once
    assert await day(db, user) == (20 * WORST, 0, 20.0 * WORST, 0.0)
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 20
    assert await db.fetchval("SELECT sum(total_tokens) FROM usage WHERE user_id = $1", user.id) == 20 * WORST
    assert await slices_held(db) == (0, 0.0)
    assert await db.fetchval("SELECT count(*) FROM stream_leases") == 0
    assert await db.fetchval("SELECT streams FROM stream_counts WHERE subject = $1", f"u:{user.id}") == 0


async def test_an_idle_caller_leases_nothing(make_client, config_file, user, db):
    client, model = await app(make_client, config_file, 100 * WORST)
    assert await turn(client, user, model) == "ran"
    await asyncio.sleep(LEASE_WITHIN_S + 0.1)
    assert await turn(client, user, model) == "ran"
    await asyncio.sleep(0.2)  # time for a lease, had one been asked for
    stats = client.app[POLICY].quota.stats
    assert (stats.leases, stats.from_slice, stats.exact) == (0, 0, 4)  # two calls a turn: window, then the rest
    assert await db.fetchval("SELECT count(*) FROM quota_leases") == 0
    await wait_for(lambda: settled(db, user))
    assert await day(db, user) == (2 * WORST, 0, 2.0 * WORST, 0.0)


async def test_a_busy_callers_requests_after_the_first_slice_make_no_admission_call(
        make_client, config_file, user, db):
    client, model = await app(make_client, config_file, 1000 * WORST)
    warm = await busy(client, user, model)
    stats = client.app[POLICY].quota.stats
    exact, served = stats.exact, stats.from_slice
    for _ in range(3):
        assert await turn(client, user, model) == "ran"
    assert stats.exact == exact  # no gateway_admit_full: served from memory
    assert stats.from_slice - served == 3  # the window slot and the reservation of each, at once
    await wait_for(lambda: settled(db, user))
    tokens, reserved, _, _ = await day(db, user)
    assert tokens == (warm + 3) * WORST
    # what is reserved now is the unused slice; /api/me does not count it against the user
    unused = client.app[POLICY].unused_tokens(user.id, datetime.now(UTC).date())
    assert reserved == unused > 0
    me = await (await client.get("/api/me", headers=user.headers)).json()
    assert me["today"]["reserved"] == 0
    assert me["remaining"]["daily_tokens"] == 1000 * WORST - (warm + 3) * WORST


async def test_an_unused_slice_goes_back_at_shutdown(make_client, config_file, user, db):
    client, model = await app(make_client, config_file, 1000 * WORST)
    warm = await busy(client, user, model)
    await wait_for(lambda: settled(db, user))
    tokens, reserved, cost, cost_reserved = await day(db, user)
    assert (tokens, cost) == (warm * WORST, warm * float(WORST)) and reserved > 0 and cost_reserved > 0
    assert await db.fetchval("SELECT count(*) FROM stream_leases") > 0  # places made ahead
    window = await db.fetchval("SELECT count FROM rate_windows WHERE subject = $1", f"u:{user.id}")
    assert window > warm
    await client.close()
    assert await day(db, user) == (warm * WORST, 0, warm * float(WORST), 0.0)
    assert await db.fetchval("SELECT count(*) FROM quota_leases") == 0
    assert await db.fetchval("SELECT count(*) FROM stream_leases") == 0
    assert await db.fetchval("SELECT streams FROM stream_counts WHERE subject = $1", f"u:{user.id}") == 0
    # the window slots it did not use are free again (unless the minute turned meanwhile)
    assert await db.fetchval("SELECT sum(count) FROM rate_windows WHERE subject = $1", f"u:{user.id}") == warm


async def test_a_dead_instances_slice_is_reclaimed_by_the_sweep(make_client, config_file, user, db):
    path = config_file(TOML.format(name="reclaimed", tokens=1000 * WORST))
    a = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10", SWEEP_S="1000")
    warm = await busy(a, user, "reclaimed")
    await wait_for(lambda: settled(db, user))
    assert (await day(db, user))[1] > 0
    b = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10", SWEEP_S="1000")
    await wait_for(lambda: quiet(a))  # a dead instance sends nothing: a's last renewal lands before it dies
    await dead(db, a)

    async def reclaimed() -> bool:  # the terminated backend lets go of a's lock a moment later
        await b.app[INSTANCE].sweep()
        return await db.fetchval("SELECT count(*) FROM quota_leases") == 0

    await wait_for(reclaimed)
    assert await day(db, user) == (warm * WORST, 0, warm * float(WORST), 0.0)
    assert await db.fetchval("SELECT count(*) FROM stream_leases") == 0
    assert await db.fetchval("SELECT streams FROM stream_counts WHERE subject = $1", f"u:{user.id}") == 0
    await b.app[INSTANCE].sweep()  # a second sweep gives nothing back twice
    assert await day(db, user) == (warm * WORST, 0, warm * float(WORST), 0.0)


async def test_a_busy_callers_native_turn_makes_one_statement_the_persist(make_client, config_file, user, db):
    """Admitted from the slice before the commit, the reply's reservation rides in
    the persist statement; nothing else is sent to the database before the 202 (no duplicate
    lookup, no BEGIN/COMMIT around it, even with a client_message_id)."""
    # the pool open at its full size: every connection's statements are logged
    client, model = await app(make_client, config_file, 1000 * WORST, DB_POOL_MIN="4", DB_POOL_MAX="4")
    await busy(client, user, model)
    await wait_for(lambda: settled(db, user))
    await wait_for(lambda: quiet(client))
    sent, stop = log_statements(client)
    try:
        resp = await client.post("/api/chat", headers=user.headers, json={
            "content": "hello", "max_tokens": 10, "model": model, "client_message_id": "m-1"})
        assert resp.status == 202
    finally:
        stop()
    # the request's statements, less the reply's finish (which may land already)
    before_reply = [q for q in on_the_path(sent) if "x.status" not in q]
    assert len(before_reply) == 1 and "INSERT INTO messages" in before_reply[0], before_reply
    await wait_for(lambda: settled(db, user))
    row = await db.fetchrow("SELECT status, metadata FROM messages WHERE id = $1",
                            uuid.UUID((await resp.json())["assistant_message_id"]))
    assert row["status"] == "complete" and "reservation" not in row["metadata"]


async def test_a_busy_callers_retry_gets_the_first_rows_and_keeps_nothing(make_client, config_file, user, db):
    """The duplicate is found by the persist statement: the retry's share goes back into the slice."""
    client, model = await app(make_client, config_file, 1000 * WORST)
    warm = await busy(client, user, model)
    body = {"content": "hello", "max_tokens": 10, "model": model, "client_message_id": "same"}
    first = await (await client.post("/api/chat", headers=user.headers, json=body)).json()
    await wait_for(lambda: settled(db, user))
    await wait_for(lambda: quiet(client))
    policy = client.app[POLICY]
    today = datetime.now(UTC).date()
    served = policy.quota.stats.from_slice
    again = await client.post("/api/chat", headers=user.headers, json=body)
    assert again.status == 202
    assert (await again.json())["assistant_message_id"] == first["assistant_message_id"]
    assert policy.quota.stats.from_slice == served + 1  # admitted from the slice, then given back
    await wait_for(lambda: quiet(client))  # (taking from the slice may have renewed it)
    unused = policy.unused_tokens(user.id, today)
    # all that is reserved is the slice's unused part: the retry holds nothing, ran nothing
    assert await day(db, user) == ((warm + 1) * WORST, unused, (warm + 1) * float(WORST), float(unused))
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 2 * (warm + 1)
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == warm + 1


async def test_a_small_cap_is_never_stranded_in_another_instances_slice(make_client, config_file, user, db):
    """B's requests spend the cap down to what A's slice holds; B's next exact admission is refused,
    recalls A's slice, and runs: the cap is used to the last request, on whichever instance."""
    path = config_file(TOML.format(name="small", tokens=8 * WORST))
    a = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10")
    b = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10")
    warm = await busy(a, user, "small")
    await wait_for(lambda: quiet(a))
    held = caller(a, user)
    assert held is not None and held.tokens >= WORST  # A holds part of the cap, unused
    ran_on_b = 0
    while await turn(b, user, "small") == "ran":
        ran_on_b += 1
        assert ran_on_b <= 8
    assert warm + ran_on_b == 8  # every request the cap fits ran: A's slice was recalled, not wasted
    assert caller(a, user) is None
    await wait_for(lambda: settled(db, user))
    assert await day(db, user) == (8 * WORST, 0, 8.0 * WORST, 0.0)
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 8
