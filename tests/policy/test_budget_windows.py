"""Budgets by UTC month and for life ([limits] monthly_tokens / monthly_cost_usd / total_tokens /
total_cost_usd, and the same in a key's limits, shared by its subtree): reserved in the one
admission call with the daily caps, exact across instances, settled to the real usage; a refusal
names its window and when it resets, and is saved as a `refused` reply. Real PostgreSQL, two app
instances on one database, the demo provider."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.config import ConfigError, Settings
from gateway.policy.admission import next_month
from gateway.service.turns import prompt_tokens
from gateway.store import limits as store
from gateway.store.limits import SQLSTATES, Budgets, KeyCap, Limit, LimitReached, month_of
from gateway.vocabulary import MessageStatus
from tests.support.common import MakeClient, User, wait_for

HELLO = prompt_tokens([{"role": "user", "content": "hello"}])  # 2: with max_tokens 10, a turn's worst case is 12

# $1 per prompt token and $1 per completion token: a demo turn of "hello" (DEMO_CHUNKS=10) costs $12
PRICED = """
[models.{name}]
provider = "demo"
input_price_per_mtok = 1000000
output_price_per_mtok = 1000000

[limits]
{limits}
"""


async def turn(client: TestClient, user: User, model: str = "demo") -> tuple[int, dict[str, Any]]:
    """The answer's status and body; a refused reply adds its `error` and `"refused": true`."""
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "hello", "max_tokens": 10, "model": model})
    answer = await resp.json()
    if resp.status == 202:
        reply = await (await client.get(f"/api/messages/{answer['assistant_message_id']}",
                                        headers=user.headers)).json()
        if reply["status"] == MessageStatus.REFUSED:
            answer.update(refused=True, error=reply["error"])
    return resp.status, answer


async def settled(db: asyncpg.Pool, user: User) -> bool:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND status IN ('pending', 'streaming')",
                             user.id) == 0


async def budget_row(db: asyncpg.Pool, subject: str, period: str) -> tuple[int, int, float, float] | None:
    row = await db.fetchrow("SELECT tokens, reserved, cost_usd::float8 AS c, cost_reserved::float8 AS r "
                            "FROM budget_usage WHERE subject = $1 AND period = $2", subject, period)
    return (row["tokens"], row["reserved"], row["c"], row["r"]) if row else None


def this_month() -> str:
    return month_of(datetime.now(UTC).date())


async def test_fifty_racers_on_two_instances_never_exceed_a_monthly_cap_that_fits_ten(
        make_client: MakeClient, config_file: Any, user: User, db: asyncpg.Pool) -> None:
    assert HELLO == 2
    path = config_file(PRICED.format(name=f"m_{uuid.uuid4().hex[:8]}", limits="monthly_tokens = 120"))
    a = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10")
    b = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10")
    answers = await asyncio.gather(*(turn(a if i % 2 else b, user) for i in range(50)))
    assert [status for status, _ in answers] == [202] * 50  # persist first: every message is kept
    refused = [body["error"] for _, body in answers if body.get("refused")]
    assert len(refused) == 40
    reset = next_month(datetime.now(UTC).date()).isoformat().replace("+00:00", "Z")
    assert {(e["reason"], e["message"]) for e in refused} == {
        ("monthly_tokens", "monthly token budget reached (user monthly tokens)")}
    assert {e["reset_at"][:19] for e in refused} == {reset[:19]}
    await wait_for(lambda: settled(db, user))
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 10
    assert await db.fetchval("SELECT sum(total_tokens) FROM usage WHERE user_id = $1", user.id) == 120
    assert await budget_row(db, f"u:{user.id}", this_month()) == (120, 0, 0.0, 0.0)
    assert await budget_row(db, f"u:{user.id}", "total") == (120, 0, 0.0, 0.0)
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND status = 'refused'",
                             user.id) == 40


async def test_a_row_first_made_by_a_settlement_holds_nothing_reserved(
        make_client: MakeClient, config_file: Any, user: User, db: asyncpg.Pool) -> None:
    # a monthly budget only: admission reserves on the month row and makes no lifetime or day row,
    # so the settlement makes those, and what it hands back was never held there
    path = config_file(PRICED.format(name="x_unused", limits="monthly_tokens = 1000"))
    client = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10")
    status, _ = await turn(client, user)
    assert status == 202
    await wait_for(lambda: settled(db, user))
    assert await budget_row(db, f"u:{user.id}", this_month()) == (12, 0, 0.0, 0.0)
    assert await budget_row(db, f"u:{user.id}", "total") == (12, 0, 0.0, 0.0)
    day = await db.fetchrow("SELECT tokens, reserved FROM daily_usage WHERE user_id = $1", user.id)
    assert (day["tokens"], day["reserved"]) == (12, 0)


async def test_a_parent_keys_lifetime_cost_budget_is_shared_by_its_child_and_never_resets(
        make_client: MakeClient, config_file: Any, make_user: Any, db: asyncpg.Pool) -> None:
    user = await make_user(("chat", "arena", "admin"))
    name = f"t_{uuid.uuid4().hex[:8]}"
    client = await make_client(GATEWAY_CONFIG=config_file(PRICED.format(name=name, limits="")), DEMO_CHUNKS="10")
    parent = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    await db.execute("UPDATE api_keys SET limits = $2 WHERE id = $1", parent, {"total_cost_usd": 30})
    made = await client.post("/api/keys", headers=user.headers, json={"name": "child"})
    assert made.status == 201, await made.text()
    child = User(user.id, (await made.json())["key"])
    # $12 each: two fit in $30, the third is clamped to the $6 left (2 prompt + 4 completion tokens)
    answers = [await turn(client, child, name) for _ in range(4)]
    assert [a.get("refused", False) for _, a in answers] == [False, False, False, True]
    error = answers[3][1]["error"]
    assert (error["reason"], error["message"], error.get("reset_at")) == (
        "total_cost", "lifetime cost budget reached (key total cost)", None)
    await wait_for(lambda: settled(db, user))
    assert await budget_row(db, f"k:{parent}", "total") == (30, 0, 30.0, 0.0)
    assert await budget_row(db, f"k:{parent}", this_month()) == (30, 0, 30.0, 0.0)
    _, body = await turn(client, user, name)  # the parent itself: nothing left either
    assert body["error"]["reason"] == "total_cost"


async def test_the_worst_case_is_held_on_the_month_row_while_the_reply_runs(
        make_client: MakeClient, config_file: Any, user: User, db: asyncpg.Pool) -> None:
    path = config_file(PRICED.format(name="x_unused", limits="monthly_tokens = 1000\ntotal_tokens = 5000"))
    client = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10", DEMO_DELAY_MS="300")
    status, _ = await turn(client, user)
    assert status == 202
    assert await budget_row(db, f"u:{user.id}", this_month()) == (0, 12, 0.0, 0.0)
    assert await budget_row(db, f"u:{user.id}", "total") == (0, 12, 0.0, 0.0)
    await wait_for(lambda: settled(db, user))
    assert await budget_row(db, f"u:{user.id}", this_month()) == (12, 0, 0.0, 0.0)
    assert await budget_row(db, f"u:{user.id}", "total") == (12, 0, 0.0, 0.0)


def test_next_month_is_the_first_of_the_next_utc_month() -> None:
    assert next_month(date(2026, 12, 7)) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_month(date(2026, 1, 31)) == datetime(2026, 2, 1, tzinfo=UTC)
    assert month_of(date(2026, 3, 9)) == "2026-03"


@pytest.mark.parametrize(("line", "message"), [
    ("monthly_tokens = -5", "[limits] monthly_tokens must be >= 1, got -5"),
    ("total_tokens = \"lots\"", "[limits] total_tokens must be an integer, got 'lots'"),
    ("monthly_cost_usd = \"ten\"", "[limits] monthly_cost_usd must be a number, got 'ten'"),
    ("total_cost_usd = -1", "[limits] total_cost_usd must be >= 0.0, got -1.0"),
    ("total_cost_usd = 0", "[limits] total_cost_usd must be a positive number of dollars below 100000000"),
])
def test_a_bad_budget_in_the_config_is_refused_naming_it(config_file: Any, line: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        Settings.from_env({"GATEWAY_CONFIG": config_file(f"[limits]\n{line}\n")})
    assert str(e.value) == message


async def test_a_bad_budget_in_a_keys_limits_is_a_400_naming_it_and_makes_no_key(
        client: TestClient, make_user: Any, db: asyncpg.Pool) -> None:
    admin = await make_user(("chat", "arena", "admin"))
    for limits, field in [({"monthly_tokens": -1}, "limits.monthly_tokens"),
                          ({"total_cost_usd": "x"}, "limits.total_cost_usd")]:
        resp = await client.post("/api/keys", headers=admin.headers, json={"name": "b", "limits": limits})
        assert resp.status == 400
        assert field in (await resp.json())["error"]["message"]
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE user_id = $1", admin.id) == 1


async def test_a_prompt_larger_than_what_a_lifetime_budget_has_left_is_refused_naming_it(
        make_client: MakeClient, config_file: Any, user: User, db: asyncpg.Pool) -> None:
    path = config_file(PRICED.format(name="y_unused", limits="total_tokens = 13"))
    client = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10")
    first, second = [await turn(client, user) for _ in range(2)]  # 12 of 13 spent: 1 left, the prompt is 2
    assert not first[1].get("refused")
    error = second[1]["error"]
    assert (error["reason"], error["message"], error.get("reset_at")) == (
        "total_tokens", "lifetime token budget reached (too little left for this prompt)", None)
    await wait_for(lambda: settled(db, user))
    assert await budget_row(db, f"u:{user.id}", "total") == (12, 0, 0.0, 0.0)


# (limit, its SQLSTATE, the user's budgets, the key's): a request of 5 tokens / $5 fits once, the
# same again is refused by that budget alone
BUDGET_CALLS = [
    (Limit.USER_MONTHLY_TOKENS, "GW4M1", Budgets(monthly=5), None),
    (Limit.KEY_MONTHLY_TOKENS, "GW4M2", None, Budgets(monthly=5)),
    (Limit.USER_MONTHLY_COST, "GW4N1", Budgets(monthly_cost=5.0), None),
    (Limit.KEY_MONTHLY_COST, "GW4N2", None, Budgets(monthly_cost=5.0)),
    (Limit.USER_TOTAL_TOKENS, "GW4T1", Budgets(total=5), None),
    (Limit.KEY_TOTAL_TOKENS, "GW4T2", None, Budgets(total=5)),
    (Limit.USER_TOTAL_COST, "GW4U1", Budgets(total_cost=5.0), None),
    (Limit.KEY_TOTAL_COST, "GW4U2", None, Budgets(total_cost=5.0)),
]


@pytest.mark.parametrize("limit, sqlstate, user_budgets, key_budgets", BUDGET_CALLS,
                         ids=[c[0].value for c in BUDGET_CALLS])
async def test_each_budget_refuses_with_its_own_sqlstate_and_changes_nothing(
        db: asyncpg.Pool, limit: Limit, sqlstate: str, user_budgets: Budgets | None,
        key_budgets: Budgets | None) -> None:
    user_id, key_id = uuid.uuid4(), uuid.uuid4()
    day, window = date(2031, 5, 6), datetime(2031, 5, 6, 7, 8, tzinfo=UTC)
    keys = [KeyCap(key_id=key_id, rpm=None, daily=None, budgets=key_budgets)]

    def admit() -> Any:
        return store.admit_full(db, user_id=user_id, keys=keys, day=day, window=window, user_rpm=None, want=5,
                                user_cap=None, share=1, want_cost=5.0, user_budgets=user_budgets)

    grant = await admit()
    assert (grant.tokens, grant.cost) == (5, 5.0)
    before = [tuple(r) for r in await db.fetch(
        "SELECT subject, period, reserved, cost_reserved::float8 FROM budget_usage WHERE subject = ANY($1::text[]) "
        "ORDER BY 1, 2", [f"u:{user_id}", f"k:{key_id}"])]
    subject = f"u:{user_id}" if user_budgets is not None else f"k:{key_id}"
    period = "2031-05" if limit.window == "monthly" else "total"
    assert before == [(subject, period, 0, 5.0) if limit.cost else (subject, period, 5, 0.0)]  # the capped row alone
    with pytest.raises(LimitReached) as refused:
        await admit()
    assert refused.value.limit is limit and SQLSTATES[sqlstate] is limit
    assert [tuple(r) for r in await db.fetch(
        "SELECT subject, period, reserved, cost_reserved::float8 FROM budget_usage WHERE subject = ANY($1::text[]) "
        "ORDER BY 1, 2", [f"u:{user_id}", f"k:{key_id}"])] == before
