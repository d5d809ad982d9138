"""The playground's Usage tab: this month's token budget of the key in use as a gauge, and each key
the caller sees with its spend today, this month and in total. A real headless Chromium reads what
the page drew; the screenshot goes to /tmp/charts-key-spend.png."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from tests.support.browser import Tab, gateway, open_playground
from tests.support.common import MakeClient, User

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)


async def test_usage_tab_shows_the_month_gauge_and_spend_per_key(
        make_client: MakeClient, make_settings: Any, user: User, db: asyncpg.Pool, tab: Tab) -> None:
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    await db.execute("UPDATE api_keys SET limits = $2 WHERE id = $1", key_id, {"monthly_tokens": 1000})
    now = datetime.now(UTC)
    month = f"{now.year:04d}-{now.month:02d}"
    await db.execute("INSERT INTO budget_usage (subject, period, tokens, cost_usd) VALUES ($1, $2, 300, 0.5), "
                     "($1, 'total', 4200, 2.5)", f"k:{key_id}", month)
    client = await gateway(make_client, make_settings)
    page = tab.page
    await open_playground(page, str(client.make_url("/")), user)
    await page.get_by_role("tab", name="Usage").click()
    await page.locator("#panel-usage[data-loaded]").wait_for(state="attached")

    gauge = page.get_by_test_id("month-gauge").get_by_test_id("gauge")
    assert [await gauge.get_attribute(a) for a in ("data-remaining", "data-cap", "data-fraction")] == [
        "700", "1000", "0.7000"]
    rows = page.get_by_test_id("key-spend-row")
    assert await rows.count() == 1
    assert await rows.first.get_attribute("data-key") == str(key_id)
    text = await rows.first.text_content() or ""
    assert text.endswith("· today 0 tokens $0 · month 300 $0.5 · total 4.2k $2.5"), text
    await page.screenshot(path="/tmp/charts-key-spend.png", full_page=True)
    assert tab.errors == []
