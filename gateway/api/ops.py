"""Operations: liveness and readiness."""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp import web

from ..db import pending_migrations
from ..state import DB
from .common import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the database answers and every migration is applied."""
    try:
        async with asyncio.timeout(2):
            async with request.app[DB].pool.acquire() as conn:
                pending = await pending_migrations(conn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
        return json_response({"status": "unavailable", "database": type(e).__name__}, status=503)
    if pending:
        return json_response({"status": "unavailable", "pending_migrations": pending}, status=503)
    return json_response({"status": "ok"})
