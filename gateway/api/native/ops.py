"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.api.common import json_response
from gateway.contract.operations import PUBLIC, errors, json_content, ok, operation, response
from gateway.contract.replies import Status
from gateway.errors import Unauthorized
from gateway.state import DB, METRICS, REDIS, SETTINGS
from gateway.store.db import pending_migrations, why_unreachable


@operation("Liveness", "ops", ok(200, "The process answers", Status), security=PUBLIC)
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@operation("Readiness: the database answers and every migration is applied", "ops",
           {**ok(200, "Ready", Status), "503": response("Not ready", json_content(Status))}, security=PUBLIC)
async def readyz(request: web.Request) -> web.Response:
    """Ready when the database answers and every migration is applied. Redis (with REDIS_URL) is
    reported, never required: without it replies from other instances follow the database, slower."""
    try:
        async with asyncio.timeout(2):
            async with request.app[DB].pool.acquire() as conn:
                pending = await pending_migrations(conn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
        return json_response({"status": "unavailable", "database": why_unreachable(e) or type(e).__name__},
                             status=503)
    if pending:
        return json_response({"status": "unavailable", "pending_migrations": pending}, status=503)
    body = {"status": "ok"}
    link = request.app.get(REDIS)
    if link is not None:
        body["redis"] = "ok" if await link.ping() else "degraded"
    return json_response(body)


@operation("Prometheus metrics (text exposition format)", "ops",
           {"200": response("The metrics", {"text/plain": {"schema": {"type": "string"}}}), **errors(401)},
           security=[{}, {"metricsToken": []}],
           description="Open unless METRICS_TOKEN is set; absent from the public port when METRICS_PORT "
                       "serves it on a listener of its own.")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; with METRICS_TOKEN set, only for `Authorization: Bearer <that token>`."""
    token = request.app[SETTINGS].metrics_token
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # constant time: the comparison must not tell how much of a guess was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.reveal().encode()):
            raise Unauthorized("metrics need Authorization: Bearer <METRICS_TOKEN>")
    body = await request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
