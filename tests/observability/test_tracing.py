"""OpenTelemetry traces through the running app: the spans a turn makes, their attributes and nesting,
the W3C traceparent continued from the client and sent upstream, the trace id in the access line,
no prompt or reply text unless asked for, and nothing at all when tracing is off."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.app import create_app
from gateway.edge.middleware import AccessLogger
from gateway.errors import ConfigError
from gateway.observability import tracing
from gateway.observability.tracing import Tracing
from gateway.state import TRACING
from tests.support.common import REPO_ROOT, User, wait_for
from tests.support.fakes import FakeUpstream, Reply, openai_stream, parse_sse
from tests.support.providers import FakeAnthropic

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

CONFIG = """
[providers.up]
kind = "openai"
base_url = "{base_url}"

[models.main]
provider = "up"
upstream = "main-up"
fallbacks = ["backup"]

[models.backup]
provider = "up"
upstream = "backup-up"
"""

INCOMING = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
PROMPT = "the secret plan is marmalade"
REPLY = ["Hel", "lo"]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(aiohttp_client: Any, make_settings: Any, upstream: FakeUpstream, config_file: Callable[[str], str],
           exporter: InMemorySpanExporter) -> Callable[..., Any]:
    """A client on the real app, traced to `exporter`, its models on the fake upstream."""

    async def make(capture_content: bool = False, server: Any = None) -> TestClient:
        settings = make_settings(GATEWAY_CONFIG=config_file(CONFIG.format(base_url=upstream.base_url)))
        app = create_app(settings, Tracing.to_exporter(exporter, capture_content=capture_content))
        if server is not None:
            return await aiohttp_client(await server(app, access_log_class=AccessLogger))
        return await aiohttp_client(app)

    return make


async def chat(client: TestClient, user: User, **headers: str) -> list[Any]:
    resp = await client.post("/api/chat", json={"content": PROMPT, "model": "main", "stream": True, "max_tokens": 50},
                             headers={**user.headers, **headers})
    assert resp.status == 200
    return parse_sse(await resp.read())


async def finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """The spans once the turn's `chat` span (the last to end, after the finish write) is exported."""

    async def done() -> bool:
        return any(s.name.startswith("chat ") for s in exporter.get_finished_spans())

    await wait_for(done)
    return sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)


def named(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def hexid(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def traceparent(span: ReadableSpan) -> str:
    """The W3C header naming `span` as the parent (flags: sampled, and the SDK's random trace id)."""
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


async def test_a_turn_is_one_trace_with_auth_policy_persist_and_a_genai_chat_span_holding_its_attempt(
        traced: Callable[..., Any], exporter: InMemorySpanExporter, upstream: FakeUpstream, user: User):
    client = await traced()
    upstream.queue(Reply(pieces=openai_stream(REPLY, prompt_tokens=9)))
    events = await chat(client, user)
    assert [(e.event, e.data) for e in events][-1] == ("message", "[DONE]")
    assert [e.event for e in events][-3:-1] == ["usage", "done"]

    spans = await finished(exporter)
    assert sorted(s.name for s in spans) == sorted([
        "POST /api/chat", "gateway.auth", "gateway.rate_limit", "gateway.persist", "gateway.policy", "chat main-up",
        "attempt main", "gateway.finish_write"])
    root, chat_span = named(spans, "POST /api/chat"), named(spans, "chat main-up")
    attempt = named(spans, "attempt main")
    assert len({s.context.trace_id for s in spans if s.context is not None}) == 1
    assert root.parent is None and root.kind is SpanKind.SERVER
    for child in ("gateway.auth", "gateway.rate_limit", "gateway.persist", "gateway.policy", "chat main-up"):
        assert parent_id(named(spans, child)) == root.context.span_id, child  # type: ignore[union-attr]
    for child in ("attempt main", "gateway.finish_write"):
        assert parent_id(named(spans, child)) == chat_span.context.span_id, child  # type: ignore[union-attr]

    assert root.attributes is not None and dict(root.attributes) == {
        "http.request.method": "POST", "http.route": "/api/chat", "url.path": "/api/chat",
        "http.response.status_code": 200}
    assert named(spans, "gateway.policy").attributes == {"gateway.policy.action": "approve"}
    assert chat_span.kind is SpanKind.CLIENT and chat_span.status.status_code is StatusCode.UNSET
    attributes = dict(chat_span.attributes or {})
    ttft = attributes.pop("gateway.time_to_first_token_ms")
    assert isinstance(ttft, int) and ttft >= 0
    assert attributes == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "up", "gen_ai.request.model": "main-up",
        "gen_ai.request.max_tokens": 50, "gen_ai.response.model": "main-up", "gen_ai.usage.input_tokens": 9,
        "gen_ai.usage.output_tokens": 2, "gen_ai.response.finish_reasons": ("stop",), "gateway.model": "main",
        "gateway.status": "complete", "gateway.attempts": 1, "gateway.usage.estimated": False,
        "gateway.cost_usd": 0.0}
    assert [e.name for e in chat_span.events] == ["gen_ai.first_token"]
    assert dict(attempt.attributes or {}) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "up", "gen_ai.request.model": "main-up",
        "gateway.model": "main", "gateway.attempt.outcome": "ok"}
    assert [e.name for e in attempt.events] == ["gen_ai.first_chunk"]

    # the upstream was called as the attempt span's child, in the same trace
    assert upstream.headers[-1]["traceparent"] == traceparent(attempt)


async def test_a_fallback_shows_two_sibling_attempts_the_first_failed_and_each_sent_its_own_traceparent(
        traced: Callable[..., Any], exporter: InMemorySpanExporter, upstream: FakeUpstream, user: User):
    client = await traced()
    upstream.queue(Reply(status=503, body=b'{"error":{"message":"down"}}'),
                   Reply(pieces=openai_stream(REPLY, prompt_tokens=9)))
    events = await chat(client, user)
    assert events[-2].event == "done"

    spans = await finished(exporter)
    chat_span = named(spans, "chat main-up")
    attempts = [s for s in spans if s.name.startswith("attempt ")]
    assert [s.name for s in attempts] == ["attempt main", "attempt backup"]
    assert {parent_id(s) for s in attempts} == {chat_span.context.span_id}  # type: ignore[union-attr]
    failed, served = attempts
    assert failed.attributes is not None and failed.attributes["gateway.attempt.outcome"] == "upstream_http_error"
    assert failed.attributes["error.type"] == "upstream_http_error"
    assert failed.status.status_code is StatusCode.ERROR
    assert served.attributes is not None and served.attributes["gateway.attempt.outcome"] == "ok"
    assert served.attributes["gen_ai.request.model"] == "backup-up"
    assert served.status.status_code is StatusCode.UNSET
    assert failed.end_time is not None and served.start_time is not None and failed.end_time <= served.start_time
    assert chat_span.attributes is not None
    assert (chat_span.attributes["gen_ai.request.model"], chat_span.attributes["gen_ai.response.model"],
            chat_span.attributes["gateway.fallback_from"], chat_span.attributes["gateway.attempts"]) == (
        "main-up", "backup-up", "main", 2)
    assert [h["traceparent"] for h in upstream.headers] == [traceparent(failed), traceparent(served)]


async def test_a_link_skipped_for_its_open_circuit_is_an_attempt_span_saying_so(
        aiohttp_client: Any, make_settings: Any, upstream: FakeUpstream, config_file: Callable[[str], str],
        exporter: InMemorySpanExporter, user: User):
    settings = make_settings(GATEWAY_CONFIG=config_file(CONFIG.format(base_url=upstream.base_url)),
                             CIRCUIT_FAILURES="1", CIRCUIT_COOLDOWN_S="600")
    client = await aiohttp_client(create_app(settings, Tracing.to_exporter(exporter)))
    upstream.queue(Reply(status=503, body=b'{"error":{"message":"down"}}'))
    await chat(client, user)  # main fails once: its circuit opens
    await finished(exporter)
    exporter.clear()
    await chat(client, user)

    spans = await finished(exporter)
    attempts = [(s.name, dict(s.attributes or {})["gateway.attempt.outcome"]) for s in spans
                if s.name.startswith("attempt ")]
    assert attempts == [("attempt main", "circuit_open"), ("attempt backup", "ok")]
    assert len(upstream.headers) == 3  # the skipped link was not called


async def test_an_incoming_traceparent_is_continued_and_carried_to_the_upstream(
        traced: Callable[..., Any], exporter: InMemorySpanExporter, upstream: FakeUpstream, user: User):
    client = await traced()
    upstream.queue(Reply(pieces=openai_stream(REPLY)))
    await chat(client, user, traceparent=INCOMING)

    spans = await finished(exporter)
    root = named(spans, "POST /api/chat")
    assert root.parent is not None and root.parent.is_remote
    assert format(root.parent.span_id, "016x") == "b7ad6b7169203331"
    assert {hexid(s)[0] for s in spans} == {"0af7651916cd43dd8448eb211c80319c"}
    assert upstream.headers[-1]["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert upstream.headers[-1]["traceparent"] == traceparent(named(spans, "attempt main"))


async def test_an_accepted_turn_keeps_its_chat_span_open_past_the_202_until_the_reply_is_saved(
        traced: Callable[..., Any], exporter: InMemorySpanExporter, upstream: FakeUpstream, user: User):
    client = await traced()
    upstream.queue(Reply(pieces=openai_stream(REPLY), piece_delay_s=0.05))
    resp = await client.post("/api/chat", json={"content": "later", "model": "main"}, headers=user.headers)
    assert resp.status == 202

    spans = await finished(exporter)
    root, chat_span = named(spans, "POST /api/chat"), named(spans, "chat main-up")
    assert parent_id(chat_span) == root.context.span_id  # type: ignore[union-attr]
    assert root.end_time is not None and chat_span.end_time is not None and root.end_time < chat_span.end_time
    assert dict(root.attributes or {})["http.response.status_code"] == 202
    finish = named(spans, "gateway.finish_write")
    assert finish.end_time is not None and finish.end_time <= chat_span.end_time


async def test_a_policy_refusal_is_a_failed_policy_span_and_nothing_after_it(
        aiohttp_client: Any, make_settings: Any, upstream: FakeUpstream, config_file: Callable[[str], str],
        exporter: InMemorySpanExporter, user: User):
    path = config_file(CONFIG.format(base_url=upstream.base_url) + "\n[limits]\nrequests_per_minute = 1\n")
    client = await aiohttp_client(create_app(make_settings(GATEWAY_CONFIG=path), Tracing.to_exporter(exporter)))
    first = await client.post("/api/chat", json={"content": "hi", "model": "main"}, headers=user.headers)
    assert first.status == 202
    await finished(exporter)
    exporter.clear()
    upstream.requests.clear()
    resp = await client.post("/api/chat", json={"content": "hi", "model": "main"}, headers=user.headers)
    assert resp.status == 429

    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    # the per-minute limit is checked at the edge, before the persist: nothing after it
    assert [s.name for s in spans] == ["POST /api/chat", "gateway.auth", "gateway.rate_limit"]
    policy = named(list(spans), "gateway.rate_limit")
    assert policy.status.status_code is StatusCode.ERROR
    assert dict(policy.attributes or {}) == {"error.type": "rate_limited"}
    root = named(list(spans), "POST /api/chat")
    assert dict(root.attributes or {})["http.response.status_code"] == 429
    assert root.status.status_code is StatusCode.UNSET  # a 4xx is the client's, not the server's, error
    assert upstream.requests == []


async def test_a_cap_stop_after_the_commit_is_a_policy_span_saying_refuse_and_no_chat_span(
        aiohttp_client: Any, make_settings: Any, upstream: FakeUpstream, config_file: Callable[[str], str],
        exporter: InMemorySpanExporter, user: User, db: Any):
    # a model the key may not use: decided after the user message is saved, as a refused reply
    client = await aiohttp_client(create_app(make_settings(
        GATEWAY_CONFIG=config_file(CONFIG.format(base_url=upstream.base_url))), Tracing.to_exporter(exporter)))
    await db.execute("UPDATE api_keys SET limits = $2 WHERE user_id = $1", user.id, {"models": ["backup"]})
    resp = await client.post("/api/chat", json={"content": "hi", "model": "main"}, headers=user.headers)
    assert resp.status == 202

    async def root_done() -> bool:
        return any(s.name == "POST /api/chat" for s in exporter.get_finished_spans())

    await wait_for(root_done)
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert [s.name for s in spans] == ["POST /api/chat", "gateway.auth", "gateway.rate_limit", "gateway.persist",
                                       "gateway.policy"]
    assert named(list(spans), "gateway.policy").attributes == {"gateway.policy.action": "refuse"}
    assert upstream.requests == []


async def test_an_unsampled_incoming_trace_exports_nothing_but_still_passes_its_trace_upstream(
        traced: Callable[..., Any], exporter: InMemorySpanExporter, upstream: FakeUpstream, user: User,
        aiohttp_server: Any, caplog: pytest.LogCaptureFixture):
    client = await traced(server=aiohttp_server)
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    upstream.queue(Reply(pieces=openai_stream(REPLY)))
    await chat(client, user, traceparent=INCOMING[:-2] + "00", **{"X-Request-Id": "unsampled-1"})

    async def logged() -> bool:
        return any(getattr(r, "request_id", None) == "unsampled-1" for r in caplog.records)

    await wait_for(logged)
    line = next(r for r in caplog.records if getattr(r, "request_id", None) == "unsampled-1")
    assert " trace=" not in line.getMessage() and not hasattr(line, "trace_id")
    sent = upstream.headers[-1]["traceparent"]
    assert sent.startswith("00-0af7651916cd43dd8448eb211c80319c-") and sent.endswith("-00")
    assert exporter.get_finished_spans() == ()


async def test_the_openai_route_is_traced_as_a_chat_span_with_its_usage(
        traced: Callable[..., Any], exporter: InMemorySpanExporter, upstream: FakeUpstream, user: User):
    client = await traced()
    upstream.queue(Reply(pieces=openai_stream(REPLY, prompt_tokens=4)))
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "main", "messages": [{"role": "user", "content": PROMPT}]})
    assert resp.status == 200
    await resp.read()

    spans = await finished(exporter)
    root, chat_span = named(spans, "POST /v1/chat/completions"), named(spans, "chat main-up")
    assert parent_id(chat_span) == root.context.span_id  # type: ignore[union-attr]
    assert parent_id(named(spans, "attempt main")) == chat_span.context.span_id  # type: ignore[union-attr]
    assert chat_span.attributes is not None
    assert (chat_span.attributes["gen_ai.usage.input_tokens"], chat_span.attributes["gen_ai.usage.output_tokens"],
            chat_span.attributes["gateway.status"]) == (4, 2, "complete")


async def test_an_anthropic_upstream_gets_the_attempts_traceparent_and_its_usage_lands_on_the_chat_span(
        aiohttp_client: Any, make_settings: Any, anthropic: tuple[FakeAnthropic, Any], exporter: InMemorySpanExporter,
        config_file: Callable[[str], str], user: User):
    fake, server = anthropic
    path = config_file(f"""
[providers.claude]
kind = "anthropic"
base_url = "{server.make_url('/v1')}"
api_key = "sk-ant-test"
[models.claude]
provider = "claude"
upstream = "claude-x"
""")
    client = await aiohttp_client(create_app(make_settings(GATEWAY_CONFIG=path), Tracing.to_exporter(exporter)))
    resp = await client.post("/api/chat", json={"content": "hi", "model": "claude", "stream": True},
                             headers=user.headers)
    assert resp.status == 200
    await resp.read()

    spans = await finished(exporter)
    chat_span, attempt = named(spans, "chat claude-x"), named(spans, "attempt claude")
    assert fake.headers[0]["traceparent"] == traceparent(attempt)
    assert chat_span.attributes is not None
    assert (chat_span.attributes["gen_ai.provider.name"], chat_span.attributes["gen_ai.usage.input_tokens"],
            chat_span.attributes["gen_ai.usage.output_tokens"], chat_span.attributes["gen_ai.response.finish_reasons"],
            ) == ("claude", 25, 15, ("stop",))


def texts_in(spans: list[ReadableSpan]) -> str:
    """Every attribute and event value of every span, as one string."""
    values: list[str] = []
    for s in spans:
        values += [str(v) for v in (s.attributes or {}).values()]
        for event in s.events:
            values += [str(v) for v in (event.attributes or {}).values()]
    return "\n".join(values)


async def test_no_prompt_or_reply_text_is_in_any_span_unless_content_capture_is_asked_for(
        traced: Callable[..., Any], exporter: InMemorySpanExporter, upstream: FakeUpstream, user: User):
    client = await traced()
    upstream.queue(Reply(pieces=openai_stream(["a reply about ", "oranges"])))
    await chat(client, user)
    spans = await finished(exporter)
    text = texts_in(spans)
    assert "marmalade" not in text and "oranges" not in text
    assert not [k for s in spans for k in (s.attributes or {}) if k in ("gen_ai.input.messages",
                                                                       "gen_ai.output.messages")]


async def test_content_capture_puts_the_prompt_and_reply_on_the_chat_span(
        traced: Callable[..., Any], exporter: InMemorySpanExporter, upstream: FakeUpstream, user: User):
    client = await traced(capture_content=True)
    upstream.queue(Reply(pieces=openai_stream(["a reply about ", "oranges"])))
    await chat(client, user)
    chat_span = named(await finished(exporter), "chat main-up")
    assert chat_span.attributes is not None
    assert chat_span.attributes["gen_ai.input.messages"] == (
        '[{"role":"user","parts":[{"type":"text","content":"the secret plan is marmalade"}]}]')
    assert chat_span.attributes["gen_ai.output.messages"] == (
        '[{"role":"assistant","parts":[{"type":"text","content":"a reply about oranges"}],"finish_reason":"stop"}]')


async def test_the_access_line_carries_the_trace_id(
        traced: Callable[..., Any], exporter: InMemorySpanExporter, upstream: FakeUpstream, user: User,
        aiohttp_server: Any, caplog: pytest.LogCaptureFixture):
    client = await traced(server=aiohttp_server)
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    upstream.queue(Reply(pieces=openai_stream(REPLY)))
    await chat(client, user, **{"X-Request-Id": "traced-1"})

    def record() -> logging.LogRecord | None:
        return next((r for r in caplog.records if getattr(r, "request_id", None) == "traced-1"), None)

    async def logged() -> bool:
        return record() is not None

    await wait_for(logged)
    trace_id, _ = hexid(named(await finished(exporter), "POST /api/chat"))
    line = record()
    assert line is not None
    assert line.trace_id == trace_id  # type: ignore[attr-defined]
    assert line.getMessage().endswith(f" user={user.id} trace={trace_id}"), line.getMessage()


async def test_arena_slots_each_get_a_chat_span_under_the_one_request(
        traced: Callable[..., Any], exporter: InMemorySpanExporter, upstream: FakeUpstream, user: User):
    client = await traced()
    upstream.queue(Reply(pieces=openai_stream(REPLY)), Reply(pieces=openai_stream(REPLY)))
    resp = await client.post("/api/arena", headers=user.headers,
                             json={"content": "compare", "models": ["main", "backup"], "stream": True})
    assert resp.status == 200
    await resp.read()

    async def both() -> bool:
        return len([s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]) == 2

    await wait_for(both)
    spans = exporter.get_finished_spans()
    root = named(list(spans), "POST /api/arena")
    chats = {s.name: s for s in spans if s.name.startswith("chat ")}
    assert set(chats) == {"chat main-up", "chat backup-up"}
    assert {parent_id(s) for s in chats.values()} == {root.context.span_id}  # type: ignore[union-attr]
    for name, model in (("chat main-up", "main"), ("chat backup-up", "backup")):
        attempt = named(list(spans), f"attempt {model}")
        assert parent_id(attempt) == chats[name].context.span_id  # type: ignore[union-attr]


async def test_off_the_app_has_no_tracing_no_middleware_and_sends_no_traceparent(
        make_client: Any, upstream: FakeUpstream, user: User, config_file: Callable[[str], str]):
    client = await make_client(GATEWAY_CONFIG=config_file(CONFIG.format(base_url=upstream.base_url)))
    assert TRACING not in client.app
    assert len(client.app.middlewares) == 1  # observe, errors and CORS preflight folded into one: no tracing
    upstream.queue(Reply(pieces=openai_stream(REPLY)))
    await chat(client, user, traceparent=INCOMING)
    assert "traceparent" not in upstream.headers[-1]
    headers = {"Accept": "text/event-stream"}
    assert tracing.upstream_headers(headers) is headers  # the hooks pass through untouched
    assert isinstance(tracing.span("x"), type(tracing.NO_SPAN))


async def test_otel_variables_alone_send_the_spans_over_otlp_http_to_a_collector(
        make_settings: Any, aiohttp_server: Any, aiohttp_client: Any, upstream: FakeUpstream, user: User,
        config_file: Callable[[str], str]):
    # a stand-in collector: what any OTLP/HTTP collector (Jaeger, Tempo, an OpenTelemetry Collector) receives
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    collector = web.Application()
    collector.router.add_post("/v1/traces", traces)
    sink = await aiohttp_server(collector)
    settings = make_settings(GATEWAY_CONFIG=config_file(CONFIG.format(base_url=upstream.base_url)),
                             OTEL_EXPORTER_OTLP_ENDPOINT=str(sink.make_url("/")), OTEL_SERVICE_NAME="gw-under-test")
    client = await aiohttp_client(create_app(settings))
    assert TRACING in client.app
    upstream.queue(Reply(pieces=openai_stream(REPLY)))
    await chat(client, user)
    await client.close()  # the app's cleanup exports what the batch processor still holds

    spans = [(span.name, {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"])
             for batch in received for resource in batch.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    assert sorted(name for name, _ in spans) == sorted([
        "POST /api/chat", "gateway.auth", "gateway.rate_limit", "gateway.persist", "gateway.policy", "chat main-up",
        "attempt main", "gateway.finish_write"])
    assert {service for _, service in spans} == {"gw-under-test"}


def test_tracing_is_off_unless_an_exporter_or_endpoint_is_named():
    assert Tracing.from_env({}) is None
    assert Tracing.from_env({"OTEL_SERVICE_NAME": "gw", "OTEL_TRACES_SAMPLER": "always_on"}) is None
    assert Tracing.from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert Tracing.from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is None
    console = Tracing.from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert console is not None and console.capture_content is False
    otlp = Tracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
                             "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true",
                             "OTEL_SERVICE_NAME": "my-gateway", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                             "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert otlp is not None and otlp.capture_content is True
    assert otlp.provider.resource.attributes["service.name"] == "my-gateway"
    assert otlp.provider.sampler.get_description() == (
        "ParentBased{root:TraceIdRatioBased{0.25},remoteParentSampled:AlwaysOnSampler,"
        "remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,"
        "localParentNotSampled:AlwaysOffSampler}")
    for tracer in (console, otlp):
        tracer.provider.shutdown()


@pytest.mark.parametrize(("env", "variable"), [
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
     "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
])
def test_a_tracing_setting_the_gateway_cannot_honour_fails_naming_its_variable(env: dict[str, str], variable: str):
    with pytest.raises(ConfigError) as e:
        Tracing.from_env(env)
    assert e.value.message.startswith(variable + ":")


def test_serve_with_a_tracing_value_it_cannot_honour_exits_2_naming_the_variable(database_url: str, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": database_url,
           "GATEWAY_DATA_DIR": str(tmp_path), "OTEL_TRACES_EXPORTER": "console",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}
    out = subprocess.run([sys.executable, "-m", "gateway", "serve"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (
        2, "", "configuration error: OTEL_TRACES_SAMPLER_ARG: a ratio from 0 to 1, got 'half'\n")


def test_the_settings_keep_the_otel_variables_but_not_the_exporter_headers(make_settings: Any):
    settings = make_settings(OTEL_TRACES_EXPORTER="console", OTEL_EXPORTER_OTLP_HEADERS="x-honeycomb-team=secret")
    assert settings.otel == {"OTEL_TRACES_EXPORTER": "console"}


OFFLINE = """
import asyncio, sys, uuid
sys.modules["opentelemetry"] = None  # as if the `otel` extra were not installed
from aiohttp.test_utils import TestClient, TestServer
from gateway.app import create_app
from gateway.config import Settings
from gateway.store.db import create_pool
from gateway.errors import ConfigError
from gateway.store.keys import create_user_with_key

async def main():
    env = {"DATABASE_URL": sys.argv[1], "BOOTSTRAP_ADMIN_KEY": "false", "DEMO_DELAY_MS": "0", "DB_POOL_MIN": "1"}
    try:
        create_app(Settings.from_env({**env, "OTEL_TRACES_EXPORTER": "console"}))
    except ConfigError as e:
        print(e.message)
    pool = await create_pool(sys.argv[1], min_size=1, max_size=2)
    _, key = await create_user_with_key(pool, "offline", ["chat"], uuid.uuid4())
    await pool.close()
    async with TestClient(TestServer(create_app(Settings.from_env(env)))) as client:
        resp = await client.post("/api/chat", json={"content": "hi", "stream": True},
                                 headers={"Authorization": "Bearer " + key})
        body = await resp.read()
        print(resp.status, body.count(b"event: done"))
    print(sorted(m for m in sys.modules if m.startswith("opentelemetry") and sys.modules[m] is not None))

asyncio.run(main())
"""


def test_the_gateway_runs_without_the_opentelemetry_packages_and_says_what_to_install_to_trace(database_url: str):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(OFFLINE), database_url], capture_output=True,
                         text=True, env=env, timeout=90)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "OTEL_TRACES_EXPORTER: tracing needs the OpenTelemetry SDK (pip install 'chat-gateway[otel]')",
        "200 1", "[]"]
