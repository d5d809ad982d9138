"""The floor proxies of bench/floor.py relay exactly what the upstream sends, so what the benchmark
measures through them is a proxy's cost and nothing less: each, started as the harness starts it,
answers a streamed request with the upstream's bytes for `bench-model` (whatever model was asked),
twice on one keep-alive connection."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.common import REPO_ROOT
from tests.support.processes import free_port

pytestmark = pytest.mark.processes  # the proxies and the upstream run as the benchmark runs them

BODY = {"model": "anything", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def _started(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.communicate(timeout=10)  # and closes its stderr pipe


async def _until_up(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        try:
            async with session.post(url, json=BODY) as resp:
                await resp.read()
                return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered")


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    port = free_port()
    proc = _started("bench/upstream.py", "--port", str(port), "--chunks", "5")
    try:
        async with aiohttp.ClientSession() as session:
            await _until_up(session, f"http://127.0.0.1:{port}/v1/chat/completions", proc)
        yield port
    finally:
        _stop(proc)


@pytest.mark.parametrize("kind", ["aiohttp", "raw"])
async def test_a_floor_proxy_relays_the_upstream_reply_byte_for_byte(upstream: int, kind: str) -> None:
    port = free_port()
    proc = _started("bench/floor.py", "--serve", "--kind", kind, "--port", str(port),
                          "--upstream-port", str(upstream))
    try:
        async with aiohttp.ClientSession() as session:
            direct_body = {**BODY, "model": "bench-model"}
            async with session.post(f"http://127.0.0.1:{upstream}/v1/chat/completions", json=direct_body) as resp:
                direct = await resp.read()
            assert direct.count(b'"delta":{"content":') == 5 and direct.endswith(b"data: [DONE]\n\n")
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            await _until_up(session, url, proc)
            for _ in range(2):  # the same keep-alive connection
                async with session.post(url, json=BODY) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"] == "text/event-stream"
                    assert await resp.read() == direct
    finally:
        _stop(proc)
