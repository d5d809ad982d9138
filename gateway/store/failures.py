"""What a failed write means, decided once: retry it (transient) or set it aside (permanent).

Every background loop and every durable write asks `classify` the same question, so they agree
on what "the database is away" means:

    transient   the same write can succeed later, unchanged: the connection was lost, refused
                or closed, the server is starting or shutting down, out of connections or
                resources, a serialization failure or deadlock, a timeout; and every refusal
                to open a connection (see below)
    permanent   it never will: the database refused this data (a NUL in text, a number out of
                range, a broken constraint), or the code is wrong (anything else)

Getting a connection is not writing a record: whatever the server answers a connection attempt
with says nothing about the data. The database does not allow connections (`ALTER DATABASE ...
ALLOW_CONNECTIONS false`: 55000), does not exist (dropped or renamed while we run: 3D000), or
refuses our role or password (28xxx): all transient when met while connecting, so the records
wait (retried, journaled, replayed) until an operator sets it right. The same SQLSTATEs from a
statement keep their usual meaning (55000 from a query is a statement the object's state does
not allow: a bug), so these count only when asyncpg raised them from opening the connection
(its `connect_utils`, which a pool's acquire goes through too).

A permanent failure of one record is the record's problem, not the queue's: it goes to the
`Quarantine` (a dead-letter file per kind, with the error), is logged once and counted, and the
writer goes on with the rest. Nothing is retried forever, and nothing is dropped without a trace.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from asyncpg.exceptions import (
    ClientConfigurationError,
    InternalClientError,
    OutdatedSchemaCacheError,
    UnsupportedClientFeatureError,
    UnsupportedServerFeatureError,
)

from gateway.compat import ASYNCPG_CLIENT_DATA_ERROR, ASYNCPG_CONNECTING_MODULE

log = logging.getLogger(__name__)


class Failure(StrEnum):
    TRANSIENT = "transient"  # retry the same write later
    PERMANENT = "permanent"  # retrying cannot help: quarantine the record


# SQLSTATE classes (the first two characters) that a retry can outlive
_TRANSIENT_CLASSES = frozenset({
    "08",  # connection exception
    "40",  # transaction rollback: serialization failure, deadlock (40002, a constraint, is below)
    "53",  # insufficient resources: too many connections, disk full, out of memory
    "57",  # operator intervention: admin/crash shutdown, cannot connect now, query canceled
    "58",  # system error: I/O error outside PostgreSQL
})
_TRANSIENT_STATES = frozenset({
    "25006",  # read-only transaction: a failover landed us on a standby for a moment
    "55P03",  # lock not available
    "55006",  # object in use
    "72000",  # snapshot too old
})
_PERMANENT_STATES = frozenset({"40002"})  # transaction integrity constraint violation
# what the server answers a connection attempt with when the database, not the data, is the
# problem: transient when raised while connecting (see the module's docstring), not otherwise
_CONNECT_STATES = frozenset({
    "55000",  # object not in prerequisite state: "database ... is not currently accepting connections"
    "3D000",  # invalid catalog name: the database does not exist (dropped or renamed)
})
_CONNECT_CLASSES = frozenset({"28"})  # invalid authorization specification: role, password, pg_hba

# the network, not the data: these errnos come from sockets
_NETWORK_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET,
    errno.ENOTCONN, errno.ESHUTDOWN, errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.EAGAIN,
})

# asyncpg's client-side errors that a retry cannot fix (a value it cannot encode, a bad setting)
_CLIENT_PERMANENT = (ASYNCPG_CLIENT_DATA_ERROR, ClientConfigurationError, UnsupportedClientFeatureError,
                     UnsupportedServerFeatureError)


def classify(exc: BaseException) -> Failure:
    """Transient if the same write may succeed later unchanged; otherwise permanent."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state in _PERMANENT_STATES:
            return Failure.PERMANENT
        if state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES:
            return Failure.TRANSIENT
        if (state in _CONNECT_STATES or state[:2] in _CONNECT_CLASSES) and while_connecting(exc):
            return Failure.TRANSIENT
        return Failure.PERMANENT
    if isinstance(exc, asyncpg.InterfaceError):
        # the rest are about the connection: "pool is closed", "connection is closed", ...
        return Failure.PERMANENT if isinstance(exc, _CLIENT_PERMANENT) else Failure.TRANSIENT
    if isinstance(exc, OutdatedSchemaCacheError):
        return Failure.TRANSIENT  # asyncpg resets the cache: the retry is prepared afresh
    if isinstance(exc, InternalClientError):
        # asyncpg's protocol lost track of the connection's state: in practice a server message on
        # an idle pooled connection (the FATAL of a terminated session) leaves it "in progress",
        # and the next query on it raises this. A new connection starts clean
        return Failure.TRANSIENT
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return Failure.TRANSIENT
    if isinstance(exc, OSError):
        if exc.errno in _NETWORK_ERRNOS or from_driver(exc):
            return Failure.TRANSIENT
        return Failure.PERMANENT
    return Failure.PERMANENT


def from_driver(exc: BaseException) -> bool:
    """Whether `exc` was raised by (or through) the database driver: asyncpg's own errors, or an
    OSError / timeout met while asyncpg was connecting or talking to the server."""
    seen = 0
    cause: BaseException | None = exc
    # a timeout around a query (asyncio.wait_for) is raised outside asyncpg, from the cancellation
    # that was inside it: follow the chain a few links
    while cause is not None and seen < 4:
        if isinstance(cause, (asyncpg.PostgresError, asyncpg.InterfaceError, InternalClientError)):
            return True
        if any(frame.f_globals.get("__name__", "").startswith("asyncpg")
               for frame, _ in traceback.walk_tb(cause.__traceback__)):
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return False


def while_connecting(exc: BaseException) -> bool:
    """Whether `exc` was raised while asyncpg opened a connection (a pool's acquire included), not
    by a statement on an open one."""
    return any(frame.f_globals.get("__name__") == ASYNCPG_CONNECTING_MODULE
               for frame, _ in traceback.walk_tb(exc.__traceback__))


def database_unavailable(exc: BaseException) -> bool:
    """The database (not the data, not something else's socket) is away: what a 503 means."""
    return from_driver(exc) and classify(exc) is Failure.TRANSIENT


class Quarantine:
    """Dead letters: records a write refused for good, kept on disk with the error that refused them.

    One JSON line per record in `<directory>/<kind>.jsonl`: `{"kind", "at", "error": {"type",
    "message"}, "record"}`, appended with one write (O_APPEND, so processes sharing the directory
    never interleave a line) and fsync'd, off the event loop. Each record is logged once at ERROR
    and counted per kind (`counts`, read by /metrics); `on_put(kind)` is told of each one too.
    """

    MAX_MESSAGE = 2000  # an error's text is kept, within reason

    def __init__(self, directory: Path, on_put: Callable[[str], None] | None = None) -> None:
        self.directory = directory
        self._on_put = on_put
        self.counts: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def count(self, kind: str) -> int:
        return self.counts.get(kind, 0)

    def path(self, kind: str) -> Path:
        return self.directory / f"{kind}.jsonl"

    async def put(self, kind: str, record: dict[str, Any] | bytes, error: BaseException) -> None:
        """Keep `record` (a JSON-able dict, or raw bytes such as a torn journal line) with `error`."""
        message = str(error)[:self.MAX_MESSAGE]
        entry = {"kind": kind, "at": datetime.now(UTC),
                 "error": {"type": type(error).__name__, "message": message},
                 # raw bytes that are not JSON are kept as text (undecodable bytes as \x escapes)
                 "record": record.decode("utf-8", "backslashreplace") if isinstance(record, bytes) else record}
        line = orjson.dumps(entry, default=str) + b"\n"
        path = self.path(kind)
        async with self._lock:
            await asyncio.to_thread(self._append, path, line)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self._on_put is not None:
            self._on_put(kind)
        log.error("quarantined a %s record in %s: %s: %s", kind, path, type(error).__name__, message[:200])

    def _append(self, path: Path, line: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
