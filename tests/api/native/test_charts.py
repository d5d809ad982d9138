"""The playground's charts, drawn as SVG by the page itself: usage per day stacked
by model, today's budget as a gauge, the leaderboard's ratings with their interval whiskers and the
win-rate matrix. A real headless Chromium counts what it drew for seeded data; screenshots go to
/tmp/charts-*.png."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from tests.support.arena import accept_arena, demo_models_toml, unique, vote, wait_comparison_finished
from tests.support.browser import Tab, gateway, open_playground
from tests.support.common import MakeClient, User, wait_for

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

TODAY = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
# (days ago, model, prompt tokens, completion tokens, cost): five (day, model) bars, four of them with a cost
SEED = [(2, "demo", 60, 40, 0.0010), (2, "alpha", 20, 30, 0.0005), (2, "alpha", 0, 0, 0.0),
        (1, "demo", 10, 20, 0.0), (0, "alpha", 5, 15, 0.0002), (0, "beta", 4, 6, 0.0001)]


async def seed_usage(db: asyncpg.Pool, user: User) -> None:
    for days_ago, model, prompt, completion, cost in SEED:
        await db.execute("""
            INSERT INTO usage (message_id, user_id, model, provider, prompt_tokens, completion_tokens, total_tokens,
                               cost_usd, created_at)
            VALUES ($1, $2, $3, 'demo', $4, $5, $6, $7, $8)""", uuid.uuid4(), user.id, model, prompt, completion,
                         prompt + completion, cost, TODAY - timedelta(days=days_ago))
    await db.execute("INSERT INTO daily_usage (user_id, day, tokens, requests, cost_usd, reserved) "
                     "VALUES ($1, $2, 30000, 2, 0.0003, 0)", user.id, TODAY.date())


async def test_usage_by_day_and_model_is_a_row_per_pair(client: TestClient, user: User, db: asyncpg.Pool) -> None:
    await seed_usage(db, user)
    start = (TODAY - timedelta(days=2)).date()
    resp = await client.get(f"/api/usage?group_by=day,model&from={start}", headers=user.headers)
    assert resp.status == 200
    body = await resp.json()
    day = [str((TODAY - timedelta(days=n)).date()) for n in (2, 1, 0)]
    assert [(r["day"], r["model"], r["total_tokens"], r["requests"]) for r in body["rows"]] == [
        (day[0], "alpha", 50, 2), (day[0], "demo", 100, 1), (day[1], "demo", 30, 1), (day[2], "alpha", 20, 1),
        (day[2], "beta", 10, 1)]
    assert body["group_by"] == "day,model" and body["totals"]["total_tokens"] == 210
    assert round(body["totals"]["cost_usd"], 8) == 0.0018
    bad = await client.get("/api/usage?group_by=model,day", headers=user.headers)
    assert bad.status == 400
    assert (await bad.json())["error"]["message"] == "group_by must be day, model, key, day,model or day,key"


async def test_usage_tab_draws_stacked_bars_per_day_and_model_and_the_budget_gauge(
        make_client: MakeClient, make_settings: Any, config_file: Any, user: User, db: asyncpg.Pool,
        tab: Tab) -> None:
    await seed_usage(db, user)
    client = await gateway(make_client, make_settings, GATEWAY_CONFIG=config_file(
        "[limits]\ndaily_tokens = 100000\n"))
    page = tab.page
    await open_playground(page, str(client.make_url("/")), user)
    await page.get_by_role("tab", name="Usage").click()
    await page.locator("#panel-usage[data-loaded]").wait_for(state="attached")

    tokens = page.get_by_test_id("tokens-chart").get_by_test_id("usage-bar")
    bars = [(await b.get_attribute("data-day"), await b.get_attribute("data-model"),
             float(await b.get_attribute("data-value") or 0)) for b in await tokens.all()]
    day = [str((TODAY - timedelta(days=n)).date()) for n in (2, 1, 0)]
    # stacked in the order of each model's total (demo 130, alpha 70, beta 10): biggest at the bottom
    assert bars == [(day[0], "demo", 100), (day[0], "alpha", 50), (day[1], "demo", 30), (day[2], "alpha", 20),
                    (day[2], "beta", 10)]
    # bars of one day are stacked: each starts where the one below it ends
    first, second = [await tokens.nth(i).bounding_box() for i in (0, 1)]
    assert first and second and abs(second["y"] + second["height"] - first["y"]) < 0.6
    assert abs(first["height"] / second["height"] - 2.0) < 0.05  # 100 tokens against 50
    cost = page.get_by_test_id("cost-chart").get_by_test_id("usage-bar")
    assert await cost.count() == 4  # demo's second day cost nothing
    legend = page.get_by_test_id("legend-item")
    assert [await li.get_attribute("data-model") for li in await legend.all()] == ["demo", "alpha", "beta"]

    gauge = page.get_by_test_id("budget-gauge").get_by_test_id("gauge")
    assert [await gauge.get_attribute(a) for a in ("data-remaining", "data-cap", "data-fraction")] == [
        "70000", "100000", "0.7000"]
    assert await gauge.get_by_test_id("gauge-fill").count() == 1
    assert "70%" in (await gauge.text_content() or "")
    await page.screenshot(path="/tmp/charts-usage.png", full_page=True)
    assert tab.errors == []


async def test_arena_tab_draws_ratings_with_whiskers_and_the_win_rate_matrix(
        make_client: MakeClient, make_settings: Any, config_file: Any, user: User, db: asyncpg.Pool,
        tab: Tab) -> None:
    x, y, z = unique("ch_x"), unique("ch_y"), unique("ch_z")
    client = await gateway(make_client, make_settings, GATEWAY_CONFIG=config_file(demo_models_toml(x, y, z)),
                           DEMO_CHUNKS="2", LEADERBOARD_BOOTSTRAP_ROUNDS="10")
    # x beats y twice and loses once; y and z tie; x and z never meet
    for models, winner in (([x, y], "a"), ([y, x], "b"), ([x, y], "b"), ([y, z], "tie")):
        answer = await accept_arena(client, user, content=f"chart {uuid.uuid4().hex[:6]}", models=models)
        await wait_comparison_finished(db, answer["comparison_id"])
        assert (await vote(client, user, answer["comparison_id"], winner)).status == 200

    board: dict[str, Any] = {}

    async def refitted() -> bool:
        board.update(await (await client.get("/api/leaderboard", headers=user.headers)).json())
        return any(m["model"] == x and m["battles"] == 3 for m in board["models"]) and any(
            m["model"] == z for m in board["models"])

    await wait_for(refitted)
    page = tab.page
    await open_playground(page, str(client.make_url("/")), user)
    await page.get_by_role("tab", name="Arena").click()
    await page.locator(f'[data-testid="rating-row"][data-model="{z}"]').wait_for()

    n = len(board["models"])
    chart = page.get_by_test_id("ratings-chart")
    for part in ("rating-row", "rating-point", "rating-whisker", "lc-point", "lc-whisker"):
        assert await chart.get_by_test_id(part).count() == n, part
    # rows in the leaderboard's order, points where the ratings are
    assert [await r.get_attribute("data-model") for r in await chart.get_by_test_id("rating-row").all()] == [
        m["model"] for m in board["models"]]
    row = chart.locator(f'[data-testid="rating-row"][data-model="{x}"]')
    assert float(await row.get_by_test_id("rating-point").get_attribute("data-rating") or 0) == next(
        m["rating"] for m in board["models"] if m["model"] == x)
    assert "provisional" in (await row.get_attribute("class") or "")  # 3 battles
    point = await row.get_by_test_id("rating-point").bounding_box()
    whisker = await row.get_by_test_id("rating-whisker").bounding_box()
    assert point and whisker  # the point sits inside its whisker
    assert whisker["x"] < point["x"] and point["x"] + point["width"] < whisker["x"] + whisker["width"]

    matrix = page.get_by_test_id("winrate-matrix")
    assert await matrix.get_by_test_id("winrate-cell").count() == 2 * len(board["pairs"])
    assert await matrix.get_by_test_id("winrate-empty").count() == n * n - 2 * len(board["pairs"])

    async def cell(row_model: str, col_model: str) -> tuple[str | None, str | None]:
        found = matrix.locator(f'[data-testid="winrate-cell"][data-row="{row_model}"][data-col="{col_model}"]')
        if not await found.count():
            return None, None
        return await found.get_attribute("data-rate"), await found.get_attribute("data-battles")

    assert await cell(x, y) == ("0.6667", "3") and await cell(y, x) == ("0.3333", "3")
    assert await cell(y, z) == ("0.5000", "1") and await cell(z, y) == ("0.5000", "1")
    assert await cell(x, z) == (None, None)  # never met
    await page.locator(".leaderboard").screenshot(path="/tmp/charts-arena.png")
    assert tab.errors == []


async def test_usage_axis_reaches_above_the_tallest_day_and_free_usage_is_not_no_usage(
        make_client: MakeClient, make_settings: Any, user: User, db: asyncpg.Pool, tab: Tab) -> None:
    # 465 tokens, all of them free: the round ticks below it are 0, 200, 400; the axis must go on to 600
    await db.execute("""
        INSERT INTO usage (message_id, user_id, model, provider, prompt_tokens, completion_tokens, total_tokens,
                           cost_usd, created_at)
        VALUES ($1, $2, 'demo', 'demo', 400, 65, 465, 0, $3)""", uuid.uuid4(), user.id, TODAY)
    client = await gateway(make_client, make_settings)
    page = tab.page
    await open_playground(page, str(client.make_url("/")), user)
    await page.get_by_role("tab", name="Usage").click()
    await page.locator("#panel-usage[data-loaded]").wait_for(state="attached")

    chart = page.get_by_test_id("tokens-chart")
    labels = [await t.text_content() for t in await chart.locator("svg > text").all()]
    assert [t for t in labels if t and "-" not in t] == ["0", "200", "400", "600"]  # the rest are days (MM-DD)
    bar = await chart.get_by_test_id("usage-bar").bounding_box()
    top_line = await chart.locator("line.grid").last.bounding_box()
    assert bar and top_line and bar["y"] > top_line["y"]  # the bar ends below the top of the axis
    cost = page.get_by_test_id("cost-chart")
    assert await cost.text_content() == "Nothing to draw: every day's total is $0."
    assert tab.errors == []
