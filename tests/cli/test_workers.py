"""`python -m gateway serve --workers N`: N processes
on one port, each its own instance; a killed worker is restarted; SIGTERM drains them all."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from gateway.cli.workers import worker_count
from tests.support.common import User
from tests.support.fleet import GatewayProcess, gateway_env, read_until

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)


def children(pid: int) -> set[int]:
    raw = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in raw.split()}


async def wait_children(pid: int, count: int, timeout: float = 30.0, gone: int | None = None) -> set[int]:
    """The parent's `count` children, once `gone` (a killed one, a zombie until reaped) is not among them."""
    async with asyncio.timeout(timeout):
        while len(found := children(pid)) != count or gone in found:
            await asyncio.sleep(0.05)
    return found


def test_workers_count_is_a_positive_number_or_auto():
    assert worker_count("3") == 3
    assert worker_count("auto") >= 1
    for bad in ("0", "-1", "two", ""):
        try:
            worker_count(bad)
        except ValueError as e:
            assert "--workers" in str(e)
        else:
            raise AssertionError(bad)


async def test_two_workers_share_one_port_a_killed_one_is_restarted_sigterm_drains_both(
        tmp_path, database_url, redis_url, gateways, user: User, db):
    gw = GatewayProcess(tmp_path / "gw", gateway_env(database_url, REDIS_URL=redis_url, DEMO_DELAY_MS="40",
                                                     DEMO_CHUNKS="30", SHUTDOWN_GRACE_S="10"), "--workers", "2")
    gateways.append(gw)
    await gw.ready()
    first = await wait_children(gw.proc.pid, 2)
    async with aiohttp.ClientSession() as session:
        # many connections, all answered, by both workers (the kernel spreads them over the port's sockets)
        for _ in range(20):
            async with session.get(gw.url + "/healthz") as resp:
                assert resp.status == 200

        # SIGKILL one worker: the parent starts another in its place, on the same port
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        again = await wait_children(gw.proc.pid, 2, gone=victim)
        assert victim not in again and len(again & first) == 1
        await gw.ready()
        assert "restarting it" in gw.output()

        # a reply streaming while the parent gets SIGTERM finishes (drain), then everything exits
        resp = await session.post(gw.url + "/api/chat", json={"content": "drain me", "stream": True},
                                  headers=user.headers)
        assert resp.status == 200
        head = await read_until(resp, b"event: metadata")
        gw.proc.send_signal(signal.SIGTERM)
        rest = await read_until(resp, b"data: [DONE]", timeout=30)
        resp.close()  # not a context manager: released here, or its connection leaks into a later test's GC
        body = head + rest
        assert b"event: done" in body and b'"finish_reason":"stop"' in body
    assert gw.proc.wait(30) == 0
    assert not Path(f"/proc/{gw.proc.pid}").exists() or children(gw.proc.pid) == set()
    for pid in again:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


async def test_workers_without_redis_warn_at_start(tmp_path, database_url, gateways):
    gw = GatewayProcess(tmp_path / "gw", gateway_env(database_url), "--workers", "2")
    gateways.append(gw)
    await gw.ready()
    await wait_children(gw.proc.pid, 2)
    assert "--workers 2 without REDIS_URL" in gw.output()


async def test_workers_without_database_url_share_one_embedded_postgresql(pg_dir, gateways):
    """The default install's path: no DATABASE_URL, so the parent starts the embedded PostgreSQL once
    and both workers use it; the first start's admin key (made once, whichever worker migrates
    first) serves turns on either; SIGTERM drains the workers and stops the database."""
    env = gateway_env("", BOOTSTRAP_ADMIN_KEY="true", LOG_LEVEL="INFO", DEMO_DELAY_MS="0")
    del env["DATABASE_URL"]
    gw = GatewayProcess(pg_dir / "gw", env, "--workers", "2")
    gateways.append(gw)
    await gw.ready(timeout=90)
    await wait_children(gw.proc.pid, 2)
    # ready() saw one worker answer; the other may still be starting
    async with asyncio.timeout(60):
        while (out := gw.output()).count("gateway on http://127.0.0.1:") < 2:
            await asyncio.sleep(0.1)
    assert out.count("gateway on http://127.0.0.1:") == 2
    assert out.count("embedded PostgreSQL running under") == 1
    keys = [line.strip() for line in out.splitlines() if line.startswith("    gwk_")]
    assert len(keys) == 1, out  # one admin key for the one database
    pidfile = pg_dir / "gw" / "data" / "pgdata" / "postmaster.pid"
    assert pidfile.exists()
    headers = {"Authorization": f"Bearer {keys[0]}"}
    async with aiohttp.ClientSession() as session:
        for i in range(12):  # fresh connections: the kernel spreads them over both workers' sockets
            async with session.post(gw.url + "/api/chat", headers={**headers, "Connection": "close"},
                                    json={"content": f"turn {i}"}) as resp:
                assert resp.status == 202, await resp.text()
        async with session.get(gw.url + "/api/threads?limit=50", headers=headers) as resp:
            assert len((await resp.json())["threads"]) == 12
    assert gw.stop() == 0
    assert not pidfile.exists()  # the parent stopped the embedded server it started
