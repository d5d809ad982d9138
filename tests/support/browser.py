"""The system Chromium (through Playwright) driving the playground served by a test gateway."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Page, async_playwright

from tests.support.common import MakeClient, User

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium")
                 if p and os.access(p, os.X_OK)), None)


# Debian's Chromium headless, kept off every network but loopback (the machine has no other)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


STEP_MS = 10_000  # the longest any single browser step may take


SHOTS = "/tmp/playground-{}.png"


# records every distinct text the newest reply shows, so a test sees it grow delta by delta
RECORD_REPLY = """() => {
  window.__reply = [];
  const log = document.querySelector('[data-testid="messages"]');
  new MutationObserver(() => {
    const texts = log.querySelectorAll('[data-testid="reply-text"]');
    if (!texts.length) return;
    const text = texts[texts.length - 1].textContent;
    if (window.__reply[window.__reply.length - 1] !== text) window.__reply.push(text);
  }).observe(log, {subtree: true, childList: true, characterData: true});
}"""


REPLY = '[data-testid="assistant-message"]'


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("no Chromium binary found (apt-get install chromium; .ci/run installs it when run as root)")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclasses.dataclass
class Tab:
    page: Page
    errors: list[str]  # uncaught script errors and refused resources (CSP) seen by the page


@pytest.fixture
async def tab(browser: Browser) -> AsyncIterator[Tab]:
    context = await browser.new_context(viewport={"width": 1280, "height": 820})
    context.set_default_timeout(STEP_MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        yield Tab(page, errors)
    finally:
        await context.close()


async def gateway(make_client: MakeClient, make_settings: Callable[..., Any], **env: str) -> TestClient:
    """The real app on a loopback server; the SSE `retry:` is short so a dropped stream resumes fast."""
    settings = dataclasses.replace(make_settings(**env), sse_retry_ms=100)
    return await make_client(settings)


async def open_playground(page: Page, base_url: str, user: User) -> None:
    await page.goto(base_url)
    await page.get_by_label("API key", exact=True).fill(user.key)
    await page.get_by_role("button", name="Save", exact=True).click()
    await page.get_by_test_id("key-status").filter(has_text="Key OK").wait_for()
    # the model list is filled once the key is accepted
    await page.locator('[data-testid="model-select"] option[value="demo"]').wait_for(state="attached")


async def send(page: Page, text: str, model: str = "demo") -> str:
    """Type a message and send it; returns the assistant message id the page follows."""
    await page.evaluate(RECORD_REPLY)
    await page.get_by_label("Model", exact=True).select_option(model)
    await page.get_by_label("Message", exact=True).fill(text)
    await page.get_by_role("button", name="Send", exact=True).click()
    reply = page.locator(REPLY).last
    await reply.wait_for()
    return await reply.get_attribute("data-message-id")  # type: ignore[return-value]


async def finished(page: Page, status: str) -> str:
    reply = page.locator(f'{REPLY}[data-status="{status}"]').last
    await reply.wait_for()
    return await reply.get_by_test_id("reply-text").text_content() or ""


ARENA_CONFIG = """
[providers.demo2]
kind = "demo"

[models.alpha]
provider = "demo"

[models.beta]
provider = "demo2"
"""
