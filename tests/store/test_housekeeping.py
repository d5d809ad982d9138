"""Housekeeping: old rate windows are swept; a thread's updated_at follows its
replies and the list orders by it; `[limits] max_tokens` reaches the upstream only when it clamps;
an abandoned stream still gets its access-log line."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.edge.middleware import AccessLogger
from gateway.state import INSTANCE
from tests.support.common import User, wait_for
from tests.support.fakes import FakeUpstream, Reply, openai_stream

# -- rate windows ---------------------------------------------------------------------------------


async def test_the_sweep_deletes_rate_windows_past_their_minute(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file("[limits]\nrequests_per_minute = 100\n"))
    subject = f"u:{user.id}"
    old = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    await db.execute("INSERT INTO rate_windows (subject, window_start, count) VALUES ($1, $2, 7)", subject, old)
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi"})
    assert resp.status == 202
    await client.app[INSTANCE].sweep()
    windows = await db.fetch("SELECT window_start, count FROM rate_windows WHERE subject = $1", subject)
    assert [w["count"] for w in windows] == [1]  # this minute's stays, the old one is gone
    assert windows[0]["window_start"] > old


async def test_the_periodic_sweep_deletes_old_windows_without_being_asked(make_client, user, db):
    subject = f"u:{uuid.uuid4()}"
    old = datetime.now(UTC) - timedelta(hours=1)
    await db.execute("INSERT INTO rate_windows (subject, window_start, count) VALUES ($1, $2, 1)", subject, old)
    await make_client(SWEEP_S="0.05")

    async def gone() -> bool:
        return await db.fetchval("SELECT count(*) FROM rate_windows WHERE subject = $1", subject) == 0

    await wait_for(gone)


# -- threads by latest activity -------------------------------------------------------------------


async def thread_ids(client, user: User, **query: str) -> tuple[list[str], str | None]:
    resp = await client.get("/api/threads", headers=user.headers, params=query)
    assert resp.status == 200
    page = await resp.json()
    return [t["id"] for t in page["threads"]], page["next_cursor"]


async def test_a_finished_reply_touches_its_thread_and_the_list_follows_activity(
        make_client, upstream: FakeUpstream, user, db):
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_MODEL="fake")
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["Hel", "lo"]), hold_at=1, release=release))
    first = await (await client.post("/api/chat", headers=user.headers, json={"content": "first"})).json()
    created = []
    for title in ("second", "third"):
        resp = await client.post("/api/threads", headers=user.headers, json={"title": title})
        created.append((await resp.json())["id"])
    thread = first["thread_id"]
    before = await db.fetchval("SELECT updated_at FROM threads WHERE id = $1", uuid.UUID(thread))
    assert (await thread_ids(client, user))[0] == [created[1], created[0], thread]
    release.set()  # the first thread's reply finishes: that thread is the latest active

    async def touched() -> bool:
        return await db.fetchval("SELECT updated_at FROM threads WHERE id = $1", uuid.UUID(thread)) > before

    await wait_for(touched)
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1",
                             uuid.UUID(first["assistant_message_id"])) == "complete"
    assert (await thread_ids(client, user))[0] == [thread, created[1], created[0]]
    # keyset pages on (updated_at, id): one at a time, every thread once, in the same order
    seen, cursor = [], None
    while True:
        ids, cursor = await thread_ids(client, user, limit="1", **({"cursor": cursor} if cursor else {}))
        seen += ids
        if cursor is None:
            break
    assert seen == [thread, created[1], created[0]]


async def test_threads_updated_in_the_same_instant_page_by_id(client, user, db):
    ids = []
    for _ in range(3):
        ids.append((await (await client.post("/api/threads", headers=user.headers, json={})).json())["id"])
    await db.execute("UPDATE threads SET updated_at = '2030-01-01T00:00:00Z' WHERE user_id = $1", user.id)
    seen, cursor = [], None
    while True:
        page, cursor = await thread_ids(client, user, limit="2", **({"cursor": cursor} if cursor else {}))
        seen += page
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)


# -- max_tokens only when clamping ----------------------------------------------------------------


@pytest.mark.parametrize(("asked", "sent"), [(None, None), (50, 50), (500, 100)])
async def test_the_max_tokens_ceiling_is_sent_upstream_only_when_it_clamps(
        make_client, config_file, upstream: FakeUpstream, user, db, asked: int | None, sent: int | None):
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_MODEL="fake",
                               GATEWAY_CONFIG=config_file("[limits]\nmax_tokens = 100\n"))
    body: dict[str, Any] = {"content": "hi", "stream": True}
    if asked is not None:
        body["max_tokens"] = asked
    resp = await client.post("/api/chat", headers=user.headers, json=body)
    assert resp.status == 200
    await resp.read()
    assert len(upstream.requests) == 1
    assert upstream.requests[0].get("max_tokens") == sent
    assert ("max_tokens" in upstream.requests[0]) is (sent is not None)
    # the OpenAI route too
    route: dict[str, Any] = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    if asked is not None:
        route["max_tokens"] = asked
    resp = await client.post("/v1/chat/completions", headers=user.headers, json=route)
    assert resp.status == 200
    assert upstream.requests[1].get("max_tokens", upstream.requests[1].get("max_completion_tokens")) == sent


# -- the access line of an abandoned stream -------------------------------------------------------


# aiohttp either cancels the handler when its client leaves (handler_cancellation, as the test
# server does) or lets it run into the closed connection (`python -m gateway serve`): a line either way
@pytest.mark.parametrize("cancellation", [True, False], ids=["handler_cancelled", "handler_runs_on"])
async def test_a_stream_abandoned_by_its_client_gets_an_access_line_with_client_closed(
        aiohttp_server: Any, aiohttp_client: Any, make_settings: Any, user: User, db: asyncpg.Pool,
        caplog: pytest.LogCaptureFixture, cancellation: bool):
    app = create_app(make_settings(DEMO_DELAY_MS="30", DEMO_CHUNKS="100"))
    if cancellation:
        client: Any = await aiohttp_client(await aiohttp_server(app, access_log_class=AccessLogger))
        runner = None
    else:  # as `serve` runs it: aiohttp's default, no handler cancellation
        runner = web.AppRunner(app, access_log_class=AccessLogger, handler_cancellation=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        client = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")
    try:
        await abandon_and_check(client, user, caplog)
    finally:
        if runner is not None:
            await client.close()
            await runner.cleanup()


async def abandon_and_check(client: Any, user: User, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    resp = await client.post("/api/chat", json={"content": "leave me", "stream": True},
                             headers={**user.headers, "X-Request-Id": "abandoned-1"})
    assert resp.status == 200
    await resp.content.readuntil(b"event: metadata")
    resp.close()  # the client goes away mid-stream

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records
                if r.name == "aiohttp.access" and getattr(r, "request_id", None) == "abandoned-1"]

    async def logged() -> bool:
        return bool(lines())

    await wait_for(logged)
    await asyncio.sleep(0.1)
    [record] = lines()  # once
    assert (record.status, record.client_closed, record.route) == (200, True, "/api/chat")
    assert "client_closed" in record.getMessage()
    # a stream read to its end is not marked
    resp = await client.post("/api/chat", json={"content": "stay", "stream": True},
                             headers={**user.headers, "X-Request-Id": "finished-1"})
    await resp.read()

    async def finished_logged() -> bool:
        return any(getattr(r, "request_id", None) == "finished-1" for r in caplog.records)

    await wait_for(finished_logged)
    done = next(r for r in caplog.records if getattr(r, "request_id", None) == "finished-1")
    assert (done.status, getattr(done, "client_closed", False)) == (200, False)
    assert "client_closed" not in done.getMessage()


# -- dead code, circuit states, redaction of late loggers -------------------------


def test_dead_code_and_write_only_counters_are_gone():
    import dataclasses

    from gateway.fleet import publisher
    from gateway.policy import quota
    from gateway.providers import openai as openai_provider
    from gateway.store import arena, limits, messages

    gone = [(module.__name__, name) for module, name in (
        (arena, "battles"), (openai_provider, "client_timeout"), (limits, "user_day_committed"),
        (messages, "finish_assistant")) if hasattr(module, name)]
    assert gone == []
    # what admission did, each read by a test that asserts a behaviour with it; nothing only written
    assert [f.name for f in dataclasses.fields(quota.Stats)] == ["exact", "from_slice", "leases"]
    assert "flushes" not in publisher.StreamPublisher.__init__.__code__.co_names


def test_a_circuit_s_state_is_an_enum_member_through_its_whole_cycle():
    from gateway.observability import metrics
    from gateway.providers.circuit import CircuitBreakers
    from gateway.vocabulary import CircuitState

    now = [0.0]
    c = CircuitBreakers(failure_threshold=2, cooldown_s=10.0, clock=lambda: now[0])
    seen = [c.state("m")]
    c.failure("m")
    c.failure("m")
    seen.append(c.state("m"))
    now[0] = 10.0
    seen.append(c.state("m"))
    assert c.allow("m") and not c.allow("m")  # the one probe
    c.success("m")
    seen.append(c.state("m"))
    assert seen == [CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]
    assert all(type(s) is CircuitState for s in seen)
    assert tuple(CircuitState) == metrics._CIRCUIT_STATES == ("closed", "half_open", "open")  # the /metrics labels


def test_a_logger_made_after_start_up_is_redacted_too():
    from gateway.observability.logs import REDACTED, install_redaction

    install_redaction()
    install_redaction()  # idempotent: one filter, one logger class
    late = logging.getLogger(f"gateway.late_{uuid.uuid4().hex}")  # a module imported after start-up
    other = logging.getLogger(f"elsewhere_{uuid.uuid4().hex}")  # not ours: left to the root handler
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    for logger in (late, other):
        logger.addHandler(Keep())
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.warning("upstream said %s", "Authorization: Bearer gwk_abcdefghijkl")
    assert [r.getMessage() for r in got] == [f"upstream said Authorization: {REDACTED}",
                                             "upstream said Authorization: Bearer gwk_abcdefghijkl"]
    assert len(late.filters) == 1
