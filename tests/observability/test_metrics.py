"""GET /metrics: Prometheus text from a registry per app, counted once per event, never per chunk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.metrics import Metrics
from gateway.providers.base import ChainObserver, ChatRequest
from gateway.providers.chain import Chain
from tests.support.cli import free_port
from tests.support.common import REPO_ROOT, MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream, Reply, openai_stream, parse_sse
from tests.support.providers import collect

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
JWT_SECRET = "metrics-test-secret-of-at-least-32-bytes!"


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def parse(text: str) -> Samples:
    return {key(s.name, **s.labels): s.value for family in text_string_to_metric_families(text)
            for s in family.samples}


async def scrape(client: TestClient, **headers: str) -> Samples:
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return parse(await resp.text())


async def scrape_when(client: TestClient, ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until `ready` holds: a request is counted as its handler returns, just after the
    client has read the end of its body."""
    latest: Samples = {}

    async def check() -> bool:
        nonlocal latest
        latest = await scrape(client)
        return ready(latest)

    await wait_for(check)
    return latest


def requests(route: str, status: int, method: str = "POST") -> tuple[str, tuple[tuple[str, str], ...]]:
    return key("gateway_http_requests_total", method=method, route=route, status=str(status))


PRICED = """
[providers.up]
kind = "openai"
base_url = "{base_url}"

[models.fake]
provider = "up"
upstream = "fake-up"
input_price_per_mtok = 1.5
output_price_per_mtok = 4.0
"""


async def test_a_streamed_chat_and_a_completion_count_requests_first_tokens_tokens_and_cost_exactly(
        make_client: MakeClient, upstream: FakeUpstream, user: User, config_file: Callable[[str], str]):
    client = await make_client(GATEWAY_CONFIG=config_file(PRICED.format(base_url=upstream.base_url)))
    # chunks a little apart (separate reads): the chunk gap is still observed once per reply
    upstream.queue(Reply(openai_stream(["a", "b", "c", "d", "e"], prompt_tokens=9), piece_delay_s=0.01),
                   Reply(openai_stream(["Hi"], prompt_tokens=4, completion_tokens=7), piece_delay_s=0.01))

    resp = await client.post("/api/chat", json={"content": "hello", "stream": True}, headers=user.headers)
    assert resp.status == 200
    assert parse_sse(await resp.read())[-1].data == "[DONE]"
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200

    m = await scrape_when(client, lambda m: requests("/api/chat", 200) in m)
    assert m[requests("/api/chat", 200)] == 1
    assert m[requests("/v1/chat/completions", 200)] == 1
    assert m[key("gateway_http_request_duration_seconds_count", route="/api/chat")] == 1
    assert m[key("gateway_time_to_first_token_seconds_count", model="fake", provider="up")] == 2
    assert m[key("gateway_chunk_gap_seconds_count", model="fake", provider="up")] == 2
    assert m[key("gateway_overhead_seconds_count")] == 2
    assert m[key("gateway_tokens_total", model="fake", kind="prompt")] == 9 + 4
    assert m[key("gateway_tokens_total", model="fake", kind="completion")] == 5 + 7
    assert m[key("gateway_cost_usd_total", model="fake")] == pytest.approx((13 * 1.5 + 12 * 4.0) / 1e6)
    assert key("gateway_fallbacks_total", from_model="fake", to_model="demo") not in m


FALLBACK = """
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


async def test_a_fallback_is_counted_from_to_and_the_failed_models_circuit_shows_open(
        make_client: MakeClient, upstream: FakeUpstream, user: User, config_file: Callable[[str], str]):
    client = await make_client(GATEWAY_CONFIG=config_file(FALLBACK.format(base_url=upstream.base_url)),
                               CIRCUIT_FAILURES="1", CIRCUIT_COOLDOWN_S="600")
    upstream.queue(Reply(status=503, body=b'{"error":{"message":"down"}}'))

    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "main", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    assert (await resp.json())["model"] == "backup"

    m = await scrape(client)
    assert m[key("gateway_fallbacks_total", from_model="main", to_model="backup")] == 1
    assert m[key("gateway_time_to_first_token_seconds_count", model="backup", provider="up")] == 1
    assert key("gateway_time_to_first_token_seconds_count", model="main", provider="up") not in m
    circuits = {(dict(labels)["model"], dict(labels)["state"]): v for (name, labels), v in m.items()
                if name == "gateway_circuit_state"}
    assert circuits == {("main", "open"): 1, ("main", "half_open"): 0, ("main", "closed"): 0,
                        ("backup", "open"): 0, ("backup", "half_open"): 0, ("backup", "closed"): 1,
                        ("demo", "open"): 0, ("demo", "half_open"): 0, ("demo", "closed"): 1}


async def test_key_cache_counts_one_miss_then_hits_and_every_unknown_key_as_a_miss(make_client: MakeClient,
                                                                                  user: User):
    client = await make_client()
    for _ in range(3):
        assert (await client.get("/api/me", headers=user.headers)).status == 200
    for _ in range(2):
        bad = {"Authorization": "Bearer gwk_" + "x" * 43}
        assert (await client.get("/api/me", headers=bad)).status == 401

    m = await scrape(client)
    assert m[key("gateway_cache_lookups_total", cache="api_key", result="miss")] == 1 + 2
    assert m[key("gateway_cache_lookups_total", cache="api_key", result="hit")] == 2


async def test_jwt_user_cache_counts_the_first_request_as_a_miss_and_the_rest_as_hits(make_client: MakeClient):
    client = await make_client(JWT_SECRET=JWT_SECRET)
    token = jwt.encode({"sub": str(uuid.uuid4()), "aud": "authenticated", "exp": int(time.time()) + 300},
                       JWT_SECRET, algorithm="HS256")
    for _ in range(3):
        assert (await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})).status == 200

    m = await scrape(client)
    assert m[key("gateway_cache_lookups_total", cache="jwt_user", result="miss")] == 1
    assert m[key("gateway_cache_lookups_total", cache="jwt_user", result="hit")] == 2


async def test_requests_are_labelled_by_route_pattern_never_by_raw_path(make_client: MakeClient, user: User):
    client = await make_client()
    missing = uuid.uuid4()
    assert (await client.get(f"/api/messages/{missing}", headers=user.headers)).status == 404
    assert (await client.get("/no/such/page")).status == 404
    assert (await client.get("/healthz")).status == 200

    text = await (await client.get("/metrics")).text()
    m = parse(text)
    assert m[requests("/api/messages/{message_id}", 404, "GET")] == 1
    assert m[requests("unmatched", 404, "GET")] == 1
    assert m[requests("/healthz", 200, "GET")] == 1
    assert str(missing) not in text and "/no/such/page" not in text


async def test_queue_and_pool_levels_are_read_at_scrape_time(make_client: MakeClient):
    client = await make_client(DB_POOL_MAX="7")
    m = await scrape(client)
    for queue in ("usage", "activity", "last_used"):
        assert key("gateway_queue_depth", queue=queue) in m
        assert m[key("gateway_queue_dropped_total", queue=queue)] == 0
    assert m[key("gateway_db_pool_max")] == 7
    assert 1 <= m[key("gateway_db_pool_size")] <= 7
    assert 0 <= m[key("gateway_db_pool_idle")] <= m[key("gateway_db_pool_size")]
    assert m[key("gateway_live_generations")] == 0
    assert m[key("gateway_active_streams")] == 0


async def test_open_streams_and_live_generations_rise_while_streaming_and_fall_after(
        make_client: MakeClient, upstream: FakeUpstream, user: User):
    client = await make_client(OPENAI_BASE_URL=upstream.base_url, OPENAI_MODEL="fake")
    # the role chunk and two deltas, then the upstream goes quiet until we cancel
    upstream.queue(Reply(openai_stream(["a", "b", "c"]), hang_after=3))
    resp = await client.post("/api/chat", json={"content": "hold", "stream": True}, headers=user.headers)
    assert resp.status == 200
    head = b""
    while b'"delta":"b"' not in head:
        head += await resp.content.readany()
    message_id = parse_sse(head)[0].id.partition(":")[0]

    m = await scrape(client)
    assert (m[key("gateway_active_streams")], m[key("gateway_live_generations")]) == (1, 1)

    assert (await client.post(f"/api/messages/{message_id}/cancel", headers=user.headers)).status == 200
    await resp.read()
    m = await scrape_when(client, lambda m: m[key("gateway_active_streams")] == 0
                          and m[key("gateway_live_generations")] == 0)
    assert m[requests("/api/chat", 200)] == 1


async def test_metrics_token_is_required_when_set(make_client: MakeClient):
    client = await make_client(METRICS_TOKEN="scrape-me-please")
    resp = await client.get("/metrics")
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "unauthorized"
    assert (await client.get("/metrics", headers={"Authorization": "Bearer scrape-me-not"})).status == 401
    assert (await client.get("/metrics", headers={"Authorization": "Basic scrape-me-please"})).status == 401
    m = await scrape(client, Authorization="Bearer scrape-me-please")
    assert m[requests("/metrics", 401, "GET")] == 3


async def test_metrics_port_serves_metrics_apart_and_the_main_port_has_none(make_client: MakeClient):
    port = free_port()
    client = await make_client(METRICS_PORT=str(port), METRICS_TOKEN="side-door")
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/metrics")
    assert resp.status == 404

    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as side:
            assert side.status == 401
        async with session.get(url, headers={"Authorization": "Bearer side-door"}) as side:
            assert side.status == 200
            assert side.headers["Content-Type"] == CONTENT_TYPE_LATEST
            m = parse(await side.text())
    assert m[requests("/healthz", 200, "GET")] == 1
    assert m[requests("unmatched", 404, "GET")] == 1  # the main port's /metrics is just an unknown path


async def test_every_app_has_its_own_registry(make_client: MakeClient, user: User):
    first, second = await make_client(), await make_client()
    assert (await first.get("/api/me", headers=user.headers)).status == 200
    assert requests("/api/me", 200, "GET") not in await scrape(second)
    assert (await scrape(first))[requests("/api/me", 200, "GET")] == 1


async def test_metrics_is_the_chains_observer_and_sees_overhead_first_token_and_chunk_gap(registry):
    metrics = Metrics()
    observer: ChainObserver = metrics  # Metrics implements the chain's observer protocol
    models = registry(DEMO_CHUNKS="4")
    chain = Chain(models, models.chain("demo"), observer=observer, started=time.monotonic() - 0.3)
    events, error = await collect(chain.stream(ChatRequest([{"role": "user", "content": "hi"}])))
    assert error is None and events

    m = parse(generate_latest(metrics.registry).decode())
    assert m[key("gateway_overhead_seconds_count")] == 1
    assert 0.3 <= m[key("gateway_overhead_seconds_sum")] < 5  # measured from `started`, not from now
    assert m[key("gateway_time_to_first_token_seconds_count", model="demo", provider="demo")] == 1
    assert m[key("gateway_chunk_gap_seconds_count", model="demo", provider="demo")] == 1
    assert key("gateway_fallbacks_total", from_model="demo", to_model="demo") not in m


def test_importing_metrics_loads_no_other_gateway_module():
    """metrics.py imports no app state at module level: no import loop runs through it."""
    root = REPO_ROOT
    code = "import sys, gateway.observability.metrics; print(sorted(m for m in sys.modules if m.startswith('gateway')))"
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['gateway', 'gateway.observability', 'gateway.observability.metrics']"
