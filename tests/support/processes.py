"""Gateway subprocesses started through the CLI, and waiting for them to be healthy."""

from __future__ import annotations

import asyncio
import socket
import sys

import aiohttp

from tests.support.common import REPO_ROOT, wait_for

ROOT = REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_cli(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def wait_healthy(session: aiohttp.ClientSession, base: str, proc: asyncio.subprocess.Process) -> None:
    async def up() -> bool:
        assert proc.returncode is None, "the server exited at start"
        try:
            async with session.get(base + "/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await wait_for(up, timeout=20)
