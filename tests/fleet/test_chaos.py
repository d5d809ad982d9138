"""Chaos: instances as real processes, killed and cut off mid-reply.

- SIGKILL the instance generating a reply while a client follows it from the other: the client
  gets the reply's end within the sweep interval (SWEEP_S=1 here), and the row ends `interrupted`
  with its checkpointed partial content, counted once.
- Redis killed and started again (empty) mid-reply: both instances go on; the remote listener
  gets every event exactly once.
- A worker killed under `--workers 2` is restarted: tests/test_workers.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.support.chat import DONE, RETRY, complete_frames, row, stream_path, wait_finished, wire
from tests.support.common import User, wait_for
from tests.support.fleet import GatewayProcess, RedisServer, gateway_env, read_events, without_pings

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

TEXTS = ["Once ", "upon ", "a ", "time ", "there ", "was ", "a ", "stream."]
SWEEP_S = 1.0


async def start_pair(tmp_path: Path, gateways: list[GatewayProcess], database_url: str, redis: str,
                     upstream_url: str) -> tuple[GatewayProcess, GatewayProcess]:
    env = gateway_env(database_url, REDIS_URL=redis, OPENAI_BASE_URL=upstream_url, OPENAI_MODEL="fake",
                      SWEEP_S=str(SWEEP_S), CHECKPOINT_S="0.1")
    a, b = GatewayProcess(tmp_path / "a", env), GatewayProcess(tmp_path / "b", env)
    gateways.extend([a, b])
    await asyncio.gather(a.ready(), b.ready())
    return a, b


async def test_sigkill_of_the_generating_instance_ends_the_remote_listener_within_the_sweep(
        tmp_path, gateways, database_url, redis_url, stepped, user: User, db):
    up = await stepped(TEXTS, holds=(4,))  # three texts out, then it holds (until the test ends)
    a, b = await start_pair(tmp_path, gateways, database_url, redis_url, up.base_url)
    async with aiohttp.ClientSession() as http:
        accepted = await http.post(a.url + "/api/chat", json={"content": "then it dies"}, headers=user.headers)
        assert accepted.status == 202
        mid = (await accepted.json())["assistant_message_id"]
        on_b = await http.get(b.url + stream_path(mid), headers=user.headers)
        head = await read_events(on_b, 1 + 3)  # retry + metadata, 3 deltas: live from A through Redis
        assert head[0].startswith(RETRY + f"id: {mid}:0\nevent: metadata\n".encode())

        async def checkpointed() -> bool:
            return (await row(db, mid))["content"] == "".join(TEXTS[:3])

        await wait_for(checkpointed)
        a.kill()
        killed = time.monotonic()
        tail = without_pings(await asyncio.wait_for(on_b.read(), 10))
        waited = time.monotonic() - killed
        # the sweep (every SWEEP_S) finds A's lock gone; B's reader sees the row end at its next look
        assert waited < SWEEP_S + 1.0, waited
        saved = await row(db, mid)
        assert (saved["status"], saved["content"]) == ("interrupted", "".join(TEXTS[:3]))
        # what the listener got is the reply as saved: its live deltas, then the end from the row (a
        # replay's metadata differs: a swept row has no model, as gateway/store/instances.py leaves it)
        replay = await http.get(b.url + stream_path(mid), headers=user.headers)
        assert (await replay.read()).endswith(b"".join(head[1:]) + tail)
        assert b'"finish_reason":"interrupted"' in tail and tail.endswith(DONE)
        assert await db.fetchval("SELECT count(*) FROM usage WHERE message_id = $1", uuid.UUID(mid)) == 1
    up.release()


async def test_redis_killed_and_restarted_mid_reply_loses_nothing(
        tmp_path, gateways, database_url, private_redis: RedisServer, stepped, user: User, db):
    up = await stepped(TEXTS, holds=(3, 6))
    a, b = await start_pair(tmp_path, gateways, database_url, private_redis.url, up.base_url)
    async with aiohttp.ClientSession() as http:
        accepted = await http.post(a.url + "/api/chat", json={"content": "redis dies"}, headers=user.headers)
        mid = (await accepted.json())["assistant_message_id"]
        on_a = await http.get(a.url + stream_path(mid), headers=user.headers)
        on_b = await http.get(b.url + stream_path(mid), headers=user.headers)
        heads = [await read_events(r, 3) for r in (on_a, on_b)]  # retry + metadata, 2 deltas

        private_redis.stop()
        for gw in (a, b):
            async with http.get(gw.url + "/readyz") as ready:
                assert (ready.status, await ready.json()) == (200, {"status": "ok", "redis": "degraded"})
        up.step(3)  # three more texts while Redis is away
        mids = [await read_events(r, 3) for r in (on_a, on_b)]
        private_redis.start()
        up.step(6)
        tails = [without_pings(await r.read()) for r in (on_a, on_b)]
        saved = await wait_finished(db, mid)
        expected = wire(complete_frames(saved, TEXTS))
        for head, middle, tail in zip(heads, mids, tails, strict=True):
            assert b"".join(head + middle) + tail == expected  # on each: the retry line once, on the metadata
