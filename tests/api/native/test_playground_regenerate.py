"""The playground and the reply lifecycle, in headless Chromium: a reply
that ended without its answer offers "Regenerate", which asks the gateway for a new reply to the same
message and follows it like a sent one; an arena turn with a slot the policy refused cannot be voted
on, and the page says why instead of offering buttons the gateway would refuse."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from tests.support.browser import ARENA_CONFIG, REPLY, SHOTS, Tab, finished, gateway, open_playground, send
from tests.support.common import MakeClient, User
from tests.support.fakes import FakeUpstream, Reply, openai_stream

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

FLAKY = """
[providers.up]
kind = "openai"
base_url = "{url}"
api_key = "k"

[models.flaky]
provider = "up"
upstream = "fake-up"
"""


async def test_a_failed_reply_is_regenerated_from_the_page_and_both_replies_are_kept(
        make_client: MakeClient, make_settings: Callable[..., Any], config_file: Callable[[str], str],
        upstream: FakeUpstream, user: User, db: asyncpg.Pool, tab: Tab) -> None:
    client = await gateway(make_client, make_settings, GATEWAY_CONFIG=config_file(FLAKY.format(url=upstream.base_url)))
    upstream.queue(Reply(status=500, body=b'{"error": {"message": "boom"}}'),
                   Reply(openai_stream(["Second ", "time ", "lucky"])))
    page = tab.page
    await open_playground(page, str(client.make_url("/")), user)
    failed_id = await send(page, "Try me", model="flaky")
    await finished(page, "failed")
    assert await page.get_by_test_id("send-error").count() == 0  # the message was sent; its reply failed
    await page.get_by_role("button", name="Regenerate").click()

    text = await finished(page, "complete")
    assert text == "Second time lucky"
    new_id = await page.locator(REPLY).last.get_attribute("data-message-id")
    assert new_id != failed_id
    assert await page.get_by_role("button", name="Regenerate").count() == 0  # offered once, taken
    rows = await db.fetch("SELECT id, role, status, reply_to FROM messages WHERE user_id = $1 "
                          "ORDER BY created_at, role DESC", user.id)
    assert [(r["role"], r["status"]) for r in rows] == [("user", "complete"), ("assistant", "failed"),
                                                        ("assistant", "complete")]
    assert rows[1]["reply_to"] == rows[2]["reply_to"] == rows[0]["id"]  # two replies to the one message
    assert str(rows[1]["id"]) == failed_id and str(rows[2]["id"]) == new_id
    assert len(upstream.requests) == 2
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 2  # once per reply
    await page.screenshot(path=SHOTS.format("regenerated"), full_page=True)
    assert tab.errors == []


async def test_an_arena_turn_with_a_refused_slot_says_why_and_offers_no_vote(
        make_client: MakeClient, make_settings: Callable[..., Any], config_file: Callable[[str], str],
        user: User, db: asyncpg.Pool, tab: Tab) -> None:
    # the key may run one stream at a time: of the two slots, the second is refused after the commit
    # (a key that may use too few models for a pair is refused before anything is written instead)
    await db.execute("UPDATE api_keys SET limits = $2 WHERE user_id = $1", user.id, {"max_concurrent_streams": 1})
    client = await gateway(make_client, make_settings, GATEWAY_CONFIG=config_file(ARENA_CONFIG),
                           DEMO_DELAY_MS="20", DEMO_CHUNKS="4", LEADERBOARD_BOOTSTRAP_ROUNDS="10")
    page = tab.page
    await open_playground(page, str(client.make_url("/")), user)
    await page.get_by_role("tab", name="Arena").click()
    await page.get_by_label("Prompt for both models").fill("Which river is the longest?")
    await page.get_by_role("button", name="Compare").click()
    await page.get_by_test_id("arena-status").filter(has_text="cannot be voted on").wait_for()
    statuses = {slot: await page.get_by_test_id(f"slot-{slot}-status").get_attribute("data-status")
                for slot in "ab"}
    assert "refused" in statuses.values()
    for name in ("A is better", "B is better", "Tie", "Both are bad"):
        assert await page.get_by_role("button", name=name).is_disabled()
    saved = await db.fetch("SELECT slot, status FROM messages WHERE user_id = $1 AND role = 'assistant' "
                           "ORDER BY slot", user.id)
    assert {r["slot"]: r["status"] for r in saved} == statuses
    assert tab.errors == []
