"""Checkpoints of live replies and what a crash leaves.

A live reply's partial content is saved every CHECKPOINT_S; after kill -9 the sweep of the next
instance marks the reply interrupted with that content, and a client resuming from whatever id it
last saw gets the closing events numbered after it — never a 204 that hides the outcome.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.providers.base import estimate_tokens
from gateway.providers.demo import demo_reply
from tests.support.chat import MakeUpstream, gated_client, read_blocks
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import parse_sse
from tests.support.processes import ROOT, free_port, run_cli, wait_healthy

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)


async def message_row(db: asyncpg.Pool, mid: str | uuid.UUID) -> asyncpg.Record:
    return await db.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(str(mid)))


async def test_a_live_reply_is_checkpointed_while_it_streams_and_the_finish_replaces_it(
        gated: MakeUpstream, make_client: MakeClient, user: User, db: asyncpg.Pool) -> None:
    texts = ["Hel", "lo", " wor", "ld"]
    up = await gated(texts, hold_at=2)  # "Hel" and "lo" out, the rest held
    client = await gated_client(make_client, up, CHECKPOINT_S="0.05")
    resp = await client.post("/api/chat", json={"content": "hi", "stream": True}, headers=user.headers)
    seen = await read_blocks(resp, 1 + 2)  # retry + metadata, two deltas
    mid = parse_sse(seen[0])[0].id.rpartition(":")[0]

    async def checkpointed() -> bool:
        row = await message_row(db, mid)
        return row["content"] == "Hello"

    await wait_for(checkpointed)
    row = await message_row(db, mid)
    assert row["status"] == "streaming"
    assert (row["metadata"]["chunks"], row["metadata"]["checkpoint_seq"]) == ([3, 2], 2)
    up.release()
    await resp.read()

    async def finished() -> bool:
        return (await message_row(db, mid))["status"] == "complete"

    await wait_for(finished)
    row = await message_row(db, mid)
    assert row["content"] == "Hello world"
    assert row["metadata"]["chunks"] == [3, 2, 4, 2] and "checkpoint_seq" not in row["metadata"]


async def test_an_idle_gateway_writes_no_checkpoints(make_client: MakeClient, user: User) -> None:
    client = await make_client(CHECKPOINT_S="0.05")
    checkpoints = client.app[__import__("gateway.state", fromlist=["GENERATIONS"]).GENERATIONS].checkpoints
    assert await checkpoints.checkpoint() == 0
    assert checkpoints.written == 0


async def test_after_kill_9_the_reply_keeps_its_checkpoint_and_a_resume_gets_the_outcome(
        database_url: str, db: asyncpg.Pool, make_client: MakeClient, tmp_path: Any) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")}
    env.update({"DATABASE_URL": database_url, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port),
                "DEMO_CHUNKS": "400", "DEMO_DELAY_MS": "10", "CHECKPOINT_S": "0.05", "PYTHONPATH": str(ROOT),
                "BOOTSTRAP_ADMIN_KEY": "false", "GATEWAY_DATA_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"})
    config = tmp_path / "gateway.toml"
    config.write_text("[limits]\ndaily_tokens = 1000000\n")  # so the reply reserves its worst case
    env["GATEWAY_CONFIG"] = str(config)
    key = (await run_cli(env, "keys", "create", "--name", "crash")).strip().splitlines()[-1]
    with open(tmp_path / "server.log", "wb") as log_file:  # the server writes to its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "serve", cwd=ROOT, env=env,
                                                    stdout=log_file, stderr=asyncio.subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    prompt_text = prompt = "a long story please"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            await wait_healthy(session, base, proc)
            stream = await session.post(base + "/api/chat", json={"content": prompt, "stream": True})
            seen = await read_blocks(stream, 1 + 40)  # retry + metadata, 40 deltas
            mid = parse_sse(seen[0])[0].id.rpartition(":")[0]

            async def checkpointed() -> bool:
                return len((await message_row(db, mid))["content"]) > 0

            await wait_for(checkpointed)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            stream.close()
        last_seen = parse_sse(b"".join(seen))[-1].id
        assert last_seen == f"{mid}:40"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    row = await message_row(db, mid)
    assert row["status"] == "streaming"  # the dead instance never finished it
    user_id = row["user_id"]
    reserved = row["metadata"]["reservation"]["user_reserved"]
    assert reserved > 0 and await db.fetchval(
        "SELECT reserved FROM daily_usage WHERE user_id = $1", user_id) == reserved
    saved_chunks = row["metadata"]["checkpoint_seq"]
    deltas = demo_reply(prompt, 400)
    assert row["content"] == "".join(deltas[:saved_chunks])  # a checkpoint is an exact prefix

    # the next instance sweeps the dead one's reply: interrupted, with the checkpointed content
    client = await make_client(SWEEP_S="0.1")

    async def is_swept() -> bool:  # at its start, or at the next sweep once the dead lock is gone
        return (await message_row(db, mid))["status"] != "streaming"

    await wait_for(is_swept)
    swept = await message_row(db, mid)
    assert swept["status"] == "interrupted" and swept["metadata"]["swept"] is True
    assert swept["content"] == row["content"] and len(swept["content"]) > 0
    # its usage settled once, to an estimate: the reservation handed back, the estimate counted
    usage = await db.fetch("SELECT * FROM usage WHERE message_id = $1", uuid.UUID(mid))
    completion = estimate_tokens(swept["content"])
    prompt = estimate_tokens(prompt_text)
    assert [(u["prompt_tokens"], u["completion_tokens"], u["estimated"]) for u in usage] == [(prompt, completion, True)]
    day = await db.fetchrow("SELECT tokens, reserved FROM daily_usage WHERE user_id = $1", user_id)
    assert (day["tokens"], day["reserved"]) == (prompt + completion, 0)
    assert (swept["prompt_tokens"], swept["completion_tokens"]) == (prompt, completion)
    assert "reservation" not in swept["metadata"] and swept["metadata"]["estimated"] is True
    token_headers = {"Authorization": f"Bearer {key}"}
    # a resume from the last id the client saw: the closing events, numbered after it
    resumed = await client.get(f"/api/messages/{mid}/stream", headers={**token_headers, "Last-Event-ID": last_seen})
    assert resumed.status == 200
    events = parse_sse(await resumed.read())
    assert [(e.id, e.event) for e in events if e.id] == [(f"{mid}:41", "usage"), (f"{mid}:42", "done")]
    assert '"finish_reason":"interrupted"' in events[-2].data
    assert events[-3].data == ('{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,"estimated":true}'
                               % (prompt, completion, prompt + completion))
    # and from the start: the checkpointed deltas with their live ids, then the outcome
    whole = parse_sse(await (await client.get(f"/api/messages/{mid}/stream", headers=token_headers)).read())
    ids = [e.id for e in whole if e.id]
    assert ids == [f"{mid}:{i}" for i in range(saved_chunks + 3)]
