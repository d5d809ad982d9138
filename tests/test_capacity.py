"""The capacity model (bench/capacity.py) on a fixed measurements file: the arithmetic of each
part's need and the first bottleneck it names."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.processes  # the command line case runs the script

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "capacity.py"

MEASURED = {
    "redis_stream_ttl_s": 600.0,
    "per_reply": {"gateway_cpu_ms": 2.0, "pg_cpu_ms": 1.0, "pg_transactions": 1.0, "pg_rows_written": 9.0,
                  "wal_bytes": 6000, "redis_commands": 70.0, "redis_bytes": 4000},
    "per_held_stream": {"gateway_rss_kb": 20.0, "redis_bytes": 100},
}


def capacity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capacity", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_model_sizes_each_part_and_names_redis_commands_first():
    p = capacity().plan(MEASURED, 10_000, 100_000)
    # gateway: 20 cores of CPU at 70% of one core each -> 28.57 instances; streams: 1953.1 MB over 1433.6
    assert p["gateway"] == {"instances": 29, "cpu_cores": 20.0, "instances_for_cpu": 28.57,
                            "instances_for_streams": 1.36, "memory_mb": 1953.1}
    assert p["postgresql"] == {"cores": 14.29, "wal_mb_s": 60.0, "transactions_per_s": 10000,
                               "rows_written_per_s": 90000}
    # 700k commands/s over 70k per shard; 10 MB of held streams + 24 GB of finished ones kept 600 s
    assert p["redis"] == {"commands_per_s": 700000, "memory_mb": 24010.0, "shards": 10}
    assert p["shares"] == {"gateway instances": 0.058, "postgresql cpu": 0.223, "postgresql wal": 0.429,
                           "redis commands": 0.625, "redis memory": 0.262}
    assert p["bottleneck"] == "redis commands"
    assert p["bottleneck_at"] == 1.6


def test_a_smaller_primary_makes_postgresql_the_bottleneck():
    p = capacity().plan(MEASURED, 10_000, 0, {"pg_cores": 8.0})
    assert p["postgresql"]["cores"] == 14.29
    assert p["shares"]["postgresql cpu"] == 1.786
    assert p["bottleneck"] == "postgresql cpu"
    assert p["bottleneck_at"] == 0.56  # already past it


def test_the_command_line_prints_the_plan_and_the_bottleneck(tmp_path):
    measured = tmp_path / "capacity.json"
    measured.write_text(json.dumps(MEASURED))
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(measured), "--replies-per-s", "10000",
                          "--concurrent-streams", "100000"], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == [
        "load: 10000 replies/s, 100000 concurrent streams",
        "gateway: 29 instances (28.57 for CPU: 20.0 cores; 1.36 for held streams: 1953.1 MB)",
        "postgresql: 14.29 cores on the primary, 60.0 MB/s of WAL, 10000 transactions/s, 90000 rows written/s",
        "redis: 10 shard(s), 700000 commands/s, 24010.0 MB",
        "share of each ceiling: gateway instances 6%, postgresql cpu 22%, postgresql wal 43%, "
        "redis commands 62%, redis memory 26%",
        "first bottleneck: redis commands (reached at 1.6x this load)",
    ]
