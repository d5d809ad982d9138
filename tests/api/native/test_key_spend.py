"""Spend per key: GET /api/keys rows carry each key's tokens and cost today, this UTC month and in its
life (its subtree's, as its limits count it); GET /api/usage groups by key (and by day and key).
Real PostgreSQL, the real app, the demo provider at a price."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from tests.support.common import MakeClient, User, wait_for

PRICED = """
[models.{name}]
provider = "demo"
input_price_per_mtok = 1000000
output_price_per_mtok = 1000000
"""


async def test_keys_and_usage_show_spend_per_key(make_client: MakeClient, config_file: Any, make_user: Any,
                                                 db: asyncpg.Pool) -> None:
    name = f"s_{uuid.uuid4().hex[:8]}"
    client = await make_client(GATEWAY_CONFIG=config_file(PRICED.format(name=name)), DEMO_CHUNKS="10")
    user = await make_user(("chat", "arena", "admin"))
    parent = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    made = await client.post("/api/keys", headers=user.headers, json={"name": "child", "scopes": ["chat"]})
    assert made.status == 201
    child_id, child = uuid.UUID((await made.json())["id"]), User(user.id, (await made.json())["key"])
    # "hello" is 2 prompt tokens; each reply 10 completion tokens: 12 tokens, $12 a turn
    for who in (user, child, child):
        resp = await client.post("/api/chat", headers=who.headers,
                                 json={"content": "hello", "max_tokens": 10, "model": name})
        assert resp.status == 202

    async def counted() -> bool:
        return await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 3

    await wait_for(counted)
    keys = (await (await client.get("/api/keys", headers=user.headers)).json())["keys"]
    spend = {uuid.UUID(k["id"]): k["spend"] for k in keys}
    both, alone = {"tokens": 36, "cost_usd": 36.0}, {"tokens": 24, "cost_usd": 24.0}
    assert spend == {parent: {"today": both, "month": both, "total": both},  # the parent counts its child's
                     child_id: {"today": alone, "month": alone, "total": alone}}
    # a key without admin sees its own row alone, with its spend
    own = (await (await client.get("/api/keys", headers=child.headers)).json())["keys"]
    assert [(k["id"], k["spend"]["total"]) for k in own] == [(str(child_id), alone)]

    body = await (await client.get("/api/usage?group_by=key", headers=user.headers)).json()
    assert sorted((r["key"], r["requests"], r["total_tokens"], r["cost_usd"]) for r in body["rows"]) == sorted([
        (str(parent), 1, 12, 12.0), (str(child_id), 2, 24, 24.0)])
    today = str(datetime.now(UTC).date())
    body = await (await client.get("/api/usage?group_by=day,key", headers=user.headers)).json()
    assert sorted((r["day"], r["key"], r["requests"]) for r in body["rows"]) == sorted([
        (today, str(parent), 1), (today, str(child_id), 2)])
    bad = await client.get("/api/usage?group_by=user", headers=user.headers)
    assert bad.status == 400
    assert (await bad.json())["error"]["message"] == "group_by must be day, model, key, day,model or day,key"
