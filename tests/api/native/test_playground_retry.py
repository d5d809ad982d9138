"""The playground's error queue: a failed send is tried again three
times, after 1 s, 2 s and 4 s, with the same client_message_id, showing "retrying…", and never
makes a second message. The failures are real: a reverse proxy in front of the gateway answers
503 (as a load balancer with no healthy backend does), or forwards the send and then drops the
connection before the answer reaches the browser (the send arrived; the browser cannot know)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.support.browser import REPLY, Tab, finished, gateway, open_playground
from tests.support.common import MakeClient, User

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length", "upgrade"}


@dataclasses.dataclass
class Send:
    at: float  # loop time the proxy received it
    client_message_id: str


class FlakyProxy:
    """A reverse proxy to the gateway; the first `fail` POSTs to /api/chat fail in the given way:
    "503" answers 503 without forwarding, "drop" forwards and then closes the connection unanswered."""

    def __init__(self, target: str, fail: int, how: str) -> None:
        self.target = target.rstrip("/")
        self.fail = fail
        self.how = how
        self.sends: list[Send] = []
        self.session: aiohttp.ClientSession | None = None
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        failing = False
        if request.method == "POST" and request.path == "/api/chat":
            self.sends.append(Send(asyncio.get_running_loop().time(), orjson.loads(body)["client_message_id"]))
            failing = len(self.sends) <= self.fail
            if failing and self.how == "503":
                failed = web.Response(status=503, text="<html>no healthy upstream</html>", content_type="text/html")
                failed.force_close()
                return failed
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self.session.request(request.method, self.target + request.path_qs, headers=headers,
                                        data=body) as upstream:
            if failing:  # "drop": the gateway got it; the browser never hears the answer
                await upstream.read()
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError
            resp = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
            # a fresh connection per request: Chromium silently resends a request whose reused
            # keep-alive connection closes unanswered, which would hide the "drop" from the page
            resp.force_close()
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():  # SSE streams through as it comes
                await resp.write(chunk)
            await resp.write_eof()
            return resp


@pytest.fixture
async def flaky() -> AsyncIterator[Callable[[TestClient, int, str], Any]]:
    servers: list[tuple[TestServer, FlakyProxy]] = []

    async def start(client: TestClient, fail: int, how: str) -> tuple[FlakyProxy, str]:
        proxy = FlakyProxy(str(client.make_url("/")), fail, how)
        proxy.session = aiohttp.ClientSession()
        server = TestServer(proxy.app)
        await server.start_server()
        servers.append((server, proxy))
        return proxy, str(server.make_url("/"))

    yield start
    for server, proxy in servers:
        await server.close()
        assert proxy.session is not None
        await proxy.session.close()


async def rows_of(db: asyncpg.Pool, user: User) -> list[asyncpg.Record]:
    return await db.fetch("SELECT role, status, client_message_id, reply_to FROM messages WHERE user_id = $1 "
                          "ORDER BY created_at, role DESC", user.id)


def gaps(sends: list[Send]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(sends)]


async def type_and_send(tab: Tab, text: str) -> None:
    await tab.page.get_by_label("Model", exact=True).select_option("demo")
    await tab.page.get_by_label("Message", exact=True).fill(text)
    await tab.page.get_by_role("button", name="Send", exact=True).click()


@pytest.mark.parametrize(("fail", "how"), [(2, "503"), (1, "drop")])
async def test_a_failed_send_is_retried_with_backoff_and_the_same_id_and_saved_once(
        fail: int, how: str, make_client: MakeClient, make_settings: Callable[..., Any], user: User,
        db: asyncpg.Pool, tab: Tab, flaky: Any) -> None:
    client = await gateway(make_client, make_settings, DEMO_DELAY_MS="20", DEMO_CHUNKS="4")
    proxy, base = await flaky(client, fail, how)
    page = tab.page
    await open_playground(page, base, user)
    await type_and_send(tab, "Say it once")
    user_message = page.get_by_test_id("user-message").last
    await user_message.get_by_test_id("send-state").filter(has_text="retrying…").wait_for()
    assert "retrying… (1 of 3)" in (await page.get_by_test_id("chat-status").text_content() or "")
    await finished(page, "complete")

    assert len(proxy.sends) == fail + 1
    assert len({s.client_message_id for s in proxy.sends}) == 1  # the same id every time
    assert [round(g) for g in gaps(proxy.sends)] == [1, 2][:fail]  # 1 s, then 2 s
    assert all(g >= d for g, d in zip(gaps(proxy.sends), (1.0, 2.0), strict=False))
    assert await user_message.get_attribute("data-client-message-id") == proxy.sends[0].client_message_id
    assert await user_message.get_attribute("data-attempts") == str(fail + 1)
    # "drop": the first attempt was stored; the retry was answered as its duplicate
    expected_badge = "sent (once)" if how == "drop" else "sent"
    assert await user_message.get_by_test_id("send-state").text_content() == expected_badge
    rows = await rows_of(db, user)
    assert [(r["role"], r["status"], r["client_message_id"]) for r in rows] == [
        ("user", "complete", proxy.sends[0].client_message_id), ("assistant", "complete", None)]
    assert await page.get_by_test_id("user-message").count() == 1 and await page.locator(REPLY).count() == 1
    assert tab.errors == []


async def test_after_three_failed_retries_the_message_waits_with_its_id_and_retry_sends_it_once(
        make_client: MakeClient, make_settings: Callable[..., Any], user: User, db: asyncpg.Pool, tab: Tab,
        flaky: Any) -> None:
    client = await gateway(make_client, make_settings, DEMO_DELAY_MS="20", DEMO_CHUNKS="4")
    proxy, base = await flaky(client, 4, "503")
    page = tab.page
    await open_playground(page, base, user)
    await type_and_send(tab, "Patience")
    user_message = page.get_by_test_id("user-message").last
    await user_message.get_by_test_id("send-state").filter(has_text="not sent").wait_for(timeout=15_000)
    assert len(proxy.sends) == 4  # the send and three retries
    assert [round(g) for g in gaps(proxy.sends)] == [1, 2, 4]
    assert (await page.get_by_test_id("chat-status").text_content() or "").startswith("Not sent: 503")
    assert await rows_of(db, user) == []  # nothing reached the gateway
    assert await page.get_by_label("Message", exact=True).input_value() == "Patience"  # the text is kept
    await page.screenshot(path="/tmp/playground-retry-failed.png")

    await user_message.get_by_test_id("retry-send").click()
    await finished(page, "complete")
    assert len(proxy.sends) == 5 and len({s.client_message_id for s in proxy.sends}) == 1
    rows = await rows_of(db, user)
    assert [(r["role"], r["client_message_id"]) for r in rows] == [("user", proxy.sends[0].client_message_id),
                                                                   ("assistant", None)]
    assert await user_message.get_by_test_id("retry-send").count() == 0
    assert tab.errors == []


async def test_a_request_the_gateway_rejects_is_not_retried(
        make_client: MakeClient, make_settings: Callable[..., Any], user: User, db: asyncpg.Pool, tab: Tab,
        flaky: Any) -> None:
    client = await gateway(make_client, make_settings, MAX_BODY_BYTES="1024")
    proxy, base = await flaky(client, 0, "503")
    page = tab.page
    await open_playground(page, base, user)
    await page.get_by_label("Message", exact=True).fill("x" * 2000)  # over the body limit: 413
    await page.get_by_role("button", name="Send", exact=True).click()
    user_message = page.get_by_test_id("user-message").last
    await user_message.get_by_test_id("send-state").filter(has_text="not sent").wait_for()
    assert len(proxy.sends) == 1 and await user_message.get_by_test_id("retry-send").count() == 0
    assert await rows_of(db, user) == []
    assert uuid.UUID(proxy.sends[0].client_message_id)
