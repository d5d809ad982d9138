"""Traces: OpenTelemetry spans for every request and every reply, configured by the standard OTEL_* variables.

Off unless `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`) or an OTLP endpoint is
set (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); only then is the SDK
(the `otel` extra) imported. Off costs nothing on the hot path: the middleware is not installed,
and each hook elsewhere (`span`, `start_chat`, `attempt_started`, `upstream_headers`, ...) is one
read of a context variable that only a traced request sets; no span object is made.

A turn's trace (the request's span continues an incoming W3C `traceparent`):

    POST /api/chat                  SERVER; its trace id is in the access line
    ├── gateway.edge.auth
    ├── gateway.policy.admission              the decision: action, model, reasons
    ├── gateway.persist             the user message's commit
    └── chat {model}                CLIENT, GenAI semantic conventions; the reply to its end
        ├── attempt {model}         one per upstream attempt, siblings in fallback order, with
        │                           their outcome; the upstream gets this span as its traceparent
        └── gateway.finish_write    the reply's one finish write

An arena turn has a `chat` span per slot; the OpenAI-compatible routes have one too. Prompt and
reply text go into spans only with `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`.

How a span finds its parent: the current one is held in a context variable (`_CURRENT`), which
asyncio copies into every task a traced request starts, so a reply's task (started by the turn)
nests under the request, each arena slot in its own task under its own `chat` span. OpenTelemetry's
global context and tracer provider are not used: each app has its own provider, as it has its
own metrics registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config import exporters_asked, otel_sampling
from gateway.observability.metrics import route_of

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from gateway.config import ModelConfig

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SERVICE_NAME = "chat-gateway"  # when OTEL_SERVICE_NAME is not set
CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
# probes and scrapes: a span every few seconds that says nothing
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class _NoSpan:
    """What `span()` gives when the request is not traced: enters, sets nothing, exits."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        pass


NO_SPAN = _NoSpan()


class _Current:
    """The traced span that new spans nest under, and the reply's `chat` span and open attempt."""

    __slots__ = ("tracing", "span", "chat", "attempt")

    def __init__(self, tracing: Tracing, span: Span, chat: _Chat | None = None) -> None:
        self.tracing = tracing
        self.span = span
        self.chat = chat
        self.attempt: Span | None = None


_CURRENT: ContextVar[_Current | None] = ContextVar("gateway_trace", default=None)


# -- what a `chat` span reads of the reply it traces (the provider chain and its request fit these) --

class AttemptView(Protocol):
    @property
    def outcome(self) -> str: ...


class ChainView(Protocol):
    """The fallback chain as a `chat` span sees it: the models planned, the one used, the attempts."""

    @property
    def models(self) -> Sequence[ModelConfig]: ...

    @property
    def used(self) -> ModelConfig: ...

    @property
    def attempts(self) -> Sequence[AttemptView]: ...

    @property
    def fallback_from(self) -> str | None: ...


class RequestView(Protocol):
    """The request's sampling parameters and messages, as a `chat` span notes them."""

    @property
    def messages(self) -> Sequence[Mapping[str, Any]]: ...

    @property
    def max_tokens(self) -> int | None: ...

    @property
    def temperature(self) -> float | None: ...

    @property
    def top_p(self) -> float | None: ...


# -- hooks for the rest of the gateway (each a context-variable read when tracing is off) -------------

def span(name: str) -> _Child | _NoSpan:
    """A child span of the current one around a `with` block (an exception marks it failed)."""
    current = _CURRENT.get()
    if current is None:
        return NO_SPAN
    return _Child(current, name)


def start_chat(chain: ChainView, request: RequestView) -> None:
    """Open the reply's `chat` span (GenAI conventions), current until `end_chat` in the same task."""
    current = _CURRENT.get()
    if current is None:
        return
    chat = _Chat(current, chain, request)
    _CURRENT.set(_Current(current.tracing, chat.span, chat))


def end_chat(status: str | None = None, finish_reason: str | None = None, ttft_ms: int | None = None,
             reply: list[str] | None = None, error: str | None = None) -> None:
    """Close the current `chat` span with the reply's outcome (`status` defaults to what the last
    attempt says); its usage came through the observer."""
    current = _CURRENT.get()
    if current is None or current.chat is None:
        return
    current.chat.end(current, status, finish_reason, ttft_ms, reply, error)


def attempt_started(model: ModelConfig) -> None:
    """The chain starts an upstream attempt on `model`: its span is opened (and sent upstream)."""
    current = _CURRENT.get()
    if current is None:
        return
    tracing = current.tracing
    if current.attempt is not None:  # one the chain left without a word: it was abandoned
        _end_attempt(tracing, current.attempt, "abandoned")
    current.attempt = tracing.tracer.start_span(
        f"attempt {model.name}", context=tracing.under(current.span), kind=tracing.client,
        attributes={"gen_ai.operation.name": "chat", "gen_ai.provider.name": model.provider,
                    "gen_ai.request.model": model.upstream, "gateway.model": model.name})


def attempt_ended(model: ModelConfig, outcome: str) -> None:
    """The chain recorded an attempt's outcome (`ok` or an error kind). A link skipped without an
    attempt (its circuit is open) gets a span of no length, so the chain's every step is seen."""
    current = _CURRENT.get()
    if current is None:
        return
    attempt, current.attempt = current.attempt, None
    if attempt is None:
        attempt_started(model)
        attempt, current.attempt = current.attempt, None
        assert attempt is not None
    _end_attempt(current.tracing, attempt, outcome)


def first_chunk(seconds: float) -> None:
    """The open attempt delivered its first event `seconds` after it started."""
    current = _CURRENT.get()
    if current is not None and current.attempt is not None:
        current.attempt.add_event("gen_ai.first_chunk", {"gateway.seconds": round(seconds, 6)})


def usage(input_tokens: int, output_tokens: int, *, estimated: bool, cost_usd: float | None) -> None:
    """The reply's usage, on its `chat` span."""
    current = _CURRENT.get()
    if current is not None and current.chat is not None:
        current.chat.span.set_attributes({
            "gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens,
            "gateway.usage.estimated": estimated, "gateway.cost_usd": cost_usd})


def upstream_headers(headers: dict[str, str]) -> dict[str, str]:
    """`headers` for an upstream call, with the W3C `traceparent` of the current attempt when traced
    (the same dict, untouched, when not)."""
    current = _CURRENT.get()
    if current is None:
        return headers
    carrier = dict(headers)
    current.tracing.propagator.inject(carrier, context=current.tracing.under(current.attempt or current.span))
    return carrier


# -- the app's tracing ------------------------------------------------------------------------

class Tracing:
    """One app's tracer: its own provider and exporter, and the request middleware."""

    def __init__(self, provider: TracerProvider, *, capture_content: bool = False) -> None:
        from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("gateway")
        self.capture_content = capture_content
        self.propagator = TraceContextTextMapPropagator()
        # the API's names, looked up once here: the module imports nothing from it until tracing is on
        self.under = set_span_in_context  # the context that makes a span the parent
        self.server, self.client, self.error = SpanKind.SERVER, SpanKind.CLIENT, StatusCode.ERROR

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Tracing | None:
        """Tracing as the OTEL_* variables in `env` ask, or None when they ask for none (see `exporters`).
        (Exporter headers, timeouts, compression and batching the SDK reads itself from the process
        environment.)"""
        exporters = exporters_asked(env)
        if not exporters:
            return None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        sampler_name, ratio = otel_sampling(env)
        provider = TracerProvider(
            sampler=_sampler(sampler_name, ratio),
            resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or SERVICE_NAME}))
        for name in exporters:
            # batched: spans are exported from the SDK's own thread, never on the event loop
            provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
        return cls(provider, capture_content=_true(env.get(CAPTURE_CONTENT)))

    @classmethod
    def to_exporter(cls, exporter: SpanExporter, *, capture_content: bool = False) -> Tracing:
        """Every span, exported as it ends to `exporter` (tests: the SDK's InMemorySpanExporter)."""
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return cls(provider, capture_content=capture_content)

    def middleware(self, trace_id: web.RequestKey[str]) -> Middleware:
        """A SERVER span per request (probes and scrapes excepted), current while it is handled; a
        sampled one's trace id is set on the request under `trace_id` (for the access line)."""
        tracer, extract, server = self.tracer, self.propagator.extract, self.server

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in UNTRACED_PATHS:
                return await handler(request)
            route = route_of(request)
            root = tracer.start_span(f"{request.method} {route}", context=extract(request.headers), kind=server,
                                     attributes={"http.request.method": request.method, "http.route": route,
                                                 "url.path": request.path})
            context = root.get_span_context()
            if context.trace_flags.sampled:  # the access line names only a trace that is exported
                request[trace_id] = format(context.trace_id, "032x")
            token = _CURRENT.set(_Current(self, root))
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as e:
                status = e.status
                raise
            except asyncio.CancelledError:
                status = 499  # the client left before an answer
                raise
            except Exception as e:
                root.record_exception(e)
                raise
            finally:
                _CURRENT.reset(token)
                root.set_attribute("http.response.status_code", status)
                if status >= 500:
                    root.set_status(self.error)
                root.end()

        return middleware

    async def close(self) -> None:
        """Export what is still queued (the SDK's shutdown blocks: it runs off the event loop)."""
        await asyncio.to_thread(self.provider.shutdown)


# -- spans ------------------------------------------------------------------------------------

class _Child:
    """A span under `current` for the length of a `with` block."""

    __slots__ = ("_current", "_name", "_span")

    def __init__(self, current: _Current, name: str) -> None:
        self._current = current
        self._name = name

    def __enter__(self) -> Span:
        current = self._current
        self._span = current.tracing.tracer.start_span(self._name, context=current.tracing.under(current.span))
        return self._span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if error is not None:
            self._span.set_attribute("error.type", getattr(error, "type", None) or type(error).__name__)
            self._span.set_status(self._current.tracing.error, getattr(error, "message", None) or type(error).__name__)
        self._span.end()


class _Chat:
    """The reply's `chat {model}` span: request attributes at the start, response ones at the end."""

    __slots__ = ("span", "parent", "chain", "request", "started")

    def __init__(self, parent: _Current, chain: ChainView, request: RequestView) -> None:
        planned = chain.models[0]
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": planned.provider,
            "gen_ai.request.model": planned.upstream, "gateway.model": planned.name}
        for key, value in (("max_tokens", request.max_tokens), ("temperature", request.temperature),
                           ("top_p", request.top_p)):
            if value is not None:
                attributes[f"gen_ai.request.{key}"] = value
        if parent.tracing.capture_content:
            attributes["gen_ai.input.messages"] = orjson.dumps(
                [{"role": m.get("role"), "parts": [{"type": "text", "content": m.get("content")}]}
                 for m in request.messages], default=str).decode()
        tracing = parent.tracing
        self.span = tracing.tracer.start_span(f"chat {planned.upstream}", context=tracing.under(parent.span),
                                              kind=tracing.client, attributes=attributes)
        self.parent = parent
        self.chain = chain
        self.request = request
        self.started = time.monotonic()

    def end(self, current: _Current, status: str | None, finish_reason: str | None, ttft_ms: int | None,
            reply: list[str] | None, error: str | None) -> None:
        tracing = self.parent.tracing
        if current.attempt is not None:  # the reply ended while an attempt was open: cancelled
            _end_attempt(tracing, current.attempt, "cancelled")
            current.attempt = None
        chain, span = self.chain, self.span
        used = chain.used
        attempts = chain.attempts
        if status is None:
            status = "complete" if attempts and attempts[-1].outcome == "ok" else "failed"
            if error is None and status == "failed" and attempts:
                error = attempts[-1].outcome
        span.set_attributes({"gen_ai.response.model": used.upstream, "gen_ai.provider.name": used.provider,
                             "gateway.model": used.name, "gateway.status": str(status),
                             "gateway.attempts": len(attempts)})
        if chain.fallback_from is not None:
            span.set_attribute("gateway.fallback_from", chain.fallback_from)
        if finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        if ttft_ms is not None:
            span.set_attribute("gateway.time_to_first_token_ms", ttft_ms)
            span.add_event("gen_ai.first_token", timestamp=_epoch_ns(self.started + ttft_ms / 1000))
        if reply is not None and tracing.capture_content:
            span.set_attribute("gen_ai.output.messages", orjson.dumps(
                [{"role": "assistant", "parts": [{"type": "text", "content": "".join(reply)}],
                  "finish_reason": finish_reason}]).decode())
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(tracing.error, error)
        span.end()
        _CURRENT.set(self.parent)


def _end_attempt(tracing: Tracing, attempt: Span, outcome: str) -> None:
    attempt.set_attribute("gateway.attempt.outcome", outcome)
    if outcome != "ok":
        attempt.set_attribute("error.type", outcome)
        attempt.set_status(tracing.error, outcome)
    attempt.end()


def _epoch_ns(monotonic_s: float) -> int:
    return time.time_ns() - round((time.monotonic() - monotonic_s) * 1e9)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _sampler(name: str, ratio: float) -> Any:
    from opentelemetry.sdk.trace import sampling

    root = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
            "traceidratio": sampling.TraceIdRatioBased(ratio)}[name.removeprefix("parentbased_")]
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=env.get("OTEL_SERVICE_NAME") or SERVICE_NAME)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint and env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        # the signal's path is appended to the general endpoint, as the specification says
        endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint or None)
