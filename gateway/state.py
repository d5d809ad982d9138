"""Every piece of app state, declared once as a typed `web.AppKey`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    import uuid
    from datetime import datetime

    from gateway.config import Settings
    from gateway.edge.auth import Authenticator
    from gateway.edge.stream_tokens import StreamTokens
    from gateway.fleet.follow import RemoteStreams
    from gateway.fleet.instance import Instance
    from gateway.fleet.link import RedisLink
    from gateway.generation.task import GenerationRegistry
    from gateway.observability.health import ModelHealth
    from gateway.observability.metrics import Metrics, Timings
    from gateway.observability.tracing import Tracing
    from gateway.policy.admission import Policy
    from gateway.providers.registry import ModelRegistry
    from gateway.service.leaderboard import LeaderboardCache
    from gateway.service.reload import Reloader
    from gateway.service.turns import Turns
    from gateway.store.activity import ActivityRecord
    from gateway.store.background import BatchWriter
    from gateway.store.db import Database
    from gateway.store.failures import Quarantine
    from gateway.store.retention import Pruner
    from gateway.store.usage import UsageRecord
    from gateway.vocabulary import Principal

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
DB: web.AppKey[Database] = web.AppKey("db")
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http", aiohttp.ClientSession)
MODELS: web.AppKey[ModelRegistry] = web.AppKey("models")
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
GENERATIONS: web.AppKey[GenerationRegistry] = web.AppKey("generations")
LEADERBOARD: web.AppKey[LeaderboardCache] = web.AppKey("leaderboard")
POLICY: web.AppKey[Policy] = web.AppKey("policy")
INSTANCE: web.AppKey[Instance] = web.AppKey("instance")
STREAM_TOKENS: web.AppKey[StreamTokens] = web.AppKey("stream_tokens")
TURNS: web.AppKey[Turns] = web.AppKey("turns")  # the service layer: begins turns, finds replies
USAGE: web.AppKey[BatchWriter[UsageRecord]] = web.AppKey("usage")  # batched usage rows (OpenAI route)
ACTIVITY: web.AppKey[BatchWriter[ActivityRecord]] = web.AppKey("activity")  # who did what, batched
LAST_USED: web.AppKey[BatchWriter[tuple[uuid.UUID, datetime]]] = web.AppKey("last_used")  # api_keys.last_used_at
PRUNER: web.AppKey[Pruner] = web.AppKey("pruner")  # [retention]: old threads deleted in the background
QUARANTINE: web.AppKey[Quarantine] = web.AppKey("quarantine")  # records refused for good, on disk
REMOTE: web.AppKey[RemoteStreams] = web.AppKey("remote")  # replies generating on other instances, followed
REDIS: web.AppKey[RedisLink | None] = web.AppKey("redis")  # with REDIS_URL (gateway/fleet)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")  # this app's Prometheus registry (never the global one)
TRACING: web.AppKey[Tracing] = web.AppKey("tracing")  # set only when OTEL_* asks for traces
HEALTH: web.AppKey[ModelHealth] = web.AppKey("health")  # each model's last five minutes, on this instance
RELOADER: web.AppKey[Reloader] = web.AppKey("reloader")  # the configuration running now, and its reload

# per request
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
USER_ID: web.RequestKey[str] = web.RequestKey("user_id", str)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")  # set once the caller is authenticated
TIMINGS: web.RequestKey[Timings] = web.RequestKey("timings")  # where the time went, for the access log
TRACE_ID: web.RequestKey[str] = web.RequestKey("trace_id", str)  # the request's trace, when traced
# the response once its headers went out: the access line of a stream its client abandoned needs it
RESPONSE: web.RequestKey[web.StreamResponse] = web.RequestKey("response", web.StreamResponse)
ACCESS_LOGGED: web.RequestKey[bool] = web.RequestKey("access_logged", bool)  # its line is written: not again
