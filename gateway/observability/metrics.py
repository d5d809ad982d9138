"""What the gateway measures: Prometheus metrics per app, and each request's timing breakdown.

Every app has its own `CollectorRegistry`, never prometheus-client's process-global one: tests
build many apps in one process, and two apps must not mix (or double-register) their series.

Cheap by construction:
- Events are counted where they happen once: a request (the `observe` middleware), an upstream
  attempt's first event, a finished reply (tokens, cost, the mean gap between its chunks).
  Nothing is observed per chunk.
- Levels (live generations, circuit states, queue depths, database pool use) are read at scrape
  time by `AppCollector`, so the code that changes them pays nothing.

`Metrics` is the provider chain's `ChainObserver` (providers/base.py): the chain reports to it
explicitly. This module never imports state.py at module level (state.py names this module's
types, so that would close an import loop): the collector is given a function that reads the
levels (`watch_levels`), and the functions that wire this module into an app (`watch`, `observe`,
`on_prepare`, each run once when the app is built) look up the app keys they need when called.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.config import ModelConfig
    from gateway.observability.combined import Siblings
    from gateway.store.usage import UsageRecord

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# any method a client invents would otherwise become a new series
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# vocabulary.CircuitState's values, named here so that this module imports nothing of the gateway
_CIRCUIT_STATES = ("closed", "half_open", "open")

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
CHUNK_GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The metric objects of one app, in that app's registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("gateway_http_requests", "HTTP requests by route pattern, method and status",
                                     ["route", "method", "status"], registry=r)
        self.http_duration = Histogram("gateway_http_request_duration_seconds",
                                       "Request handling time by route pattern (a stream: until it ends)",
                                       ["route"], buckets=REQUEST_BUCKETS, registry=r)
        self.overhead = Histogram("gateway_overhead_seconds",
                                  "From a request's arrival to its first upstream call: the gateway's own time "
                                  "(auth, validation, policy, persist)", buckets=OVERHEAD_BUCKETS, registry=r)
        self.first_token = Histogram("gateway_time_to_first_token_seconds",
                                     "From an upstream attempt's start to its first event, by the model that answered",
                                     ["model", "provider"], buckets=FIRST_TOKEN_BUCKETS, registry=r)
        self.chunk_gap = Histogram("gateway_chunk_gap_seconds",
                                   "Mean time between a reply's streamed chunks, observed once per reply",
                                   ["model", "provider"], buckets=CHUNK_GAP_BUCKETS, registry=r)
        self.fallbacks = Counter("gateway_fallbacks", "Replies served by a fallback instead of the planned model",
                                 ["from_model", "to_model"], registry=r)
        self.cache_lookups = Counter("gateway_cache_lookups", "In-process cache lookups by cache and result",
                                     ["cache", "result"], registry=r)
        self.tokens = Counter("gateway_tokens", "Tokens used, by model and kind (prompt, completion)",
                              ["model", "kind"], registry=r)
        self.cost = Counter("gateway_cost_usd", "Cost of the tokens used, in USD, by model", ["model"], registry=r)
        self.active_streams = Gauge("gateway_active_streams", "Open SSE responses", registry=r)
        # label lookups are cached: one dict hit per request instead of prometheus-client's validation
        self._request_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        # and so are the per-model series of the chain's reports (a few per reply, each once per model)
        self._model_series: dict[tuple[Any, tuple[str, ...]], Any] = {}
        # under `serve --workers N`: the other workers, whose series every scrape adds in (combined.py)
        self.siblings: Siblings | None = None

    async def exposition(self) -> bytes:
        """The Prometheus text of a scrape: this app's series, or every worker's summed."""
        if self.siblings is None:
            return generate_latest(self.registry)
        return await self.siblings.exposition(self.registry)

    def watch_levels(self, read: Callable[[], Levels]) -> None:
        """Call `read` at every scrape and export what it returns (generations, circuits, queues, pool)."""
        self.registry.register(AppCollector(read))

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method if method in _METHODS else "OTHER", status)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = (self.http_requests.labels(key[0], key[1], str(status)),
                                                  self.http_duration.labels(route))
        series[0].inc()
        series[1].observe(seconds)

    # -- ChainObserver: what the provider chain reports --

    def upstream_call(self, overhead_s: float) -> None:
        """A request's first upstream call is starting, `overhead_s` after it arrived: the gateway's own time."""
        self.overhead.observe(overhead_s)

    def attempt_answered(self, model: ModelConfig, seconds: float, planned: ModelConfig) -> None:
        """An attempt delivered its first event `seconds` after it started; `planned` is the chain's first model."""
        self._series(self.first_token, model.name, model.provider).observe(seconds)
        if model is not planned:
            self.fallbacks.labels(planned.name, model.name).inc()

    def attempt_ended(self, model: ModelConfig, outcome: str) -> None:
        """A link ended (its outcome is counted per reply by the log and the traces, not here)."""

    def reply_streamed(self, model: ModelConfig, batches: int, seconds: float) -> None:
        """A reply's batches after its first: `batches` of them over `seconds`; observes the mean gap."""
        if batches:
            self._series(self.chunk_gap, model.name, model.provider).observe(seconds / batches)

    def usage(self, record: UsageRecord) -> None:
        """A finished reply's tokens and cost."""
        self._series(self.tokens, record.model, "prompt").inc(max(0, record.prompt_tokens))
        self._series(self.tokens, record.model, "completion").inc(max(0, record.completion_tokens))
        self._series(self.cost, record.model).inc(max(0.0, record.cost_usd))

    def _series(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: later calls are one dict hit (prometheus-client
        keeps every labelled series for good too, so this holds nothing it would not)."""
        series = self._model_series.get((metric, labels))
        if series is None:
            series = self._model_series[(metric, labels)] = metric.labels(*labels)
        return series

    def cache(self, name: str) -> tuple[Counter, Counter]:
        """The (hit, miss) counters of one cache, resolved once by its owner."""
        return self.cache_lookups.labels(name, "hit"), self.cache_lookups.labels(name, "miss")


@dataclass(slots=True, kw_only=True)
class QueueLevels:
    """One background writer's queue."""

    name: str
    depth: int
    dropped: int
    written: int


@dataclass(slots=True, kw_only=True)
class PoolLevels:
    """The database pool's connections."""

    size: int
    idle: int
    max: int


@dataclass(slots=True, kw_only=True)
class Levels:
    """What the app holds at one scrape; a part is None (or empty) until its service has started."""

    live_generations: int | None = None
    circuits: dict[str, str] | None = None  # model name -> circuit state
    queues: list[QueueLevels] = field(default_factory=list)
    pool: PoolLevels | None = None
    quarantined: dict[str, int] | None = None  # records quarantined so far, by kind


class AppCollector(Collector):
    """Levels read at scrape time through `read` (absent ones are skipped)."""

    def __init__(self, read: Callable[[], Levels]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        levels = self._read()
        if levels.live_generations is not None:
            yield GaugeMetricFamily("gateway_live_generations", "Replies generating in this process",
                                    value=levels.live_generations)
        if levels.circuits is not None:
            circuits = GaugeMetricFamily("gateway_circuit_state", "1 for each model's current circuit state",
                                         labels=["model", "state"])
            for name, current in levels.circuits.items():
                for state in _CIRCUIT_STATES:
                    circuits.add_metric([name, state], 1.0 if state == current else 0.0)
            yield circuits
        depth = GaugeMetricFamily("gateway_queue_depth", "Items waiting in a background writer", labels=["queue"])
        dropped = CounterMetricFamily("gateway_queue_dropped", "Items a full background writer dropped",
                                      labels=["queue"])
        written = CounterMetricFamily("gateway_queue_written", "Items a background writer wrote", labels=["queue"])
        for queue in levels.queues:
            depth.add_metric([queue.name], queue.depth)
            dropped.add_metric([queue.name], queue.dropped)
            written.add_metric([queue.name], queue.written)
        yield from (depth, dropped, written)
        if levels.quarantined is not None:
            quarantined = CounterMetricFamily("gateway_quarantined", "Records the database refused for good, "
                                              "kept in the quarantine", labels=["kind"])
            for kind, count in sorted(levels.quarantined.items()):
                quarantined.add_metric([kind], count)
            yield quarantined
        if levels.pool is not None:
            pool = levels.pool
            yield GaugeMetricFamily("gateway_db_pool_size", "Open database connections", value=pool.size)
            yield GaugeMetricFamily("gateway_db_pool_idle", "Idle database connections", value=pool.idle)
            yield GaugeMetricFamily("gateway_db_pool_max", "Most database connections the pool opens",
                                    value=pool.max)


class Timings:
    """Where one request's time went, for its access-log line: phases in milliseconds, plus what
    the response-prepare signal saw (status, whether it is an SSE stream)."""

    __slots__ = ("start", "phases", "status", "stream", "open")

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.phases: dict[str, float] = {}
        self.status: int | None = None
        self.stream = False
        self.open = True

    def add(self, phase: str, since: float) -> None:
        """Record the time from `since` (a time.monotonic() reading) to now as `phase`."""
        self.phases[phase] = round((time.monotonic() - since) * 1000, 2)

    def mark(self, phase: str) -> None:
        """Record the time from the request's arrival to now as `phase` (e.g. first_token)."""
        self.add(phase, self.start)


def route_of(request: web.BaseRequest) -> str:
    """The matched route's pattern (`/api/messages/{message_id}`): never the raw path, whose ids
    (and anything a client sends) would make a new series each."""
    # the access logger is handed a BaseRequest; the app only ever makes web.Request, which has a route
    if not isinstance(request, web.Request):
        return "unmatched"
    try:
        resource = request.match_info.route.resource
    except AssertionError:  # aiohttp refused the request before routing it (malformed): it has no match_info
        return "malformed"
    return resource.canonical if resource is not None else "unmatched"


def observe(metrics: Metrics, key: web.RequestKey[Timings]) -> Middleware:
    """The outermost middleware: starts the request's Timings (kept under `key`), counts it and its
    latency by route."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        timings = request[key] = Timings()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away before an answer (nginx's "client closed request")
            raise
        finally:
            timings.open = False
            if timings.stream:
                metrics.active_streams.dec()
            # a prepared response's status is what the client got, whatever happened after
            metrics.request_done(route_of(request), request.method, timings.status or status,
                                 time.monotonic() - timings.start)

    return middleware


def is_event_stream(response: web.StreamResponse) -> bool:
    """Whether the response is SSE, read off its header: `response.content_type` would parse it and
    keep a dict of its parameters (~0.5 KB) on the response for as long as the stream is held."""
    mime = response.headers.get("Content-Type", "").partition(";")[0]
    return mime.strip().lower() == "text/event-stream"


def on_prepare(metrics: Metrics, key: web.RequestKey[Timings]) -> Callable[[web.Request, web.StreamResponse],
                                                                          Awaitable[None]]:
    """A response-prepare signal: notes the status sent (on the request's Timings under `key`) and
    counts open SSE streams."""

    async def signal(request: web.Request, response: web.StreamResponse) -> None:
        timings = request.get(key)
        if timings is None:
            return
        timings.status = response.status
        if timings.open and not timings.stream and is_event_stream(response):
            timings.stream = True
            metrics.active_streams.inc()

    return signal
