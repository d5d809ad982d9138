"""Counting the statements an app sends: asyncpg's query logger on every connection of its pool,
and the statements asyncpg sends by itself, which a test that counts the gateway's own leaves out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from asyncpg import introspection

from gateway.state import POLICY

# asyncpg learns a type's codec the first time a connection meets the type (an introspection query),
# and when PostgreSQL has JIT on it switches JIT off around that query and back after it (two
# `set_config('jit', ...)` statements): any pool connection may do so on the request's path, at
# whatever moment it first meets a type, so they are not the gateway's statements
ASYNCPG_LOOKUPS = frozenset({introspection.INTRO_LOOKUP_TYPES, introspection.INTRO_LOOKUP_TYPES_13,
                             introspection.TYPE_BY_NAME})


def asyncpgs_own(query: str) -> bool:
    """A statement asyncpg sends by itself, to learn a type's codec (and the JIT setting around it)."""
    return query in ASYNCPG_LOOKUPS or "set_config('jit'" in query


# written by the instance's own background tasks, not by a request: a slice lease or renewal (a task
# of its own, gateway/policy/quota.py), the batched writers (activity log, keys' last use), the heartbeat
BACKGROUND = ("gateway_lease_quota", "gateway_return_quota", "activity", "last_used_at", "gateway_heartbeat")


def on_the_path(sent: list[str]) -> list[str]:
    """The statements of `sent` a request made, in order: asyncpg's own and the instance's background
    tasks' left out (any of them may land while a request is being answered)."""
    return [q for q in sent if not asyncpgs_own(q) and not any(name in q for name in BACKGROUND)]


def log_statements(client: TestClient) -> tuple[list[str], Callable[[], None]]:
    """Every statement the app's pool sends from now on, as sent (asyncpg's query logger on each of
    its connections), and a function that stops the logging. The pool must be open at its full size
    (DB_POOL_MIN = DB_POOL_MAX), so no connection is made later and none goes unlogged."""
    sent: list[str] = []
    pool: asyncpg.Pool = client.app[POLICY]._pool
    connections = [holder._con for holder in pool._holders if holder._con is not None]
    assert len(connections) == pool.get_max_size(), "a pool not at its full size: a later connection goes unlogged"

    def log(record: Any) -> None:
        sent.append(record.query)

    for conn in connections:
        conn.add_query_logger(log)

    def stop() -> None:
        for conn in connections:
            conn.remove_query_logger(log)

    return sent, stop
