"""Hardening: a database that refuses connections loses no reply, a request cannot forge a
log line, and `model: "random"` draws only among the models the caller may use."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from asyncpg.exceptions import _base as asyncpg_base

from gateway.generation.durability import NOT_STORED
from gateway.observability.logs import escape_controls, install_redaction
from gateway.state import MODELS, USAGE
from gateway.store.db import create_pool, migrate
from gateway.store.failures import Failure, classify, database_unavailable
from gateway.store.keys import create_user_with_key, issue_key
from tests.support.chat import PROMPT_TOKENS, TEXTS, accept, complete_frames, gated_client, open_listeners, wire
from tests.support.common import MakeClient, User, wait_for, with_database
from tests.support.fakes import parse_sse
from tests.support.fleet import GatewayProcess, gateway_env
from tests.support.providers import TWO_WEIGHTED

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

# -- 6. a database that refuses connections -----------------------------------------------------------


@dataclass
class RefusingDatabase:
    """A database of the test's own on the session's server, which it can close to connections (as
    `ALTER DATABASE ... ALLOW_CONNECTIONS false` plus terminating its sessions does) and open again."""

    name: str
    url: str
    admin: asyncpg.Connection  # on the server's maintenance database: never cut off

    async def refuse(self) -> None:
        await self.admin.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        await self.admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = $1 AND pid <> pg_backend_pid()", self.name)

    async def allow(self) -> None:
        await self.admin.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


@pytest.fixture
async def refusing_db(pg_server_url: str) -> AsyncIterator[RefusingDatabase]:
    name = "gw_refuse_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(pg_server_url, name)
    try:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        yield RefusingDatabase(name, url, admin)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


LIMITED = """
[limits]
daily_tokens = 100000
quota_leases = false
"""

KEY_DAILY = 50000


async def capped_user(url: str) -> tuple[User, uuid.UUID]:
    """A user with a key that has a daily cap of its own: a reply reserves on both day rows."""
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        user_id = uuid.uuid4()
        key_id, key = await create_user_with_key(pool, "refused", ["chat"], user_id)
        await pool.execute("UPDATE api_keys SET limits = $2 WHERE id = $1", key_id, {"daily_tokens": KEY_DAILY})
        return User(user_id, key), key_id
    finally:
        await pool.close()


async def test_a_database_refusing_connections_mid_stream_loses_no_reply_and_holds_no_reservation(
        refusing_db: RefusingDatabase, gated: Any, make_client: MakeClient, config_file: Any, tmp_path: Path):
    user, key_id = await capped_user(refusing_db.url)
    up = await gated(TEXTS, hold_at=3)
    client = await gated_client(make_client, up, DATABASE_URL=refusing_db.url, GATEWAY_CONFIG=config_file(LIMITED),
                                FINISH_RETRY_S="1", SWEEP_S="0.2", GATEWAY_DATA_DIR=str(tmp_path))
    mid = (await accept(client, user, "refuse me"))["assistant_message_id"]
    listener = (await open_listeners(client, user, mid, 1))[0]
    try:
        await refusing_db.refuse()
        up.release()  # the reply ends while the database refuses every connection
        async with asyncio.timeout(15):
            body = await listener.read()  # journaled: the listener is not kept waiting
        assert list((tmp_path / "journal").glob("finish-*.jsonl")), "the finish was not journaled"
        assert not (tmp_path / "quarantine").exists() or not list((tmp_path / "quarantine").iterdir())
        # a new request while the database refuses connections: 503, with when to try again
        resp = await client.post("/api/chat", json={"content": "and me"}, headers=user.headers)
        assert resp.status == 503, await resp.text()
        assert resp.headers["Retry-After"].isdigit()
        assert (await resp.json())["error"]["type"] == "unavailable"
    finally:
        await refusing_db.allow()

    pool = await create_pool(refusing_db.url, min_size=1, max_size=2)
    try:
        message_id = uuid.UUID(mid)

        async def replayed() -> bool:
            return await pool.fetchval("SELECT status FROM messages WHERE id = $1", message_id) == "complete"

        await wait_for(replayed)
        saved = await pool.fetchrow("SELECT * FROM messages WHERE id = $1", message_id)
        assert (saved["status"], saved["content"]) == ("complete", "".join(TEXTS))
        assert body == wire(complete_frames(saved, TEXTS))
        usage = await pool.fetch("SELECT prompt_tokens, completion_tokens FROM usage WHERE message_id = $1",
                                 message_id)
        assert [tuple(r) for r in usage] == [(PROMPT_TOKENS, len(TEXTS))]
        tokens = PROMPT_TOKENS + len(TEXTS)
        daily = await pool.fetch("SELECT tokens, requests, reserved FROM daily_usage WHERE user_id = $1", user.id)
        assert [tuple(r) for r in daily] == [(tokens, 1, 0)]
        key_daily = await pool.fetch("SELECT tokens, requests, reserved FROM key_daily_usage WHERE api_key_id = $1",
                                     key_id)
        assert [tuple(r) for r in key_daily] == [(tokens, 1, 0)]
        assert "reservation" not in saved["metadata"]
    finally:
        await pool.close()
    assert list((tmp_path / "journal").glob("finish-*.jsonl")) == []


async def day_rows(pool: asyncpg.Pool, user: User, key_id: uuid.UUID) -> list[tuple[Any, ...]]:
    """(tokens, requests, reserved) of the user's day row, then of the key's."""
    user_day = await pool.fetch("SELECT tokens, requests, reserved FROM daily_usage WHERE user_id = $1", user.id)
    key_day = await pool.fetch("SELECT tokens, requests, reserved FROM key_daily_usage WHERE api_key_id = $1",
                               key_id)
    return [tuple(r) for r in (*user_day, *key_day)]


POISON = ["a ", "poison ", "pill"]


@pytest.mark.parametrize(("constraint", "kept", "usage"), [
    # the reply's text is refused (so the salvaged record, which keeps it, is too): saved bare
    pytest.param("ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (position('poison' in content) = 0)", "bare",
                 (PROMPT_TOKENS, len(POISON), False), id="text-refused"),
    # its counts are refused (so the bare reply, which keeps them, is too): the least, an estimated zero
    pytest.param("ALTER TABLE usage ADD CONSTRAINT few CHECK (completion_tokens < 3)", "least", (0, 0, True),
                 id="counts-refused"),
])
async def test_a_reply_refused_for_good_is_closed_and_its_reservations_released_by_a_lesser_form(
        refusing_db: RefusingDatabase, gated: Any, make_client: MakeClient, config_file: Any, tmp_path: Path,
        constraint: str, kept: str, usage: tuple[int, int, bool]):
    user, key_id = await capped_user(refusing_db.url)
    pool = await create_pool(refusing_db.url, min_size=1, max_size=2)
    try:
        await pool.execute(constraint)
        up = await gated(POISON)
        client = await gated_client(make_client, up, DATABASE_URL=refusing_db.url,
                                    GATEWAY_CONFIG=config_file(LIMITED), CHECKPOINT_S="60",
                                    GATEWAY_DATA_DIR=str(tmp_path))
        resp = await client.post("/api/chat", json={"content": "take it", "stream": True}, headers=user.headers)
        assert resp.status == 200
        events = parse_sse(await resp.read())
        assert [e.event for e in events] == ["metadata", "message", "message", "message", "error", "message"]
        assert orjson.loads(events[-2].data) == NOT_STORED
        message_id = uuid.UUID(orjson.loads(events[0].data)["message_id"])
        saved = await pool.fetchrow("SELECT status, content, error, metadata FROM messages WHERE id = $1",
                                    message_id)
        assert (saved["status"], saved["content"], saved["error"]) == ("failed", "", NOT_STORED)
        assert (saved["metadata"]["quarantined"], saved["metadata"]["kept"]) == (True, kept)
        assert "reservation" not in saved["metadata"]
        row = await pool.fetchrow("SELECT prompt_tokens, completion_tokens, estimated FROM usage "
                                  "WHERE message_id = $1", message_id)
        assert tuple(row) == usage
        tokens = usage[0] + usage[1]
        assert await day_rows(pool, user, key_id) == [(tokens, 1, 0), (tokens, 1, 0)]
    finally:
        await pool.close()
    # the record as it came is in the quarantine, once
    [line] = (tmp_path / "quarantine" / "finish.jsonl").read_bytes().splitlines()
    entry = orjson.loads(line)
    assert (entry["record"]["content"], entry["record"]["status"]) == ("".join(POISON), "complete")


async def test_a_v1_usage_record_refused_for_good_still_settles_what_its_request_holds(
        refusing_db: RefusingDatabase, gated: Any, make_client: MakeClient, config_file: Any, tmp_path: Path):
    # the OpenAI door's usage goes through a batch writer: a record the database refuses for good is
    # quarantined, and the least form (no tokens, estimated) is written in its place, which settles
    # the reservations its request holds
    user, key_id = await capped_user(refusing_db.url)
    pool = await create_pool(refusing_db.url, min_size=1, max_size=2)
    try:
        await pool.execute("ALTER TABLE usage ADD CONSTRAINT few CHECK (completion_tokens < 3)")
        up = await gated(POISON)
        client = await gated_client(make_client, up, DATABASE_URL=refusing_db.url,
                                    GATEWAY_CONFIG=config_file(LIMITED), GATEWAY_DATA_DIR=str(tmp_path))
        resp = await client.post("/v1/chat/completions", headers=user.headers,
                                 json={"model": "fake", "stream": True,
                                       "messages": [{"role": "user", "content": "take it"}]})
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        await client.app[USAGE].flush()
        rows = await pool.fetch("SELECT prompt_tokens, completion_tokens, estimated FROM usage WHERE user_id = $1",
                                user.id)
        assert [tuple(r) for r in rows] == [(0, 0, True)]
        assert await day_rows(pool, user, key_id) == [(0, 1, 0), (0, 1, 0)]
    finally:
        await pool.close()
    [line] = (tmp_path / "quarantine" / "usage.jsonl").read_bytes().splitlines()
    entry = orjson.loads(line)
    assert (entry["record"]["completion_tokens"], entry["record"]["estimated"]) == (len(POISON), False)


@pytest.mark.parametrize("how", ["database does not allow connections", "database does not exist", "no such role"])
async def test_a_refused_connection_is_transient_and_a_503(refusing_db: RefusingDatabase, how: str):
    url = refusing_db.url
    if how == "database does not allow connections":
        await refusing_db.refuse()
    elif how == "database does not exist":
        url = with_database(url, "gw_never_" + uuid.uuid4().hex[:8])
    else:
        parts = urlsplit(url)
        url = urlunsplit(parts._replace(netloc=f"nobody_{uuid.uuid4().hex[:6]}@{parts.netloc.rpartition('@')[2]}"))
    with pytest.raises(asyncpg.PostgresError) as connecting:
        await asyncpg.connect(url)
    state = {"database does not allow connections": "55000", "database does not exist": "3D000",
             "no such role": "28"}[how]
    assert connecting.value.sqlstate.startswith(state)
    assert classify(connecting.value) is Failure.TRANSIENT
    assert database_unavailable(connecting.value)


async def test_the_same_sqlstate_from_a_statement_is_permanent(database_url: str):
    # 55000 from a query is a statement the object's state does not allow (here: currval before any
    # nextval in the session), a bug that retrying cannot help
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE TEMP SEQUENCE unused")
        with pytest.raises(asyncpg.PostgresError) as statement:
            await conn.fetchval("SELECT currval('unused')")
    finally:
        await conn.close()
    assert statement.value.sqlstate == "55000"
    assert classify(statement.value) is Failure.PERMANENT
    assert not database_unavailable(statement.value)


def test_asyncpg_losing_track_of_a_terminated_connection_is_transient():
    # what the next query on a pooled connection raises when the FATAL of its terminated session
    # arrived while it sat idle (seen with pg_terminate_backend): a new connection starts clean
    error = asyncpg_base.InternalClientError("cannot switch to state 11; another operation (2) is in progress")
    assert classify(error) is Failure.TRANSIENT


# -- 9. log forging --------------------------------------------------------------------------------------

FORGED = "2026-12-07 01:00:00,000 INFO aiohttp.access FORGED"
# (name, request target as sent, extra header lines as sent): each request's X-Request-Id is its name
FORGERIES = [
    ("newline-in-query", "/healthz?x=%0A" + FORGED.replace(" ", "%20"), ""),
    ("cr-and-ansi-in-path", "/healthz%0D%1B[31mred%0A" + FORGED.replace(" ", "%20"), ""),
    ("cr-ansi-and-separators-in-query", "/healthz?x=%0D%1B[31mred%E2%80%A8%C2%85%1B[0m", ""),
    # a raw control character in a header: the parser refuses the request, and quotes the header
    ("ansi-in-user-agent", "/healthz?ua=1", "User-Agent: evil\x1b[31m\r\n"),
]
LOGGED = [name for name, _, _ in FORGERIES[:3]]  # the refused one has no request id: its line says `malformed`


async def send_raw_request(port: int, target: str, request_id: str, headers: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: gw\r\nX-Request-Id: {request_id}\r\n{headers}"
                     "Connection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(raw.split(b" ", 2)[1])


async def forge(tmp_path: Path, database_url: str, log_format: str) -> tuple[dict[str, int], str]:
    """Send every forgery to a real `gateway serve`; the statuses, and everything it logged."""
    gw = GatewayProcess(tmp_path / log_format, gateway_env(database_url, LOG_LEVEL="INFO", LOG_FORMAT=log_format))
    try:
        await gw.ready()
        statuses = {name: await send_raw_request(gw.port, target, name, headers)
                    for name, target, headers in FORGERIES}

        async def logged() -> bool:
            output = gw.output()
            return all(name in output for name in LOGGED) and ("UNKNOWN / 400" in output or '"status":400' in output)

        await wait_for(logged)
    finally:
        assert gw.stop() == 0
    return statuses, (tmp_path / log_format / "gateway.log").read_text()


def no_raw_controls(text: str) -> None:
    lines = text.split("\n")
    assert not [line for line in lines if not line.isprintable()], "a raw control character reached the log"
    assert not [line for line in lines if line.startswith(FORGED)], "a request forged a log line"


async def test_control_characters_from_a_request_are_escaped_in_the_text_log(tmp_path: Path, database_url: str):
    statuses, text = await forge(tmp_path, database_url, "text")
    no_raw_controls(text)
    assert statuses == {"newline-in-query": 200, "cr-and-ansi-in-path": 404, "cr-ansi-and-separators-in-query": 200,
                        "ansi-in-user-agent": 400}
    lines = text.split("\n")
    escaped = {"newline-in-query": (f"/healthz?x=\\n{FORGED}", 200),
               "cr-and-ansi-in-path": (f"/healthz\\r\\x1b[31mred\\n{FORGED}", 404),
               "cr-ansi-and-separators-in-query": ("/healthz?x=\\r\\x1b[31mred\\u2028\\x85\\x1b[0m", 200)}
    for name, (path, status) in escaped.items():
        [line] = [line for line in lines if name in line]
        assert re.fullmatch(rf"\S+ \S+ INFO aiohttp\.access {name} GET {re.escape(path)} {status} \d+\.\dms user=-",
                            line), line
    # the refused request: its access line, and the parser's error quoting the header escaped (repr)
    assert len([line for line in lines if " INFO aiohttp.access " in line and " UNKNOWN / 400 " in line]) == 1
    assert "    b'User-Agent: evil\\x1b[31m'" in lines


async def test_control_characters_from_a_request_are_escaped_in_the_json_log(tmp_path: Path, database_url: str):
    _, text = await forge(tmp_path, database_url, "json")
    no_raw_controls(text)
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]  # every line is one object
    access = {obj["request_id"]: obj for obj in lines if obj["logger"] == "aiohttp.access"}
    assert access["newline-in-query"]["path"] == f"/healthz?x=\\n{FORGED}"
    assert access["cr-and-ansi-in-path"]["path"] == f"/healthz\\r\\x1b[31mred\\n{FORGED}"
    assert access["cr-ansi-and-separators-in-query"]["path"] == "/healthz?x=\\r\\x1b[31mred\\u2028\\x85\\x1b[0m"
    assert [obj["route"] for obj in access.values() if obj["status"] == 400] == ["malformed"]
    for obj in access.values():
        assert obj["path"] in obj["message"]


def test_any_record_of_a_gateway_or_aiohttp_logger_reaches_any_handler_on_one_line(caplog: pytest.LogCaptureFixture):
    # caplog's handler is not ours: the filter on the loggers escapes the message, after the redaction
    install_redaction()
    caplog.set_level(logging.DEBUG)
    logging.getLogger("gateway.generation.durability").warning("model %s unknown", f"x\n{FORGED}\r\x1b[2J")
    logging.getLogger("aiohttp.server").warning("key %s", "Bearer gwk_" + "k" * 30 + "\n" + FORGED)
    assert [r.getMessage() for r in caplog.records] == [f"model x\\n{FORGED}\\r\\x1b[2J unknown",
                                                        "key Bearer [redacted]\\n" + FORGED]


def test_escaping_leaves_printable_text_as_it_is_and_escapes_each_control_once():
    plain = "/api/messages/5d1e/stream?token=[redacted] café \\n"
    assert escape_controls(plain) is plain
    assert escape_controls("\x00\t\x7f\x9b\u2029\u202e\u2066") == "\\x00\\t\\x7f\\x9b\\u2029\\u202e\\u2066"
    assert escape_controls(escape_controls("a\nb")) == "a\\nb"


# -- 11. model "random" among the models the caller may use -----------------------------------------

async def limit_key(db: asyncpg.Pool, user: User, models: list[str]) -> None:
    await db.execute("UPDATE api_keys SET limits = $2 WHERE user_id = $1", user.id, {"models": models})


async def random_turn(client: Any, user: User) -> tuple[int, list[Any], dict[str, Any]]:
    resp = await client.post("/api/chat", json={"content": "Pick one", "model": "random", "stream": True},
                             headers=user.headers)
    if resp.status != 200:
        return resp.status, [], await resp.json()
    events = parse_sse(await resp.read())
    return resp.status, events, orjson.loads(events[0].data)


async def test_model_random_draws_only_the_models_the_key_may_use(make_client, config_file, user, db):
    await limit_key(db, user, ["light"])
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED))
    client.app[MODELS].rng.seed(7)  # unrestricted, "heavy" (weight 3) would be drawn most
    for _ in range(15):
        status, events, meta = await random_turn(client, user)
        assert status == 200
        assert (meta["model"], meta["selected"]) == ("light", "random")
        assert [e.event for e in events][-3:] == ["usage", "done", "message"]
    rows = await db.fetch("SELECT status, model FROM messages WHERE user_id = $1 AND role = 'assistant'", user.id)
    assert [tuple(r) for r in rows] == [("complete", "light")] * 15
    # the OpenAI door draws the same way
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "random", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200 and (await resp.json())["model"] == "light"


async def test_model_random_draws_within_the_models_every_key_of_the_chain_allows(make_client, config_file, user, db):
    parent_id = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    await limit_key(db, user, ["heavy", "light"])
    _, key = await issue_key(db, user.id, "child", ["chat"], limits={"models": ["light", "demo"]},
                             parent_id=parent_id)
    child = User(user.id, key)
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED))
    client.app[MODELS].rng.seed(11)
    drawn = {(await random_turn(client, child))[2]["model"] for _ in range(8)}
    assert drawn == {"light"}


async def test_model_random_for_a_key_that_may_use_no_drawable_model_is_a_403_and_saves_nothing(
        make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED), KEY_CACHE_TTL_S="0")
    for models in (["off"], ["never"], ["unknown"]):  # disabled, weight 0, not configured
        await limit_key(db, user, models)
        status, _events, body = await random_turn(client, user)
        assert (status, body["error"]["type"]) == (403, "forbidden"), models
        assert body["error"]["message"] == "model 'random' draws from no model this key may use"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 0


async def test_model_random_when_every_model_the_key_may_use_is_down_is_a_503(make_client, config_file, user, db):
    await limit_key(db, user, ["light"])
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED), CIRCUIT_FAILURES="1")
    client.app[MODELS].circuits.failure("light")  # "heavy" and "demo" are up, but not this key's
    status, _events, body = await random_turn(client, user)
    assert status == 503 and body["error"]["message"] == "no model is available to draw from; retry later"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 0


THREE_WEIGHTED = TWO_WEIGHTED + """
[models.medium]
provider = "local"
weight = 2
"""


async def test_the_arenas_default_pair_is_drawn_among_the_models_the_key_may_use(make_client, config_file, user,
                                                                                   make_user, db):
    await limit_key(db, user, ["light", "medium"])
    client = await make_client(GATEWAY_CONFIG=config_file(THREE_WEIGHTED))
    client.app[MODELS].rng.seed(3)
    for i in range(8):  # unrestricted, "heavy" (weight 3) would be in most pairs
        resp = await client.post("/api/arena", headers=user.headers,
                                 json={"content": f"compare {i}", "stream": False})
        assert resp.status == 202, await resp.text()
    rows = await db.fetch("SELECT model_a, model_b FROM comparisons WHERE user_id = $1", user.id)
    assert len(rows) == 8
    assert all(sorted((r["model_a"], r["model_b"])) == ["light", "medium"] for r in rows)
    # a key that may use only one drawable model cannot be paired: a 403, nothing saved
    other = await make_user()
    await limit_key(db, other, ["light", "off", "never"])
    resp = await client.post("/api/arena", headers=other.headers, json={"content": "one more", "stream": False})
    assert resp.status == 403, await resp.text()
    assert (await resp.json())["error"]["message"] == "the arena's pairing needs two models this key may use"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", other.id) == 0
