"""Quota leases and daily budgets as tests set them up."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from gateway.fleet.instance import lock_key
from gateway.state import INSTANCE, POLICY
from tests.support.common import MakeClient, User

# the demo model at $1 per token: a turn of "hello" (2 prompt tokens) with max_tokens 10 (DEMO_CHUNKS=10:
# exactly 10 completion tokens) uses exactly its worst case: 12 tokens, $12
TOML = """
[models.{name}]
provider = "demo"
input_price_per_mtok = 1000000
output_price_per_mtok = 1000000

[limits]
requests_per_minute = 1000
daily_tokens = {tokens}
daily_cost_usd = {tokens}
max_concurrent_streams = 100
"""


WORST = 12


async def app(make_client: MakeClient, config_file, tokens: int, **env: str) -> tuple[TestClient, str]:
    name = f"leased_{uuid.uuid4().hex[:8]}"
    path = config_file(TOML.format(name=name, tokens=tokens))
    return await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10", **env), name


async def turn(client: TestClient, user: User, model: str) -> str:
    """'ran' or 'refused' (persist first: both are 202s)."""
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "hello", "max_tokens": 10, "model": model})
    assert resp.status == 202, await resp.text()
    body = await resp.json()
    reply = await (await client.get(f"/api/messages/{body['assistant_message_id']}", headers=user.headers)).json()
    return "refused" if reply["status"] == "refused" else "ran"


def caller(client: TestClient, user: User) -> Any:
    """The user's slice on this instance (the user has one key: every request is one caller)."""
    quota = client.app[POLICY].quota
    return next((s for (u, _), s in quota._slices.items() if u == user.id), None)


async def busy(client: TestClient, user: User, model: str, limit: int = 8) -> int:
    """Requests in quick succession until this instance holds a slice of the user's quota; how many.
    A lease in flight is waited for (it runs in the background: under load it can outlast a turn)."""
    quota = client.app[POLICY].quota
    for n in range(1, limit + 1):
        assert await turn(client, user, model) == "ran"
        leasing = [task for (u, _), task in quota._leasing.items() if u == user.id]
        if leasing:
            async with asyncio.timeout(10):
                await asyncio.gather(*leasing, return_exceptions=True)
        if caller(client, user) is not None:
            return n
    demand = {c[0] == user.id: round(d.interval, 3) for c, d in quota._demand.items()}.get(True)
    raise AssertionError(f"no slice leased: {quota.stats.leases} lease statements, the caller's interval "
                         f"{demand} s, calm until {quota._calm.get(user.id)} (now {quota._now()})")


async def quiet(client: TestClient) -> bool:
    """No lease statement of this instance in flight."""
    quota = client.app[POLICY].quota
    return not quota._leasing and all(s.renewing is None for s in quota._slices.values())


async def settled(db: asyncpg.Pool, user: User) -> bool:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND status IN ('pending', 'streaming')",
                             user.id) == 0


async def day(db: asyncpg.Pool, user: User) -> tuple[int, int, float, float]:
    row = await db.fetchrow("SELECT tokens, reserved, cost_usd::float8 AS c, cost_reserved::float8 AS cr "
                            "FROM daily_usage WHERE user_id = $1 AND day = $2", user.id, datetime.now(UTC).date())
    return (row["tokens"], row["reserved"], row["c"], row["cr"])


async def dead(db: asyncpg.Pool, client: TestClient) -> None:
    """Cut the instance's liveness connection: to its peers it is gone (it sweeps too rarely to notice)."""
    unsigned = lock_key(client.app[INSTANCE].id) & 0xFFFF_FFFF_FFFF_FFFF
    pid = await db.fetchval("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid "
                            "AND objid = $2::oid AND objsubid = 1 AND granted", unsigned >> 32, unsigned & 0xFFFF_FFFF)
    assert pid is not None
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
