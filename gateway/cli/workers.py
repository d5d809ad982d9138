"""`serve --workers N`: N gateway processes on one port, supervised by this one.

Each worker is a whole instance (its own id, liveness lock, generation registry, pools), started
as `python -m gateway serve --worker`: it binds the port with SO_REUSEPORT, so the kernel spreads
new connections over the workers, and a worker that dies takes only its own connections with it.
The parent serves nothing. It starts the embedded PostgreSQL once when DATABASE_URL is unset (the
workers connect to it by URL), restarts a worker that exits unasked (a crash, the OOM killer, a
SIGKILL), and on SIGTERM or SIGINT passes the signal on and waits: every worker drains as a
single process does (running replies get the grace period, then are saved as interrupted). SIGHUP is
passed on to every worker: each reads the configuration file again (gateway/service/reload.py).

A scrape of /metrics (on the public port, or on METRICS_PORT, which every worker listens on too)
answers for all the workers: each serves its own series on a Unix socket in a folder made for
this run, and the worker asked adds its siblings' series to its own (observability/combined.py).

Workers share live streams the way instances on different machines do: through Redis. Without
REDIS_URL a reply is followed live only by clients of the worker generating it; a reconnect that
lands on another worker waits for the reply to finish (with pings), then replays it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

from gateway.config import Settings
from gateway.observability.combined import workers_dir_env
from gateway.store.db import open_database, start_embedded, stop_embedded

log = logging.getLogger(__name__)

POLL_S = 0.1
RESTART_DELAYS_S = (0.0, 0.5, 1.0, 2.0, 5.0)  # a worker that keeps dying fast is restarted less eagerly
STABLE_S = 10.0  # a worker that ran this long before dying is restarted at once again
EXIT_CONFIG = 2  # a worker's "cannot start" (port taken, bad settings): restarting will not help


def worker_count(raw: str) -> int:
    """`--workers`: a positive number, or `auto` (the CPUs this process may run on)."""
    if raw.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--workers must be a positive number or auto, got {raw!r}")
    return n


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    quick_deaths: int = 0


class Supervisor:
    def __init__(self, settings: Settings, count: int, env: dict[str, str]) -> None:
        self._settings = settings
        self._count = count
        self._env = env
        self.workers: list[Worker] = []
        self._stopping = False

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        s = self._settings
        # a SIGHUP passed on while a worker is still starting (before its app handles it) is ignored,
        # not fatal: the worker reads the file as it starts anyway
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--worker", "--host", s.host, "--port", str(s.port)],
            env={**self._env, "GATEWAY_WORKER": str(index)},
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))

    def _signalled(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("%s: draining %d workers", signal.Signals(signum).name, len(self.workers))
        self._stopping = True
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)

    def _reload(self, signum: int, frame: FrameType | None) -> None:
        live = [w for w in self.workers if w.proc.poll() is None]
        log.info("SIGHUP: passed to %d workers (each reloads the configuration file)", len(live))
        for worker in live:
            worker.proc.send_signal(signal.SIGHUP)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._signalled)
        signal.signal(signal.SIGHUP, self._reload)
        self.workers = [Worker(i, self._spawn(i)) for i in range(self._count)]
        log.info("supervising %d workers on http://%s:%d (pids %s)", self._count, self._settings.host,
                 self._settings.port, ", ".join(str(w.proc.pid) for w in self.workers))
        code = 0
        while not self._stopping:
            time.sleep(POLL_S)
            for worker in self.workers:
                status = worker.proc.poll()
                if status is None or self._stopping:
                    continue
                if status == EXIT_CONFIG and time.monotonic() - worker.started < STABLE_S:
                    log.error("worker %d could not start (exit %d): stopping", worker.index, status)
                    code = EXIT_CONFIG
                    self._signalled(signal.SIGTERM, None)
                    break
                self._restart(worker, status)
        return max(code, self._wait_all())

    def _restart(self, worker: Worker, status: int) -> None:
        ran = time.monotonic() - worker.started
        worker.quick_deaths = 0 if ran >= STABLE_S else worker.quick_deaths + 1
        delay = RESTART_DELAYS_S[min(worker.quick_deaths, len(RESTART_DELAYS_S) - 1)]
        log.warning("worker %d (pid %d) exited with %d after %.1f s: restarting it%s", worker.index,
                    worker.proc.pid, status, ran, f" in {delay:.1f} s" if delay else "")
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not self._stopping:
            time.sleep(POLL_S)
        if not self._stopping:
            worker.proc = self._spawn(worker.index)
            worker.started = time.monotonic()

    def _wait_all(self) -> int:
        """After SIGTERM: every worker gets its drain (the grace period and the server's shutdown)."""
        deadline = time.monotonic() + self._settings.shutdown_grace_s + 15
        code = 0
        for worker in self.workers:
            try:
                status = worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time: killed", worker.index)
                worker.proc.kill()
                status = worker.proc.wait()
            # a worker stopped by our SIGTERM exits 0 (or -SIGTERM if it was still starting)
            if status not in (0, -signal.SIGTERM):
                code = 1
        return code


def run_workers(settings: Settings, count: int) -> int:
    """Start `count` workers on settings' port; returns when they have all stopped."""
    if settings.database_url is not None:
        # one refusal here (DatabaseUnreachable, one line) rather than one per worker, each restarted
        asyncio.run(_reach_database(settings))
    if settings.redis_url is None:
        log.warning("--workers %d without REDIS_URL: a reply is followed live only on the worker generating "
                    "it; a reconnect landing on another worker waits for the end, then replays", count)
    # each worker's metrics on a socket here, so that any worker can answer a scrape for all
    sockets = Path(tempfile.mkdtemp(prefix="gateway-workers-"))
    env = {**os.environ, **workers_dir_env(sockets)}
    embedded = None
    if settings.database_url is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs on a missing XDG_RUNTIME_DIR, as in db.py
            embedded = start_embedded(settings.data_dir)
        env["DATABASE_URL"] = embedded.get_uri()
        log.info("embedded PostgreSQL running under %s, shared by the workers", settings.data_dir.resolve() / "pgdata")
    try:
        return Supervisor(settings, count, env).run()
    finally:
        if embedded is not None:
            stop_embedded(embedded)
        shutil.rmtree(sockets, ignore_errors=True)


async def _reach_database(settings: Settings) -> None:
    db = await open_database(replace(settings, db_pool_min=1))
    await db.close()
