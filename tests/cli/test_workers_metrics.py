"""`serve --workers 2`: /metrics answers for both workers, on the public port and on METRICS_PORT."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from gateway.observability.combined import combine
from tests.support.fleet import GatewayProcess, free_port, gateway_env

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

HEALTHZ_OK = re.compile(r'^gateway_http_requests_total\{method="GET",route="/healthz",status="200"\} (\S+)$', re.M)


def healthz_count(text: str) -> float:
    found = HEALTHZ_OK.findall(text)
    assert len(found) == 1, text
    return float(found[0])


async def twenty_then_scrapes(gw: GatewayProcess, metrics_url: str) -> list[float]:
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # a fresh connection each: the kernel spreads them over both workers
            async with session.get(gw.url + "/healthz", headers={"Connection": "close"}) as resp:
                assert resp.status == 200
        counts = []
        for _ in range(8):
            async with session.get(metrics_url, headers={"Connection": "close"}) as resp:
                assert resp.status == 200
                counts.append(healthz_count(await resp.text()))
        return counts


async def both_listening(gw: GatewayProcess) -> None:
    """ready() saw one worker answer; the other may still be starting."""
    async with asyncio.timeout(30):
        while gw.output().count("gateway on http://127.0.0.1:") < 2:
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("metrics_port", [False, True], ids=["public port", "METRICS_PORT"])
async def test_every_scrape_after_twenty_requests_counts_twenty_over_two_workers(
        tmp_path, database_url, gateways, metrics_port: bool):
    env = gateway_env(database_url, LOG_LEVEL="INFO")
    port = free_port()
    if metrics_port:
        env["METRICS_PORT"] = str(port)
    gw = GatewayProcess(tmp_path / "gw", env, "--workers", "2")
    gateways.append(gw)
    await gw.ready()
    await both_listening(gw)
    metrics_url = f"http://127.0.0.1:{port}/metrics" if metrics_port else gw.url + "/metrics"
    assert await twenty_then_scrapes(gw, metrics_url) == [20.0] * 8
    assert "Address already in use" not in gw.output()


def test_series_are_summed_across_workers_and_start_times_keep_the_earliest():
    one = ('# HELP r_total requests\n# TYPE r_total counter\nr_total{route="/a"} 3.0\nr_total{route="/b"} 1.0\n'
           '# HELP r_created requests\n# TYPE r_created gauge\nr_created{route="/a"} 200.0\n')
    two = ('# HELP r_total requests\n# TYPE r_total counter\nr_total{route="/a"} 4.0\nr_total{route="/c"} 2.0\n'
           '# HELP r_created requests\n# TYPE r_created gauge\nr_created{route="/a"} 100.0\n')
    assert combine([one, two]).decode() == (
        '# HELP r_total requests\n# TYPE r_total counter\nr_total{route="/a"} 7.0\nr_total{route="/b"} 1.0\n'
        'r_total{route="/c"} 2.0\n# HELP r_created requests\n# TYPE r_created gauge\nr_created{route="/a"} 100.0\n')
