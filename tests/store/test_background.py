"""Background writers against a real database: a refused record fails alone (quarantined, counted,
never retried forever) while the rest of its batch is written; a database that is away is waited
for; `flush` waits for what is queued. Also the one error classification they share, and the
edge's use of it (503 only when the database is away)."""

from __future__ import annotations

import asyncio
import errno
import socket
import uuid
from dataclasses import asdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from gateway.edge.middleware import errors
from gateway.store.background import BatchWriter, GroupCommit
from gateway.store.db import create_pool
from gateway.store.failures import Failure, Quarantine, classify, database_unavailable
from gateway.store.usage import UsageRecord, record_usage_many

TODAY = date(2030, 1, 2)  # a day of their own, so the daily totals below are these tests' alone


def usage(user_id: uuid.UUID, prompt: int, completion: int = 1) -> UsageRecord:
    return UsageRecord(message_id=uuid.uuid4(), user_id=user_id, api_key_id=None, model="m", provider="p",
                       prompt_tokens=prompt, completion_tokens=completion, estimated=False, cost_usd=0.0,
                       day=TODAY, user_reserved=0, key_reserved=0)


async def usage_ids(db: asyncpg.Pool, user_id: uuid.UUID) -> set[uuid.UUID]:
    return {r["message_id"] for r in await db.fetch("SELECT message_id FROM usage WHERE user_id = $1", user_id)}


def quarantined(directory: Path, kind: str) -> list[dict[str, Any]]:
    path = directory / f"{kind}.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recording:
    """The usage flush, recording each batch it is given (by prompt_tokens, which the tests make unique)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.calls: list[list[int]] = []

    async def flush(self, batch: list[UsageRecord]) -> None:
        self.calls.append([r.prompt_tokens for r in batch])
        await record_usage_many(self.pool, batch)


# -- a refused record fails alone ----------------------------------------------------------------------

async def test_a_poison_record_is_quarantined_and_the_rest_of_its_batch_is_written(db, tmp_path):
    user_id = uuid.uuid4()
    quarantine = Quarantine(tmp_path)
    recording = Recording(db)
    writer: BatchWriter[UsageRecord] = BatchWriter("usage", recording.flush, interval_s=10, quarantine=quarantine,
                                                   to_json=asdict)
    writer.start()
    poison = usage(user_id, 2**31)  # past the integer column: the database can never take it
    records = [usage(user_id, 1), usage(user_id, 2), poison, usage(user_id, 3), usage(user_id, 4)]
    for record in records:
        writer.add(record)
    await writer.flush()
    assert await usage_ids(db, user_id) == {r.message_id for r in records if r is not poison}
    # halves until the bad one is alone; every good record written exactly once
    assert recording.calls == [[1, 2, 2**31, 3, 4], [1, 2], [2**31, 3, 4], [2**31], [3, 4]]
    assert (writer.written, writer.quarantined, writer.depth, writer.dropped) == (4, 1, 0, 0)
    assert quarantine.count("usage") == 1
    [entry] = quarantined(tmp_path, "usage")
    assert set(entry) == {"kind", "at", "error", "record"}
    assert entry["kind"] == "usage" and entry["error"]["type"] == "DataError"
    assert entry["record"] == orjson.loads(orjson.dumps(asdict(poison)))
    totals = await db.fetchrow("SELECT tokens, requests FROM daily_usage WHERE user_id = $1 AND day = $2",
                               user_id, TODAY)
    assert (totals["tokens"], totals["requests"]) == (1 + 2 + 3 + 4 + 4, 4)

    # and it keeps working: the next record is written at once, nothing retried
    later = usage(user_id, 5)
    writer.add(later)
    await writer.flush()
    assert later.message_id in await usage_ids(db, user_id)
    assert recording.calls[5:] == [[5]] and quarantine.count("usage") == 1
    await writer.close()


async def test_two_poison_records_in_one_batch_are_each_quarantined(db, tmp_path):
    user_id = uuid.uuid4()
    quarantine = Quarantine(tmp_path)
    writer: BatchWriter[UsageRecord] = BatchWriter("usage", lambda b: record_usage_many(db, b), interval_s=10,
                                                   quarantine=quarantine, to_json=asdict)
    writer.start()
    bad = [usage(user_id, 2**31), usage(user_id, 1, completion=-2**31 - 1)]
    good = [usage(user_id, 7) for _ in range(6)]
    for record in [good[0], bad[0], *good[1:4], bad[1], *good[4:]]:
        writer.add(record)
    await writer.flush()
    assert await usage_ids(db, user_id) == {r.message_id for r in good}
    assert [e["record"]["message_id"] for e in quarantined(tmp_path, "usage")] == [str(r.message_id) for r in bad]
    assert quarantine.count("usage") == 2 and writer.written == 6
    await writer.close()


@pytest.mark.parametrize("away", ["closed_pool", "nothing_listening"])
async def test_a_transient_failure_keeps_the_batch_whole_and_retries_it(db, database_url, tmp_path, away):
    user_id = uuid.uuid4()
    if away == "closed_pool":
        broken = await create_pool(database_url, min_size=1, max_size=1)
        await broken.close()  # InterfaceError: pool is closed
    else:
        broken = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres", min_size=0)
    pools = [broken, db]
    calls: list[int] = []
    failures: list[Failure] = []

    async def flush(batch: list[UsageRecord]) -> None:
        calls.append(len(batch))
        pool = pools.pop(0) if len(pools) > 1 else pools[0]
        try:
            await record_usage_many(pool, batch)
        except Exception as e:
            failures.append(classify(e))
            raise

    quarantine = Quarantine(tmp_path)
    writer: BatchWriter[UsageRecord] = BatchWriter("usage", flush, interval_s=10, max_backoff_s=0.05,
                                                   quarantine=quarantine, to_json=asdict)
    writer.start()
    records = [usage(user_id, i) for i in range(1, 4)]
    for record in records:
        writer.add(record)
    await writer.flush()
    assert failures == [Failure.TRANSIENT]
    assert calls == [3, 3]  # retried whole: a transient failure says nothing about the records
    assert await usage_ids(db, user_id) == {r.message_id for r in records}
    assert quarantine.count("usage") == 0 and not (tmp_path / "usage.jsonl").exists()
    await writer.close()
    await broken.close()


async def test_flush_does_not_wait_out_the_batching_interval(db):
    user_id = uuid.uuid4()
    writer: BatchWriter[UsageRecord] = BatchWriter("usage", lambda b: record_usage_many(db, b), interval_s=3600)
    writer.start()
    await writer.flush()  # nothing queued: returns at once
    records = [usage(user_id, 1), usage(user_id, 2)]
    for record in records:
        writer.add(record)
    async with asyncio.timeout(5):
        await writer.flush()
    assert await usage_ids(db, user_id) == {r.message_id for r in records}
    await writer.close()


async def test_flush_of_a_writer_that_is_not_running_raises_instead_of_hanging(db):
    writer: BatchWriter[UsageRecord] = BatchWriter("usage", lambda b: record_usage_many(db, b))
    writer.add(usage(uuid.uuid4(), 1))
    with pytest.raises(RuntimeError, match="not running"):
        await writer.flush()


# -- group commit --------------------------------------------------------------------------------------

class Gated:
    """A usage group-commit flush whose first call waits for `open`, so later submissions pile up."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.open = asyncio.Event()
        self.in_flight = asyncio.Event()
        self.calls: list[list[int]] = []

    async def flush(self, batch: list[UsageRecord]) -> None:
        self.calls.append([r.prompt_tokens for r in batch])
        if len(self.calls) == 1:
            self.in_flight.set()
            await self.open.wait()
        await record_usage_many(self.pool, batch)


async def test_group_commit_refused_batch_fails_only_the_caller_of_the_bad_item(db):
    user_id = uuid.uuid4()
    gated = Gated(db)
    group: GroupCommit[UsageRecord, None] = GroupCommit(gated.flush)
    first = asyncio.ensure_future(group.submit(usage(user_id, 1)))
    await gated.in_flight.wait()
    records = [usage(user_id, 2), usage(user_id, 2**31), usage(user_id, 3)]
    rest = [asyncio.ensure_future(group.submit(r)) for r in records]
    gated.open.set()
    done = await asyncio.gather(first, *rest, return_exceptions=True)
    assert done[:2] == [None, None] and done[3] is None
    assert isinstance(done[2], asyncpg.DataError)
    assert gated.calls == [[1], [2, 2**31, 3], [2], [2**31], [3]]
    assert len(await usage_ids(db, user_id)) == 3


async def test_group_commit_transient_failure_fails_the_whole_batch_without_retrying_items_alone():
    gate, in_flight = asyncio.Event(), asyncio.Event()
    calls: list[list[int]] = []

    async def flush(batch: list[int]) -> list[int]:
        calls.append(batch)
        if len(calls) == 1:
            in_flight.set()
            await gate.wait()
            return [x * 10 for x in batch]
        raise ConnectionRefusedError(errno.ECONNREFUSED, "database away")

    group: GroupCommit[int, int] = GroupCommit(flush)
    first = asyncio.ensure_future(group.submit(1))
    await in_flight.wait()
    rest = [asyncio.ensure_future(group.submit(x)) for x in (2, 3)]
    gate.set()
    done = await asyncio.gather(first, *rest, return_exceptions=True)
    assert done[0] == 10 and all(isinstance(d, ConnectionRefusedError) for d in done[1:])
    assert calls == [[1], [2, 3]]


# -- one classification --------------------------------------------------------------------------------

@pytest.mark.parametrize("exc, failure", [
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Failure.TRANSIENT),
    (ConnectionResetError(), Failure.TRANSIENT),
    (TimeoutError(), Failure.TRANSIENT),
    (socket.gaierror(-2, "name unknown"), Failure.TRANSIENT),
    (OSError(errno.ENETUNREACH, "unreachable"), Failure.TRANSIENT),
    (asyncpg.InterfaceError("pool is closed"), Failure.TRANSIENT),
    (asyncpg.ConnectionDoesNotExistError("gone"), Failure.TRANSIENT),
    (asyncpg.CannotConnectNowError("starting"), Failure.TRANSIENT),
    (asyncpg.AdminShutdownError("shutdown"), Failure.TRANSIENT),
    (asyncpg.TooManyConnectionsError("full"), Failure.TRANSIENT),
    (asyncpg.SerializationError("retry"), Failure.TRANSIENT),
    (asyncpg.DeadlockDetectedError("deadlock"), Failure.TRANSIENT),
    (asyncpg.QueryCanceledError("statement timeout"), Failure.TRANSIENT),
    (asyncpg.ReadOnlySQLTransactionError("standby"), Failure.TRANSIENT),
    (asyncpg.DataError("bad data"), Failure.PERMANENT),
    (asyncpg.CharacterNotInRepertoireError("NUL"), Failure.PERMANENT),
    (asyncpg.NumericValueOutOfRangeError("too big"), Failure.PERMANENT),
    (asyncpg.UniqueViolationError("dup"), Failure.PERMANENT),
    (asyncpg.ForeignKeyViolationError("fk"), Failure.PERMANENT),
    (asyncpg.UndefinedColumnError("a bug"), Failure.PERMANENT),
    (asyncpg.exceptions.TransactionIntegrityConstraintViolationError("40002"), Failure.PERMANENT),
    (asyncpg.exceptions._base.DataError("value out of int32 range"), Failure.PERMANENT),  # client side
    (PermissionError(errno.EACCES, "denied"), Failure.PERMANENT),
    (FileNotFoundError(errno.ENOENT, "missing"), Failure.PERMANENT),
    (ValueError("bad"), Failure.PERMANENT),
    (orjson.JSONDecodeError("torn", "{", 1), Failure.PERMANENT),
    (KeyError("field"), Failure.PERMANENT),
])
def test_classify(exc, failure):
    assert classify(exc) is failure


async def test_an_oserror_met_inside_the_driver_is_the_database_being_away(database_url):
    pool = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres", min_size=0)
    try:
        with pytest.raises(OSError) as raised:
            await pool.fetchval("SELECT 1")
    finally:
        await pool.close()
    assert database_unavailable(raised.value)
    assert not database_unavailable(ConnectionRefusedError(errno.ECONNREFUSED, "an upstream's socket"))


# -- the edge: 503 only when the database is away ------------------------------------------------------

async def test_only_a_database_outage_is_a_503_any_other_oserror_is_a_500(aiohttp_client, db, caplog):
    down = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres", min_size=0)

    async def database_away(request: web.Request) -> web.Response:
        await down.fetchval("SELECT 1")
        return web.Response()

    async def database_refuses(request: web.Request) -> web.Response:
        await db.fetchval("SELECT $1::integer", 2**31)  # asyncpg cannot encode it: not an outage
        return web.Response()

    async def disk(request: web.Request) -> web.Response:
        raise PermissionError(errno.EACCES, "Permission denied", "/var/lib/gateway/file")

    async def socket_elsewhere(request: web.Request) -> web.Response:
        raise aiohttp.ClientOSError(errno.ECONNREFUSED, "upstream refused")

    app = web.Application(middlewares=[errors])
    for name, handler in [("away", database_away), ("refuses", database_refuses), ("disk", disk),
                          ("socket", socket_elsewhere)]:
        app.router.add_get(f"/{name}", handler)
    client = await aiohttp_client(app)
    try:
        answers = {}
        for name in ("away", "refuses", "disk", "socket"):
            resp = await client.get(f"/{name}", headers={"X-Request-Id": f"req-{name}"})
            answers[name] = (resp.status, await resp.json())
    finally:
        await down.close()

    def body(type_: str, message: str, name: str) -> dict[str, Any]:
        return {"error": {"type": type_, "message": message, "request_id": f"req-{name}"}}

    assert answers == {
        "away": (503, body("unavailable", "database unavailable", "away")),
        "refuses": (500, body("internal_error", "internal error", "refuses")),
        "disk": (500, body("internal_error", "internal error", "disk")),
        "socket": (500, body("internal_error", "internal error", "socket")),
    }
    unhandled = [r for r in caplog.records if r.getMessage().startswith("unhandled error in GET")]
    assert [r.getMessage() for r in unhandled] == [
        f"unhandled error in GET /{n}" for n in ("refuses", "disk", "socket")]
    assert all(r.exc_info is not None for r in unhandled)


async def test_quarantine_keeps_raw_bytes_that_are_not_json_as_text(tmp_path):
    seen: list[str] = []
    quarantine = Quarantine(tmp_path, on_put=seen.append)
    await quarantine.put("finish", b'{"usage": {"message_id": "ab\xff', ValueError("torn"))
    [entry] = quarantined(tmp_path, "finish")
    assert entry["record"] == '{"usage": {"message_id": "ab\\xff'
    assert entry["error"] == {"type": "ValueError", "message": "torn"}
    assert datetime.fromisoformat(entry["at"]).tzinfo == UTC
    assert seen == ["finish"] and quarantine.count("finish") == 1
