"""Running the command-line interface as a subprocess against a test database."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

import gateway

# the tree under test: a subprocess imports this copy of `gateway`, not whichever checkout an
# editable install points at (a worktree's tests would otherwise run another tree's code)
SOURCE_ROOT = Path(gateway.__file__).resolve().parent.parent


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def cli_env(database_url: str, **overrides: str) -> dict[str, str]:
    """A clean environment: nothing from the developer's shell leaks into the run."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SOURCE_ROOT),
           "DATABASE_URL": database_url, "BOOTSTRAP_ADMIN_KEY": "false", "DEMO_DELAY_MS": "0", "DB_POOL_MIN": "1"}
    env.update(overrides)
    return env


async def run_cli(cwd: Path, env: dict[str, str], *args: str, timeout: float = 30) -> Run:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", *args, cwd=cwd, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return Run(await proc.wait(), out.decode(), err.decode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until_healthy(session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process,
                             log_path: Path, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        assert proc.returncode is None, "the server exited before it became healthy:\n" + log_path.read_text()
        try:
            async with session.get(url) as resp:
                if resp.status == 200 and await resp.json() == {"status": "ok"}:
                    return
        except aiohttp.ClientConnectionError:
            pass
        assert loop.time() < deadline, "the server did not become healthy in time:\n" + log_path.read_text()
        await asyncio.sleep(0.05)
