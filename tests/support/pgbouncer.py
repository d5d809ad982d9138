"""Debian's PgBouncer (/usr/sbin/pgbouncer) in transaction pooling, in front of the test PostgreSQL.

`PgBouncer(tmp, server_url)` writes its ini and user list under `tmp`, starts it in the foreground
on a free port and waits until it listens; `url(database)` is the pooled URL of one database,
`stop()` ends it. Few server connections per database (`pool_size`, opened ahead), fewer than two
instances' pools ask for, so that the clients' transactions really do share server sessions. As
root it runs as `nobody` (it refuses to run as root). Never skipped: without the binary this
fails, and says how to install it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.fleet import free_port, wait_port

INI = """\
[databases]
* = host={host} port={port}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = {pool_size}
max_client_conn = 1000
server_reset_query =
ignore_startup_parameters = extra_float_digits
"""


class PgBouncer:
    def __init__(self, tmp: Path, server_url: str, pool_size: int = 10) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise AssertionError("pgbouncer is missing: apt-get install pgbouncer (.ci/run does)")
        server = urlsplit(server_url)
        self.server = server
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        user = server.username or "postgres"
        users = tmp / "userlist.txt"
        users.write_text(f'"{user}" ""\n')
        ini = tmp / "pgbouncer.ini"
        password = f" password={server.password}" if server.password else ""
        # the embedded server listens on a Unix socket only (`?host=/its/socket/dir`), in a directory
        # only its own system user may enter: pgbouncer then runs as that user instead of `nobody`
        socket_dir = parse_qs(server.query).get("host", [""])[0]
        host = socket_dir if socket_dir.startswith("/") else server.hostname or "127.0.0.1"
        ini.write_text(INI.format(host=host, port=server.port or 5432, password=password,
                                  listen=self.port, users=users, pool_size=pool_size))
        # that user reads both files after dropping root
        for path in (tmp, users, ini):
            path.chmod(0o755 if path.is_dir() else 0o644)
        runs_as = pwd.getpwuid(Path(socket_dir).stat().st_uid).pw_name if socket_dir.startswith("/") else "nobody"
        as_root = ["-u", runs_as] if os.geteuid() == 0 else []
        self.log = tmp / "pgbouncer.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, *as_root, str(ini)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(self.port, proc=self.proc)

    def url(self, database_url: str) -> str:
        """`database_url` (a database on the same server) through the pooler."""
        parts = urlsplit(database_url)
        user = parts.username or "postgres"
        auth = f"{user}:{parts.password}@" if parts.password else f"{user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}{parts.path}"

    def output(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # safe shutdown: waits for nothing, closes everything
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def pgbouncer(pg_server_url: str) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling in front of the test server, stopped afterwards (its
    directory is one `nobody` can enter: pytest's own temporary directories are private)."""
    tmp = Path(tempfile.mkdtemp(prefix="gateway-pgbouncer-"))
    try:
        bouncer = PgBouncer(tmp, pg_server_url)
        try:
            yield bouncer
        finally:
            bouncer.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
