"""Erasing a user: `DELETE /api/admin/users/{id}` and `python -m gateway users erase USER_ID`.

Afterwards no column of any table holds the user's id or one of their keys' ids (user_id columns,
the counters and budgets keyed by `u:<id>` and `k:<id>`, webhook events' payloads), the
user's keys answer 401 on every instance within a second, their reply streams are gone from
Redis, the operator's usage report still adds up (the user's usage kept as totals naming nobody),
and an audit entry records the erasure without content.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway.fleet.wire import stream_key
from gateway.state import ACTIVITY, GENERATIONS, USAGE
from tests.support.arena import demo_models_toml, unique
from tests.support.chat import accept
from tests.support.cli import cli_env, run_cli
from tests.support.common import MakeClient, User, wait_for
from tests.support.erasure import key_ids, populate, report, rows_naming, second_key

pytestmark = pytest.mark.processes  # the command line runs as a subprocess; Redis as a server


async def erased_totals(db: asyncpg.Pool) -> tuple[int, int, float]:
    row = await db.fetchrow("SELECT coalesce(sum(requests), 0) AS n, coalesce(sum(total_tokens), 0) AS t, "
                            "coalesce(sum(cost_usd), 0) AS c FROM erased_usage")
    return row["n"], row["t"], row["c"]


async def status_with(client: TestClient, key: str) -> int:
    resp = await client.get("/api/threads", headers={"Authorization": f"Bearer {key}"})
    await resp.read()
    return resp.status


async def test_an_admin_erases_a_user_everywhere_and_the_usage_report_still_adds_up(
        make_client: MakeClient, make_user, config_file, redis_url: str, db: asyncpg.Pool):
    x, y = unique("erase_x"), unique("erase_y")
    # key events queued for an endpoint that never answers: they stay in the outbox, naming the user
    hook = unique("http://127.0.0.1:9/erasure-hook/")
    hooks = (f'[[webhooks]]\nurl = "{hook}"\nsecret = "whsec_{"A" * 43}="\n'
             'events = ["key.created", "key.revoked"]\n')
    env = {"GATEWAY_CONFIG": config_file(demo_models_toml(x, y) + hooks), "REDIS_URL": redis_url,
           "DEMO_CHUNKS": "4", "KEY_CACHE_TTL_S": "3600", "SWEEP_S": "1000", "WEBHOOK_POLL_S": "1000"}
    a, b = await make_client(**env), await make_client(**env)
    admin: User = await make_user(scopes=("chat", "admin"))
    victim: User = await make_user()
    other_key = await second_key(db, victim)
    bystander: User = await make_user()
    replies = await populate(a, b, victim, db, (x, y))
    await populate(b, a, bystander, db, (x, y))
    made = await a.post("/api/keys", json={"name": "given", "user_id": str(victim.id)}, headers=admin.headers)
    assert made.status == 201, await made.text()
    victim_keys = await key_ids(db, victim)
    assert len(victim_keys) == 3
    named = await rows_naming(db, victim.id, victim_keys)
    # the month and lifetime budget rows of the user and of each key that spent, the key.created event
    assert (named["budget_usage"], named["webhook_outbox"]) == (4, 1)
    for client in (a, b):
        assert [await status_with(client, k) for k in (victim.key, other_key)] == [200, 200]  # cached
    for client in (a, b):
        await client.app[ACTIVITY].flush()
    before = await report(db)
    totals = await db.fetchrow("SELECT count(*) AS n, sum(total_tokens) AS t, sum(cost_usd) AS c FROM usage "
                               "WHERE user_id = $1", victim.id)
    bystander_rows = await rows_naming(db, bystander.id)
    erased_before = await erased_totals(db)
    redis = aioredis.Redis.from_url(redis_url)
    assert await redis.exists(*(stream_key(m) for m in replies)) == 3

    resp = await a.delete(f"/api/admin/users/{victim.id}", headers=admin.headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    activity = body["erased"].pop("activity")
    assert activity >= 4  # the victim's requests: two turns, the arena stream, the vote, the key checks
    assert body == {"user_id": str(victim.id), "keys_revoked": 3, "redis_streams": 3,
                    "erased": {"users": 1, "api_keys": 3, "threads": 2, "messages": 5, "comparisons": 1,
                               "usage": 3, "other": body["erased"]["other"]}}

    assert await rows_naming(db, victim.id, victim_keys) == {}
    assert await rows_naming(db, bystander.id) == bystander_rows  # nobody else's rows touched
    assert await redis.exists(*(stream_key(m) for m in replies)) == 0
    await redis.aclose()

    async def refused_everywhere() -> bool:
        return [await status_with(c, k) for c in (a, b) for k in (victim.key, other_key)] == [401] * 4

    await wait_for(refused_everywhere, timeout=1.0)
    assert await report(db) == before  # the totals stayed, naming nobody
    erased_after = await erased_totals(db)
    assert [after - before for after, before in zip(erased_after, erased_before, strict=True)] == [
        totals["n"], totals["t"], totals["c"]]

    # the audit entry: the admin's request, the erased id in its path and nothing else of theirs
    await a.app[ACTIVITY].flush()
    audit = await db.fetch("SELECT user_id, action, method, path, status FROM activity_log WHERE path = $1",
                           f"/api/admin/users/{victim.id}")
    assert [tuple(r) for r in audit] == [(admin.id, "erasure.erase_user", "DELETE", f"/api/admin/users/{victim.id}",
                                          200)]

    again = await a.delete(f"/api/admin/users/{victim.id}", headers=admin.headers)
    assert (again.status, (await again.json())["error"]["message"]) == (404, "user not found")


async def test_erasure_asks_for_an_admin_key_a_valid_id_and_another_user(client: TestClient, make_user,
                                                                         db: asyncpg.Pool):
    admin: User = await make_user(scopes=("chat", "admin"))
    plain: User = await make_user()
    cases = [(plain, str(admin.id), 403), (admin, "not-a-uuid", 400), (admin, str(admin.id), 400),
             (admin, str(uuid.uuid4()), 404)]
    for who, target, status in cases:
        resp = await client.delete(f"/api/admin/users/{target}", headers=who.headers)
        assert resp.status == status, (target, await resp.text())
    messages = [(await (await client.delete(f"/api/admin/users/{t}", headers=w.headers)).json())["error"]["message"]
                for w, t, _ in cases]
    assert messages == ["erasing a user needs the admin scope", "user id is not a valid UUID",
                        "user id is the caller's own: erase it with `python -m gateway users erase`", "user not found"]
    assert await db.fetchval("SELECT count(*) FROM users WHERE id = ANY($1::uuid[])", [admin.id, plain.id]) == 2


async def test_the_command_line_erases_a_user_and_writes_the_audit_entry(
        make_client: MakeClient, make_user, config_file, database_url: str, db: asyncpg.Pool, tmp_path):
    x, y = unique("cli_x"), unique("cli_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), DEMO_CHUNKS="4")
    victim: User = await make_user()
    await populate(client, client, victim, db, (x, y))
    await client.app[ACTIVITY].flush()
    before = await report(db)

    run = await run_cli(tmp_path, cli_env(database_url), "users", "erase", str(victim.id))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"erased user {victim.id}: 1 users, 1 api keys, 2 threads, 5 messages, "
                                 "1 comparisons, 3 usage, ")
    assert run.stdout.rstrip().endswith("; 1 keys revoked; 0 redis streams")
    assert await rows_naming(db, victim.id) == {}
    assert await status_with(client, victim.key) == 401  # this instance heard the revocation
    assert await report(db) == before
    audit = await db.fetch("SELECT user_id, api_key_id, action, method, path, status FROM activity_log "
                           "WHERE path = $1", f"users erase {victim.id}")
    assert [tuple(r) for r in audit] == [(uuid.UUID(int=0), None, "users.erase", "CLI", f"users erase {victim.id}",
                                          200)]

    again = await run_cli(tmp_path, cli_env(database_url), "users", "erase", str(victim.id))
    assert (again.returncode, again.stderr.strip()) == (1, f"no user {victim.id}")


async def test_a_live_reply_on_another_instance_is_cancelled_and_erased_with_its_user(
        make_client: MakeClient, make_user, stepped, db: asyncpg.Pool):
    up = await stepped(["never ", "finished"], holds=(2,))  # the role chunk and one text, then it holds
    env = {"OPENAI_BASE_URL": up.base_url, "OPENAI_MODEL": "fake", "SWEEP_S": "1000"}
    a, b = await make_client(**env), await make_client(**env)
    admin: User = await make_user(scopes=("chat", "admin"))
    victim: User = await make_user()
    mid = (await accept(b, victim, "cut me off"))["assistant_message_id"]

    async def streaming() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE id = $1", uuid.UUID(mid)) == "streaming"

    await wait_for(streaming)
    resp = await a.delete(f"/api/admin/users/{victim.id}", headers=admin.headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert (body["erased"]["messages"], body["erased"]["threads"], body["keys_revoked"]) == (2, 1, 1)
    assert b.app[GENERATIONS].get(uuid.UUID(mid)) is None  # cancelled on B, not left generating
    up.release()
    await b.app[USAGE].flush()
    await asyncio.sleep(0.2)
    assert await rows_naming(db, victim.id) == {}
