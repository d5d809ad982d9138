"""Fleet test parts: a private Redis server (or REDIS_URL), gateway instances as real processes.

Redis: `REDIS_URL` when given, else Debian's `redis-server` started on a free port with
persistence off (`--save '' --appendonly no`), so a restart comes back empty, as a lost cache
node would. Tests that stop and start Redis always get a private one. Never skipped: without
the binary these fail, and say how to install it.

Instances: `python -m gateway serve` subprocesses on one database (`GatewayProcess`), for what an
in-process app cannot show: SIGKILL, workers, a real proxy in front.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.common import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")


class RedisServer:
    """A private redis-server: `stop()` and `start()` again on the same port, empty (no persistence)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise AssertionError("redis-server is missing: apt-get install redis-server (.ci/run does)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # as a crash would: nothing saved, connections cut
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


# -- the gateway as a process ------------------------------------------------------------------------

def gateway_env(database_url: str, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GATEWAY_CONFIG")}
    base.update({"DATABASE_URL": database_url, "BOOTSTRAP_ADMIN_KEY": "false", "DEMO_DELAY_MS": "0",
                 "DB_POOL_MIN": "1", "SHUTDOWN_GRACE_S": "2", "LOG_LEVEL": "WARNING",
                 # this tree's gateway package, for the subprocess too
                 "PYTHONPATH": str(REPO_ROOT)})
    base.update(env)
    return base


class GatewayProcess:
    """`python -m gateway serve [args]` on a free port; `kill()` is SIGKILL, `stop()` is SIGTERM."""

    def __init__(self, workdir: Path, env: dict[str, str], *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(workdir / "gateway.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            env={**env, "GATEWAY_DATA_DIR": str(workdir / "data")}, cwd=workdir, stdout=self.log,
            stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    async with session.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"gateway not ready after {timeout} s:\n{self.output()}")
                await asyncio.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        return (self.workdir / "gateway.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture
async def gateways(tmp_path: Path) -> AsyncIterator[list[GatewayProcess]]:
    """Processes a test starts (append them): stopped at the end, whatever happened."""
    started: list[GatewayProcess] = []
    yield started
    for gw in started:
        gw.stop()


async def read_until(resp: aiohttp.ClientResponse, marker: bytes, timeout: float = 10.0) -> bytes:
    """Bytes from `resp` until `marker` has arrived (inclusive of everything read so far)."""
    got = b""
    async with asyncio.timeout(timeout):
        while marker not in got:
            chunk = await resp.content.readany()
            if not chunk:
                break
            got += chunk
    return got


PING = b": ping\n\n"
_PINGS = re.compile(rb"(?:^|(?<=\n\n))(?:: ping\n\n)+")


def without_pings(raw: bytes) -> bytes:
    """`raw` without its keep-alive blocks (whole `: ping` blocks only): each connection pings on its
    own clock, so where they fall is timing; every other byte is still compared exactly."""
    return _PINGS.sub(b"", raw)


async def read_events(resp: aiohttp.ClientResponse, count: int, timeout: float = 30.0) -> list[bytes]:
    """The next `count` SSE blocks that are not pings, each with its blank-line terminator (the
    first block of a response starts with the `retry:` line). Fails after `timeout` rather than
    waiting for a block that never comes."""
    out: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(out) < count:
            block = await resp.content.readuntil(b"\n\n")
            if block != PING:
                out.append(block)
    return out


def parse_events(raw: bytes) -> list[dict[str, Any]]:
    """SSE blocks as dicts of their fields (pings and retry lines included as they come)."""
    out = []
    for block in raw.split(b"\n\n"):
        if block:
            fields: dict[str, Any] = {}
            for line in block.split(b"\n"):
                name, _, value = line.partition(b": ")
                fields[name.decode()] = value
            out.append(fields)
    return out


class SteppedUpstream:
    """An OpenAI-compatible upstream on loopback that streams `texts` and waits, before the piece
    numbered k (the role chunk is piece 0, text i is piece i + 1), until the test calls `step(k)`.
    `pieces`: a stream of the test's own instead (e.g. fakes.openai_reasoning_stream)."""

    def __init__(self, texts: list[str], holds: tuple[int, ...] = (), pieces: list[bytes] | None = None) -> None:
        from aiohttp import web

        from tests.support.fakes import openai_stream

        self.texts = texts
        self.pieces = openai_stream(texts, prompt_tokens=7) if pieces is None else pieces
        self.gates = {k: asyncio.Event() for k in holds}
        self.requests = 0
        self.server: Any = None
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))

    def step(self, k: int) -> None:
        self.gates[k].set()

    def release(self) -> None:
        for gate in self.gates.values():
            gate.set()

    async def chat(self, request: Any) -> Any:
        from aiohttp import web

        await request.read()
        self.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, piece in enumerate(self.pieces):
            if i in self.gates:
                await self.gates[i].wait()
            await resp.write(piece)
        await resp.write_eof()
        return resp


@pytest.fixture
def stepped(aiohttp_server: Any) -> Any:
    async def make(texts: list[str], holds: tuple[int, ...] = (),
                   pieces: list[bytes] | None = None) -> SteppedUpstream:
        fake = SteppedUpstream(texts, holds, pieces)
        fake.server = await aiohttp_server(fake.app)
        return fake

    return make


# -- Debian's nginx in front ----------------------------------------------------------------------------

NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{site}
}}
"""

# the README's deployment section shows this block, one reason per line (keep the two in step)
NGINX_SITE = """\
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    upstream gateway {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gateway;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            client_max_body_size 2m;
        }}
    }}"""


class Nginx:
    """Debian's nginx (/usr/sbin/nginx) on a free port, round-robin over `backends`, config in `tmp`."""

    def __init__(self, tmp: Path, backends: list[int]) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise AssertionError("nginx is missing: apt-get install nginx (.ci/run does)")
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
        # as root, the workers would switch to nobody, who cannot write the temp dirs: stay this user
        user = f"user {pwd_name()};\n" if os.geteuid() == 0 else ""
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, site=NGINX_SITE.format(
            servers=servers, port=self.port)))
        self.tmp = tmp
        self.proc = subprocess.Popen([binary, "-c", str(self.conf), "-p", str(tmp), "-e", str(tmp / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, proc=self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def pwd_name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
