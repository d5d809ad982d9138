"""GET /api/me shows the month and lifetime budgets in force, the user's ([limits]) and those of
each key of the caller's chain, with what each has used, what running replies hold and what is
left, and the least left per window; the fields it had before keep their values."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from gateway.contract.replies import Me
from gateway.vocabulary import MessageStatus
from tests.support.common import MakeClient, User, wait_for

# $1 per prompt token and $1 per completion token: a demo turn of "hello" (DEMO_CHUNKS=10) costs
# $12 for 12 tokens (2 prompt, 10 completion)
PRICED = """
[models.{name}]
provider = "demo"
input_price_per_mtok = 1000000
output_price_per_mtok = 1000000

[limits]
{limits}
"""


async def finished(db: asyncpg.Pool, user: User) -> bool:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND role = 'assistant' "
                             "AND status = $2", user.id, MessageStatus.COMPLETE) == 1


async def me(client: Any, user: User) -> dict[str, Any]:
    resp = await client.get("/api/me", headers=user.headers)
    assert resp.status == 200
    body = await resp.read()
    msgspec.json.decode(body, type=Me)  # the contract describes it
    result: dict[str, Any] = msgspec.json.decode(body)
    return result


async def test_me_shows_the_budgets_in_force_and_what_remains_of_them(
        make_client: MakeClient, config_file: Any, make_user: Any, db: asyncpg.Pool) -> None:
    user = await make_user(("chat", "arena", "admin"))
    name = f"me_{uuid.uuid4().hex[:8]}"
    config = PRICED.format(name=name, limits="daily_tokens = 500\nmonthly_tokens = 1000\ntotal_cost_usd = 100")
    client = await make_client(GATEWAY_CONFIG=config_file(config), DEMO_CHUNKS="10")
    parent = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    await db.execute("UPDATE api_keys SET limits = $2 WHERE id = $1", parent, {"total_tokens": 40})
    made = await client.post("/api/keys", headers=user.headers,
                             json={"name": "child", "limits": {"monthly_tokens": 30, "monthly_cost_usd": 20}})
    assert made.status == 201, await made.text()
    made_key = await made.json()
    child = User(user.id, made_key["key"])
    resp = await client.post("/api/chat", headers=child.headers,
                             json={"content": "hello", "max_tokens": 10, "model": name})
    assert resp.status == 202
    await wait_for(lambda: finished(db, user))

    body = await me(client, child)
    month = datetime.now(UTC).strftime("%Y-%m")
    # what was there before, as it was
    assert body["limits"]["daily_tokens"] == 500
    assert body["remaining"] == {"daily_tokens": 488}
    assert (body["today"]["tokens"], body["today"]["reserved"], body["today"]["requests"]) == (12, 0, 1)
    assert list(body) == ["user", "key", "limits", "today", "remaining", "budgets", "budget_remaining"]
    assert body["budgets"] == [
        {"subject": "user", "key_id": None, "window": "monthly_tokens", "period": month, "limit": 1000, "used": 12,
         "reserved": 0, "remaining": 988},
        {"subject": "user", "key_id": None, "window": "total_cost_usd", "period": "total", "limit": 100.0,
         "used": 12.0, "reserved": 0.0, "remaining": 88.0},
        {"subject": "key", "key_id": made_key["id"], "window": "monthly_tokens", "period": month, "limit": 30,
         "used": 12, "reserved": 0, "remaining": 18},
        {"subject": "key", "key_id": made_key["id"], "window": "monthly_cost_usd", "period": month, "limit": 20.0,
         "used": 12.0, "reserved": 0.0, "remaining": 8.0},
        {"subject": "key", "key_id": str(parent), "window": "total_tokens", "period": "total", "limit": 40,
         "used": 12, "reserved": 0, "remaining": 28},
    ]
    assert body["budget_remaining"] == {"monthly_tokens": 18, "monthly_cost_usd": 8.0, "total_tokens": 28,
                                        "total_cost_usd": 88.0}


async def test_a_caller_without_budgets_sees_none(make_client: MakeClient, user: User) -> None:
    client = await make_client()
    body = await me(client, user)
    assert (body["budgets"], body["budget_remaining"]) == (
        [], {"monthly_tokens": None, "monthly_cost_usd": None, "total_tokens": None, "total_cost_usd": None})
    assert body["remaining"] == {"daily_tokens": None}
