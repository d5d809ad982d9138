"""The migration runner on fresh databases, and the embedded server keeping its data across starts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from gateway.config import Settings
from gateway.store.db import migrate, open_database, pending_migrations
from tests.support.common import REPO_ROOT
from tests.support.database import fresh_database

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

# every .sql file in the top-level sql/ is a migration, named in the order it applies
SQL_DIR = REPO_ROOT / "sql"
ALL_MIGRATIONS = sorted(p.name for p in SQL_DIR.glob("*.sql"))


async def schema_snapshot(conn: asyncpg.Connection) -> dict[str, Any]:
    """What a migration could change: recorded versions, columns, indexes."""
    return {
        "migrations": [tuple(r) for r in await conn.fetch(
            "SELECT version, applied_at FROM schema_migrations ORDER BY version")],
        "columns": [tuple(r) for r in await conn.fetch("""
            SELECT table_name, column_name, data_type, is_nullable, column_default
            FROM information_schema.columns WHERE table_schema = 'public'
            ORDER BY table_name, ordinal_position""")],
        "indexes": [tuple(r) for r in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname")],
    }


def process_gone(pid: int) -> bool:
    # a stopped postmaster was reparented away from us; a zombie awaiting its reaper has exited too
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_migrate_applies_every_file_once_and_a_second_run_changes_nothing(pg_server_url: str):
    assert ALL_MIGRATIONS and ALL_MIGRATIONS[0] == "0001_init.sql"
    async with fresh_database(pg_server_url) as url:
        conn = await asyncpg.connect(url)
        try:
            assert await pending_migrations(conn) == ALL_MIGRATIONS
            assert await migrate(conn) == ALL_MIGRATIONS
            assert [r["version"] for r in await conn.fetch(
                "SELECT version FROM schema_migrations ORDER BY version")] == ALL_MIGRATIONS
            assert await conn.fetchval("SELECT to_regclass('public.messages') IS NOT NULL")
            before = await schema_snapshot(conn)

            assert await migrate(conn) == []
            assert await schema_snapshot(conn) == before
            assert await pending_migrations(conn) == []
        finally:
            await conn.close()


async def test_concurrent_migrations_apply_each_file_exactly_once(pg_server_url: str):
    async with fresh_database(pg_server_url) as url:
        first, second = await asyncpg.connect(url), await asyncpg.connect(url)
        try:
            results = await asyncio.gather(migrate(first), migrate(second))
            # the advisory lock serialises them: one applies everything, the other finds nothing to do
            assert sorted(results, key=len) == [[], ALL_MIGRATIONS]
            assert await first.fetchval("SELECT count(*) FROM schema_migrations") == len(ALL_MIGRATIONS)
            assert await pending_migrations(second) == []
        finally:
            await first.close()
            await second.close()


async def test_embedded_server_stops_on_close_and_keeps_data_for_the_next_start(pg_dir: Path):
    settings = Settings.from_env({"GATEWAY_DATA_DIR": str(pg_dir / "data"), "DB_POOL_MIN": "1",
                                  "DB_POOL_MAX": "2"})
    assert settings.database_url is None
    pgdata = pg_dir / "data" / "pgdata"

    db = await open_database(settings)
    try:
        assert db.embedded is not None
        pid = db.embedded.get_pid()
        assert pid is not None and psutil.pid_exists(pid)
        await db.pool.execute("CREATE TABLE kept (v text)")
        await db.pool.execute("INSERT INTO kept VALUES ('survives a restart')")
    finally:
        await db.close()
    assert not (pgdata / "postmaster.pid").exists()
    assert process_gone(pid)

    db = await open_database(settings)
    try:
        assert db.embedded is not None and db.embedded.get_pid() != pid
        assert await db.pool.fetchval("SELECT v FROM kept") == "survives a restart"
    finally:
        await db.close()
    assert not (pgdata / "postmaster.pid").exists()
