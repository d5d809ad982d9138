"""Direct vs gateway, side by side in one run: what the gateway adds to a streamed reply.

Starts everything it measures, on loopback, and stops all of it at the end (also on Ctrl-C,
SIGTERM or an error):
  1. the fake upstream (bench/upstream.py) on --upstream-port;
  2. an API key (`python -m gateway keys create`), then the gateway (`python -m gateway`) on
     --gateway-port, with a temp TOML config routing `bench-model` to the upstream and a temp
     data dir (embedded PostgreSQL there unless --database-url is given); waits for /readyz.
Then, per round, bench/load.py runs DIRECT against the upstream and then against the gateway
for each --targets entry (native = POST /api/chat, openai = POST /v1/chat/completions), and
it prints a markdown table of medians (min-max across rounds), the gateway-added TTFT
(gateway minus direct, paired per round) and the throughput ratio gateway/direct.

Pinning (default on >= 2 CPUs, --no-pin to disable): the gateway -> CPU 1 (its embedded
PostgreSQL, started by it, inherits that CPU), upstream + load driver -> CPU 0, in the direct
and the gateway runs alike. So the gateway and its database share one core; the tools have
the other.

    .venv/bin/python bench/run.py --targets native -c 1 -n 300 --rounds 3
    .venv/bin/python bench/run.py --targets native -c 64 -n 5000 --duration 20 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
sys.path.insert(0, str(HERE))
from load import TICK, proc_tree  # noqa: E402

# settings the caller's environment must not leak into the gateway under test
GATEWAY_ENV = ("DATABASE_URL", "GATEWAY_CONFIG", "GATEWAY_HOST", "GATEWAY_PORT", "PORT", "GATEWAY_DATA_DIR",
               "DEFAULT_MODEL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "GROQ_API_KEY",
               "ANTHROPIC_API_KEY", "JWT_SECRET", "JWKS_URL", "JWT_ALGORITHMS", "CORS_ORIGINS", "LOG_LEVEL")
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


class Stop(Exception):
    """A fatal setup problem: reported, then everything started is stopped."""


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def pinned(cpus: set[int] | None):
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_up(proc: subprocess.Popen, url: str, limit_s: float, what: str, logfile: Path | None = None) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Stop(f"{what} exited with {proc.returncode}" + (f":\n{tail(logfile)}" if logfile else ""))
        if http_ok(url):
            return
        time.sleep(0.2)
    raise Stop(f"{what} not ready after {limit_s:.0f}s" + (f":\n{tail(logfile)}" if logfile else ""))


def tail(path: Path | None, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:] if path else ""
    except OSError:
        return ""


def stop_proc(proc: subprocess.Popen | None, grace_s: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def postmaster_pid(data_dir: Path) -> int | None:
    """The embedded PostgreSQL under our data dir, if it is running."""
    try:
        pid = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if b"postgres" in f.read() else None
    except (OSError, ValueError, IndexError):
        return None


def stop_postmaster(data_dir: Path) -> None:
    """Normally the gateway stops its embedded PostgreSQL; this covers a gateway that was killed."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return
    log(f"stopping embedded PostgreSQL pid {pid}")
    os.kill(pid, signal.SIGINT)  # fast shutdown
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def tree_ticks(pids: list[int]) -> int:
    return sum(proc_tree(p)[1] for p in pids)


def wait_idle(pids: list[int], max_s: float = 30, busy: float = 0.05) -> None:
    """Bounded wait until the gateway (and its database) use < 5% of a core, so runs don't overlap."""
    last, deadline = tree_ticks(pids), time.monotonic() + max_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = tree_ticks(pids)
        if now - last <= busy * TICK * 0.5:
            return
        last = now
    log(f"warning: gateway still busy after {max_s:.0f}s")


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        self.data_dir = self.tmp / "data"
        self.pin = a.pin if a.pin is not None else (os.cpu_count() or 1) >= 2
        self.tools_cpus, self.gateway_cpus = ({0}, {1}) if self.pin else (None, None)
        self.upstream: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None
        self.key = ""
        self.db_pid: int | None = None

    # -- setup ---------------------------------------------------------------------------------

    def gateway_env(self) -> dict[str, str]:
        a = self.a
        env = {k: v for k, v in os.environ.items() if k not in GATEWAY_ENV}
        config = self.tmp / "gateway.toml"
        extra = Path(a.config_extra).read_text() if getattr(a, "config_extra", "") else ""
        config.write_text(CONFIG.format(port=a.upstream_port) + "\n" + extra)
        env.update(GATEWAY_CONFIG=str(config), DEFAULT_MODEL="bench-model", GATEWAY_HOST="127.0.0.1",
                   GATEWAY_PORT=str(a.gateway_port), GATEWAY_DATA_DIR=str(self.data_dir),
                   BOOTSTRAP_ADMIN_KEY="false", SHUTDOWN_GRACE_S="2")
        if a.database_url:
            env["DATABASE_URL"] = a.database_url
        for item in a.gateway_env:
            k, _, v = item.partition("=")
            env[k] = v
        return env

    def start(self) -> None:
        a = self.a
        for port in (a.upstream_port, a.gateway_port):
            if not port_free(port):
                raise Stop(f"port {port} is busy: stop whatever listens there first")
        self.upstream = subprocess.Popen(
            [PY, str(HERE / "upstream.py"), "--port", str(a.upstream_port), "--chunks", str(a.chunks),
             "--first-delay-ms", str(a.first_delay_ms), "--chunk-delay-ms", str(a.chunk_delay_ms)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=pinned(self.tools_cpus))
        wait_up(self.upstream, f"http://127.0.0.1:{a.upstream_port}/v1/models", 15, "fake upstream")

        env = self.gateway_env()
        log("creating an API key ("
            + ("DATABASE_URL" if a.database_url else f"embedded PostgreSQL in {self.data_dir}") + ")")
        r = subprocess.run([PY, "-m", "gateway", "keys", "create", "--name", "bench"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=180, start_new_session=True,
                           preexec_fn=pinned(self.gateway_cpus))
        lines = r.stdout.strip().splitlines()
        if r.returncode or not lines:
            raise Stop(f"keys create failed ({r.returncode}): {r.stderr[-2000:]}")
        self.key = lines[-1].strip()

        logfile = self.tmp / "gateway.log"
        with open(logfile, "wb") as out:
            self.gateway = subprocess.Popen([PY, "-m", "gateway"], cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=pinned(self.gateway_cpus))
        wait_up(self.gateway, f"http://127.0.0.1:{a.gateway_port}/readyz", 120, "gateway", logfile)
        self.db_pid = None if a.database_url else postmaster_pid(self.data_dir)
        if getattr(a, "peer_pid", None) and self.gateway_cpus:
            # the peer gets the same core as this gateway, every thread of it
            for tid in os.listdir(f"/proc/{a.peer_pid}/task"):
                os.sched_setaffinity(int(tid), self.gateway_cpus)
        log(f"upstream pid {self.upstream.pid}, gateway pid {self.gateway.pid}, "
            f"embedded PostgreSQL pid {self.db_pid or '-'}, pin={self.pin}")

    def stop(self) -> None:
        stop_proc(self.gateway)  # SIGTERM: the gateway finishes and stops its embedded PostgreSQL
        if not self.a.database_url:
            stop_postmaster(self.data_dir)
        stop_proc(self.upstream)
        if self.a.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- runs ----------------------------------------------------------------------------------

    def load(self, target: str, requests: int, warmup: int) -> dict:
        """One load.py run: `direct` (the upstream), a gateway target, or `peer` (another gateway
        already running on --peer-url, e.g. LiteLLM, driven on its /v1/chat/completions)."""
        a = self.a
        if target == "peer":
            url, kind, key, pid = a.peer_url, "openai", a.peer_key, a.peer_pid
        elif target == "direct":
            url, kind, key, pid = f"http://127.0.0.1:{a.upstream_port}", "direct", "", None
        else:
            url, kind, key, pid = f"http://127.0.0.1:{a.gateway_port}", target, self.key, self.gateway.pid
        cmd = [PY, str(HERE / "load.py"), "--target", kind, "--url", url,
               "-c", str(a.concurrency), "-n", str(requests), "--duration", str(a.duration),
               "--warmup", str(warmup), "--expect-chunks", str(a.chunks), "--pid", f"upstream={self.upstream.pid}"]
        if pid:
            watched = [pid] + ([self.db_pid] if self.db_pid and target != "peer" else [])
            cmd += ["--pid", f"gateway={pid}"] + (["--pid", f"db={self.db_pid}"] if len(watched) > 1 else [])
            wait_idle(watched)
        env = dict(os.environ, BENCH_API_KEY=key)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.duration + 120,
                           preexec_fn=pinned(self.tools_cpus))
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        if r.returncode or not lines:
            raise Stop(f"load.py failed ({r.returncode}): {r.stderr[-2000:]}")
        out = json.loads(lines[-1])
        up_cpu = out["procs"]["upstream"]["cpu_s"]
        out["tools_util"] = round((out["client_cpu_s"] + up_cpu) / out["elapsed_s"], 2) if out["elapsed_s"] else None
        return out

    def probe(self, targets: list[str]) -> list[str]:
        """One request per gateway target; a target that cannot serve it is reported and dropped."""
        usable = []
        for target in targets:
            r = self.load(target, 1, 0)
            if r["ok"]:
                usable.append(target)
            else:
                log(f"target {target}: probe request failed ({r['errors']}), skipped")
                print(f"\nnote: target `{target}` skipped: its probe request failed with {r['errors']}")
        return usable

    def run(self) -> dict:
        a = self.a
        targets = self.probe(a.targets)
        if not targets:
            raise Stop("no gateway target works")
        runs: dict[str, list[dict]] = {t: [] for t in ["direct", *targets]}
        for rnd in range(1, a.rounds + 1):
            for target in runs:
                r = self.load(target, a.requests, a.warmup)
                runs[target].append(r)
                log(f"round {rnd} {target:<7} ok={r['ok']} failed={r['failed']} cut={r['cut']} "
                    f"req/s={r['req_per_s']} ttft_p50={r['ttft_ms']['p50']}ms p99={r['ttft_ms']['p99']}ms "
                    f"errors={r['errors']}")
        report(a, runs, self.pin)
        return runs


# -- report --------------------------------------------------------------------------------------

def get(d: dict, path: str):
    for k in path.split("."):
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def spread(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mid, lo, hi = statistics.median(values), min(values), max(values)
    whole = all(float(v).is_integer() for v in (mid, lo, hi)) or abs(mid) >= 100
    f = (lambda x: f"{x:.0f}") if whole else (lambda x: f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}")
    return f(mid) + (f" ({f(lo)}-{f(hi)})" if lo != hi else "")


ROWS = [("req/s", "req_per_s"), ("TTFT p50 ms", "ttft_ms.p50"), ("TTFT p90 ms", "ttft_ms.p90"),
        ("TTFT p99 ms", "ttft_ms.p99"), ("total p50 ms", "total_ms.p50"), ("total p99 ms", "total_ms.p99"),
        ("ok / run", "ok"), ("failed / run", "failed"), ("cut / run", "cut"),
        ("tools CPU (cores)", "tools_util"), ("gateway CPU (cores)", "procs.gateway.cpu_util"),
        ("gateway CPU ms/req", "procs.gateway.cpu_ms_per_req"), ("PostgreSQL CPU (cores)", "procs.db.cpu_util"),
        ("PostgreSQL CPU ms/req", "procs.db.cpu_ms_per_req"), ("gateway RSS peak MB", "procs.gateway.rss_peak_mb")]


def report(a: argparse.Namespace, runs: dict[str, list[dict]], pin: bool) -> None:
    names = list(runs)
    print(f"\nconcurrency={a.concurrency} requests<={a.requests} duration<={a.duration}s chunks={a.chunks} "
          f"rounds={a.rounds} warmup={a.warmup} pin={pin} db={'DATABASE_URL' if a.database_url else 'embedded'}"
          "  (median, min-max across rounds)\n")
    print("| metric | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, path in ROWS:
        print(f"| {label} | " + " | ".join(spread([get(r, path) for r in runs[n]]) for n in names) + " |")
    direct = runs["direct"]
    print("\n| gateway target | added TTFT p50 ms | added TTFT p99 ms | throughput ratio gateway/direct |")
    print("|---|---|---|---|")
    for name in names[1:]:
        pairs = list(zip(direct, runs[name], strict=True))  # round r of the gateway against round r of direct
        ratio = [g["req_per_s"] / d["req_per_s"] for d, g in pairs if d["req_per_s"] and g["req_per_s"] is not None]
        print(f"| {name} | {spread(added(pairs, 'ttft_ms.p50'))} | {spread(added(pairs, 'ttft_ms.p99'))} "
              f"| {spread(ratio)} |")


def added(pairs: list[tuple[dict, dict]], path: str) -> list:
    """What the gateway adds to the metric at `path`, round by round (direct, gateway); a round
    where either side has no value is left out."""
    return [get(g, path) - get(d, path) for d, g in pairs if None not in (get(g, path), get(d, path))]


# As a user runs it unless told otherwise: every limit on (none ever reached) and the default log
# level (INFO: one access line per request). `--config-extra ''` measures without limits,
# `--gateway-env LOG_LEVEL=WARNING` without the access log.
LIMITS_ON = str(Path(__file__).resolve().parent / "limits_on.toml")


def config_extra_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-extra", metavar="TOML_FILE", default=LIMITS_ON,
                   help="appended to the gateway's config (default: bench/limits_on.toml, every limit on; "
                        "'' for none)")


def gateway_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say how Bench starts the upstream and the gateway (shared by the other
    bench scripts, which also set the few run.py-only ones Bench reads: see bench_defaults)."""
    p.add_argument("--database-url", help="use this PostgreSQL instead of an embedded one in a temp dir")
    p.add_argument("--upstream-port", type=int, default=18000)
    p.add_argument("--gateway-port", type=int, default=18080)
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE", help="extra gateway env")
    p.add_argument("--no-pin", dest="pin", action="store_false", default=None)


def bench_defaults(a: argparse.Namespace, **values: object) -> argparse.Namespace:
    """Fill in what Bench reads from run.py's own arguments, for scripts that do not offer them."""
    for name, value in {"keep": False, "first_delay_ms": 0.0, "chunk_delay_ms": 0.0, **values}.items():
        if not hasattr(a, name):
            setattr(a, name, value)
    return a


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="native",
                   help="comma-separated: native, openai (this gateway), peer (the gateway at --peer-url)")
    p.add_argument("--peer-url", help="another OpenAI-compatible gateway routing bench-model to the upstream port, "
                                      "e.g. LiteLLM on http://127.0.0.1:4000")
    p.add_argument("--peer-key", default="", help="its API key")
    p.add_argument("--peer-pid", type=int, help="its PID (CPU and RSS sampling; pinned with the gateway)")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-n", "--requests", type=int, default=300, help="measured requests per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunks", type=int, default=64, help="content chunks per upstream reply")
    p.add_argument("--duration", type=float, default=60, help="hard cap per measured run, s")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured requests per run (default max(20, 2*C))")
    p.add_argument("--first-delay-ms", type=float, default=0, help="upstream pause before its first event")
    p.add_argument("--chunk-delay-ms", type=float, default=0, help="upstream pause between content chunks")
    gateway_arguments(p)
    config_extra_argument(p)
    p.add_argument("--pin", dest="pin", action="store_true", default=None)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (config, gateway.log, data)")
    p.add_argument("--json-out", help="write every raw load.py result here")
    a = p.parse_args()
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if not a.targets or set(a.targets) - {"native", "openai", "peer"}:
        p.error("--targets takes native, openai and/or peer")
    if "peer" in a.targets and not a.peer_url:
        p.error("--targets peer needs --peer-url")
    if a.warmup is None:
        a.warmup = max(20, 2 * a.concurrency)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(a)
    try:
        bench.start()
        runs = bench.run()
        if a.json_out:
            Path(a.json_out).write_text(json.dumps({"args": vars(a) | {"database_url": bool(a.database_url)},
                                                    "runs": runs}, indent=1))
        return 0
    except Stop as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        bench.stop()


if __name__ == "__main__":
    sys.exit(main())
