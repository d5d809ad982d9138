#!/usr/bin/env python3
"""The floor of an HTTP-terminating proxy in Python on this box, measured with the same harness
as the gateway: two proxies that do only what no gateway can skip, on the gateway's own upstream
client (`gateway/providers/http.py`), and nothing else (no auth, no limits, no accounting, no log).

- `aiohttp`: an aiohttp handler (the gateway's server) that reads the body, parses it, sets
  `model`, posts it upstream and writes the upstream's bytes back as they come, one write per read.
- `raw`: the same on an asyncio Protocol with httptools' request parser (no aiohttp request or
  response objects, no handler task per request): the lean server path's best case.

Both relay the upstream's SSE bytes unparsed, so their CPU per chunk is the floor of a proxy that
does not read what it relays. The gateway parses each event (it counts and checks what it
relays) and re-encodes it; that difference is the gateway's per-chunk work.

    .venv/bin/python bench/floor.py --kind aiohttp --compare PATH/TO/compare.py \\
        --python PATH/TO/bench-venv/bin/python -- --relay -c 1 -n 300 --warmup 30 --rounds 3

Everything after `--` goes to compare.py (this script adds --gateway-url, --gateway-pid and
--api-key). Loopback only; stops the proxy it starts. `--serve` runs only the proxy, in the
foreground (the harness runs it so).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httptools
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.providers.http import Connection, Upstream  # noqa: E402

MODEL = "bench-model"
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream", "Authorization": "Bearer bench"}
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")


async def post(upstream: Upstream, raw: bytes) -> Connection:
    """What no proxy that terminates HTTP can skip: the body parsed, `model` set, posted upstream."""
    body = orjson.loads(raw)
    body["model"] = MODEL
    return await upstream.post("/chat/completions", HEADERS, orjson.dumps(body), connect_timeout_s=5,
                               idle_timeout_s=30)


def aiohttp_app(upstream: Upstream) -> object:
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        conn = await post(upstream, await request.read())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        while data := await conn.read():
            await resp.write(data)
        conn.finish()
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


class RawProxy(asyncio.Protocol):
    """One client connection: httptools parses the requests, each is answered in order (chunked)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.worker = asyncio.ensure_future(self.serve())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.cancel()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.queue.put_nowait(b"".join(self.body))
        self.body = []

    async def serve(self) -> None:
        try:
            while True:
                raw = await self.queue.get()
                conn = await post(self.upstream, raw)
                assert self.transport is not None
                head = HEAD
                while data := await conn.read():
                    self.transport.write(head + b"%x\r\n%s\r\n" % (len(data), data))
                    head = b""
                conn.finish()
                self.transport.write(head + b"0\r\n\r\n")
        except Exception:
            # an upstream failure: the client sees its connection close (a failed request), not a hang
            if self.transport is not None:
                self.transport.close()
            raise


async def serve(kind: str, port: int, upstream_url: str) -> None:
    upstream = Upstream(upstream_url)
    if kind == "raw":
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: RawProxy(upstream), "127.0.0.1", port)
    else:
        from aiohttp import web
        runner = web.AppRunner(aiohttp_app(upstream), access_log=None)  # type: ignore[arg-type]
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("aiohttp", "raw"), required=True)
    p.add_argument("--port", type=int, default=18090)
    p.add_argument("--upstream-port", type=int, default=18000)
    p.add_argument("--compare", help="the harness's compare.py")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs the harness")
    p.add_argument("--serve", action="store_true", help="only run the proxy, in the foreground")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args()
    upstream_url = f"http://127.0.0.1:{a.upstream_port}/v1"
    if a.serve:
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(a.kind, a.port, upstream_url))
        else:
            uvloop.run(serve(a.kind, a.port, upstream_url))
        return 0
    if not a.compare:
        p.error("--compare is required unless --serve")
    proxy = subprocess.Popen([sys.executable, __file__, "--serve", "--kind", a.kind, "--port", str(a.port),
                              "--upstream-port", str(a.upstream_port)], stdout=subprocess.PIPE,
                             preexec_fn=lambda: os.sched_setaffinity(0, {1}))
    try:
        assert proxy.stdout is not None
        deadline = time.monotonic() + 30
        while proxy.stdout.readline().strip() != b"ready":
            if proxy.poll() is not None or time.monotonic() > deadline:
                print("the proxy did not start", file=sys.stderr)
                return 1
        rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
        return subprocess.run([a.python, a.compare, "--gateway-url", f"http://127.0.0.1:{a.port}",
                               "--gateway-pid", str(proxy.pid), "--api-key", "bench",
                               "--upstream-port", str(a.upstream_port), *rest]).returncode
    finally:
        proxy.terminate()
        proxy.wait(10)


if __name__ == "__main__":
    sys.exit(main())
