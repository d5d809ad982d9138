"""The playground page at `/`, driven as a person would: a real headless Chromium (Debian's
`chromium` package) through Playwright, against the real app on a real loopback HTTP server.

Skipped, with the reason, only where no Chromium binary is installed (`.ci/run` installs it
where apt-get is available). Screenshots go to /tmp/playground-*.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Page

from gateway.providers.demo import demo_reply
from tests.support.browser import (
    ARENA_CONFIG,
    REPLY,
    SHOTS,
    Tab,
    finished,
    gateway,
    open_playground,
    send,
)
from tests.support.common import MakeClient, User

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)


async def wait_for_words(page: Page, count: int) -> str:
    """Wait until the reply being streamed shows at least `count` deltas, and return its text."""
    await page.wait_for_function(f"() => (window.__reply || []).length >= {count}")
    return await page.locator(REPLY).last.get_by_test_id("reply-text").text_content() or ""


async def saved(db: asyncpg.Pool, user: User, message_id: str) -> asyncpg.Record:
    return await db.fetchrow("SELECT status, content, model, provider, metadata FROM messages "
                             "WHERE id = $1 AND user_id = $2", uuid.UUID(message_id), user.id)


def assert_grew_by_whole_chunks(seen: list[str], content: str, chunks: list[int]) -> None:
    """Every text the page showed is the reply up to a chunk boundary, each one longer than the
    last (nothing repeated, nothing skipped over), ending with the whole reply."""
    bounds = [sum(chunks[:i]) for i in range(len(chunks) + 1)]
    assert all(content[:len(s)] == s and len(s) in bounds for s in seen), seen
    assert [len(s) for s in seen] == sorted({len(s) for s in seen}), seen
    assert len(seen) >= 3 and seen[-1] == content  # it grew in steps, not all at once


async def test_chat_reply_streams_delta_by_delta_with_its_metadata_and_ends_as_saved(
        make_client: MakeClient, make_settings: Callable[..., Any], user: User, db: asyncpg.Pool, tab: Tab) -> None:
    client = await gateway(make_client, make_settings, DEMO_DELAY_MS="120", DEMO_CHUNKS="12")
    page = tab.page
    await open_playground(page, str(client.make_url("/")), user)
    assert [await o.get_attribute("value") for o in await page.locator("#model option").all()] == [
        "auto", "demo", "demo-alt"]

    message_id = await send(page, "Tell me about rivers and streams", model="auto")  # the router names a category
    await wait_for_words(page, 5)
    assert await page.locator(REPLY).last.get_attribute("data-status") == "streaming"
    await page.screenshot(path=SHOTS.format("chat"), full_page=True)

    text = await finished(page, "complete")
    row = await saved(db, user, message_id)
    assert row["status"] == "complete" and text == row["content"]
    assert text == "".join(demo_reply("Tell me about rivers and streams", 12))
    assert_grew_by_whole_chunks(await page.evaluate("window.__reply"), row["content"], row["metadata"]["chunks"])
    reply = page.locator(REPLY).last
    assert await reply.get_attribute("data-end") == "stream"  # ended by [DONE], not by polling
    meta = reply.get_by_test_id("reply-meta")
    assert await meta.get_by_test_id("meta-model").locator("dd").text_content() == "demo"
    assert await meta.get_by_test_id("meta-provider").locator("dd").text_content() == "demo"
    assert row["metadata"]["category"] is not None
    assert await meta.get_by_test_id("meta-category").locator("dd").text_content() == row["metadata"]["category"]
    assert await meta.get_by_test_id("meta-fallback-from").count() == 0  # no fallback happened
    assert await page.get_by_role("button", name="Send", exact=True).is_enabled()
    assert await page.get_by_role("button", name="Stop", exact=True).is_disabled()
    # the thread list shows the conversation
    await page.get_by_test_id("thread").first.wait_for()
    assert tab.errors == []


class CuttableProxy:
    """A TCP relay on loopback in front of the gateway: `cut()` drops every open connection at once,
    as a flaky network does; `received` keeps what the browser sent (its request heads)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.received = bytearray()
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, record=True), self._pipe(up_reader, writer))
        finally:
            self._links.discard(link)
            for w in link:
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool = False) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if record:
                    self.received += data
                dst.write(data)
                await dst.drain()
        dst.close()

    def cut(self) -> None:
        for writer, up_writer in list(self._links):
            writer.transport.abort()
            up_writer.transport.abort()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


ProxyFor = Callable[[TestClient], Awaitable[tuple[CuttableProxy, str]]]


@pytest.fixture
async def proxy_for() -> AsyncIterator[ProxyFor]:
    """Start a cuttable proxy in front of a test client's server: (proxy, its base URL)."""
    proxies: list[CuttableProxy] = []

    async def start(client: TestClient) -> tuple[CuttableProxy, str]:
        proxy = CuttableProxy(client.server.host, client.server.port)  # type: ignore[arg-type]
        proxies.append(proxy)
        return proxy, await proxy.start()

    yield start
    for proxy in proxies:
        await proxy.close()


@pytest.mark.parametrize("drop", ["network", "page"])
async def test_reply_dropped_mid_stream_resumes_whole_after_the_last_event_id(
        drop: str, make_client: MakeClient, make_settings: Callable[..., Any], user: User, db: asyncpg.Pool,
        tab: Tab, proxy_for: ProxyFor) -> None:
    """network: every connection is cut under the browser, which reconnects by itself with the
    Last-Event-ID header. page: the page's own hook closes the EventSource and reopens it with
    `lastEventId` in the query. Either way the gateway replays exactly what came after."""
    client = await gateway(make_client, make_settings, DEMO_DELAY_MS="150", DEMO_CHUNKS="14")
    proxy, base_url = await proxy_for(client)
    page = tab.page
    await open_playground(page, base_url, user)
    message_id = await send(page, "Keep going even if the line drops")

    before = await wait_for_words(page, 4)
    if drop == "network":
        proxy.cut()
    else:
        assert await page.evaluate("window.playground.dropStream()") is True
    text = await finished(page, "complete")

    row = await saved(db, user, message_id)
    assert text == row["content"] and row["content"].startswith(before) and len(before) < len(text)
    assert_grew_by_whole_chunks(await page.evaluate("window.__reply"), row["content"], row["metadata"]["chunks"])
    reply = page.locator(REPLY).last
    assert await reply.get_attribute("data-end") == "stream"  # the stream itself finished it
    assert int(await reply.get_attribute("data-reconnects") or 0) >= 1
    # the browser asked to resume after an event of this message
    sent = bytes(proxy.received).lower()
    resume_marker = b"last-event-id: " if drop == "network" else b"&lasteventid="
    assert resume_marker + message_id.encode() in sent
    assert tab.errors == []


async def test_stop_cancels_the_reply_and_shows_the_saved_partial_text(
        make_client: MakeClient, make_settings: Callable[..., Any], user: User, db: asyncpg.Pool, tab: Tab) -> None:
    client = await gateway(make_client, make_settings, DEMO_DELAY_MS="200", DEMO_CHUNKS="40")
    page = tab.page
    await open_playground(page, str(client.make_url("/")), user)
    prompt = "Say a lot, I may stop you"
    message_id = await send(page, prompt)
    await wait_for_words(page, 2)
    await page.get_by_role("button", name="Stop", exact=True).click()

    text = await finished(page, "cancelled")
    row = await saved(db, user, message_id)
    assert row["status"] == "cancelled" and text == row["content"]
    whole = "".join(demo_reply(prompt, 40))
    assert whole.startswith(text) and len(text) < len(whole)
    assert await page.locator(REPLY).last.get_by_test_id("reply-status").text_content() == "cancelled"
    assert await page.get_by_role("button", name="Send", exact=True).is_enabled()
    assert await page.get_by_role("button", name="Stop", exact=True).is_disabled()
    assert tab.errors == []


async def test_arena_shows_both_replies_and_a_vote_reveals_the_models_and_is_stored(
        make_client: MakeClient, make_settings: Callable[..., Any], config_file: Callable[[str], str], user: User,
        db: asyncpg.Pool, tab: Tab) -> None:
    # the leaderboard is fitted over every vote in the session's database (the arena tests leave
    # many): few bootstrap rounds keep its refit well inside the page's wait
    client = await gateway(make_client, make_settings, GATEWAY_CONFIG=config_file(ARENA_CONFIG),
                           DEMO_DELAY_MS="60", DEMO_CHUNKS="10", LEADERBOARD_BOOTSTRAP_ROUNDS="10")
    page = tab.page
    await open_playground(page, str(client.make_url("/")), user)
    await page.get_by_role("tab", name="Arena").click()
    await page.get_by_label("Prompt for both models").fill("Which river is the longest?")
    await page.get_by_role("button", name="Compare").click()
    for slot in "ab":
        await page.locator(f'[data-testid="slot-{slot}-status"][data-status="complete"]').wait_for()
    await page.get_by_role("button", name="A is better").click()
    await page.get_by_test_id("vote-status").filter(has_text="Vote recorded").wait_for()

    row = await db.fetchrow("""
        SELECT c.winner, c.voted_at, ma.model AS model_a, ma.content AS content_a, mb.model AS model_b,
               mb.content AS content_b
        FROM comparisons c JOIN messages ma ON ma.id = c.message_a JOIN messages mb ON mb.id = c.message_b
        WHERE c.user_id = $1""", user.id)
    assert row["winner"] == "a" and row["voted_at"] is not None
    assert row["model_a"] != row["model_b"] and {row["model_a"], row["model_b"]} <= {"demo", "alpha", "beta"}
    for slot in "ab":
        assert await page.get_by_test_id(f"slot-{slot}-text").text_content() == row[f"content_{slot}"]
        reveal = page.get_by_test_id(f"reveal-{slot}")
        assert await reveal.get_attribute("data-model") == row[f"model_{slot}"]
        assert (await reveal.text_content() or "").startswith(f"Model {slot.upper()} was {row[f'model_{slot}']} (")
    for name in ("A is better", "B is better", "Tie", "Both are bad"):
        assert await page.get_by_role("button", name=name).is_disabled()  # one vote per comparison
    # the leaderboard, refitted in the background, comes to count the vote
    for model in (row["model_a"], row["model_b"]):
        await page.locator(f'[data-testid="leaderboard-row"][data-model="{model}"]').wait_for()
    await page.screenshot(path=SHOTS.format("arena"), full_page=True)
    assert tab.errors == []


async def test_playground_page_is_served_with_its_assets_and_a_strict_content_policy(client: TestClient) -> None:
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    html = await resp.text()
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        assert f'"{asset}"' in html
        asset_resp = await client.get(asset)
        assert asset_resp.status == 200 and kind in asset_resp.content_type
    assert (await client.get("/static/nope.js")).status == 404
