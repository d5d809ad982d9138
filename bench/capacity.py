#!/usr/bin/env python3
"""The capacity model: what one reply costs each part, and what a load needs of each.

Measure (starts everything on loopback and stops it: the fake upstreams, a private redis-server,
the gateway with its embedded PostgreSQL, as bench/run.py and bench/held_streams.py do):

    .venv/bin/python bench/capacity.py --measure [-n 400] [--streams 300] [--out bench/capacity.json]

records per reply (POST /api/chat, streamed to the end): the gateway's CPU, PostgreSQL's CPU, its
transactions (each of the gateway's statements runs on its own, so one per statement; the server
has no pg_stat_statements loaded), rows written and WAL bytes (pg_current_wal_lsn before and
after), the Redis commands (INFO commandstats before and after) and the Redis memory each reply's
stream keeps until it expires; then, with --streams replies held open on a slow upstream, the
gateway's RSS and the Redis memory per held stream.

Model (reads that file, starts nothing):

    .venv/bin/python bench/capacity.py --replies-per-s 10000 --concurrent-streams 100000

prints the gateway instances, PostgreSQL cores and WAL rate, and Redis shards and memory the load
needs, and names the first bottleneck: of the parts that cannot grow past a ceiling (one
PostgreSQL primary of --pg-cores, its WAL at --pg-wal-mb-s; Redis at --redis-shards of
--redis-ops-per-shard and --redis-mb-per-shard; at most --max-instances gateways), the one whose
ceiling the load reaches first, and at what load it would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_FILE = HERE / "capacity.json"

# -- the model -----------------------------------------------------------------------------------

DEFAULT_LIMITS: dict[str, float] = {
    "instance_cores": 1.0,  # one gateway process runs one event loop: one core's worth of CPU
    "instance_memory_mb": 2048.0,  # memory one instance may use for held streams
    "utilization": 0.7,  # the share of a unit's capacity planned for (headroom for bursts)
    "max_instances": 500.0,  # gateways one PostgreSQL (through PgBouncer) and one Redis fleet serve
    "pg_cores": 64.0,  # the largest primary: writes do not spread over replicas
    "pg_wal_mb_s": 200.0,  # WAL one primary writes, ships to its standby and archives, sustained
    "redis_shards": 16.0,  # Redis Cluster shards (primaries)
    "redis_ops_per_shard": 100_000.0,  # commands per second one shard (one core) serves
    "redis_mb_per_shard": 8192.0,  # memory of one shard
}


def plan(measured: dict[str, Any], replies_per_s: float, concurrent_streams: float,
         limits: dict[str, float] | None = None) -> dict[str, Any]:
    """What the load needs of each part, each ceiling, and the first bottleneck."""
    lim = {**DEFAULT_LIMITS, **(limits or {})}
    per = measured["per_reply"]
    held = measured["per_held_stream"]
    util = lim["utilization"]
    ttl = float(measured.get("redis_stream_ttl_s", 600.0))

    # gateway: CPU for the replies, memory for the held streams; whichever asks more instances
    gw_cpu_cores = replies_per_s * per["gateway_cpu_ms"] / 1000
    by_cpu = gw_cpu_cores / (lim["instance_cores"] * util)
    gw_memory_mb = concurrent_streams * held["gateway_rss_kb"] / 1024
    by_memory = gw_memory_mb / (lim["instance_memory_mb"] * util)
    instances = max(1, math.ceil(max(by_cpu, by_memory)))

    # PostgreSQL: CPU and WAL of the one primary; transactions per second for the pooler
    pg_cores = replies_per_s * per["pg_cpu_ms"] / 1000 / util
    wal_mb_s = replies_per_s * per["wal_bytes"] / 1e6
    pg_tps = replies_per_s * per["pg_transactions"]

    # Redis: commands per second; memory of the live streams and of finished ones until they expire
    redis_ops = replies_per_s * per["redis_commands"]
    # (a difference of two readings of used_memory: below zero is noise, counted as nothing)
    redis_mb = (concurrent_streams * max(0, held["redis_bytes"])
                + replies_per_s * ttl * max(0, per["redis_bytes"])) / 1e6
    redis_shards = max(1, math.ceil(max(redis_ops / (lim["redis_ops_per_shard"] * util),
                                        redis_mb / (lim["redis_mb_per_shard"] * util))))

    # each ceiling as the share of it the load uses; the largest is reached first
    shares = {
        "gateway instances": instances / lim["max_instances"],
        "postgresql cpu": pg_cores / lim["pg_cores"],
        "postgresql wal": wal_mb_s / (lim["pg_wal_mb_s"] * util),
        "redis commands": redis_ops / (lim["redis_ops_per_shard"] * util * lim["redis_shards"]),
        "redis memory": redis_mb / (lim["redis_mb_per_shard"] * util * lim["redis_shards"]),
    }
    bottleneck = max(shares, key=lambda k: shares[k])
    return {
        "load": {"replies_per_s": replies_per_s, "concurrent_streams": concurrent_streams},
        "gateway": {"instances": instances, "cpu_cores": round(gw_cpu_cores, 2),
                    "instances_for_cpu": round(by_cpu, 2), "instances_for_streams": round(by_memory, 2),
                    "memory_mb": round(gw_memory_mb, 1)},
        "postgresql": {"cores": round(pg_cores, 2), "wal_mb_s": round(wal_mb_s, 2),
                       "transactions_per_s": round(pg_tps), "rows_written_per_s": round(
                           replies_per_s * per.get("pg_rows_written", 0.0))},
        "redis": {"commands_per_s": round(redis_ops), "memory_mb": round(redis_mb, 1), "shards": redis_shards},
        "shares": {k: round(v, 3) for k, v in shares.items()},
        "bottleneck": bottleneck,
        # at what multiple of this load the bottleneck's ceiling is reached (with the planned headroom)
        "bottleneck_at": round(1 / shares[bottleneck], 3) if shares[bottleneck] else None,
    }


def render(p: dict[str, Any]) -> str:
    load, gw, pg, rd = p["load"], p["gateway"], p["postgresql"], p["redis"]
    lines = [
        f"load: {load['replies_per_s']:g} replies/s, {load['concurrent_streams']:g} concurrent streams",
        f"gateway: {gw['instances']} instances ({gw['instances_for_cpu']} for CPU: {gw['cpu_cores']} cores; "
        f"{gw['instances_for_streams']} for held streams: {gw['memory_mb']} MB)",
        f"postgresql: {pg['cores']} cores on the primary, {pg['wal_mb_s']} MB/s of WAL, "
        f"{pg['transactions_per_s']} transactions/s, {pg['rows_written_per_s']} rows written/s",
        f"redis: {rd['shards']} shard(s), {rd['commands_per_s']} commands/s, {rd['memory_mb']} MB",
        "share of each ceiling: " + ", ".join(f"{k} {v:.0%}" for k, v in p["shares"].items()),
    ]
    at = p["bottleneck_at"]
    reach = ("already past it" if at is not None and at < 1 else f"reached at {at:g}x this load")
    lines.append(f"first bottleneck: {p['bottleneck']} ({reach})")
    return "\n".join(lines)


# -- the measurement -----------------------------------------------------------------------------

def _ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _tree_ticks(root: int) -> int:
    sys.path.insert(0, str(HERE))
    from load import proc_tree

    return proc_tree(root)[1]


def _redis(port: int, *args: str) -> str:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall((f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            data += chunk
            if data.startswith(b"$") and b"\r\n" in data:
                size = int(data[1:data.index(b"\r\n")])
                if len(data) >= data.index(b"\r\n") + 2 + size + 2:
                    break
            elif not chunk or (data.startswith(b"+") and data.endswith(b"\r\n")):
                break
        head, _, body = data.partition(b"\r\n")
        return body.decode() if head.startswith(b"$") else head.decode()


def _redis_stats(port: int) -> tuple[dict[str, int], int]:
    calls: dict[str, int] = {}
    for line in _redis(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            calls[name[8:]] = int(rest.split(",")[0].split("=")[1])
    memory = next(int(line.split(":")[1]) for line in _redis(port, "INFO", "memory").splitlines()
                  if line.startswith("used_memory:"))
    return calls, memory


async def _pg_stats(data_dir: Path) -> dict[str, int]:
    import asyncpg

    lines = (data_dir / "postmaster.pid").read_text().splitlines()
    conn = await asyncpg.connect(host=lines[4], port=int(lines[3]), user="postgres", database="postgres")
    try:
        row = await conn.fetchrow("""
            SELECT pg_current_wal_lsn() - '0/0'::pg_lsn AS wal, sum(xact_commit + xact_rollback) AS xacts,
                   sum(tup_inserted + tup_updated + tup_deleted) AS rows FROM pg_stat_database""")
        return {"wal": int(row["wal"]), "xacts": int(row["xacts"]), "rows": int(row["rows"])}
    finally:
        await conn.close()


def measure(a: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    sys.path.insert(0, str(HERE))
    from held_streams import HOLD_CONFIG, HOLDER, rss_kb
    from run import PY, Bench, bench_defaults, pinned, stop_proc, wait_idle, wait_up

    redis_dir = Path(tempfile.mkdtemp(prefix="gw-capacity-redis-"))
    redis = subprocess.Popen(["redis-server", "--port", str(a.redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(redis_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    fd, extra = tempfile.mkstemp(prefix="gw-capacity-", suffix=".toml")
    os.write(fd, HOLD_CONFIG.format(port=a.hold_port).encode())
    os.close(fd)
    a.config_extra = extra
    a.gateway_env = [*a.gateway_env, f"REDIS_URL=redis://127.0.0.1:{a.redis_port}/0"]
    bench_defaults(a, concurrency=a.concurrency, duration=120.0, chunks=a.chunks)
    bench = Bench(a)
    slow = holder = None
    try:
        for _ in range(50):
            try:
                _redis(a.redis_port, "PING")
                break
            except OSError:
                time.sleep(0.1)
        slow = subprocess.Popen(
            [PY, str(HERE / "upstream.py"), "--port", str(a.hold_port), "--chunks", "100000",
             "--chunk-delay-ms", "5000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=pinned(bench.tools_cpus))
        wait_up(slow, f"http://127.0.0.1:{a.hold_port}/v1/models", 15, "slow upstream")
        bench.start()
        assert bench.gateway is not None and bench.db_pid is not None
        gw, db = bench.gateway.pid, bench.db_pid
        bench.load("native", a.warmup, 0)
        wait_idle([gw, db])
        pg0, (rc0, rm0), g0, d0 = asyncio.run(_pg_stats(bench.data_dir / "pgdata")), _redis_stats(a.redis_port), \
            _ticks(gw), _tree_ticks(db)
        run = bench.load("native", a.requests, 0)
        wait_idle([gw, db])
        pg1, (rc1, rm1), g1, d1 = asyncio.run(_pg_stats(bench.data_dir / "pgdata")), _redis_stats(a.redis_port), \
            _ticks(gw), _tree_ticks(db)
        n = run["ok"]
        if not n or run["failed"]:
            raise SystemExit(f"the measured run failed: {run['errors']}")
        hz = os.sysconf("SC_CLK_TCK")
        commands = {k: round((v - rc0.get(k, 0)) / n, 2) for k, v in sorted(rc1.items()) if v - rc0.get(k, 0)}
        commands.pop("info", None)
        per_reply = {
            "gateway_cpu_ms": round((g1 - g0) * 1000 / hz / n, 3),
            "pg_cpu_ms": round((d1 - d0) * 1000 / hz / n, 3),
            "pg_transactions": round((pg1["xacts"] - pg0["xacts"] - 1) / n, 2),  # less our own read
            "pg_rows_written": round((pg1["rows"] - pg0["rows"]) / n, 2),
            "wal_bytes": round((pg1["wal"] - pg0["wal"]) / n),
            "redis_commands": round(sum(commands.values()), 2),
            "redis_commands_by_name": commands,
            "redis_bytes": round((rm1 - rm0) / n),
        }
        # held streams: the gateway's RSS and Redis memory per reply held open
        wait_idle([gw, db])
        rss0, (_, hm0) = rss_kb(gw), _redis_stats(a.redis_port)
        holder = subprocess.Popen([PY, "-c", HOLDER, f"http://127.0.0.1:{a.gateway_port}/v1/chat/completions",
                                   bench.key, str(a.streams), str(min(a.streams, 100))], stdout=subprocess.PIPE,
                                  start_new_session=True, preexec_fn=pinned(bench.tools_cpus))
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != b"open":
            raise SystemExit(f"the holder failed (exit {holder.wait()})")
        time.sleep(a.settle_s)
        rss1, (_, hm1) = rss_kb(gw), _redis_stats(a.redis_port)
        return {
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "replies": n, "chunks_per_reply": a.chunks, "concurrency": a.concurrency, "held_streams": a.streams,
            "redis_stream_ttl_s": 600.0,
            "reply_throughput_per_s": run["req_per_s"],
            "per_reply": per_reply,
            "per_held_stream": {"gateway_rss_kb": round((rss1 - rss0) / a.streams, 1),
                                "redis_bytes": round((hm1 - hm0) / a.streams)},
        }
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if holder is not None:
            holder.kill()
            holder.wait()
        bench.stop()
        stop_proc(slow)
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(redis_dir, ignore_errors=True)
        os.unlink(extra)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="measure and write --out")
    p.add_argument("--out", type=Path, default=DEFAULT_FILE, help="the measurements file (written or read)")
    p.add_argument("--replies-per-s", type=float, help="the load to plan for: replies started per second")
    p.add_argument("--concurrent-streams", type=float, default=0, help="... and replies streaming at once")
    for name, value in DEFAULT_LIMITS.items():
        p.add_argument("--" + name.replace("_", "-"), type=float, default=value, help=f"default {value:g}")
    p.add_argument("-n", "--requests", type=int, default=400, help="measured replies")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--chunks", type=int, default=64, help="chunks per reply from the fake upstream")
    p.add_argument("--streams", type=int, default=300, help="replies held open")
    p.add_argument("--settle-s", type=float, default=3)
    p.add_argument("--hold-port", type=int, default=18001)
    p.add_argument("--redis-port", type=int, default=18379)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    sys.path.insert(0, str(HERE))
    from run import gateway_arguments

    gateway_arguments(p)
    a = p.parse_args()
    if a.measure:
        measured = measure(a)
        a.out.write_text(json.dumps(measured, indent=2) + "\n")
        print(json.dumps(measured, indent=2))
    if a.replies_per_s is not None:
        measured = json.loads(a.out.read_text())
        limits = {name: getattr(a, name) for name in DEFAULT_LIMITS}
        result = plan(measured, a.replies_per_s, a.concurrent_streams, limits)
        print(json.dumps(result, indent=2) if a.json else render(result))
    elif not a.measure:
        p.error("give --measure, or --replies-per-s (and --concurrent-streams)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
