"""Shared fixtures: a real PostgreSQL, the real app factory, real local fake upstreams.

PostgreSQL: `DATABASE_URL` when set (the machine's server), else an embedded server started
once for the session. Either way the session gets its own fresh database, migrated once.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import Settings
from gateway.store.db import create_pool, migrate, start_embedded, stop_embedded
from gateway.store.keys import create_user_with_key

# the helpers' own asserts report like a test's
pytest.register_assert_rewrite("tests.support")

from tests.support.common import MakeClient, User, private_dir, with_database  # noqa: E402
from tests.support.fakes import FakeUpstream  # noqa: E402

# fixtures several test modules request by name live beside their helpers in tests/support/
pytest_plugins = ["tests.support.auth", "tests.support.browser", "tests.support.chat", "tests.support.conformance",
                  "tests.support.fleet", "tests.support.gemini", "tests.support.pgbouncer", "tests.support.providers",
                  "tests.support.redis_cluster"]


@pytest.fixture
def pg_dir() -> Any:
    """A private directory for a test's own embedded server (see private_dir), removed afterwards."""
    path = private_dir("gateway-test-pg-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server_url() -> Any:
    """The URL of a running PostgreSQL server (its maintenance database)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = private_dir("gateway-test-pg-")
        server = start_embedded(data)
    try:
        yield server.get_uri()
    finally:
        stop_embedded(server)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
async def database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test session; dropped at the end."""
    name = "gw_test_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(pg_server_url, name)
    conn = await asyncpg.connect(url)
    await migrate(conn)
    await conn.close()
    try:
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool for the tests' own queries (asserting exact rows)."""
    pool = await create_pool(database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture
def make_settings(database_url: str) -> Callable[..., Settings]:
    """Settings for a test app: env-style keyword overrides on top of fast, quiet defaults."""

    def make(**env: str) -> Settings:
        base = {"DATABASE_URL": database_url, "BOOTSTRAP_ADMIN_KEY": "false", "DEMO_DELAY_MS": "0",
                "DB_POOL_MIN": "1", "SHUTDOWN_GRACE_S": "2"}
        base.update(env)
        return Settings.from_env(base)

    return make


@pytest.fixture
def make_client(aiohttp_client: Any, make_settings: Callable[..., Settings]) -> MakeClient:
    """A test client on the real app factory; pass Settings, or env-style overrides."""

    async def make(settings: Settings | None = None, **env: str) -> TestClient:
        return await aiohttp_client(create_app(settings or make_settings(**env)))

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient:
    return await make_client()


@pytest.fixture
def make_user(db: asyncpg.Pool) -> Callable[..., Awaitable[User]]:
    async def make(scopes: tuple[str, ...] = ("chat", "arena")) -> User:
        user_id = uuid.uuid4()
        _, key = await create_user_with_key(db, "test", list(scopes), user_id)
        return User(user_id, key)

    return make


@pytest.fixture
async def user(make_user: Callable[..., Awaitable[User]]) -> User:
    return await make_user()


@pytest.fixture
async def upstream(aiohttp_server: Any) -> FakeUpstream:
    """A fake OpenAI-compatible upstream on loopback, scripted per test."""
    fake = FakeUpstream()
    fake.server = await aiohttp_server(fake.app)
    return fake


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[[str], str]:
    """Write a TOML config and return its path (for GATEWAY_CONFIG)."""

    def write(text: str) -> str:
        path = tmp_path / f"gateway-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(text)
        return str(path)

    return write
