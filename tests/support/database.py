"""Fresh databases on the test PostgreSQL server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from tests.support.common import with_database


@asynccontextmanager
async def fresh_database(pg_server_url: str) -> AsyncIterator[str]:
    """An empty database on the test server (no migrations applied), dropped afterwards."""
    name = "gw_fresh_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(pg_server_url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
