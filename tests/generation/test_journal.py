"""A finished reply is durable whatever the database does: a record it refuses for good fails alone
(quarantined as sent, its message saved as failed with what can be saved), a torn or poison
journal line never stops replay or start-up, and the sweep loop outlives any exception."""

from __future__ import annotations

import asyncio
import errno
import logging
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from gateway.generation.durability import NOT_STORED, FinishWriter
from gateway.generation.journal import FinishJournal, record_to_json
from gateway.state import INSTANCE, QUARANTINE
from gateway.store.failures import Quarantine
from gateway.store.messages import FinishRecord, TurnRequest, finish_many, persist_turns
from gateway.store.usage import UsageRecord
from tests.support.common import User, wait_for
from tests.support.fakes import Reply, openai_stream, parse_sse


async def placeholders(db: asyncpg.Pool, user: User, n: int, instance_id: uuid.UUID | None = None) -> list[uuid.UUID]:
    """n assistant rows, live (streaming), owned by `instance_id` (a dead instance by default)."""
    owner = instance_id or uuid.uuid4()
    turns = await persist_turns(db, [TurnRequest(user_id=user.id, content=f"q{i}", client_message_id=None,
                                                 thread_id=None, instance_id=owner) for i in range(n)])
    return [t.assistant_message_id for t in turns]  # type: ignore[union-attr]


def finish(user: User, message_id: uuid.UUID, content: str, prompt: int = 3, completion: int = 2) -> FinishRecord:
    return FinishRecord(
        usage=UsageRecord(message_id=message_id, user_id=user.id, api_key_id=None, model="demo", provider="demo",
                          prompt_tokens=prompt, completion_tokens=completion, estimated=False, cost_usd=0.0,
                          day=datetime.now(UTC).date(), user_reserved=0, key_reserved=0),
        status="complete", content=content, ttft_ms=5, latency_ms=9, error=None,
        metadata={"finish_reason": "stop", "chunks": [len(content)]})


async def row(db: asyncpg.Pool, message_id: uuid.UUID) -> dict[str, Any]:
    r = await db.fetchrow("SELECT status, content, error, metadata, prompt_tokens, completion_tokens FROM messages "
                          "WHERE id = $1", message_id)
    return dict(r)


async def usage_count(db: asyncpg.Pool, message_id: uuid.UUID) -> int:
    return await db.fetchval("SELECT count(*) FROM usage WHERE message_id = $1", message_id)


def quarantined(directory: Path, kind: str = "finish") -> list[dict[str, Any]]:
    path = directory / f"{kind}.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def complete(content: str) -> dict[str, Any]:
    return {"status": "complete", "content": content, "error": None,
            "metadata": {"finish_reason": "stop", "chunks": [len(content)]}, "prompt_tokens": 3,
            "completion_tokens": 2}


def salvaged(content: str, prompt: int = 3, completion: int = 2, **flags: bool) -> dict[str, Any]:
    return {"status": "failed", "content": content, "error": NOT_STORED,
            "metadata": {"finish_reason": "error", "chunks": [len(content)], "quarantined": True, **flags},
            "prompt_tokens": prompt, "completion_tokens": completion}


# -- the finish write -----------------------------------------------------------------------------------

class RecordingWriter(FinishWriter):
    """The real finish writer, noting the contents of each statement it sends."""

    calls: list[list[str]]

    async def _write_batch(self, batch: list[FinishRecord]) -> None:
        self.calls.append([r.content for r in batch])
        await super()._write_batch(batch)


async def test_a_poison_record_in_a_finish_batch_fails_alone_and_is_saved_as_failed(db, database_url, user, tmp_path):
    ids = await placeholders(db, user, 4)
    quarantine = Quarantine(tmp_path / "quarantine")
    journal = FinishJournal(tmp_path / "journal", quarantine)
    writer = RecordingWriter(db, journal, quarantine, retry_s=5)
    writer.calls = []
    records = [finish(user, ids[0], "first"), finish(user, ids[1], "good"), finish(user, ids[2], "x\x00y"),
               finish(user, ids[3], "also good")]
    # hold the first reply's row, so its finish is in flight while the next three pile up behind it
    blocker, watcher = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT 1 FROM messages WHERE id = $1 FOR UPDATE", ids[0])
        first = asyncio.ensure_future(writer.save(records[0]))

        async def waiting() -> bool:
            return await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                          "AND query LIKE '%UPDATE messages SET status%'") == 1

        await wait_for(waiting)
        rest = [asyncio.ensure_future(writer.save(r)) for r in records[1:]]
        await blocker.execute("ROLLBACK")
        async with asyncio.timeout(10):
            await asyncio.gather(first, *rest)
    finally:
        blocker.terminate()
        watcher.terminate()
    assert writer.calls == [["first"], ["good", "x\x00y", "also good"], ["good"], ["x\x00y"], ["also good"],
                            ["x\ufffdy"]]
    assert [await row(db, i) for i in ids] == [complete("first"), complete("good"), salvaged("x\ufffdy"),
                                               complete("also good")]
    assert [await usage_count(db, i) for i in ids] == [1, 1, 1, 1]
    [entry] = quarantined(tmp_path / "quarantine")
    assert entry["kind"] == "finish" and entry["error"]["type"] == "CharacterNotInRepertoireError"
    assert entry["record"] == orjson.loads(record_to_json(records[2]))  # as sent, NUL and all
    assert quarantine.count("finish") == 1
    assert journal.pending() == []  # refused for good is never journaled


async def test_usage_out_of_range_is_clamped_flagged_and_saved_as_failed(db, user, tmp_path):
    [mid] = await placeholders(db, user, 1)
    quarantine = Quarantine(tmp_path)
    writer = FinishWriter(db, FinishJournal(tmp_path / "journal", quarantine), quarantine, retry_s=5)
    await writer.save(finish(user, mid, "ok", prompt=2**31, completion=-5))
    assert await row(db, mid) == salvaged("ok", prompt=2**31 - 1, completion=0, usage_suspect=True)
    assert [e["record"]["usage"]["prompt_tokens"] for e in quarantined(tmp_path)] == [2**31]


async def test_a_nul_in_an_upstream_reply_is_replaced_before_it_is_stored_and_the_next_start_succeeds(
        make_client, upstream, user, db, tmp_path):
    """The adapter replaces NUL (which PostgreSQL text cannot hold) before the reply is streamed or
    stored: the reply completes, nothing is quarantined or journaled, the next start is clean. (A record
    the database refuses anyway is quarantined: tests/test_background.py.)"""
    upstream.queue(Reply(openai_stream(["Hel\x00", "lo"], prompt_tokens=4)))
    env = {"OPENAI_BASE_URL": upstream.base_url, "OPENAI_API_KEY": "sk-up", "OPENAI_MODEL": "fake",
           "GATEWAY_DATA_DIR": str(tmp_path)}
    client = await make_client(**env)
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "model": "fake",
                                                                      "stream": True})
    events = parse_sse(await resp.read())
    assert [e.event for e in events][-3:] == ["usage", "done", "message"]
    mid = orjson.loads(events[0].data)["message_id"]
    assert "".join(orjson.loads(e.data)["delta"] for e in events if e.event == "message" and e.id) == "Hel\ufffdlo"
    got = await (await client.get(f"/api/messages/{mid}", headers=user.headers)).json()
    assert (got["status"], got["content"], got["error"]) == ("complete", "Hel\ufffdlo", None)
    assert await usage_count(db, uuid.UUID(mid)) == 1
    assert quarantined(tmp_path / "quarantine") == []
    assert list((tmp_path / "journal").glob("finish-*.jsonl")) == []
    again = await make_client(**env)
    assert (await again.get("/healthz")).status == 200


# -- replay ---------------------------------------------------------------------------------------------

async def test_start_up_applies_the_good_journal_records_and_quarantines_torn_and_poison_ones(
        make_client, user, db, tmp_path):
    ids = await placeholders(db, user, 3)
    good1, poison, good2 = finish(user, ids[0], "one"), finish(user, ids[1], "p\x00"), finish(user, ids[2], "two")
    torn = record_to_json(good2)[:40]  # a crash mid-append
    wrong = orjson.dumps({**asdict(good1), "surprise": 1})  # JSON, but not a finish record
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    path = journal_dir / "finish-1-deadbeef.jsonl"
    path.write_bytes(b"\n".join([record_to_json(good1), torn, record_to_json(poison), wrong, b"[1, 2]",
                                 record_to_json(good2)]) + b"\n")
    client = await make_client(GATEWAY_DATA_DIR=str(tmp_path))  # starts: the journal cannot stop it
    assert [await row(db, i) for i in ids] == [complete("one"), salvaged("p\ufffd"), complete("two")]
    assert [await usage_count(db, i) for i in ids] == [1, 1, 1]
    assert not path.exists()
    entries = quarantined(tmp_path / "quarantine")
    assert [e["record"] for e in entries] == [torn.decode(), orjson.loads(record_to_json(poison)), wrong.decode(),
                                              "[1, 2]"]
    assert [e["error"]["type"] for e in entries] == ["JSONDecodeError", "CharacterNotInRepertoireError",
                                                     "TypeError", "ValueError"]
    assert client.app[QUARANTINE].count("finish") == 4
    assert 'gateway_quarantined_total{kind="finish"} 4.0' in await (await client.get("/metrics")).text()


async def test_a_transient_failure_stops_replay_and_keeps_the_unsettled_lines(db, user, tmp_path):
    ids = await placeholders(db, user, 3)
    quarantine = Quarantine(tmp_path / "quarantine")
    journal = FinishJournal(tmp_path / "journal", quarantine)
    records = [finish(user, i, f"r{n}") for n, i in enumerate(ids)]
    for record in records:
        await journal.append(record)
    applied: list[str] = []

    async def database_goes_away(record: FinishRecord) -> None:
        if record.content == "r1":
            raise ConnectionRefusedError(errno.ECONNREFUSED, "database away")
        await finish_many(db, [record])
        applied.append(record.content)

    assert await journal.replay(database_goes_away) == 1
    [path] = journal.pending()
    assert path.read_bytes() == record_to_json(records[1]) + b"\n" + record_to_json(records[2]) + b"\n"
    assert applied == ["r0"] and quarantine.counts == {}

    async def database_back(record: FinishRecord) -> None:
        await finish_many(db, [record])
        applied.append(record.content)

    assert await journal.replay(database_back) == 2
    assert applied == ["r0", "r1", "r2"] and journal.pending() == []
    assert [(await row(db, i))["content"] for i in ids] == ["r0", "r1", "r2"]


# -- the sweep loop -------------------------------------------------------------------------------------

async def test_the_sweep_loop_survives_an_unexpected_exception(make_client, tmp_path, caplog):
    client = await make_client(SWEEP_S="0.05", GATEWAY_DATA_DIR=str(tmp_path))
    instance = client.app[INSTANCE]
    real_sweep = instance.sweep
    rounds: list[int] = []

    async def sweep() -> None:
        rounds.append(1)
        if len(rounds) == 1:
            raise orjson.JSONDecodeError("what the old loop died of", "{", 1)
        if len(rounds) == 2:
            raise RuntimeError("anything at all")
        await real_sweep()

    caplog.set_level(logging.ERROR, logger="gateway.fleet.instance")
    instance.sweep = sweep  # type: ignore[method-assign]

    async def three_rounds() -> bool:
        return len(rounds) >= 3

    await wait_for(three_rounds)
    assert instance._task is not None and not instance._task.done()
    failed = [r for r in caplog.records if r.getMessage() == "instance sweep failed"]
    assert [r.exc_info[0] for r in failed if r.exc_info] == [orjson.JSONDecodeError, RuntimeError]


async def test_a_torn_journal_line_met_by_a_running_sweep_is_quarantined_and_the_loop_goes_on(
        make_client, user, db, tmp_path):
    client = await make_client(SWEEP_S="0.05", GATEWAY_DATA_DIR=str(tmp_path))
    [mid] = await placeholders(db, user, 1, instance_id=client.app[INSTANCE].id)  # ours: not swept
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir(exist_ok=True)
    (journal_dir / "finish-2-torn.jsonl").write_bytes(b'{"usage": {"message_id": "12')
    quarantine = client.app[QUARANTINE]

    async def quarantined_once() -> bool:
        return quarantine.count("finish") == 1 and not list(journal_dir.glob("finish-*.jsonl"))

    await wait_for(quarantined_once)
    # the loop is alive: a record journaled after the torn one is applied by a later round
    (journal_dir / "finish-3-good.jsonl").write_bytes(record_to_json(finish(user, mid, "later")) + b"\n")

    async def applied() -> bool:
        return (await row(db, mid))["status"] == "complete"

    await wait_for(applied)
    assert quarantine.count("finish") == 1
    task = client.app[INSTANCE]._task
    assert task is not None and not task.done()
