"""What the fleet costs: two instances on one PostgreSQL and one Redis, measured.

    listeners  a reply generating on instance A, one listener on A and one on B (through Redis):
               the time-to-first-token and per-chunk latency B's listener adds over A's, p50/p99
    fanout     one reply, N listeners split over A and B (default 2,000): all complete, identical,
               and how late the first and last events reach them
    workers    req/s at c=64 against `serve --workers 1` and `--workers 2` (bench/load.py, native)
    redis      Redis memory per reply stream (INFO used_memory, before and after K replies)

Everything on 127.0.0.1: a private redis-server and bench/upstream.py on free ports, the gateway
as `python -m gateway serve` subprocesses, a fresh database on --database-url (dropped at the
end). Prints a markdown table (and, with --json-out, the raw figures). Nothing is pinned: on a
small machine the load generator, the gateways, Redis and PostgreSQL share the cores.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/fleet.py
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
CONFIG = """\
[providers.bench]
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
api_key = "bench"

[models.bench-model]
provider = "bench"
upstream = "bench-model"
"""


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Procs:
    """Every process the bench starts, stopped at the end (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - the process holds it
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop_all(self, keep: subprocess.Popen[bytes] | None = None) -> None:
        for proc in reversed(self.procs):
            if proc is not keep:
                self.stop(proc)
        self.procs = [keep] if keep is not None else []


def wait_http(url: str, proc: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {limit_s} s")


class Bench:
    def __init__(self, a: argparse.Namespace, tmp: Path, procs: Procs, database_url: str) -> None:
        self.a = a
        self.tmp = tmp
        self.procs = procs
        self.database_url = database_url
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.key = ""
        self.redis_proc: subprocess.Popen[bytes] | None = None

    def env(self, upstream_port: int, **extra: str) -> dict[str, str]:
        config = self.tmp / f"gateway-{upstream_port}.toml"
        config.write_text(CONFIG.format(port=upstream_port))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "GROQ_", "ANTHROPIC_"))}
        env.update(DATABASE_URL=self.database_url, GATEWAY_CONFIG=str(config), DEFAULT_MODEL="bench-model",
                   REDIS_URL=self.redis_url, BOOTSTRAP_ADMIN_KEY="false",
                   SHUTDOWN_GRACE_S="2", PYTHONPATH=str(ROOT), **extra)
        return env

    def start_redis(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        proc = self.redis_proc = self.procs.start(
            "redis", [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                      "no", "--dir", str(self.tmp)])
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.redis_port)) == 0:
                    return
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)

    def upstream(self, name: str, chunks: int, first_ms: float = 0, chunk_ms: float = 0) -> int:
        port = free_port()
        proc = self.procs.start(name, [PY, str(HERE / "upstream.py"), "--port", str(port), "--chunks", str(chunks),
                                       "--first-delay-ms", str(first_ms), "--chunk-delay-ms", str(chunk_ms)])
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        return port

    def gateway(self, name: str, env: dict[str, str], *args: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = self.procs.start(name, [PY, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                                       *args], env=env)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/readyz", proc)
        return proc, url

    def create_key(self, env: dict[str, str]) -> None:
        r = subprocess.run([PY, "-m", "gateway", "keys", "create", "--name", "bench-fleet"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise SystemExit(f"keys create failed: {r.stderr[-2000:]}")
        self.key = r.stdout.strip().splitlines()[-1]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    # -- measurements ------------------------------------------------------------------------------

    async def listeners(self) -> dict[str, Any]:
        """Per reply: POST to A (202), one listener on A and one on B from the start; each event's
        arrival time on both; B minus A per event."""
        port = self.upstream("up-listeners", chunks=self.a.chunks, first_ms=50, chunk_ms=self.a.chunk_ms)
        env = self.env(port)
        self.create_key(env)
        _, a = self.gateway("gw-a", env)
        _, b = self.gateway("gw-b", env)
        ttft: list[float] = []
        chunk: list[float] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            for i in range(self.a.replies + 3):
                async with http.post(a + "/api/chat", json={"content": f"listen {i}"}, headers=self.headers) as r:
                    mid = (await r.json())["assistant_message_id"]
                times = await asyncio.gather(arrivals(http, a, mid, self.headers), arrivals(http, b, mid, self.headers))
                if i < 3:
                    continue  # warm-up: connections, caches
                on_a, on_b = times
                assert sorted(on_a) == sorted(on_b), "A and B listeners saw different events"
                deltas = sorted(seq for seq in on_a if seq >= 1)[:self.a.chunks]
                ttft.append((on_b[deltas[0]] - on_a[deltas[0]]) * 1000)
                chunk.extend((on_b[s] - on_a[s]) * 1000 for s in deltas[1:])
        return {"replies": self.a.replies, "chunks": self.a.chunks,
                "added_ttft_ms_p50": pct(ttft, 0.5), "added_ttft_ms_p99": pct(ttft, 0.99),
                "added_chunk_ms_p50": pct(chunk, 0.5), "added_chunk_ms_p99": pct(chunk, 0.99)}

    async def fanout(self) -> dict[str, Any]:
        """N listeners, half on A and half on B, attached before the first token; all read to the end."""
        n = self.a.fanout
        port = self.upstream("up-fanout", chunks=64, first_ms=self.a.fanout_wait_ms, chunk_ms=20)
        env = self.env(port)
        if not self.key:
            self.create_key(env)
        _, a = self.gateway("gw-fan-a", env)
        _, b = self.gateway("gw-fan-b", env)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async with http.post(a + "/api/chat", json={"content": "fan out"}, headers=self.headers) as r:
                mid = (await r.json())["assistant_message_id"]
            t0 = time.perf_counter()
            results = await asyncio.gather(*(whole(http, a if i % 2 == 0 else b, mid, self.headers)
                                             for i in range(n)), return_exceptions=True)
        ok = [r for r in results if isinstance(r, tuple)]
        failed = [repr(r) for r in results if not isinstance(r, tuple)]
        attached = [r[0] - t0 for r in ok]
        first = [r[1] for r in ok]
        last = [r[2] for r in ok]
        digests = {r[3] for r in ok}
        side = {"A": [r for i, r in enumerate(results) if i % 2 == 0 and isinstance(r, tuple)],
                "B": [r for i, r in enumerate(results) if i % 2 == 1 and isinstance(r, tuple)]}
        out: dict[str, Any] = {"listeners": n, "ok": len(ok), "failed": len(failed), "identical": len(digests) == 1,
                               "all_attached_s": max(attached) if attached else None,
                               "errors": sorted(set(failed))[:3]}
        for label, rs in side.items():
            if rs:
                f0, l0 = min(first), min(last)
                out[f"first_lag_ms_{label}_p50"] = pct([(r[1] - f0) * 1000 for r in rs], 0.5)
                out[f"first_lag_ms_{label}_p99"] = pct([(r[1] - f0) * 1000 for r in rs], 0.99)
                out[f"last_lag_ms_{label}_p50"] = pct([(r[2] - l0) * 1000 for r in rs], 0.5)
                out[f"last_lag_ms_{label}_p99"] = pct([(r[2] - l0) * 1000 for r in rs], 0.99)
        return out

    def workers(self) -> dict[str, Any]:
        """req/s at c=64 (bench/load.py, native target) against --workers 1 and 2, alternating."""
        port = self.upstream("up-workers", chunks=64)
        env = self.env(port)
        if not self.key:
            self.create_key(env)
        rates: dict[int, list[float]] = {1: [], 2: []}
        for round_ in range(self.a.rounds):
            for count in (1, 2):
                proc, url = self.gateway(f"gw-workers{count}-{round_}", env, "--workers", str(count))
                r = subprocess.run([PY, str(HERE / "load.py"), "--target", "native", "--url", url, "-c", "64",
                                    "-n", str(self.a.requests), "--warmup", "128", "--duration", "60",
                                    "--expect-chunks", "64"],
                                   env={**os.environ, "BENCH_API_KEY": self.key}, capture_output=True, text=True,
                                   timeout=180)
                self.procs.stop(proc)
                line = json.loads(r.stdout.strip().splitlines()[-1])
                log(f"workers={count} round {round_}: {line.get('req_per_s')} req/s, ok {line.get('ok')}, "
                    f"failed {line.get('failed')}")
                rates[count].append(float(line["req_per_s"]))
        one, two = statistics.median(rates[1]), statistics.median(rates[2])
        return {"c": 64, "requests": self.a.requests, "rounds": self.a.rounds, "req_s_workers_1": one,
                "req_s_workers_2": two, "ratio": two / one}

    async def redis_memory(self) -> dict[str, Any]:
        """used_memory before and after K finished replies of 64 chunks (streams kept: TTL 10 min)."""
        import redis.asyncio as aioredis

        port = self.upstream("up-redis", chunks=64)
        env = self.env(port)
        if not self.key:
            self.create_key(env)
        _, a = self.gateway("gw-redis", env)
        redis = aioredis.Redis.from_url(self.redis_url)
        await redis.flushdb()
        before = (await redis.info("memory"))["used_memory"]
        k = self.a.memory_replies
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            sem = asyncio.Semaphore(32)

            async def one(i: int) -> None:
                async with sem, http.post(a + "/api/chat", json={"content": f"m{i}", "stream": True},
                                          headers=self.headers) as r:
                    await r.read()

            await asyncio.gather(*(one(i) for i in range(k)))
        await asyncio.sleep(0.5)  # the publisher's last batches
        keys = [key async for key in redis.scan_iter("gw:reply:*")]
        after = (await redis.info("memory"))["used_memory"]
        sample = await redis.memory_usage(keys[0]) if keys else None
        entries = await redis.xlen(keys[0]) if keys else 0
        await redis.aclose()
        return {"replies": k, "streams": len(keys), "entries_per_stream": entries,
                "bytes_per_reply": (after - before) / max(1, len(keys)), "memory_usage_one_stream": sample}


async def arrivals(http: aiohttp.ClientSession, base: str, mid: str, headers: dict[str, str]) -> dict[int, float]:
    """Each event's arrival time (perf_counter) by seq, over one listener's whole stream."""
    times: dict[int, float] = {}
    async with http.get(f"{base}/api/messages/{mid}/stream", headers=headers) as resp:
        while True:
            block = await resp.content.readuntil(b"\n\n")
            now = time.perf_counter()
            if not block or block.startswith(b"data: [DONE]"):
                return times
            if block.startswith(b"id: "):
                times[int(block[4:block.index(b"\n")].rsplit(b":", 1)[1])] = now


async def whole(http: aiohttp.ClientSession, base: str, mid: str,
                headers: dict[str, str]) -> tuple[float, float, float, str]:
    """(headers arrived, first delta arrived, body ended, digest of the body)."""
    async with http.get(f"{base}/api/messages/{mid}/stream", headers=headers,
                        timeout=aiohttp.ClientTimeout(total=120)) as resp:
        attached = time.perf_counter()
        body, first = b"", 0.0
        async for chunk in resp.content.iter_any():
            if not first and b'data: {"delta"' in body + chunk:
                first = time.perf_counter()
            body += chunk
        end = time.perf_counter()
    if not body.endswith(b"data: [DONE]\n\n") or not first or b"event: error" in body:
        raise RuntimeError("incomplete or failed stream")
    return attached, first, end, hashlib.sha256(body.replace(b": ping\n\n", b"")).hexdigest()


def table(results: dict[str, Any]) -> str:
    rows = ["| measure | figure |", "|---|---|"]
    if "listeners" in results:
        r = results["listeners"]
        rows.append(f"| listener on B vs on A: added TTFT p50 / p99 ({r['replies']} replies) | "
                    f"{r['added_ttft_ms_p50']:.2f} / {r['added_ttft_ms_p99']:.2f} ms |")
        rows.append(f"| listener on B vs on A: added per-chunk latency p50 / p99 ({r['chunks']} chunks each) | "
                    f"{r['added_chunk_ms_p50']:.2f} / {r['added_chunk_ms_p99']:.2f} ms |")
    if "fanout" in results:
        r = results["fanout"]
        rows.append(f"| {r['listeners']} listeners (A/B half each) on one reply: complete, identical | "
                    f"{r['ok']} ok, {r['failed']} failed, identical: {r['identical']} |")
        for side in ("A", "B"):
            if f"first_lag_ms_{side}_p50" in r:
                rows.append(f"| fan-out on {side}: first delta / last event lag behind the earliest, p50 / p99 | "
                            f"{r[f'first_lag_ms_{side}_p50']:.0f} / {r[f'first_lag_ms_{side}_p99']:.0f} ms; "
                            f"{r[f'last_lag_ms_{side}_p50']:.0f} / {r[f'last_lag_ms_{side}_p99']:.0f} ms |")
    if "workers" in results:
        r = results["workers"]
        rows.append(f"| req/s at c=64, --workers 1 vs 2 (median of {r['rounds']}) | "
                    f"{r['req_s_workers_1']:.0f} vs {r['req_s_workers_2']:.0f} (x{r['ratio']:.2f}) |")
    if "redis" in results:
        r = results["redis"]
        rows.append(f"| Redis memory per reply stream ({r['entries_per_stream']} events) | "
                    f"{r['bytes_per_reply'] / 1024:.1f} KiB (MEMORY USAGE of one: "
                    f"{(r['memory_usage_one_stream'] or 0) / 1024:.1f} KiB) |")
    return "\n".join(rows)


async def with_database(server_url: str) -> tuple[str, str]:
    name = "bench_fleet_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(server_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}", name


async def drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                   help="a PostgreSQL server (its maintenance database); a fresh database is made and dropped")
    p.add_argument("--measure", default="listeners,fanout,workers,redis")
    p.add_argument("--replies", type=int, default=40, help="listeners: replies measured")
    p.add_argument("--chunks", type=int, default=32, help="listeners: chunks per reply")
    p.add_argument("--chunk-ms", type=float, default=10, help="listeners: upstream pause between chunks")
    p.add_argument("--fanout", type=int, default=2000, help="fanout: listeners")
    p.add_argument("--fanout-wait-ms", type=float, default=5000,
                   help="fanout: upstream pause before the first token (below the first-token timeout, 15 s)")
    p.add_argument("--requests", type=int, default=3000, help="workers: measured requests per run")
    p.add_argument("--rounds", type=int, default=2, help="workers: runs per worker count")
    p.add_argument("--memory-replies", type=int, default=200, help="redis: replies")
    p.add_argument("--json-out")
    a = p.parse_args()
    if not a.database_url:
        p.error("--database-url (or DATABASE_URL) is required")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    measures = [m.strip() for m in a.measure.split(",") if m.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    procs = Procs(tmp)
    database_url, name = asyncio.run(with_database(a.database_url))
    results: dict[str, Any] = {}
    try:
        bench = Bench(a, tmp, procs, database_url)
        bench.start_redis()
        for measure in measures:
            log(f"-- {measure}")
            if measure == "listeners":
                results[measure] = asyncio.run(bench.listeners())
            elif measure == "fanout":
                results[measure] = asyncio.run(bench.fanout())
            elif measure == "workers":
                results[measure] = bench.workers()
            elif measure == "redis":
                results[measure] = asyncio.run(bench.redis_memory())
            else:
                raise SystemExit(f"unknown measure {measure!r}")
            log(json.dumps(results[measure]))
            procs.stop_all(keep=bench.redis_proc)  # each measure gets the machine to itself
    finally:
        procs.stop_all()
        asyncio.run(drop_database(a.database_url, name))
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
