"""The webhook worker's budget scan, run by every instance every WEBHOOK_POLL_S: after its first
round it reads only the users and keys whose use settled since its previous round (an index on
the lifetime rows' settled_at, sql/0023), never every key's every budget row."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from gateway.config import LimitsConfig, Secret, WebhookConfig
from gateway.webhooks.worker import _RECENT, WebhookWorker

SECRET = Secret("whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode())


async def over_budget_key(db: asyncpg.Pool, settled: str) -> uuid.UUID:
    """A key of a new user with a lifetime budget of 10 tokens and 20 used, last settled `settled`."""
    user = uuid.uuid4()
    await db.execute("INSERT INTO users (id) VALUES ($1)", user)
    key = await db.fetchval("INSERT INTO api_keys (user_id, name, prefix, key_hash, scopes, limits) "
                            "VALUES ($1, 'scan', 'gwk_scan', $2, '{chat}', '{\"total_tokens\": 10}') RETURNING id",
                            user, uuid.uuid4().bytes)
    await db.execute(f"INSERT INTO budget_usage (subject, period, tokens, requests, settled_at) "
                     f"VALUES ($1, 'total', 20, 1, {settled})", f"k:{key}")
    return key


async def queued_for(db: asyncpg.Pool, url: str) -> list[str]:
    rows = await db.fetch("SELECT payload -> 'data' ->> 'key_id' AS key_id FROM webhook_outbox "
                          "WHERE endpoint = $1 ORDER BY created_at", url)
    return [r["key_id"] for r in rows]


async def test_after_its_first_round_the_scan_reads_only_subjects_that_settled_since(db: asyncpg.Pool) -> None:
    url = f"http://127.0.0.1:9/scan/{uuid.uuid4().hex}"
    endpoint = WebhookConfig(url=url, secret=SECRET, events=("budget.exhausted",))
    worker = WebhookWorker(db, (endpoint,), LimitsConfig(), poll_s=1000, retry_s=1, give_up_s=60)
    today = datetime.now(UTC).date()
    old = await over_budget_key(db, "now() - interval '2 hours'")
    await worker.queue_budget_events(today)  # the first round reads every subject
    assert str(old) in await queued_for(db, url)

    stale = await over_budget_key(db, "now() - interval '2 hours'")  # over its budget, nothing settled lately
    fresh = await over_budget_key(db, "now()")
    await worker.queue_budget_events(today)
    assert str(stale) not in await queued_for(db, url)
    assert str(fresh) in await queued_for(db, url)

    await db.execute("UPDATE budget_usage SET settled_at = now() WHERE subject = $1", f"k:{stale}")  # it spends
    await worker.queue_budget_events(today)
    assert (await queued_for(db, url)).count(str(stale)) == 1


async def test_a_users_daily_budget_of_the_limits_section_is_announced(db: asyncpg.Pool) -> None:
    url = f"http://127.0.0.1:9/scan/{uuid.uuid4().hex}"
    endpoint = WebhookConfig(url=url, secret=SECRET, events=("budget.exhausted",))
    worker = WebhookWorker(db, (endpoint,), LimitsConfig(daily_tokens=10), poll_s=1000, retry_s=1, give_up_s=60)
    today = datetime.now(UTC).date()
    user = uuid.uuid4()
    await db.execute("INSERT INTO users (id) VALUES ($1)", user)
    await db.execute("INSERT INTO daily_usage (user_id, day, tokens, requests) VALUES ($1, $2, 20, 1)", user, today)
    await db.execute("INSERT INTO budget_usage (subject, period, tokens, requests) VALUES ($1, 'total', 20, 1)",
                     f"u:{user}")
    await worker.queue_budget_events(today)
    data = await db.fetchval("SELECT payload -> 'data' FROM webhook_outbox WHERE endpoint = $1 "
                             "AND payload -> 'data' ->> 'user_id' = $2", url, str(user))
    assert data == {"subject": "user", "user_id": str(user), "window": "daily_tokens", "period": today.isoformat(),
                    "limit": 10.0, "used": 20.0}


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in plan_nodes(child))]


async def test_the_scan_of_recent_settlements_is_an_index_scan_among_ten_thousand_keys(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            # 10,000 keys with a monthly budget, each with twelve months and a lifetime row settled
            # an hour ago or more; 20 of them spent a moment ago
            user = uuid.uuid4()
            await conn.execute("INSERT INTO users (id) VALUES ($1)", user)
            keys = await conn.fetch("""
                INSERT INTO api_keys (user_id, name, prefix, key_hash, scopes, limits)
                SELECT $1::uuid, 'k' || i, 'gwk_' || i, sha256(convert_to($1::uuid::text || i, 'UTF8')), '{chat}',
                       '{"monthly_tokens": 1000000}'
                FROM generate_series(1, 10000) i RETURNING id""", user)
            await conn.execute("""
                INSERT INTO budget_usage (subject, period, tokens, requests, settled_at)
                SELECT 'k:' || k, p, 5, 1, now() - interval '1 hour' - random() * interval '30 days'
                FROM unnest($1::uuid[]) k,
                     LATERAL (SELECT to_char(now() - m * interval '1 month', 'YYYY-MM') FROM generate_series(0, 11) m
                              UNION ALL SELECT 'total') AS p (p)""", [k["id"] for k in keys])
            await conn.execute("UPDATE budget_usage SET settled_at = now() WHERE period = 'total' "
                               "AND subject = ANY($1::text[])", [f"k:{k['id']}" for k in keys[:20]])
            await conn.execute("ANALYZE budget_usage")
            since = datetime.now(UTC) - timedelta(seconds=60)
            recent = await conn.fetchval("SELECT count(*) FROM budget_usage WHERE period = 'total' "
                                         "AND settled_at >= $1", since)  # the 20, and other tests' keys
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {_RECENT}", since)
            nodes = plan_nodes((orjson.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"])
            reads = [(n["Node Type"], n.get("Index Name"), n["Actual Rows"]) for n in nodes
                     if n.get("Relation Name") == "budget_usage" or n.get("Index Name") == "budget_usage_settled"]
            assert recent >= 20
            if reads[0][0] == "Index Scan":
                assert reads == [("Index Scan", "budget_usage_settled", recent)]
            else:  # a bitmap's index part also counts row versions other tests' updates left for vacuum
                assert [r[:2] for r in reads] == [("Bitmap Heap Scan", None),
                                                  ("Bitmap Index Scan", "budget_usage_settled")]
                assert reads[0][2] == recent and reads[1][2] >= recent
        finally:
            await tx.rollback()
