"""What survives a stop: graceful shutdown of a real server process (SIGTERM), and the finish
write across a database restart (retried, else journaled to disk and replayed exactly once).

The database tests stop and restart a PRIVATE embedded PostgreSQL, never the session's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.generation.journal import record_from_json
from gateway.providers.demo import demo_reply
from gateway.store.db import create_pool, migrate, start_embedded, stop_embedded
from gateway.store.keys import create_user_with_key
from gateway.store.messages import finish_many
from tests.support.chat import (
    PROMPT_TOKENS,
    TEXTS,
    MakeUpstream,
    accept,
    complete_frames,
    gated_client,
    open_listeners,
    read_blocks,
    stopped_frames,
    wire,
)
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import parse_sse
from tests.support.processes import ROOT, free_port, run_cli, wait_healthy

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

# -- graceful shutdown of a real server process --------------------------------------------------------


async def test_sigterm_interrupts_open_streams_saves_them_and_exits_cleanly(database_url, db, tmp_path):
    port = free_port()
    # only what a process needs from ours: no provider keys or config that would change the default model
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")}
    env.update({"DATABASE_URL": database_url, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port),
                "DEMO_CHUNKS": "200", "DEMO_DELAY_MS": "20", "SHUTDOWN_GRACE_S": "0.5",
                "BOOTSTRAP_ADMIN_KEY": "false", "GATEWAY_DATA_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"})
    key = (await run_cli(env, "keys", "create", "--name", "x")).strip().splitlines()[-1]
    with open(tmp_path / "server.log", "wb") as log_file:  # the server writes to its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "serve", cwd=ROOT, env=env,
                                                    stdout=log_file, stderr=asyncio.subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    prompts = [f"tell me story number {i}" for i in range(3)]
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            await wait_healthy(session, base, proc)
            streams = [await session.post(base + "/api/chat", json={"content": p, "stream": True}) for p in prompts]
            assert [s.status for s in streams] == [200] * 3
            heads = [await read_blocks(s, 1 + 3) for s in streams]  # retry + metadata, 3 deltas: mid-reply
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                bodies = [b"".join(h) + await s.read() for h, s in zip(heads, streams, strict=True)]
                assert await proc.wait() == 0
        for prompt, body in zip(prompts, bodies, strict=True):
            events = parse_sse(body)
            mid = events[0].id.rpartition(":")[0]
            received = sum(e.event == "message" and e.id is not None for e in events)
            saved = await db.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(mid))
            deltas = demo_reply(prompt, 200)[:received]
            assert 3 <= received < 200  # cut mid-reply, after what the client had read before the signal
            assert (saved["status"], saved["content"]) == ("interrupted", "".join(deltas))
            assert body == wire(stopped_frames(saved, prompt, deltas, "interrupted"))
            assert await db.fetchval("SELECT count(*) FROM usage WHERE message_id = $1", saved["id"]) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- the finish write across a database restart ---------------------------------------------------------

@dataclass
class PrivatePostgres:
    """An embedded PostgreSQL of this module's own, which its tests stop and start at will."""

    directory: Path
    server: Any = None

    @property
    def url(self) -> str:
        return self.server.get_uri()

    async def start(self) -> None:
        self.server = await asyncio.to_thread(start_embedded, self.directory)

    async def stop(self) -> None:
        await asyncio.to_thread(stop_embedded, self.server)  # pg_ctl stop (fast): connections are cut

    @contextlib.asynccontextmanager
    async def down(self) -> AsyncIterator[None]:
        """Stopped inside the block, running again after it (also when the block fails, so the
        apps of the test close against a live database)."""
        await self.stop()
        try:
            yield
        finally:
            await self.start()


@pytest.fixture(scope="module")
async def private_pg() -> AsyncIterator[PrivatePostgres]:
    # a directory of its own, not pytest's numbered temp dirs (which other pytest runs prune)
    with tempfile.TemporaryDirectory(prefix="gw-private-pg-") as directory:
        pg = PrivatePostgres(Path(directory))
        await pg.start()
        try:
            conn = await asyncpg.connect(pg.url)
            await migrate(conn)
            await conn.close()
            yield pg
        finally:
            await pg.stop()


async def private_user(url: str) -> User:
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        user_id = uuid.uuid4()
        _, key = await create_user_with_key(pool, "durable", ["chat"], user_id)
        return User(user_id, key)
    finally:
        await pool.close()


Rows = list[tuple[Any, ...]]


async def accounting(pool: asyncpg.Pool, user: User) -> tuple[Rows, Rows, Rows]:
    """The user's assistant rows, usage rows and daily totals, for exact comparison."""
    replies = await pool.fetch("SELECT id, status, content FROM messages WHERE user_id = $1 AND role = 'assistant'",
                               user.id)
    usage = await pool.fetch("SELECT message_id, prompt_tokens, completion_tokens FROM usage WHERE user_id = $1",
                             user.id)
    daily = await pool.fetch("SELECT tokens, requests FROM daily_usage WHERE user_id = $1", user.id)
    return [tuple(r) for r in replies], [tuple(r) for r in usage], [tuple(r) for r in daily]


def saved_once(mid: str) -> tuple[Rows, Rows, Rows]:
    """The accounting of one complete reply from the gated upstream, counted once."""
    message_id = uuid.UUID(mid)
    return ([(message_id, "complete", "".join(TEXTS))], [(message_id, PROMPT_TOKENS, len(TEXTS))],
            [(PROMPT_TOKENS + len(TEXTS), 1)])


async def test_finish_write_outlasts_a_database_restart_and_saves_once(private_pg, gated, make_client, tmp_path,
                                                                       caplog):
    user = await private_user(private_pg.url)
    up = await gated(TEXTS, hold_at=3)
    client = await gated_client(make_client, up, DATABASE_URL=private_pg.url, FINISH_RETRY_S="20", SWEEP_S="1000",
                                GATEWAY_DATA_DIR=str(tmp_path))
    mid = (await accept(client, user, "survive this"))["assistant_message_id"]
    listener = (await open_listeners(client, user, mid, 1))[0]

    caplog.set_level(logging.WARNING, logger="gateway.generation.task")

    async def retrying() -> bool:
        return any(f"finish write for {mid} failed" in r.getMessage() for r in caplog.records)

    async with private_pg.down():
        up.release()  # the reply ends while the database is down
        await wait_for(retrying)
    async with asyncio.timeout(10):
        body = await listener.read()  # the listener's end comes once the reply is saved

    pool = await create_pool(private_pg.url, min_size=1, max_size=2)
    try:
        assert await accounting(pool, user) == saved_once(mid)
        saved = await pool.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(mid))
        assert body == wire(complete_frames(saved, TEXTS))
    finally:
        await pool.close()
    assert not (tmp_path / "journal").exists() or not list((tmp_path / "journal").iterdir())


@dataclass
class Journaled:
    user: User
    mid: str
    body: bytes  # what the reply's listener received
    line: bytes  # the journal's one record


async def journal_one_reply(pg: PrivatePostgres, gated: MakeUpstream, make_client: MakeClient, data_dir: Path,
                            sweep_s: str) -> Journaled:
    """A reply that ends while the database is down for longer than FINISH_RETRY_S: journaled,
    its listener answered in full anyway. The database is running again on return."""
    user = await private_user(pg.url)
    up = await gated(TEXTS, hold_at=3)
    client = await gated_client(make_client, up, DATABASE_URL=pg.url, FINISH_RETRY_S="0.5", SWEEP_S=sweep_s,
                                GATEWAY_DATA_DIR=str(data_dir))
    mid = (await accept(client, user, "keep me on disk"))["assistant_message_id"]
    listener = (await open_listeners(client, user, mid, 1))[0]
    async with pg.down():
        up.release()
        async with asyncio.timeout(10):
            body = await listener.read()  # journaled: the listener is not kept waiting for the database
        journal = list((data_dir / "journal").glob("finish-*.jsonl"))
        assert len(journal) == 1
        lines = journal[0].read_bytes().splitlines()
        assert len(lines) == 1
        record = record_from_json(lines[0])
        assert (str(record.message_id), record.usage.user_id, record.status, record.content) == (
            mid, user.id, "complete", "".join(TEXTS))
    return Journaled(user, mid, body, lines[0])


async def check_replayed_once(pg: PrivatePostgres, journaled: Journaled, data_dir: Path,
                              swept: bool = False) -> None:
    user, mid = journaled.user, journaled.mid
    pool = await create_pool(pg.url, min_size=1, max_size=2)
    try:
        expected = saved_once(mid)
        if swept:  # counted once, as the sweep's estimate of the checkpointed content (none: it was short)
            usage = await pool.fetchrow("SELECT prompt_tokens, completion_tokens, estimated FROM usage "
                                        "WHERE message_id = $1", uuid.UUID(mid))
            assert usage["estimated"] is True
            expected = (expected[0], [(uuid.UUID(mid), usage["prompt_tokens"], usage["completion_tokens"])],
                        [(usage["prompt_tokens"] + usage["completion_tokens"], 1)])
        assert await accounting(pool, user) == expected
        saved = await pool.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(mid))
        assert "swept" not in saved["metadata"] and saved["metadata"]["finish_reason"] == "stop"
        assert journaled.body == wire(complete_frames(saved, TEXTS))
        assert list((data_dir / "journal").glob("finish-*.jsonl")) == []
        # the same line replayed again changes nothing
        assert await finish_many(pool, [record_from_json(journaled.line)]) == (0, 0)
        assert await accounting(pool, user) == expected
    finally:
        await pool.close()


async def test_journaled_finish_is_replayed_by_the_next_instance_at_start_exactly_once(
        private_pg, gated, make_client, tmp_path, caplog):
    journaled = await journal_one_reply(private_pg, gated, make_client, tmp_path, sweep_s="1000")
    # the first instance lost its lock with the restart and, sweeping rarely, has not retaken it:
    # the new one takes its row for dead (interrupted, swept), then the replayed finish wins over that
    caplog.set_level(logging.WARNING, logger="gateway.fleet.instance")
    await make_client(DATABASE_URL=private_pg.url, SWEEP_S="1000", GATEWAY_DATA_DIR=str(tmp_path))
    assert any(r.getMessage().endswith("is gone: 1 live replies interrupted") for r in caplog.records)
    # the sweep settled the reply to an estimate (reservation back, counted once); the replayed
    # finish then gives the row its real content, and the usage stays counted once
    await check_replayed_once(private_pg, journaled, tmp_path, swept=True)


async def test_journaled_finish_is_replayed_by_its_own_instance_once_the_database_is_back(
        private_pg, gated, make_client, tmp_path):
    journaled = await journal_one_reply(private_pg, gated, make_client, tmp_path, sweep_s="0.1")

    async def replayed() -> bool:
        return not list((tmp_path / "journal").glob("finish-*.jsonl"))

    await wait_for(replayed)
    await check_replayed_once(private_pg, journaled, tmp_path)


async def test_finish_write_cut_mid_query_by_a_database_shutdown_is_retried(private_pg, gated, make_client,
                                                                            tmp_path):
    user = await private_user(private_pg.url)
    up = await gated(TEXTS, hold_at=3)
    client = await gated_client(make_client, up, DATABASE_URL=private_pg.url, FINISH_RETRY_S="20", SWEEP_S="1000",
                                GATEWAY_DATA_DIR=str(tmp_path))
    mid = (await accept(client, user, "mid-query"))["assistant_message_id"]
    listener = (await open_listeners(client, user, mid, 1))[0]
    # hold the reply's row locked, so that the finish write is in flight, waiting, when the server stops
    blocker = await asyncpg.connect(private_pg.url)
    watcher = await asyncpg.connect(private_pg.url)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT 1 FROM messages WHERE id = $1 FOR UPDATE", uuid.UUID(mid))
        up.release()

        async def finish_write_waits() -> bool:
            return await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                          "AND query LIKE '%UPDATE messages SET status%'") == 1

        await wait_for(finish_write_waits)
        async with private_pg.down():
            pass  # the server terminates every session, the waiting finish write's among them
    finally:
        blocker.terminate()
        watcher.terminate()
    async with asyncio.timeout(10):
        body = await listener.read()
    pool = await create_pool(private_pg.url, min_size=1, max_size=2)
    try:
        assert await accounting(pool, user) == saved_once(mid)
        saved = await pool.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(mid))
        assert body == wire(complete_frames(saved, TEXTS))
    finally:
        await pool.close()
