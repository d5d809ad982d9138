#!/usr/bin/env python3
"""Held relayed streams: the gateway's RSS per idle stream, and what they do to first-token latency.

Starts what bench/run.py starts (fast fake upstream, gateway, embedded PostgreSQL unless
--database-url; pinned: gateway on CPU 1, tools on CPU 0) plus a second, slow fake upstream
(one chunk every --hold-chunk-ms) behind the model `hold-model`. Then:

  1. c=1 runs on `/v1/chat/completions` (bench-model), direct and via the gateway, --rounds times;
  2. a holder process opens --streams streams on `hold-model` through the gateway and keeps them
     open (each one has received its first chunk); the gateway's own RSS (its PID only, not the
     embedded PostgreSQL) before and after gives the RSS per held stream;
  3. the same c=1 runs again while every held stream stays open.

Prints a markdown table: RSS per held stream, and the gateway-added TTFT p50/p99 (gateway minus
direct, paired per round, median and min-max over rounds) without and with the held streams.

    .venv/bin/python bench/held_streams.py --streams 2000 -n 300 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import (  # noqa: E402
    PY,
    Bench,
    Stop,
    added,
    bench_defaults,
    config_extra_argument,
    gateway_arguments,
    log,
    pinned,
    spread,
    stop_proc,
    wait_up,
)

HOLD_CONFIG = """\
[providers.hold]
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
api_key = "bench"

[models.hold-model]
provider = "hold"
upstream = "hold-model"
idle_timeout_s = 600
first_token_timeout_s = 120
timeout_s = 900
max_stream_s = 3600
"""

HOLDER = textwrap.dedent("""
    import asyncio, sys, aiohttp
    url, key, n, ramp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    async def main():
        body = {"model": "hold-model", "stream": True, "messages": [{"role": "user", "content": "hold"}]}
        headers = {"Authorization": "Bearer " + key}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async def hold():
                resp = await http.post(url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=None))
                if resp.status != 200:
                    raise SystemExit(f"held stream answered {resp.status}: {await resp.text()}")
                while b'"content"' not in await resp.content.readany():
                    pass
                return resp
            held = []
            for i in range(0, n, ramp):
                held += await asyncio.gather(*(hold() for _ in range(min(ramp, n - i))))
            print("open", flush=True)
            await asyncio.sleep(36000)
    asyncio.run(main())
""")


def rss_kb(pid: int) -> int:
    """The process's own RSS (not its children's: the embedded PostgreSQL is one of them)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise Stop(f"no VmRSS for pid {pid}")


def rounds(bench: Bench, n: int, warmup: int, label: str) -> list[tuple[dict, dict]]:
    pairs = []
    for rnd in range(1, bench.a.rounds + 1):
        d = bench.load("direct", n, warmup)
        g = bench.load("openai", n, warmup)
        if d["failed"] or g["failed"]:
            raise Stop(f"{label}: failed requests: direct {d['errors']}, gateway {g['errors']}")
        log(f"{label} round {rnd}: direct p50={d['ttft_ms']['p50']} p99={d['ttft_ms']['p99']}  "
            f"gateway p50={g['ttft_ms']['p50']} p99={g['ttft_ms']['p99']} ms")
        pairs.append((d, g))
    return pairs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=2000, help="held streams")
    p.add_argument("--ramp", type=int, default=200, help="held streams opened at once")
    p.add_argument("--hold-chunk-ms", type=float, default=5000, help="the slow upstream's pause between chunks")
    p.add_argument("--hold-port", type=int, default=18001)
    p.add_argument("-n", "--requests", type=int, default=300, help="measured c=1 requests per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--settle-s", type=float, default=5, help="wait after the streams are open, before the RSS")
    config_extra_argument(p)
    gateway_arguments(p)
    a = p.parse_args()
    fd, extra = tempfile.mkstemp(prefix="gw-hold-", suffix=".toml")
    os.write(fd, HOLD_CONFIG.format(port=a.hold_port).encode()
             + (b"\n" + Path(a.config_extra).read_bytes() if a.config_extra else b""))
    os.close(fd)
    a.config_extra = extra
    bench_defaults(a, concurrency=1, duration=120.0)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(a)
    slow = holder = None
    try:
        slow = subprocess.Popen(
            [PY, str(HERE / "upstream.py"), "--port", str(a.hold_port), "--chunks", "100000",
             "--chunk-delay-ms", str(a.hold_chunk_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=pinned(bench.tools_cpus))
        wait_up(slow, f"http://127.0.0.1:{a.hold_port}/v1/models", 15, "slow upstream")
        bench.start()
        assert bench.gateway is not None
        gw = bench.gateway.pid
        free = rounds(bench, a.requests, 20, "no held streams")
        time.sleep(2)
        rss0 = rss_kb(gw)
        t0 = time.monotonic()
        holder = subprocess.Popen([PY, "-c", HOLDER, f"http://127.0.0.1:{a.gateway_port}/v1/chat/completions",
                                   bench.key, str(a.streams), str(a.ramp)], stdout=subprocess.PIPE,
                                  start_new_session=True, preexec_fn=pinned(bench.tools_cpus))
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != b"open":
            raise Stop(f"the holder failed (exit {holder.wait()})")
        opened_s = time.monotonic() - t0
        time.sleep(a.settle_s)
        rss1 = rss_kb(gw)
        per_stream = (rss1 - rss0) / a.streams
        log(f"{a.streams} streams open in {opened_s:.1f} s; gateway RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MB, "
            f"{per_stream:.1f} KB per held stream")
        held = rounds(bench, a.requests, 20, f"{a.streams} held streams")
        rss2 = rss_kb(gw)
        if holder.poll() is not None:
            raise Stop("the holder exited while the streams were meant to be held")

        print(f"\nheld streams={a.streams} (one upstream chunk every {a.hold_chunk_ms:.0f} ms), c=1 runs of "
              f"{a.requests} requests x {a.rounds} rounds, chunks={a.chunks}, pin={bench.pin}\n")
        print("| metric | value |\n|---|---|")
        print(f"| gateway RSS before / with held streams / after the c=1 runs MB | {rss0 / 1024:.1f} / "
              f"{rss1 / 1024:.1f} / {rss2 / 1024:.1f} |")
        print(f"| RSS per held stream KB | {per_stream:.1f} |")
        for label, pairs in (("no held streams", free), (f"{a.streams} held streams", held)):
            print(f"| added TTFT p50 ms, {label} | {spread(added(pairs, 'ttft_ms.p50'))} |")
            print(f"| added TTFT p99 ms, {label} | {spread(added(pairs, 'ttft_ms.p99'))} |")
            print(f"| gateway CPU ms/req, {label} | "
                  f"{spread([g['procs']['gateway']['cpu_ms_per_req'] for _, g in pairs])} |")
        return 0
    except Stop as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if holder is not None:
            holder.kill()
            holder.wait()
        bench.stop()
        stop_proc(slow)
        os.unlink(extra)


if __name__ == "__main__":
    sys.exit(main())
