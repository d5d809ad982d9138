#!/usr/bin/env python3
"""Fan-out: how many listeners can follow one generation, and what a held-open stream costs.

Starts the fake upstream (slow: one chunk every --chunk-delay-ms) and the gateway as run.py
does, starts ONE reply with a non-streaming `POST /api/chat`, then opens --listeners
EventSource-style GETs on its `stream_url` (no Authorization header: the token in the URL)
while the reply is still being generated. Reports how many listeners got the complete
stream (every delta, then `data: [DONE]`), byte-identical to each other, and the gateway's
RSS before and with all listeners attached (per held stream).

    .venv/bin/python bench/listeners.py --listeners 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import Bench, Stop, bench_defaults, gateway_arguments, log  # noqa: E402
from soak import rss_mb  # noqa: E402


async def fan_out(a: argparse.Namespace, bench: Bench) -> dict[str, object]:
    base = f"http://127.0.0.1:{a.gateway_port}"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        r = await http.post(base + "/api/chat", json={"content": "fan out", "stream": False},
                            headers={"Authorization": f"Bearer {bench.key}"})
        accepted = await r.json()
        url = base + accepted["stream_url"]
        before = rss_mb(bench.gateway.pid)
        opened = asyncio.Event()
        open_count = 0

        async def listen() -> bytes:
            nonlocal open_count
            async with http.get(url, headers={"Accept": "text/event-stream"}) as resp:
                first = await resp.content.readany()  # the retry line: the stream is held open
                open_count += 1
                if open_count == a.listeners:
                    opened.set()
                return first + await resp.read()

        started = time.monotonic()
        tasks = [asyncio.create_task(listen()) for _ in range(a.listeners)]
        await asyncio.wait_for(opened.wait(), timeout=120)
        attached_s = time.monotonic() - started
        with_all = rss_mb(bench.gateway.pid)
        bodies = await asyncio.gather(*tasks, return_exceptions=True)
    # keep-alive comments land wherever each listener's ping timer fires: compare without them
    good = [b.replace(b": ping\n\n", b"") for b in bodies
            if isinstance(b, bytes) and b.endswith(b"data: [DONE]\n\n")]
    deltas = good[0].count(b'data: {"delta"') if good else 0
    return {"listeners": a.listeners, "complete": len(good), "identical": len(set(good)) == 1 if good else False,
            "deltas_each": deltas, "errors": len(bodies) - len(good), "attach_s": round(attached_s, 2),
            "rss_before_mb": round(before, 1), "rss_all_attached_mb": round(with_all, 1),
            "rss_per_listener_kb": round((with_all - before) * 1024 / a.listeners, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listeners", type=int, default=1000)
    p.add_argument("--chunks", type=int, default=200)
    p.add_argument("--chunk-delay-ms", type=float, default=100)
    gateway_arguments(p)
    a = p.parse_args()
    bench_defaults(a)
    bench = Bench(a)
    try:
        bench.start()
        result = asyncio.run(fan_out(a, bench))
    except Stop as e:
        log(f"stopped: {e}")
        return 1
    finally:
        bench.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
