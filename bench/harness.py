"""Run an external side-by-side harness (a `compare.py` that starts its own fake upstream on
--upstream-port and alternates direct and gateway runs) against this gateway, set up as
`run.py` sets it up: a temp TOML config routing `bench-model` to that upstream (plus
--config-extra, e.g. bench/limits_on.toml), an API key, the embedded PostgreSQL in a temp data
dir, the gateway and its database pinned to CPU 1. The harness pins its own tools to CPU 0.

    .venv/bin/python bench/harness.py --compare PATH/TO/compare.py --config-extra bench/limits_on.toml \\
        -- -c 1 -n 400 --warmup 20 --rounds 3

Everything after `--` goes to the harness as is (this script adds --gateway-url, --gateway-pid
and --api-key). The harness counts the gateway's process tree, which does not include the
embedded PostgreSQL (the server daemonizes): this script samples the database's CPU over the
whole harness run and prints it per gateway request (warmups included) on stderr at the end.
Stops everything it started (also on Ctrl-C or an error).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from load import TICK, proc_tree  # noqa: E402
from run import PY, Bench, Stop, config_extra_argument, log, port_free, wait_up  # noqa: E402


class Gateway(Bench):
    """run.py's gateway setup without its own upstream (the harness brings one)."""

    def start(self) -> None:
        a = self.a
        if not port_free(a.gateway_port):
            raise Stop(f"port {a.gateway_port} is busy")
        env = self.gateway_env()
        r = subprocess.run([PY, "-m", "gateway", "keys", "create", "--name", "bench"], cwd=HERE.parent, env=env,
                           capture_output=True, text=True, timeout=180, start_new_session=True,
                           preexec_fn=lambda: _pin({1}))
        lines = r.stdout.strip().splitlines()
        if r.returncode or not lines:
            raise Stop(f"keys create failed ({r.returncode}): {r.stderr[-2000:]}")
        self.key = lines[-1].strip()
        logfile = self.tmp / "gateway.log"
        with open(logfile, "wb") as out:
            # started on CPU 1: the embedded PostgreSQL it starts inherits that core
            self.gateway = subprocess.Popen([PY, "-m", "gateway"], cwd=HERE.parent, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=lambda: _pin({1}))
        wait_up(self.gateway, f"http://127.0.0.1:{a.gateway_port}/readyz", 120, "gateway", logfile)
        from run import postmaster_pid
        self.db_pid = postmaster_pid(self.data_dir)
        log(what_runs(self.gateway.pid))


def what_runs(pid: int) -> str:
    """Which code the gateway process runs and on which loop, from /proc: its `gateway` package is
    this checkout's (run from its root with `-m`), and uvloop's extension is loaded or not."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    cwd = Path(f"/proc/{pid}/cwd").resolve()
    uvloop = "uvloop" in maps
    return (f"gateway code: {cwd}/gateway" + ("" if cwd == HERE.parent else f" (not this checkout, {HERE.parent})")
            + f", uvloop {'loaded' if uvloop else 'NOT loaded (pip install uvloop for the figures users get)'}")


def _pin(cpus: set[int]) -> None:
    import os
    os.sched_setaffinity(0, cpus)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", required=True, help="the harness's compare.py")
    config_extra_argument(p)
    p.add_argument("--upstream-port", type=int, default=18000)
    p.add_argument("--gateway-port", type=int, default=18080)
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--python", default=PY, help="the interpreter that runs the harness")
    p.add_argument("--keep", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args()
    a.database_url, a.pin, a.chunks, a.first_delay_ms, a.chunk_delay_ms = None, True, 64, 0, 0
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    gw = Gateway(a)
    try:
        gw.start()
        assert gw.gateway is not None
        db_before = proc_tree(gw.db_pid)[1] if gw.db_pid else 0
        log(f"gateway pid {gw.gateway.pid}, embedded PostgreSQL pid {gw.db_pid}")
        json_out = Path(tempfile.mkdtemp(prefix="gw-harness-")) / "raw.jsonl"
        cmd = [a.python, a.compare, "--gateway-url", f"http://127.0.0.1:{a.gateway_port}",
               "--gateway-pid", str(gw.gateway.pid), "--api-key", gw.key, "--upstream-port", str(a.upstream_port),
               "--json-out", str(json_out), *rest]
        started = time.monotonic()
        rc = subprocess.run(cmd).returncode
        db_s = ((proc_tree(gw.db_pid)[1] if gw.db_pid else 0) - db_before) / TICK
        served = 0
        if json_out.exists():
            res = json.loads(json_out.read_text())
            warmup = int(res.get("args", {}).get("warmup") or 0)
            served = sum(int(r.get("requests", 0)) + warmup for r in res.get("runs", {}).get("gateway", []))
        log(f"embedded PostgreSQL CPU over the whole run ({time.monotonic() - started:.0f} s): {db_s:.2f} s"
            + (f", {db_s * 1000 / served:.3f} ms per gateway request ({served} requests)" if served else ""))
        return rc
    except Stop as e:
        log(f"error: {e}")
        return 1
    finally:
        gw.stop()


if __name__ == "__main__":
    sys.exit(main())
