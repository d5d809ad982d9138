"""SIGHUP to a running `python -m gateway serve` (one process, and `--workers 2`) reads the
configuration file again instead of killing it; a reply streaming meanwhile finishes."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.support.common import User, wait_for
from tests.support.fleet import GatewayProcess, gateway_env, read_until

pytestmark = pytest.mark.processes  # starts gateway processes (see pyproject.toml)

BEFORE = '[models.alpha]\nprovider = "demo"\n\n[router]\ndefault = "alpha"\n'
AFTER = BEFORE + '\n[models.gamma]\nprovider = "demo"\n'
BROKEN = AFTER + '\n[models.delta]\nprovider = "demo"\nfallbacks = ["nobody"]\n'


async def model_ids(session: aiohttp.ClientSession, gw: GatewayProcess, user: User) -> list[str]:
    # a new connection each time: under --workers the kernel may hand it to either worker
    async with session.get(gw.url + "/v1/models", headers={**user.headers, "Connection": "close"}) as resp:
        assert resp.status == 200
        return sorted(m["id"] for m in (await resp.json())["data"])


def listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:`port` (each worker has its own, SO_REUSEPORT): a worker listens
    once its app has started, SIGHUP handler included."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[1] == f"0100007F:{port:04X}" and row.split()[3] == "0A")


async def reload_rows(db: asyncpg.Pool, path: Path) -> list[tuple[str, int]]:
    rows = await db.fetch("SELECT method, status FROM activity_log WHERE action = 'config.reloaded' AND path = $1 "
                          "ORDER BY id", str(path))
    return [(r["method"], r["status"]) for r in rows]


async def test_sighup_reloads_a_single_gateway_a_stream_in_flight_finishes_and_a_bad_file_is_one_log_line(
        tmp_path: Path, database_url: str, gateways: list[GatewayProcess], user: User, db: asyncpg.Pool) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(BEFORE)
    gw = GatewayProcess(tmp_path / "gw", gateway_env(database_url, GATEWAY_CONFIG=str(config), DEMO_DELAY_MS="40",
                                                     DEMO_CHUNKS="30", LOG_LEVEL="INFO"))
    gateways.append(gw)
    await gw.ready()
    async with aiohttp.ClientSession() as session:
        assert await model_ids(session, gw, user) == ["alpha", "demo"]
        resp = await session.post(gw.url + "/api/chat", json={"content": "across a reload", "stream": True},
                                  headers=user.headers)
        head = await read_until(resp, b"event: metadata")
        config.write_text(AFTER)
        gw.proc.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return "gamma" in await model_ids(session, gw, user)

        await wait_for(reloaded)
        body = head + await read_until(resp, b"data: [DONE]", timeout=30)
        resp.close()
        assert b'"model":"alpha","provider":"demo"' in body and b'"finish_reason":"stop"' in body

        config.write_text(BROKEN)
        gw.proc.send_signal(signal.SIGHUP)

        async def refused() -> bool:
            return (await reload_rows(db, config))[-1:] == [("SIGHUP", 422)]

        await wait_for(refused)
        assert await model_ids(session, gw, user) == ["alpha", "demo", "gamma"]  # the running file is kept
    assert gw.proc.poll() is None
    applied = [line for line in gw.output().splitlines() if "configuration reloaded" in line]
    assert len(applied) == 1 and applied[0].endswith(f"configuration reloaded from {config}: models added gamma")
    refusals = [line for line in gw.output().splitlines() if "configuration not reloaded" in line]
    assert len(refusals) == 1
    assert refusals[0].endswith(f"configuration not reloaded, the running one is kept: GATEWAY_CONFIG: {config} "
                                "line 12: [models.delta] fallback 'nobody' is not a declared model")
    assert await reload_rows(db, config) == [("SIGHUP", 200), ("SIGHUP", 422)]
    assert gw.stop() == 0


async def test_sighup_to_the_parent_of_two_workers_reloads_both_and_kills_neither(
        tmp_path: Path, database_url: str, gateways: list[GatewayProcess], user: User, db: asyncpg.Pool) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(BEFORE)
    gw = GatewayProcess(tmp_path / "gw", gateway_env(database_url, GATEWAY_CONFIG=str(config)), "--workers", "2")
    gateways.append(gw)
    await gw.ready()

    async def both_listening() -> bool:  # ready answers as soon as one of the two does
        return listeners(gw.port) == 2

    await wait_for(both_listening, timeout=30)
    workers = set(Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split())
    async with aiohttp.ClientSession() as session:
        config.write_text(AFTER)
        gw.proc.send_signal(signal.SIGHUP)

        async def both() -> bool:
            return await reload_rows(db, config) == [("SIGHUP", 200), ("SIGHUP", 200)]  # one row per worker

        await wait_for(both)
        for _ in range(10):
            assert await model_ids(session, gw, user) == ["alpha", "demo", "gamma"]
    assert gw.proc.poll() is None
    assert set(Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()) == workers
    assert gw.stop() == 0
