"""The playground's Admin tab, driven in a real headless Chromium: model health after a fallback, a key
created with limits and revoked, the audit trail showing both, a reload. Screenshot: /tmp/admin-tab.png."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Page

from tests.support.browser import Tab, gateway, open_playground
from tests.support.chat import first_metadata
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream, Reply

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

SHOT = "/tmp/admin-tab.png"

CONFIG = """[providers.flaky]
kind = "openai"
base_url = "{url}"

[models.alpha]
provider = "flaky"
upstream = "up-alpha"
fallbacks = ["beta"]

[models.beta]
provider = "demo"

[router]
default = "alpha"
"""


async def row_texts(page: Page, table: str, selector: str) -> list[str]:
    return await page.locator(f'[data-testid="{table}"] {selector} td').all_inner_texts()


async def audit_kinds(page: Page, expected: list[str]) -> list[str]:
    """The newest kinds of the audit trail, refreshing until they are `expected` (the log's writer
    writes in batches, and the trail is every user's: older rows fill it before the newest arrive)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        kinds = await page.locator('[data-testid="admin-audit"] tbody tr').evaluate_all(
            "rows => rows.map(r => r.dataset.kind)")
        if kinds[:len(expected)] == expected or loop.time() > deadline:
            return kinds[:len(expected)]
        await page.get_by_test_id("admin-refresh").click()
        await page.get_by_test_id("admin-status").filter(has_text="Loading").wait_for(state="detached")


async def test_the_admin_tab_shows_model_health_creates_and_revokes_a_key_and_reads_the_audit_trail(
        make_client: MakeClient, make_settings: Callable[..., Any], make_user: Callable[..., Any],
        upstream: FakeUpstream, tmp_path: Path, user: User, db: asyncpg.Pool, tab: Tab) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(url=upstream.base_url))
    upstream.queue(Reply(status=500, body=b'{"error": {"message": "down"}}'))
    client = await gateway(make_client, make_settings, GATEWAY_CONFIG=str(config))
    admin: User = await make_user(("chat", "arena", "admin"))
    # one turn: alpha's provider fails, beta answers in its place
    resp = await client.post("/api/chat", json={"stream": True, "content": "hello"}, headers=user.headers)
    assert first_metadata(await resp.read())["fallback_from"] == "alpha"
    user_key = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)

    async def spent() -> int:  # the turn's tokens, once its usage is settled
        return int(await db.fetchval("SELECT coalesce(sum(tokens), 0) FROM budget_usage WHERE subject = $1 "
                                     "AND period = 'total'", f"k:{user_key}"))

    await wait_for(spent)
    turn_tokens = await spent()

    page = tab.page
    await open_playground(page, str(client.make_url("/")), admin)
    await page.get_by_role("tab", name="Admin").click()
    await page.locator('[data-testid="admin-models"] tr[data-model="alpha"]').wait_for()
    assert await row_texts(page, "admin-models", 'tr[data-model="alpha"]') == [
        "alpha (default)", "flaky", "yes", "closed", "1", "100.0%", "–", "–", "1"]
    beta = await row_texts(page, "admin-models", 'tr[data-model="beta"]')
    assert beta[:6] == ["beta", "demo", "yes", "closed", "1", "0.0%"] and beta[6].endswith(" ms") and beta[8] == "0"

    # a key with limits, shown once, then revoked
    await page.get_by_label("Name").fill("ci-bot")
    await page.get_by_label("Daily tokens").fill("5000")
    await page.get_by_label("Requests / minute").fill("30")
    await page.get_by_role("button", name="Create key").click()
    new_key = page.get_by_test_id("admin-new-key").filter(has_text="New key for ci-bot")
    await new_key.wait_for()
    shown = await new_key.text_content() or ""
    created = await db.fetchrow(
        "SELECT id, prefix, limits, scopes FROM api_keys WHERE user_id = $1 AND name = 'ci-bot'", admin.id)
    assert shown.startswith(f"New key for ci-bot (shown once, copy it now): {created['prefix']}")
    assert (created["limits"], created["scopes"]) == ({"daily_tokens": 5000, "requests_per_minute": 30},
                                                      ["chat", "arena"])
    key_row = f'tr[data-key-id="{created["id"]}"]'
    await page.locator(f'[data-testid="admin-keys"] {key_row}').wait_for()
    texts = await row_texts(page, "admin-keys", key_row)
    assert texts[:4] == ["ci-bot", created["prefix"], "chat, arena", "daily_tokens 5000; requests_per_minute 30"]
    assert texts[6:8] == ["active", "0 tokens $0 · 0 tokens $0 · 0 tokens $0"]
    # the user's key spent the turn (today, this month, in total; the demo model is free)
    user_row = await row_texts(page, "admin-keys", f'tr[data-key-id="{user_key}"]')
    assert user_row[7] == " · ".join([f"{turn_tokens} tokens $0"] * 3)
    await page.get_by_role("button", name="Revoke ci-bot").click()
    await page.locator(f'[data-testid="admin-keys"] {key_row}.revoked').wait_for()
    assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = $1", created["id"]) is True

    async def revocation_logged() -> bool:  # the activity writer's batch is in (the trail lists rows as written)
        return bool(await db.fetchval("SELECT count(*) FROM activity_log WHERE method = 'DELETE' AND path = $1",
                                      f"/api/keys/{created['id']}"))

    await wait_for(revocation_logged)

    await page.get_by_test_id("admin-reload").click()
    reload_status = page.get_by_test_id("admin-reload-status").filter(has_text="Reloaded.")
    await reload_status.wait_for()
    # the test's app was given a short SSE retry in code, which the file and environment do not set
    assert await reload_status.text_content() == "Reloaded. Needs a restart: sse_retry_ms"
    assert await audit_kinds(page, ["config reloaded", "key revoked", "key created"]) == [
        "config reloaded", "key revoked", "key created"]
    first = await row_texts(page, "admin-audit", "tbody tr:first-child")
    # the actor is the admin, by one of its keys (its user has two named `test`)
    prefixes = {r["prefix"] for r in await db.fetch("SELECT prefix FROM api_keys WHERE user_id = $1 AND name = 'test'",
                                                    admin.id)}
    assert first[1] == "config reloaded" and first[3] == "200"
    assert first[2] in {f"test ({prefix}…)" for prefix in prefixes}, (first, prefixes)
    assert tab.errors == []
    await page.screenshot(path=SHOT, full_page=True)


async def test_the_admin_tab_tells_a_key_without_the_admin_scope_what_it_needs(
        make_client: MakeClient, make_settings: Callable[..., Any], user: User, tab: Tab) -> None:
    client = await gateway(make_client, make_settings)
    page = tab.page
    await open_playground(page, str(client.make_url("/")), user)
    await page.get_by_role("tab", name="Admin").click()
    await page.get_by_test_id("admin-status").filter(has_text="(this tab needs a key with the admin scope)").wait_for()
    assert await page.locator('[data-testid="admin-models"] tbody tr').count() == 0
    assert tab.errors == []
