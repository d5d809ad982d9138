"""Daily cost caps ([limits] daily_cost_usd per user, limits.daily_cost_usd per key): the worst case
at the model's prices is reserved atomically, settled to the real cost exactly once (by the finish,
or by the sweep when the instance died), and a request that does not fit is clamped or refused."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.config import ConfigError, Settings
from gateway.fleet.instance import lock_key
from gateway.generation.journal import record_from_json, record_to_json
from gateway.service.turns import prompt_tokens
from gateway.state import INSTANCE
from gateway.store.messages import FinishRecord
from gateway.store.usage import UsageRecord
from gateway.vocabulary import MessageStatus
from tests.support.common import User, wait_for
from tests.support.fakes import FakeUpstream, Reply, openai_stream

# $1 per prompt token and $1 per completion token: a demo turn of "hello" (2 prompt tokens,
# estimated) with max_tokens 10 (DEMO_CHUNKS=10: exactly 10 completion tokens) costs exactly its
# worst case, $12
DEMO_TOML = """
[models.{name}]
provider = "demo"
input_price_per_mtok = 1000000
output_price_per_mtok = 1000000

[limits]
daily_cost_usd = {cap}
"""

# the fake upstream at $1 per prompt token and $2 per completion token; its default reply reports
# 9 prompt and 2 completion tokens: $13
UPSTREAM_TOML = """
[providers.up]
kind = "openai"
base_url = "{url}"
api_key = "k"

[models.{name}]
provider = "up"
upstream = "fake-up"
input_price_per_mtok = 1000000
output_price_per_mtok = 2000000

[limits]
daily_cost_usd = {cap}
"""

HELLO = prompt_tokens([{"role": "user", "content": "hello"}])


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def user_day(db: asyncpg.Pool, user: User) -> tuple[float, float] | None:
    row = await db.fetchrow("SELECT cost_usd::float8 AS c, cost_reserved::float8 AS r FROM daily_usage "
                            "WHERE user_id = $1 AND day = $2", user.id, datetime.now(UTC).date())
    return (row["c"], row["r"]) if row else None


async def key_day(db: asyncpg.Pool, key_id: Any) -> tuple[float, float] | None:
    row = await db.fetchrow("SELECT cost_usd::float8 AS c, cost_reserved::float8 AS r FROM key_daily_usage "
                            "WHERE api_key_id = $1 AND day = $2", key_id, datetime.now(UTC).date())
    return (row["c"], row["r"]) if row else None


async def settled(db: asyncpg.Pool, user: User) -> bool:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND status IN ('pending', 'streaming')",
                             user.id) == 0


async def turn(client: TestClient, user: User | dict[str, str], model: str, **body: Any) -> tuple[int, dict]:
    """The answer's status and body; a reply the cap refused (after the user message was saved:
    persist first) adds its `error` and `"refused": true` to the 202's body."""
    headers = user.headers if isinstance(user, User) else user
    resp = await client.post("/api/chat", headers=headers,
                             json={"content": "hello", "max_tokens": 10, "model": model, **body})
    answer = await resp.json()
    if resp.status == 202:
        reply = await (await client.get(f"/api/messages/{answer['assistant_message_id']}", headers=headers)).json()
        if reply["status"] == MessageStatus.REFUSED:
            answer.update(refused=True, error=reply["error"])
    return resp.status, answer


async def demo_client(make_client, config_file, cap: float) -> tuple[TestClient, str]:
    name = unique("priced")
    return await make_client(GATEWAY_CONFIG=config_file(DEMO_TOML.format(name=name, cap=cap)), DEMO_CHUNKS="10"), name


async def test_fifty_concurrent_requests_never_exceed_a_cost_cap_that_fits_ten(make_client, config_file, user, db):
    assert HELLO == 2
    client, model = await demo_client(make_client, config_file, 120)
    answers = await asyncio.gather(*(turn(client, user, model) for _ in range(50)))
    assert [status for status, _ in answers] == [202] * 50  # persist first: every message is kept
    refused = [body["error"] for _, body in answers if body.get("refused")]
    assert len(refused) == 40
    assert {(e["message"], e["reason"]) for e in refused} == {("daily cost cap reached (user daily cost)",
                                                               "daily_cost")}
    await wait_for(lambda: settled(db, user))
    assert await user_day(db, user) == (120.0, 0.0)
    assert await db.fetchval("SELECT sum(cost_usd)::float8 FROM usage WHERE user_id = $1", user.id) == 120.0
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 10
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 100


async def test_the_worst_case_is_reserved_while_the_reply_runs_and_settled_to_the_real_cost(
        make_client, config_file, upstream: FakeUpstream, make_user, db):
    user = await make_user()
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    await db.execute("UPDATE api_keys SET limits = $2 WHERE id = $1", key_id, {"daily_cost_usd": 500})
    name = unique("up")
    client = await make_client(GATEWAY_CONFIG=config_file(UPSTREAM_TOML.format(url=upstream.base_url, name=name,
                                                                                 cap=1000)))
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["Hel", "lo"]), hold_at=1, release=release))
    status, _ = await turn(client, user, name)
    assert status == 202
    worst = HELLO * 1 + 10 * 2  # prompt x $1 + max_tokens x $2
    assert await user_day(db, user) == (0.0, worst)
    assert await key_day(db, key_id) == (0.0, worst)
    release.set()
    await wait_for(lambda: settled(db, user))
    assert await user_day(db, user) == (13.0, 0.0)  # 9 x $1 + 2 x $2, as the upstream reported
    assert await key_day(db, key_id) == (13.0, 0.0)
    assert upstream.requests[0]["max_tokens"] == 10


async def test_a_reply_is_clamped_to_the_tokens_the_cost_cap_leaves(make_client, config_file, upstream, user, db):
    name = unique("up")
    cap = HELLO * 1 + 4 * 2  # room for the prompt and 4 completion tokens
    client = await make_client(GATEWAY_CONFIG=config_file(UPSTREAM_TOML.format(url=upstream.base_url, name=name,
                                                                                 cap=cap)))
    status, body = await turn(client, user, name)
    assert status == 202
    await wait_for(lambda: settled(db, user))
    assert upstream.requests[0]["max_tokens"] == 4
    reply = await db.fetchrow("SELECT metadata FROM messages WHERE id = $1",
                              uuid.UUID(body["assistant_message_id"]))
    assert reply["metadata"]["policy"]["reasons"] == ["max_tokens clamped to the 4 tokens today's cost cap allows"]
    assert await user_day(db, user) == (13.0, 0.0)


async def test_a_prompt_the_cap_cannot_pay_for_is_refused_and_reserves_nothing(make_client, config_file, user, db):
    client, model = await demo_client(make_client, config_file, 1)  # the prompt alone costs $2
    status, body = await turn(client, user, model, client_message_id="later")
    assert status == 202 and body["refused"] is True
    assert body["error"]["message"] == "daily cost cap reached (too little left for this prompt)"
    assert body["error"]["reason"] == "daily_cost"
    midnight = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), UTC)
    assert datetime.fromisoformat(body["error"]["reset_at"]) == midnight
    assert await user_day(db, user) == (0.0, 0.0)  # the reservation was handed back
    # the message is kept, its reply refused; nothing was counted
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 2
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 0


async def test_a_spent_cap_refuses_priced_models_but_not_free_ones(make_client, config_file, user, db):
    client, model = await demo_client(make_client, config_file, 12)
    assert (await turn(client, user, model))[0] == 202
    await wait_for(lambda: settled(db, user))
    status, body = await turn(client, user, model)
    assert (status, body["error"]["message"]) == (202, "daily cost cap reached (user daily cost)")
    free = await turn(client, user, "demo")
    assert free[0] == 202 and "refused" not in free[1]  # free: costs nothing, so no cost cap refuses it
    await wait_for(lambda: settled(db, user))
    assert await user_day(db, user) == (12.0, 0.0)


async def test_a_keys_cost_cap_is_set_through_the_api_and_bounds_its_children(make_client, config_file, make_user, db):
    admin = await make_user(scopes=("chat", "arena", "admin"))
    client, model = await demo_client(make_client, config_file, 1000)
    for bad in (0, -1, "12", True, 1e9, None):
        resp = await client.post("/api/keys", headers=admin.headers,
                                 json={"name": "bad", "limits": {"daily_cost_usd": bad}})
        if bad is None:
            assert resp.status == 201  # no cap
            continue
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["message"] == \
            "limits.daily_cost_usd must be a number of dollars above 0 and below 100000000"
    resp = await client.post("/api/keys", headers=admin.headers, json={"name": "capped",
                                                                        "limits": {"daily_cost_usd": 12}})
    assert resp.status == 201
    capped = await resp.json()
    assert capped["limits"] == {"daily_cost_usd": 12}
    headers = {"Authorization": f"Bearer {capped['key']}"}
    # a child of the capped key cannot promise more than its parent
    over = await client.post("/api/keys", headers=headers, json={"name": "over", "limits": {"daily_cost_usd": 13}})
    assert over.status == 403
    assert (await turn(client, headers, model))[0] == 202
    await wait_for(lambda: settled(db, admin))
    status, body = await turn(client, headers, model)
    assert (status, body["error"]["message"]) == (202, "daily cost cap reached (key daily cost)")
    assert await key_day(db, uuid.UUID(capped["id"])) == (12.0, 0.0)
    assert (await turn(client, admin, model))[0] == 202  # the user's other key has room


def test_the_config_takes_a_positive_daily_cost(config_file):
    path = config_file("[limits]\ndaily_cost_usd = 2.5\n")
    assert Settings.from_env({"GATEWAY_CONFIG": path}).limits.daily_cost_usd == 2.5
    for bad in ("0", "-1", '"x"', "nan"):
        with pytest.raises(ConfigError, match="daily_cost_usd"):
            Settings.from_env({"GATEWAY_CONFIG": config_file(f"[limits]\ndaily_cost_usd = {bad}\n")})


async def test_the_sweep_settles_a_dead_instances_cost_reservation_once(make_client, config_file, upstream, user, db):
    name = unique("up")
    path = config_file(UPSTREAM_TOML.format(url=upstream.base_url, name=name, cap=1000))
    a = await make_client(GATEWAY_CONFIG=path, SWEEP_S="1000")
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["Hel", "lo"]), hold_at=1, release=release))
    status, body = await turn(a, user, name)
    assert status == 202
    assert await user_day(db, user) == (0.0, HELLO + 20)
    b = await make_client(GATEWAY_CONFIG=path, SWEEP_S="0.1")
    unsigned = lock_key(a.app[INSTANCE].id) & 0xFFFF_FFFF_FFFF_FFFF
    pid = await db.fetchval("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid "
                            "AND objid = $2::oid AND objsubid = 1 AND granted", unsigned >> 32, unsigned & 0xFFFF_FFFF)
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
    await wait_for(lambda: settled(db, user))
    # swept with no content: it consumed nothing, and its reservation is back
    assert await user_day(db, user) == (0.0, 0.0)
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 1
    release.set()  # a was only cut off: its finish lands on the swept row and counts nothing twice

    async def complete() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE id = $1",
                                 uuid.UUID(body["assistant_message_id"])) == "complete"

    await wait_for(complete)
    assert await user_day(db, user) == (0.0, 0.0)
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 1
    assert b.app[INSTANCE].id != a.app[INSTANCE].id


async def test_nearly_out_of_dollars_a_request_is_downgraded_to_the_cheaper_model(make_client, config_file, user, db):
    name = unique("priced")
    toml = DEMO_TOML.format(name=name, cap=40) + 'downgrade_model = "demo"\ndowngrade_at = 0.5\n'
    client = await make_client(GATEWAY_CONFIG=config_file(toml), DEMO_CHUNKS="10")
    models = []
    for _ in range(3):
        status, body = await turn(client, user, name)
        assert status == 202
        await wait_for(lambda: settled(db, user))
        reply = await db.fetchrow("SELECT model, metadata FROM messages WHERE id = $1",
                                  uuid.UUID(body["assistant_message_id"]))
        models.append(reply["model"])
    assert models == [name, name, "demo"]  # $24 of $40 spent after two: past half
    assert reply["metadata"]["policy"] == {"action": "downgrade", "reasons": ["daily budget nearly spent"],
                                           "downgraded_from": name}
    assert await user_day(db, user) == (24.0, 0.0)  # the free model cost nothing, its reservation is back


def test_a_journaled_finish_keeps_what_its_admission_holds():
    lease = uuid.uuid4()
    usage = UsageRecord(message_id=uuid.uuid4(), user_id=uuid.uuid4(), api_key_id=None, model="m", provider="p",
                        prompt_tokens=1, completion_tokens=2, estimated=False, cost_usd=0.5,
                        day=datetime.now(UTC).date(), user_reserved=3, user_cost_reserved=1.25, lease_id=lease)
    record = FinishRecord(usage=usage, status=MessageStatus.COMPLETE, content="x", ttft_ms=1, latency_ms=2,
                          error=None, metadata={})
    back = record_from_json(record_to_json(record)).usage
    assert (back.user_cost_reserved, uuid.UUID(str(back.lease_id))) == (1.25, lease)
    assert back.held() == {"user_tokens": 3, "key_tokens": 0, "user_cost": 1.25, "key_cost": 0.0}
