#!/usr/bin/env python3
"""Soak: is the gateway's memory flat under steady load?

Starts the fake upstream and the gateway exactly as run.py does (same config, pinning and
cleanup), then keeps `-c` concurrent streams going for `--minutes` through one gateway target
while sampling the gateway's RSS every `--every` seconds. Prints RSS per minute and the ratio
of the last minute to minute 2 (the target: within 10%).

    .venv/bin/python bench/soak.py --target openai -c 64 --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import PY, Bench, Stop, bench_defaults, gateway_arguments, log, pinned  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="openai", choices=("native", "openai"))
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--every", type=float, default=10, help="RSS sample interval, s")
    p.add_argument("--chunks", type=int, default=64)
    gateway_arguments(p)
    a = p.parse_args()
    bench_defaults(a)
    duration = a.minutes * 60
    bench = Bench(a)
    samples: list[tuple[float, float]] = []
    try:
        bench.start()
        cmd = [PY, str(HERE / "load.py"), "--target", a.target, "--url", f"http://127.0.0.1:{a.gateway_port}",
               "-c", str(a.concurrency), "-n", "100000000", "--duration", str(duration), "--warmup", "0",
               "--expect-chunks", str(a.chunks)]
        env = dict(os.environ, BENCH_API_KEY=bench.key)
        load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=pinned(bench.tools_cpus))
        started = time.monotonic()
        while load.poll() is None and time.monotonic() - started < duration + 60:
            samples.append((time.monotonic() - started, rss_mb(bench.gateway.pid)))
            time.sleep(a.every)
        out, err = load.communicate(timeout=120)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise Stop(f"load.py failed: {err[-2000:]}")
        result = json.loads(lines[-1])
    except Stop as e:
        log(f"stopped: {e}")
        return 1
    finally:
        bench.stop()

    print(f"\nsoak target={a.target} concurrency={a.concurrency} minutes={a.minutes}: ok={result['ok']} "
          f"failed={result['failed']} req/s={result['req_per_s']} errors={result['errors']}")
    print("| minute | gateway RSS MB (last sample in the minute) |\n|---|---|")
    by_minute: dict[int, float] = {}
    for t, rss in samples:
        by_minute[int(t // 60) + 1] = rss
    for minute, rss in sorted(by_minute.items()):
        print(f"| {minute} | {rss:.1f} |")
    last = max(by_minute)
    if 2 in by_minute and last > 2:
        print(f"\nRSS at minute {last} / minute 2: {by_minute[last] / by_minute[2]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
