"""A three-node Redis Cluster on loopback (Debian's `redis-server` and `redis-cli`), torn down after.

Three masters with no replicas, each node's cluster config in a temporary directory, persistence
off (`--save '' --appendonly no`): a node killed and started again rejoins the cluster (its config
file keeps its identity and slots) with its keys gone, as a lost cache node would. While a node is
down the cluster answers CLUSTERDOWN (it requires full slot coverage, the default). Never skipped:
without the binaries this fails, and says how to install them.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fleet import free_port, wait_port


class RedisClusterNodes:
    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        for binary in (server, cli):
            if not Path(binary).exists():
                raise AssertionError(f"{Path(binary).name} is missing: apt-get install redis-server (.ci/run does)")
        self.server, self.cli = server, cli
        self.workdir = workdir
        self.ports = [free_port() for _ in range(nodes)]
        # each node's bus port, chosen too (the default, port + 10000, may be taken or past 65535)
        self.bus_ports = {port: free_port() for port in self.ports}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The first node's URL: the gateway finds the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, port: int) -> None:
        node = self.workdir / str(port)
        node.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(self.bus_ports[port]),
             "--cluster-config-file", str(node / "nodes.conf"), "--cluster-node-timeout", "2000",
             "--save", "", "--appendonly", "no", "--dir", str(node), "--logfile", str(node / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, proc=self.procs[port])

    def create(self) -> None:
        for port in self.ports:
            self.start(port)
        subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
        self.wait_ok()

    def state(self, port: int) -> str:
        out = subprocess.run([self.cli, "-p", str(port), "cluster", "info"], capture_output=True, timeout=5).stdout
        for line in out.decode().splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return "unknown"

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node running says cluster_state:ok."""
        deadline = time.monotonic() + timeout
        while any(self.state(p) != "ok" for p in self.procs):
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster is not ok after {timeout} s")
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()  # as a crash would: nothing saved, connections cut
        proc.wait(10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


@pytest.fixture
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.create()
        yield cluster
    finally:
        cluster.stop()
