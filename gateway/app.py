"""create_app(settings): wiring only. Every resource is opened in a cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from gateway.api.aisdk import chat as ai_sdk
from gateway.api.anthropic import messages as anthropic_messages
from gateway.api.native import account, admin, arena, chat, docs, erasure, keys, ops, playground, threads, ws
from gateway.api.openai import chat_completions as openai
from gateway.api.openai import embeddings, responses
from gateway.config import Settings
from gateway.contract.openapi import get_openapi
from gateway.edge.activity import record_activity
from gateway.edge.auth import Authenticator
from gateway.edge.jwt_auth import JwtVerifier
from gateway.edge.lean import serve_lean
from gateway.edge.malformed import install as answer_malformed_requests_in_json
from gateway.edge.middleware import Cors, add_request_id, edge, errors
from gateway.edge.stream_tokens import StreamTokens, load_signing_key
from gateway.errors import ConfigError
from gateway.fleet.follow import RemoteStreams
from gateway.fleet.instance import Instance
from gateway.generation.durability import FinishWriter
from gateway.generation.journal import FinishJournal
from gateway.generation.task import GenerationRegistry
from gateway.observability.health import ModelHealth
from gateway.observability.logs import install_redaction
from gateway.observability.metrics import Levels, Metrics, PoolLevels, QueueLevels, observe, on_prepare
from gateway.observability.tracing import Tracing
from gateway.policy.admission import Policy
from gateway.providers.chain import TracingObserver
from gateway.providers.registry import ModelRegistry
from gateway.service.leaderboard import LeaderboardCache
from gateway.service.reload import Reloader
from gateway.service.turns import Turns
from gateway.state import (
    ACTIVITY,
    AUTH,
    DB,
    GENERATIONS,
    HEALTH,
    HTTP,
    INSTANCE,
    LAST_USED,
    LEADERBOARD,
    METRICS,
    MODELS,
    POLICY,
    PRUNER,
    QUARANTINE,
    REDIS,
    RELOADER,
    REMOTE,
    SETTINGS,
    STREAM_TOKENS,
    TIMINGS,
    TRACE_ID,
    TRACING,
    TURNS,
    USAGE,
)
from gateway.store.activity import ActivityRecord, record_activity_many
from gateway.store.background import BatchWriter
from gateway.store.db import migrate, open_database
from gateway.store.failures import Quarantine
from gateway.store.keys import bootstrap_admin_key, touch_keys
from gateway.store.leaderboard import battles
from gateway.store.retention import Pruner
from gateway.store.usage import UsageRecord, record_usage_many
from gateway.webhooks.worker import WebhookWorker

if TYPE_CHECKING:
    from gateway.fleet.link import RedisLink
    from gateway.fleet.publisher import StreamPublisher

log = logging.getLogger(__name__)


async def http_client(app: web.Application) -> AsyncIterator[None]:
    # one session for every upstream call; no pool cap (the upstream is the limit, not us)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=True) as session:
        app[HTTP] = session
        yield


async def database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    db = await open_database(settings)
    app[DB] = db
    try:
        async with db.session() as conn:  # the migration lock is a session lock
            await migrate(conn)
        if settings.bootstrap_admin_key and not settings.jwt_enabled:
            key = await bootstrap_admin_key(db.pool)
            if key is not None:
                announce_admin_key(settings, key)
        yield
    finally:
        await db.close()


def announce_admin_key(settings: Settings, key: str) -> None:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print("\nCreated an admin API key (shown once, stored only as a hash):\n\n    " + key + "\n\nTry it:\n\n"
          f"    curl -N http://{host}:{settings.port}/api/chat -H 'Authorization: Bearer {key}' "
          "-H 'Content-Type: application/json' -d '{\"content\": \"Hello!\", \"stream\": true}'\n", flush=True)


async def services(app: web.Application) -> AsyncIterator[None]:
    settings, db = app[SETTINGS], app[DB]
    pool = db.pool
    models = ModelRegistry(settings, app[HTTP])
    await models.sync(pool)
    app[MODELS] = models
    jwt = JwtVerifier(settings, app[HTTP], metrics=app[METRICS]) if settings.jwt_enabled else None
    # records the database refuses for good are kept here (one file per kind), never retried forever
    quarantine = Quarantine(settings.data_dir / "quarantine")
    app[QUARANTINE] = quarantine
    # writes that can wait: batched off the request path, drained at shutdown
    last_used: BatchWriter[tuple[uuid.UUID, datetime]] = BatchWriter(
        "last_used", lambda batch: touch_keys(pool, batch), interval_s=0.5, quarantine=quarantine,
        to_json=lambda item: {"api_key_id": item[0], "used_at": item[1]})
    app[LAST_USED] = last_used
    activity: BatchWriter[ActivityRecord] = BatchWriter(
        "activity", lambda batch: record_activity_many(pool, batch), interval_s=0.2, quarantine=quarantine,
        to_json=lambda record: record._asdict())
    app[ACTIVITY] = activity
    auth = Authenticator(settings, pool, jwt, last_used=last_used, metrics=app[METRICS])
    app[AUTH] = auth
    stream_tokens = StreamTokens(await load_signing_key(pool), settings.stream_token_ttl_s)
    app[STREAM_TOKENS] = stream_tokens
    journal = FinishJournal(settings.data_dir / "journal", quarantine)
    finishes = FinishWriter(pool, journal, quarantine, retry_s=settings.finish_retry_s)
    # what the chains report: the metrics, and with tracing on the spans too; each model's recent health
    observer = ModelHealth(TracingObserver(app[METRICS]) if TRACING in app else app[METRICS])
    app[HEALTH] = observer
    generations = GenerationRegistry(pool, finishes, models, observer, settings.shutdown_grace_s,
                                     settings.checkpoint_s, settings.checkpoint_chunks)
    app[GENERATIONS] = generations
    # the fleet: with REDIS_URL every reply's events go to Redis, and any instance follows any reply live
    link, publisher = redis_parts(settings)
    app[REDIS] = link
    if publisher is not None:
        generations.publisher = publisher.changed
    remote = RemoteStreams(pool, link)
    app[REMOTE] = remote
    instance = Instance(db.session_url, pool, finishes.replay_journal, generations.cancel, settings.sweep_s,
                        on_key_revoked=auth.forget_key, on_reconnect=lambda: reconnected(),
                        on_quota_recall=lambda user_id: app[POLICY].recalled(user_id))
    app[INSTANCE] = instance
    # usage batches every 100 ms: the settlement statement's cost is mostly per statement (~1.4 ms of
    # PostgreSQL CPU for a few rows, on the same machine as the hot path), so at one stream at a time a
    # 10 ms interval made one statement per ~3 replies and PostgreSQL 0.95 ms of CPU per reply; at 100 ms
    # it is 0.16 ms. A reply's row is durable within 0.1 s (a cap about to refuse flushes it first).
    usage: BatchWriter[UsageRecord] = BatchWriter("usage", lambda batch: record_usage_many(pool, batch),
                                                  interval_s=0.1, max_batch=200, quarantine=quarantine,
                                                  to_json=asdict, lesser=UsageRecord.least)
    app[USAGE] = usage
    # the policy's stream leases carry this instance's id: they die with it (the sweep); before a cap
    # refuses or clamps a request, the usage records queued here are written (they release reservations)
    app[POLICY] = Policy(settings.limits, pool, models=models.models, instance_id=instance.id,
                         settlements=usage)

    def reconnected() -> None:  # cut off from the database: peers may have reclaimed our quota slices
        auth.forget_all_keys()
        app[POLICY].reconnected()

    app[TURNS] = Turns(pool=pool, settings=settings, models=models, policy=app[POLICY], generations=generations,
                       stream_tokens=stream_tokens, instance_id=instance.id, record_usage=usage.add,
                       observer=observer, notify_cancel=instance.notify_cancel, remote=remote)
    app[RELOADER] = Reloader(settings, models, pool, activity)
    leaderboard = LeaderboardCache(lambda include_named: battles(pool, include_named),
                                   rounds=settings.leaderboard_bootstrap_rounds)
    app[LEADERBOARD] = leaderboard
    await instance.start()  # also interrupts what crashed instances left live, replays the journal
    usage.start()
    generations.checkpoints.start()
    if publisher is not None:
        publisher.start()
    last_used.start()
    activity.start()
    # [[webhooks]]: the outbox is delivered by a background worker on every instance (none configured: idle)
    webhooks = WebhookWorker(pool, settings.webhooks, settings.limits, poll_s=settings.webhook_poll_s,
                             retry_s=settings.webhook_retry_s, give_up_s=settings.webhook_give_up_s)
    webhooks.start()
    # [retention] threads_days: every instance runs the task, one at a time prunes (unset: idle)
    pruner = Pruner(pool, settings.retention.threads_days, batch=settings.retention.batch,
                    interval_s=settings.retention.interval_s)
    app[PRUNER] = pruner
    pruner.start()
    try:
        yield
    finally:
        await generations.close()  # normally already done in on_shutdown
        await generations.checkpoints.close()
        await remote.close()
        if publisher is not None:
            await publisher.close()  # after the generations: their last events go out first
        if link is not None:
            await link.close()
        # together, and the ones that can be lost only get the grace period (the database may be down)
        await asyncio.gather(usage.close(), activity.close(settings.shutdown_grace_s),
                             last_used.close(settings.shutdown_grace_s))
        await app[POLICY].close()  # the unused quota slices go back, once every usage record is written
        await instance.close()
        await leaderboard.close()
        await webhooks.close()
        await pruner.close()
        models.close()  # the idle upstream connections


def redis_parts(settings: Settings) -> tuple[RedisLink | None, StreamPublisher | None]:
    """With REDIS_URL: the connection and the publisher of this instance's reply events."""
    if settings.redis_url is None:
        return None, None
    try:
        from gateway.fleet.link import RedisLink
        from gateway.fleet.publisher import StreamPublisher
    except ImportError:
        raise ConfigError("REDIS_URL is set but the redis package is missing: pip install 'chat-gateway[fleet]'") \
            from None
    # a reader blocked on a quiet stream looks at the row between reads: a reply whose instance died is
    # swept within SWEEP_S, and its listeners hear of it a fraction of that later
    link = RedisLink(settings.redis_url.reveal(), block_ms=round(min(1000, max(100, settings.sweep_s * 250))))
    return link, StreamPublisher(link, settings.redis_stream_ttl_s)


class CannotListen(Exception):
    """A listener of the app's own cannot have its port: the message names the setting."""


async def metrics_server(app: web.Application) -> AsyncIterator[None]:
    """With METRICS_PORT: /metrics on a listener of its own (bound to METRICS_HOST, loopback by
    default), so the public port never serves it. A tiny app sharing the main app's registry."""
    settings = app[SETTINGS]
    side = web.Application(middlewares=[errors])
    side[SETTINGS] = settings
    side[METRICS] = app[METRICS]
    side.on_response_prepare.append(add_request_id)
    side.router.add_get("/metrics", ops.metrics)
    runner = web.AppRunner(side, access_log=None)
    await runner.setup()
    try:
        # every worker of `serve --workers N` listens too; whichever is asked answers for all
        site = web.TCPSite(runner, settings.metrics_host, settings.metrics_port,
                           reuse_port=app[METRICS].siblings is not None or None)
        try:
            await site.start()
        except OSError as e:
            raise CannotListen(f"METRICS_PORT: cannot listen on {settings.metrics_host}:{settings.metrics_port}: "
                               f"{os.strerror(e.errno) if e.errno else e}") from e
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
        yield
    finally:
        await runner.cleanup()


async def reload_on_sighup(app: web.Application) -> AsyncIterator[None]:
    """`serve`'s (appended after `services`): SIGHUP reads the configuration file again. A file that does
    not validate is one log line and changes nothing; replies already streaming are never touched."""
    loop = asyncio.get_running_loop()
    asked = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, asked.set)

    async def listen() -> None:
        while True:
            await asked.wait()
            asked.clear()
            try:
                await app[RELOADER].reload(via="SIGHUP")
            except ConfigError:
                pass  # the reloader logged it, on one line
            except Exception:  # the database, while the new models were mirrored: the next SIGHUP tries again
                log.exception("configuration reload failed")

    task = asyncio.create_task(listen())
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def traces(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[TRACING].close()  # exports what is still queued


async def finish_generations(app: web.Application) -> None:
    """On shutdown, before open streams are cut: running replies get the grace period to finish,
    then the rest are interrupted and saved, and their listeners get a final event."""
    if GENERATIONS in app:
        await app[GENERATIONS].close()


def create_app(settings: Settings, tracing: Tracing | None = None) -> web.Application:
    """The app; `tracing` (tests) replaces what OTEL_* in `settings` asks for."""
    # process-wide, idempotent: no key in aiohttp's or our logs, no request text in a malformed request's 400
    install_redaction()
    answer_malformed_requests_in_json()
    cors = Cors(settings.cors_origins)
    metrics = Metrics()  # this app's own registry
    tracing = tracing or Tracing.from_env(settings.otel)  # None: off, and no middleware at all
    # observe is outermost: it counts the error responses the errors middleware makes, too; the
    # request's span sits inside it, and sees the status the errors middleware answers with. Untraced,
    # the three are one (`edge`): every frame of the chain is held for as long as a stream is open
    chain = ([observe(metrics, TIMINGS), tracing.middleware(TRACE_ID), errors, cors.preflight] if tracing
             else [edge(metrics, cors)])
    app = web.Application(middlewares=chain, client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    if tracing is not None:
        app[TRACING] = tracing
        app.cleanup_ctx.append(traces)
    metrics.watch_levels(levels_of(app))
    app.cleanup_ctx.extend([http_client, database, services])
    if settings.metrics_port is not None:
        app.cleanup_ctx.append(metrics_server)
    app.on_shutdown.append(finish_generations)
    app.on_response_prepare.append(add_request_id)
    app.on_response_prepare.append(cors.on_prepare)
    serve_lean(app)  # its connections start on the lean path (edge/lean.py)
    app.on_response_prepare.append(record_activity)
    app.on_response_prepare.append(on_prepare(metrics, TIMINGS))

    app.router.add_routes(routes(settings))
    playground.add_routes(app.router)  # GET / and /static/
    return app


def routes(settings: Settings) -> list[web.RouteDef]:
    """The HTTP surface (docs/api.md's tables, in code): /openapi.json's paths are built from it, each
    handler's operation as it declares it (gateway.contract.operations)."""
    table = [
        web.post("/api/chat", chat.post_chat),
        web.get("/api/messages/{message_id}", chat.get_message),
        web.get("/api/messages/{message_id}/stream", chat.get_message_stream),
        web.post("/api/messages/{message_id}/cancel", chat.cancel_message),
        web.post("/api/messages/{message_id}/regenerate", chat.regenerate),
        web.post("/api/threads", threads.create_thread),
        web.post("/v1/chat/sessions", threads.create_thread),
        web.get("/api/threads", threads.list_threads),
        web.get("/api/threads/{thread_id}", threads.get_thread),
        web.delete("/api/threads/{thread_id}", threads.delete_thread),
        web.post("/v1/chat/completions", openai.chat_completions),
        web.post("/v1/embeddings", embeddings.create_embeddings),
        web.get("/v1/models", openai.list_models),
        web.get("/v1/models/{model}", openai.get_model),
        web.post("/v1/responses", responses.create_response),
        web.get("/v1/responses/{response_id}", responses.get_response),
        web.delete("/v1/responses/{response_id}", responses.delete_response),
        web.get("/v1/responses/{response_id}/input_items", responses.list_input_items),
        web.post("/api/ai-sdk/chat", ai_sdk.post_chat),
        web.get("/api/ai-sdk/chat/{chat_id}/stream", ai_sdk.get_chat_stream),
        web.get("/api/ai-sdk/chat/{chat_id}/messages", ai_sdk.get_chat_messages),
        web.post("/api/ai-sdk/chat/{chat_id}/stop", ai_sdk.stop_chat),
        web.post("/v1/messages", anthropic_messages.create_message),
        web.post("/v1/messages/count_tokens", anthropic_messages.count_tokens),
        web.get("/ws", ws.websocket),
        web.post("/api/keys", keys.create_key),
        web.get("/api/keys", keys.list_keys),
        web.delete("/api/keys/{key_id}", keys.revoke_key),
        web.post("/api/arena", arena.post_arena),
        web.get("/api/comparisons/{comparison_id}", arena.get_comparison),
        web.get("/api/comparisons/{comparison_id}/stream", arena.get_comparison_stream),
        web.post("/api/comparisons/{comparison_id}/vote", arena.post_vote),
        web.get("/api/leaderboard", arena.get_leaderboard),
        web.get("/api/me", account.me),
        web.get("/api/usage", account.usage),
        web.get("/api/usage/export", account.usage_export),
        web.get("/api/admin/models", admin.models),
        web.get("/api/admin/audit", admin.audit),
        web.post("/api/admin/reload", admin.reload),
        web.delete("/api/admin/users/{user_id}", erasure.erase_user),
        web.get("/healthz", ops.healthz),
        web.get("/readyz", ops.readyz),
        web.get("/openapi.json", get_openapi),
        web.get("/docs", docs.page),
        web.get("/docs/{filename}", docs.asset),
    ]
    if settings.metrics_port is None:  # else /metrics is served on its own listener only
        table.append(web.get("/metrics", ops.metrics))
    return table


def levels_of(app: web.Application) -> Callable[[], Levels]:
    """What the metrics read at every scrape: the app's levels, from its services as they are then
    (they may start after this is handed over)."""

    def read() -> Levels:
        levels = Levels()
        generations = app.get(GENERATIONS)
        if generations is not None:
            levels.live_generations = len(generations.live)
        models = app.get(MODELS)
        if models is not None:
            levels.circuits = {name: models.circuits.state(name) for name in models.models}
        for key in (USAGE, ACTIVITY, LAST_USED):
            writer = app.get(key)
            if writer is not None:
                levels.queues.append(QueueLevels(name=writer.name, depth=writer.depth, dropped=writer.dropped,
                                                 written=writer.written))
        quarantine = app.get(QUARANTINE)
        if quarantine is not None:
            levels.quarantined = dict(quarantine.counts)
        db = app.get(DB)
        if db is not None:
            pool = db.pool
            levels.pool = PoolLevels(size=pool.get_size(), idle=pool.get_idle_size(), max=pool.get_max_size())
        return levels

    return read
