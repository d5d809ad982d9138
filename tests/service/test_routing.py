"""Decide and execute policies around the chain: circuit breakers, Retry-After, the "auto" router,
the weighted arena draw, and the models table synced from config."""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

import orjson
import pytest

from gateway.config import ModelConfig
from gateway.providers.base import ChatRequest
from gateway.providers.chain import Chain
from gateway.providers.circuit import CircuitBreakers
from gateway.providers.registry import NotEnoughModels
from gateway.service.router import classify, route
from tests.support.fakes import Reply, openai_stream, parse_sse
from tests.support.providers import ERROR_BODY, PROMPT, chain_toml, collect, trail


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_circuit_opens_after_n_failures_then_lets_one_probe_through():
    clock = Clock()
    c = CircuitBreakers(failure_threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        c.failure("m")
    assert c.state("m") == "closed" and c.allow("m")
    c.failure("m")
    assert c.state("m") == "open" and not c.allow("m") and not c.available("m")
    clock.now += 10
    assert c.state("m") == "half_open" and c.available("m")
    assert c.allow("m") is True  # the probe
    assert c.allow("m") is False  # only one at a time
    assert not c.available("m")
    c.failure("m")  # the probe failed: open again, for a full cool-down
    assert c.state("m") == "open"
    clock.now += 9.9
    assert not c.allow("m")
    clock.now += 0.1
    assert c.allow("m")
    c.success("m")
    assert c.state("m") == "closed" and c.allow("m") and c.allow("m")


def test_a_success_resets_the_consecutive_failure_count():
    c = CircuitBreakers(failure_threshold=2, cooldown_s=10, clock=Clock())
    c.failure("m")
    c.success("m")
    c.failure("m")
    assert c.state("m") == "closed"


async def test_chain_skips_a_model_whose_circuit_is_open(upstream, upstream_b, registry):
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url), CIRCUIT_FAILURES="2")
    upstream.queue(Reply(status=500, body=ERROR_BODY), Reply(status=503, body=ERROR_BODY))
    for _ in range(2):
        chain = Chain(models, models.chain("primary"))
        _events, error = await collect(chain.stream(ChatRequest(PROMPT)))
        assert error is None and trail(chain)[-1] == ("backup", "ok")
    assert models.circuits.state("primary") == "open"
    chain = Chain(models, models.chain("primary"))
    _events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None
    assert trail(chain) == [("primary", "circuit_open"), ("backup", "ok")]
    assert len(upstream.requests) == 2  # the open circuit sent nothing to the primary
    assert chain.attempts[0].ms == 0


async def test_client_errors_do_not_open_a_circuit(upstream, registry):
    models = registry(chain_toml(upstream.base_url, None), CIRCUIT_FAILURES="1")
    upstream.queue(Reply(status=400, body=b'{"error":{"message":"bad request"}}'))
    chain = Chain(models, models.chain("primary"))
    _, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is not None and error.status == 400
    assert models.circuits.state("primary") == "closed"


async def test_429_on_the_last_link_is_retried_after_retry_after(upstream, upstream_b, registry):
    upstream.queue(Reply(status=500, body=ERROR_BODY))
    upstream_b.queue(Reply(status=429, body=b"{}", headers={"Retry-After": "0.2"}),
                     Reply(openai_stream(["ok"])))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url))
    chain = Chain(models, models.chain("primary"))
    _events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None
    assert trail(chain) == [("primary", "upstream_http_error"), ("backup", "upstream_http_error"), ("backup", "ok")]
    assert len(upstream_b.requests) == 2


async def test_429_with_a_fallback_left_moves_on_at_once(upstream, upstream_b, registry):
    upstream.queue(Reply(status=429, body=b"{}", headers={"Retry-After": "30"}))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url))
    chain = Chain(models, models.chain("primary"))
    _, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None
    assert trail(chain) == [("primary", "upstream_http_error"), ("backup", "ok")]
    assert chain.attempts[0].ms < 5000


# -- what the chain reports --------------------------------------------------------------------

class Recorder:
    """A ChainObserver that writes down what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def upstream_call(self, overhead_s: float) -> None:
        self.calls.append(("upstream_call", overhead_s))

    def attempt_answered(self, model: ModelConfig, seconds: float, planned: ModelConfig) -> None:
        self.calls.append(("attempt_answered", model.name, planned.name))

    def attempt_ended(self, model: ModelConfig, outcome: str) -> None:
        self.calls.append(("attempt_ended", model.name, outcome))

    def reply_streamed(self, model: ModelConfig, batches: int, seconds: float) -> None:
        self.calls.append(("reply_streamed", model.name, batches))

    def usage(self, record: Any) -> None:
        self.calls.append(("usage", record.model))


async def test_a_chain_reports_to_the_observer_it_is_given_once_per_reply_never_per_chunk(
        upstream, upstream_b, registry):
    upstream.queue(Reply(status=500, body=ERROR_BODY))
    # pieces apart, so the reply arrives in several reads (batches)
    upstream_b.queue(Reply(openai_stream(["a", "b", "c", "d"]), piece_delay_s=0.01))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url))
    mine = Recorder()
    chain = Chain(models, models.chain("primary"), observer=mine, started=time.monotonic() - 0.5)
    batches = [batch async for batch in chain.stream(ChatRequest(PROMPT))]
    assert len(batches) > 1
    (name, overhead), *rest = mine.calls
    assert name == "upstream_call" and 0.5 <= overhead < 5  # from `started`, once, before the first attempt
    assert rest == [("attempt_ended", "primary", "upstream_http_error"), ("attempt_answered", "backup", "primary"),
                    ("attempt_ended", "backup", "ok"), ("reply_streamed", "backup", len(batches) - 1)]


# -- router --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, category", [
    ("Why does this python function raise a KeyError?", "code"),
    ("```\nSELECT * FROM t\n```", "code"),
    ("Solve the equation x^2 = 9", "math"),
    ("what is 12 * 34", "math"),
    ("Write a poem about the sea", "creative"),
    ("What is the capital of France?", "general"),
])
def test_router_classifies_prompts_by_rules(prompt, category):
    assert classify(prompt)[0] == category


def test_router_complexity_grows_with_the_prompt():
    assert classify("hi")[1] == "low"
    assert classify("word " * 100)[1] == "medium"
    assert classify("word " * 400)[1] == "high"


def test_router_only_advises_for_auto():
    table = {"code": "strong", "default": "fast"}
    assert route("fast", "def f(): pass", table, "demo").model == "fast"  # an explicit model is kept
    r = route("auto", "def f(): pass", table, "demo")
    assert (r.model, r.category, r.auto) == ("strong", "code", True)
    assert route(None, "hello", table, "demo").model == "fast"  # no model: the table's default
    assert route("auto", "hello", {}, "demo").model == "demo"


ROUTER_TOML = """
[models.strong]
provider = "demo"
upstream = "demo-strong"
[router]
default = "demo"
code = "strong"
"""


async def test_auto_model_metadata_names_category_and_model(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(ROUTER_TOML))
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "refactor this python class", "model": "auto", "stream": True})
    meta = orjson.loads(parse_sse(await resp.read())[0].data)
    assert (meta["model"], meta["category"], meta["auto"]) == ("strong", "code", True)
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hello", "model": "demo",
                                                                      "stream": True})
    meta = orjson.loads(parse_sse(await resp.read())[0].data)
    assert (meta["model"], meta["category"], meta["auto"]) == ("demo", None, False)


# -- weighted draw -------------------------------------------------------------------------------

DRAW_TOML = """
[models.a]
provider = "demo"
weight = 1
[models.b]
provider = "demo"
weight = 3
[models.c]
provider = "demo"
weight = 6
[models.off]
provider = "demo"
enabled = false
[models.zero]
provider = "demo"
weight = 0
[models.demo]
provider = "demo"
enabled = false
"""


def test_draw_pair_is_two_distinct_enabled_models_in_proportion_to_weight(registry):
    models = registry(DRAW_TOML)
    rng = random.Random(7)
    firsts: Counter[str] = Counter()
    for _ in range(3000):
        a, b = models.draw_pair(rng)
        assert a.name != b.name and {a.name, b.name} <= {"a", "b", "c"}
        firsts[a.name] += 1
    # first pick ~ weights 1:3:6 of 3000 = 300, 900, 1800
    assert abs(firsts["a"] - 300) < 90 and abs(firsts["b"] - 900) < 150 and abs(firsts["c"] - 1800) < 150


def test_draw_pair_skips_open_circuits_and_needs_two_models(registry):
    models = registry(DRAW_TOML, CIRCUIT_FAILURES="1")
    models.circuits.failure("c")
    rng = random.Random(1)
    assert all({a.name, b.name} == {"a", "b"} for a, b in (models.draw_pair(rng) for _ in range(50)))
    models.circuits.failure("b")
    with pytest.raises(NotEnoughModels):
        models.draw_pair(rng)


# -- models table --------------------------------------------------------------------------------

async def test_models_are_synced_to_the_database_and_dropped_ones_disabled(make_client, config_file, db):
    toml = """
[providers.up]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
[models.synced-x]
provider = "up"
upstream = "x-1"
weight = 2.5
input_price_per_mtok = 0.5
output_price_per_mtok = 1.5
"""
    await make_client(GATEWAY_CONFIG=config_file(toml))
    row = await db.fetchrow("SELECT provider, upstream, enabled, weight, input_price_per_mtok, output_price_per_mtok "
                            "FROM models WHERE name = 'synced-x'")
    assert dict(row) == {"provider": "up", "upstream": "x-1", "enabled": True, "weight": 2.5,
                         "input_price_per_mtok": 0.5, "output_price_per_mtok": 1.5}
    await make_client()  # started again without it
    assert await db.fetchval("SELECT enabled FROM models WHERE name = 'synced-x'") is False
    assert await db.fetchval("SELECT enabled FROM models WHERE name = 'demo'") is True
