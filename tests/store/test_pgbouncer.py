"""Behind PgBouncer in transaction pooling: `DATABASE_URL` names the pooler, `DATABASE_DIRECT_URL`
the server. Two instances share ten server connections through the pooler; their turns run with
no error, revocation and cancel still cross instances (LISTEN rides the direct connection), the
quota slices stay exact, a dead instance's reply is swept through the pooler, and a fresh database
is migrated through the direct URL."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.state import DB, INSTANCE, POLICY
from gateway.store.db import Database
from tests.support.chat import accept, row, stream_path, wait_finished
from tests.support.common import MakeClient, User, wait_for
from tests.support.database import fresh_database
from tests.support.fleet import SteppedUpstream, read_events
from tests.support.pgbouncer import PgBouncer
from tests.support.quota import TOML, WORST, busy, caller, day, dead, settled, turn

pytestmark = pytest.mark.processes  # starts pgbouncer

TEXTS = ["Once ", "upon ", "a ", "time."]


def pooled(bouncer: PgBouncer, database_url: str) -> dict[str, str]:
    return {"DATABASE_URL": bouncer.url(database_url), "DATABASE_DIRECT_URL": database_url, "SWEEP_S": "1000"}


async def test_the_pool_keeps_no_statement_on_the_server_and_sessions_go_direct(
        pgbouncer: PgBouncer, make_client: MakeClient, database_url: str):
    client = await make_client(**pooled(pgbouncer, database_url))
    db: Database = client.app[DB]
    assert db.url == pgbouncer.url(database_url) and db.session_url == database_url
    async with db.pool.acquire() as conn:
        assert conn._config.statement_cache_size == 0
        # through the pooler: the server session answering is PgBouncer's, on the pooler's port
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
    async with db.session() as conn:  # straight to the server: its own address, never the pooler's
        direct = urlsplit(database_url)
        socket_dir = parse_qs(direct.query).get("host", [""])[0]
        if socket_dir.startswith("/"):  # the embedded server: a Unix socket
            assert conn._addr == f"{socket_dir}/.s.PGSQL.{direct.port or 5432}"
        else:
            assert conn._addr[1] == (direct.port or 5432)


async def test_fifty_concurrent_turns_on_two_pooled_instances_finish_with_no_error(
        pgbouncer: PgBouncer, make_client: MakeClient, user: User, db: asyncpg.Pool, database_url: str):
    env = pooled(pgbouncer, database_url)
    a, b = await make_client(**env), await make_client(**env)
    assert a.app[INSTANCE].id != b.app[INSTANCE].id
    accepted = await asyncio.gather(*(accept(a if i % 2 else b, user, f"turn {i}") for i in range(50)))
    mids = [r["assistant_message_id"] for r in accepted]
    saved = [await wait_finished(db, mid) for mid in mids]
    assert [r["status"] for r in saved] == ["complete"] * 50
    assert await db.fetchval("SELECT count(*) FROM usage WHERE message_id = ANY($1::uuid[])",
                             [uuid.UUID(m) for m in mids]) == 50
    assert "ERROR" not in pgbouncer.output()


async def test_a_revocation_on_one_pooled_instance_reaches_the_other_within_a_second(
        pgbouncer: PgBouncer, make_client: MakeClient, make_user, database_url: str):
    env = {**pooled(pgbouncer, database_url), "KEY_CACHE_TTL_S": "3600"}
    a, b = await make_client(**env), await make_client(**env)
    root = await make_user(scopes=("chat", "admin"))
    resp = await a.post("/api/keys", json={"name": "doomed", "scopes": ["chat"]}, headers=root.headers)
    assert resp.status == 201, await resp.text()
    doomed = await resp.json()
    headers = {"Authorization": f"Bearer {doomed['key']}"}

    async def status(client: TestClient) -> int:
        resp = await client.get("/api/threads", headers=headers)
        await resp.read()
        return int(resp.status)

    assert (await status(a), await status(b)) == (200, 200)  # cached on both
    assert (await a.delete(f"/api/keys/{doomed['id']}", headers=root.headers)).status == 204

    async def refused_on_b() -> bool:
        return await status(b) == 401

    await wait_for(refused_on_b, timeout=1.0)


async def test_a_cancel_on_one_pooled_instance_stops_the_reply_on_the_other(
        pgbouncer: PgBouncer, make_client: MakeClient, stepped, user: User, db: asyncpg.Pool, database_url: str):
    up: SteppedUpstream = await stepped(TEXTS, holds=(3,))
    env = {**pooled(pgbouncer, database_url), "OPENAI_BASE_URL": up.base_url, "OPENAI_MODEL": "fake"}
    a, b = await make_client(**env), await make_client(**env)
    # B has served the caller before (its key cached, its pooled connections open), as in the
    # revocation test: what is timed is the cancel crossing instances, not B's first request
    warm = await b.get("/api/threads", headers=user.headers)
    assert warm.status == 200, await warm.text()
    mid = (await accept(a, user, "stop it"))["assistant_message_id"]
    on_a = await a.get(stream_path(mid), headers=user.headers)
    await read_events(on_a, 3)  # retry + metadata, 2 deltas: A is generating
    # B asks (NOTIFY through the pooler), A hears it on its direct connection and stops the reply
    asked = asyncio.ensure_future(b.post(f"/api/messages/{mid}/cancel", headers=user.headers))

    async def cancelled() -> bool:
        return (await row(db, mid))["status"] == "cancelled"

    # through the pooler, late in a loaded full run, this has taken 2-3.5 s (without it, 0.05-0.2 s):
    # the bound is what CI can keep; the cause of the slow cases is not found yet
    await wait_for(cancelled, timeout=5.0)
    async with asyncio.timeout(10):  # B answers once it has seen the finish (it follows the row)
        resp = await asked
        answer = await resp.json()
    assert (resp.status, answer["status"], answer["content"]) == (200, "cancelled", "".join(TEXTS[:2]))
    up.release()
    assert (await wait_finished(db, mid))["status"] == "cancelled"


async def test_quota_slices_stay_exact_across_two_pooled_instances(
        pgbouncer: PgBouncer, make_client: MakeClient, config_file, user: User, db: asyncpg.Pool, database_url: str):
    model = f"leased_{uuid.uuid4().hex[:8]}"
    env = {**pooled(pgbouncer, database_url), "GATEWAY_CONFIG": config_file(TOML.format(name=model, tokens=20 * WORST)),
           "DEMO_CHUNKS": "10"}
    a, b = await make_client(**env), await make_client(**env)
    warm = await busy(a, user, model) + await busy(b, user, model)
    assert caller(a, user) is not None and caller(b, user) is not None  # both hold a slice
    outcomes = await asyncio.gather(*(turn(a if i % 2 else b, user, model) for i in range(50)))
    assert outcomes.count("ran") == 20 - warm  # exactly what the caps fit
    assert a.app[POLICY].quota.stats.from_slice + b.app[POLICY].quota.stats.from_slice >= 2
    await wait_for(lambda: settled(db, user))
    assert await day(db, user) == (20 * WORST, 0, 20.0 * WORST, 0.0)
    assert await db.fetchval("SELECT sum(total_tokens) FROM usage WHERE user_id = $1", user.id) == 20 * WORST


async def test_a_fresh_database_behind_the_pooler_is_migrated_through_the_direct_url(
        pgbouncer: PgBouncer, make_client: MakeClient, pg_server_url: str):
    async with fresh_database(pg_server_url) as url:
        client = await make_client(**pooled(pgbouncer, url))
        conn = await asyncpg.connect(url)
        try:
            applied = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        finally:
            await conn.close()
        assert applied > 0
        await client.close()


async def test_a_dead_instances_reply_is_swept_through_the_pooler(
        pgbouncer: PgBouncer, make_client: MakeClient, stepped, user: User, db: asyncpg.Pool, database_url: str):
    up: SteppedUpstream = await stepped(TEXTS, holds=(3,))
    env = {**pooled(pgbouncer, database_url), "OPENAI_BASE_URL": up.base_url, "OPENAI_MODEL": "fake",
           "CHECKPOINT_S": "0.05"}
    a, b = await make_client(**env), await make_client(**env)
    mid = (await accept(a, user, "then a dies"))["assistant_message_id"]

    async def checkpointed() -> bool:
        return (await row(db, mid))["content"] == "".join(TEXTS[:2])

    await wait_for(checkpointed)
    await dead(db, a)  # its lock's direct connection cut: to b it is gone

    async def swept_by_b() -> bool:  # the terminated backend lets go of a's lock a moment later
        await b.app[INSTANCE].sweep()  # the dead owner's lock for one transaction, through PgBouncer
        return (await row(db, mid))["status"] != "streaming"

    await wait_for(swept_by_b)
    swept = await row(db, mid)
    assert (swept["status"], swept["content"]) == ("interrupted", "".join(TEXTS[:2]))
    assert await db.fetchval("SELECT estimated FROM usage WHERE message_id = $1", uuid.UUID(mid)) is True
    up.release()
