"""Several deployments behind one model name, per-provider headers and compatibility switches
and `max_completion_tokens` passed through: two
real fake upstreams behind one model, a recording upstream for what is sent."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.config import Deployment, Settings
from gateway.errors import ConfigError
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import ChatRequest
from gateway.providers.chain import Chain
from gateway.providers.circuit import CircuitBreakers
from tests.support.common import FakeClock
from tests.support.fakes import Reply, openai_stream, parse_sse
from tests.support.providers import ERROR_BODY, PROMPT, collect, openai_provider_toml


def pool_toml(url_a: str, url_b: str, weights: tuple[float, float] = (3, 1), fallbacks: str = '["backup"]') -> str:
    return (openai_provider_toml("east", url_a, "sk-east") + openai_provider_toml("west", url_b, "sk-west")
            + f"""
[models.pool]
deployments = [
    {{provider = "east", upstream = "llama-east", weight = {weights[0]}}},
    {{provider = "west", upstream = "llama-west", weight = {weights[1]}}},
]
fallbacks = {fallbacks}
input_price_per_mtok = 1.0

[models.backup]
provider = "demo"
upstream = "demo"
""")


def trail(chain: Chain) -> list[tuple[str, str, str]]:
    return [(a.model, a.provider, a.outcome) for a in chain.attempts]


# -- configuration -------------------------------------------------------------------------------

def test_deployments_are_parsed_with_the_first_as_the_models_provider(config_file):
    s = Settings.from_env({"GATEWAY_CONFIG": config_file(pool_toml("http://a/v1", "http://b/v1"))})
    pool = s.models["pool"]
    assert pool.deployments == (Deployment("east", "llama-east", 3.0), Deployment("west", "llama-west", 1.0))
    assert (pool.provider, pool.upstream, pool.fallbacks, pool.input_price_per_mtok) == (
        "east", "llama-east", ("backup",), 1.0)


@pytest.mark.parametrize("model_table, message", [
    ('deployments = [{provider = "east", upstrem = "x"}]',
     "[models.m] deployments[0] upstrem: unknown key (did you mean 'upstream'?)"),
    ('provider = "east"\ndeployments = [{provider = "east"}]',
     "[models.m] give either provider/upstream or deployments, not both"),
    ('deployments = [{provider = "nowhere"}]', "[models.m] deployments[0] provider 'nowhere' is not declared"),
    ("deployments = []", "[models.m] deployments must be a non-empty list"),
    ('deployments = [{provider = "east", weight = 0}]', "[models.m] deployments: at least one weight must be > 0"),
])
def test_bad_deployments_stop_the_start(config_file, model_table: str, message: str):
    toml = openai_provider_toml("east", "http://a/v1") + "[models.m]\n" + model_table + "\n"
    with pytest.raises(ConfigError) as e:
        Settings.from_env({"GATEWAY_CONFIG": config_file(toml)})
    assert message in str(e.value)


# -- spreading by weight -------------------------------------------------------------------------

def test_each_requests_links_are_drawn_by_weight(registry):
    models = registry(pool_toml("http://a/v1", "http://b/v1"))
    models.rng.seed(2024)
    firsts = Counter()
    for _ in range(4000):
        links = models.chain("pool")
        # both deployments, in a drawn order, then the fallback
        assert sorted(link.provider for link in links[:2]) == ["east", "west"]
        assert [link.name for link in links] == ["pool", "pool", "backup"]
        firsts[links[0].provider] += 1
    assert 2850 < firsts["east"] < 3150  # weight 3 of 4: 3000 expected


async def test_requests_spread_over_both_upstreams_by_weight(upstream, upstream_b, registry):
    models = registry(pool_toml(upstream.base_url, upstream_b.base_url))
    models.rng.seed(7)
    for _ in range(40):
        chain = Chain(models, models.chain("pool"))
        _events, error = await collect(chain.stream(ChatRequest(PROMPT)))
        assert error is None and chain.fallback_from is None and chain.used.name == "pool"
    assert len(upstream.requests) + len(upstream_b.requests) == 40
    assert len(upstream.requests) > 2 * len(upstream_b.requests) > 0
    assert {r["model"] for r in upstream.requests} == {"llama-east"}
    assert {h["Authorization"] for h in upstream_b.headers} == {"Bearer sk-west"}


async def test_a_standby_deployment_of_weight_0_is_tried_last(registry):
    models = registry(pool_toml("http://a/v1", "http://b/v1", weights=(0, 1)))
    assert {tuple(link.provider for link in models.chain("pool")) for _ in range(50)} == {("west", "east", "demo")}


# -- cooldown ------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [Reply(status=429, body=b"{}"), Reply(status=503, body=ERROR_BODY)],
                         ids=["429", "503"])
async def test_a_failing_deployment_cools_down_and_is_skipped_while_its_sibling_serves(
        upstream, upstream_b, registry, failure: Reply):
    models = registry(pool_toml(upstream.base_url, upstream_b.base_url, weights=(1, 0)), DEPLOYMENT_COOLDOWN_S="5")
    clock = FakeClock(100.0)
    models.circuits = CircuitBreakers(5, 30, clock=clock)
    upstream.queue(failure)
    chain = Chain(models, models.chain("pool"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None and events
    assert trail(chain) == [("pool", "east", "upstream_http_error"), ("pool", "west", "ok")]
    assert chain.fallback_from is None  # another deployment of the same model is not a fallback

    chain = Chain(models, models.chain("pool"))  # east is drawn first (weight 1 vs 0) but cooling
    _events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None
    assert trail(chain) == [("pool", "east", "cooldown"), ("pool", "west", "ok")]
    assert chain.attempts[0].ms == 0
    assert len(upstream.requests) == 1 and len(upstream_b.requests) == 2

    clock.now += 5  # the cooldown is over: east serves again
    chain = Chain(models, models.chain("pool"))
    _events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None and trail(chain) == [("pool", "east", "ok")]


async def test_retry_after_sets_the_deployments_cooldown(upstream, upstream_b, registry):
    models = registry(pool_toml(upstream.base_url, upstream_b.base_url, weights=(1, 0)))
    clock = FakeClock(100.0)
    models.circuits = CircuitBreakers(5, 30, clock=clock)
    upstream.queue(Reply(status=429, body=b"{}", headers={"Retry-After": "20"}))
    await collect(Chain(models, models.chain("pool")).stream(ChatRequest(PROMPT)))
    clock.now += 19
    chain = Chain(models, models.chain("pool"))
    await collect(chain.stream(ChatRequest(PROMPT)))
    assert trail(chain)[0] == ("pool", "east", "cooldown")
    clock.now += 1
    chain = Chain(models, models.chain("pool"))
    await collect(chain.stream(ChatRequest(PROMPT)))
    assert trail(chain) == [("pool", "east", "ok")]


async def test_a_deployment_whose_circuit_is_open_is_skipped(upstream, upstream_b, registry):
    models = registry(pool_toml(upstream.base_url, upstream_b.base_url, weights=(1, 0)), CIRCUIT_FAILURES="1")
    models.circuits.failure("pool#0")  # east's own circuit
    chain = Chain(models, models.chain("pool"))
    _events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None and trail(chain) == [("pool", "east", "circuit_open"), ("pool", "west", "ok")]
    assert models.available(models.models["pool"])  # one deployment is enough for a draw
    models.circuits.failure("pool#1")
    assert not models.available(models.models["pool"])


async def test_the_fallback_model_follows_only_when_every_deployment_failed(upstream, upstream_b, registry):
    upstream.queue(Reply(status=500, body=ERROR_BODY))
    upstream_b.queue(Reply(status=401, body=b'{"error":{"message":"Invalid API Key"}}'))
    models = registry(pool_toml(upstream.base_url, upstream_b.base_url, weights=(1, 0)))
    chain = Chain(models, models.chain("pool"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None and events
    assert trail(chain) == [("pool", "east", "upstream_http_error"), ("pool", "west", "upstream_http_error"),
                            ("backup", "demo", "ok")]
    assert (chain.used.name, chain.fallback_from) == ("backup", "pool")


async def test_chat_on_a_deployed_model_names_the_deployment_that_served(
        upstream, upstream_b, config_file, make_client, user, db):
    upstream.queue(Reply(status=503, body=ERROR_BODY))
    upstream_b.queue(Reply(openai_stream(["We", "st"], prompt_tokens=4)))
    client = await make_client(
        GATEWAY_CONFIG=config_file(pool_toml(upstream.base_url, upstream_b.base_url, weights=(1, 0))))
    resp = await client.post("/api/chat", json={"content": "hi", "model": "pool", "stream": True}, headers=user.headers)
    events = parse_sse(await resp.read())
    meta = orjson.loads(events[0].data)
    assert (meta["model"], meta["provider"], meta["fallback_from"]) == ("pool", "west", None)
    row = await db.fetchrow("SELECT status, content, model, provider, metadata FROM messages "
                            "WHERE id = $1 AND user_id = $2", uuid.UUID(meta["message_id"]), user.id)
    assert (row["status"], row["content"], row["model"], row["provider"]) == ("complete", "West", "pool", "west")
    assert [(a["model"], a["provider"], a["outcome"]) for a in row["metadata"]["attempts"]] == [
        ("pool", "east", "upstream_http_error"), ("pool", "west", "ok")]
    usage = await db.fetchrow("SELECT model, provider, prompt_tokens FROM usage WHERE message_id = $1",
                              uuid.UUID(meta["message_id"]))
    assert tuple(usage) == ("pool", "west", 4)


# -- headers -------------------------------------------------------------------------------------

HEADERS_TOML = """
[providers.router]
kind = "openai"
base_url = "{url}"
api_key = "sk-router"
headers = {{ "HTTP-Referer" = "env:OPENROUTER_REFERER", "X-Title" = "Gateway tests" }}

[models.routed]
provider = "router"
upstream = "some/model"
"""


async def test_provider_headers_reach_the_upstream_and_env_values_are_read(upstream, registry):
    models = registry(HEADERS_TOML.format(url=upstream.base_url), OPENROUTER_REFERER="https://referer.example")
    model = models.models["routed"]
    await collect(models.provider(model).stream(model, ChatRequest(PROMPT)))
    sent = upstream.headers[0]
    assert (sent["HTTP-Referer"], sent["X-Title"], sent["Authorization"]) == (
        "https://referer.example", "Gateway tests", "Bearer sk-router")


def test_header_values_never_print(config_file):
    s = Settings.from_env({"GATEWAY_CONFIG": config_file(HEADERS_TOML.format(url="http://x/v1")),
                           "OPENROUTER_REFERER": "https://referer.example"})
    headers = s.providers["router"].headers
    assert headers["HTTP-Referer"].reveal() == "https://referer.example"
    assert "referer.example" not in repr(s) and "Gateway tests" not in repr(s)
    assert "referer.example" not in f"{headers['HTTP-Referer']}"


def test_a_header_naming_an_unset_variable_stops_the_start(config_file):
    with pytest.raises(ConfigError, match=r"\[providers.router\] headers.HTTP-Referer: environment variable "
                                          r"OPENROUTER_REFERER is not set"):
        Settings.from_env({"GATEWAY_CONFIG": config_file(HEADERS_TOML.format(url="http://x/v1"))})


@pytest.mark.parametrize("headers, message", [
    ('{ "Bad Name" = "x" }', "is not a valid header name"),
    ('{ "X-A" = 1 }', "headers.X-A must be a string"),
    ('"X-A: 1"', "headers must be a table"),
])
def test_bad_headers_stop_the_start(config_file, headers: str, message: str):
    toml = f'[providers.p]\nbase_url = "http://x/v1"\nheaders = {headers}\n'
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"GATEWAY_CONFIG": config_file(toml)})


async def test_an_azure_style_api_key_header_replaces_authorization(upstream, registry):
    toml = (f'[providers.azure]\nbase_url = "{upstream.base_url}"\nheaders = {{ "api-key" = "env:AZURE_KEY" }}\n'
            '[models.az]\nprovider = "azure"\n')
    models = registry(toml, AZURE_KEY="azure-secret")
    model = models.models["az"]
    await collect(models.provider(model).stream(model, ChatRequest(PROMPT)))
    assert upstream.headers[0]["api-key"] == "azure-secret" and "Authorization" not in upstream.headers[0]


async def test_header_values_are_not_logged_when_the_upstream_fails(upstream, config_file, make_client, user, caplog):
    upstream.queue(Reply(status=500, body=ERROR_BODY))
    client = await make_client(GATEWAY_CONFIG=config_file(HEADERS_TOML.format(url=upstream.base_url)),
                               OPENROUTER_REFERER="https://referer.example")
    with caplog.at_level(logging.DEBUG):
        resp = await client.post("/api/chat", json={"content": "hi", "model": "routed", "stream": True},
                                 headers=user.headers)
        await resp.read()
    assert upstream.headers[0]["HTTP-Referer"] == "https://referer.example"
    assert "model routed (router) failed" in caplog.text
    assert "referer.example" not in caplog.text and "sk-router" not in caplog.text


# -- compatibility switches and max_completion_tokens ---------------------------------------------

def compat_toml(url: str, **switches: bool) -> str:
    lines = "".join(f"{k} = {str(v).lower()}\n" for k, v in switches.items())
    return f'[providers.strict]\nbase_url = "{url}"\n{lines}\n[models.m]\nprovider = "strict"\nupstream = "up-m"\n'


async def test_send_stream_options_false_omits_it_and_usage_is_estimated_and_flagged(
        upstream, config_file, make_client, user, db):
    upstream.queue(Reply(openai_stream(["Hel", "lo"], usage=False)))
    client = await make_client(GATEWAY_CONFIG=config_file(compat_toml(upstream.base_url, send_stream_options=False)))
    resp = await client.post("/api/chat", json={"content": "Say hello", "model": "m", "stream": True},
                             headers=user.headers)
    events = parse_sse(await resp.read())
    assert upstream.requests[0] == {"model": "up-m", "messages": [{"role": "user", "content": "Say hello"}],
                                    "stream": True}
    usage = orjson.loads(events[3].data)
    assert usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "estimated": True}
    message_id = uuid.UUID(orjson.loads(events[0].data)["message_id"])
    row = await db.fetchrow("SELECT metadata FROM messages WHERE id = $1", message_id)
    assert row["metadata"]["estimated"] is True
    assert await db.fetchval("SELECT estimated FROM usage WHERE message_id = $1", message_id) is True


async def test_stream_options_are_sent_by_default(upstream, registry):
    models = registry(compat_toml(upstream.base_url))
    model = models.models["m"]
    await collect(models.provider(model).stream(model, ChatRequest(PROMPT)))
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}


async def openai_call(client, user, **limit: Any) -> None:
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "m", "messages": [{"role": "user", "content": "hi"}], **limit})
    assert resp.status == 200
    await resp.read()


async def test_max_completion_tokens_is_passed_through_as_sent(upstream, config_file, make_client, user):
    client = await make_client(GATEWAY_CONFIG=config_file(compat_toml(upstream.base_url)))
    await openai_call(client, user, max_completion_tokens=20)
    await openai_call(client, user, max_tokens=21)
    await openai_call(client, user)
    sent = [{k: v for k, v in r.items() if k.startswith("max")} for r in upstream.requests]
    assert sent == [{"max_completion_tokens": 20}, {"max_tokens": 21}, {}]


async def test_a_provider_that_knows_only_max_tokens_gets_the_limit_as_max_tokens(
        upstream, config_file, make_client, user):
    client = await make_client(GATEWAY_CONFIG=config_file(
        compat_toml(upstream.base_url, send_max_completion_tokens=False)))
    await openai_call(client, user, max_completion_tokens=20)
    assert {k: v for k, v in upstream.requests[0].items() if k.startswith("max")} == {"max_tokens": 20}


async def test_a_clamped_max_completion_tokens_is_sent_clamped(upstream, config_file, make_client, user):
    toml = compat_toml(upstream.base_url) + "\n[limits]\nmax_tokens = 8\n"
    client = await make_client(GATEWAY_CONFIG=config_file(toml))
    await openai_call(client, user, max_completion_tokens=20)
    assert {k: v for k, v in upstream.requests[0].items() if k.startswith("max")} == {"max_completion_tokens": 8}


def test_compat_switches_are_known_keys_and_typed(config_file):
    s = Settings.from_env({"GATEWAY_CONFIG": config_file(compat_toml("http://x/v1", send_stream_options=False))})
    assert (s.providers["strict"].send_stream_options, s.providers["strict"].send_max_completion_tokens) == (
        False, True)
    with pytest.raises(ConfigError, match="did you mean 'send_stream_options'"):
        Settings.from_env({"GATEWAY_CONFIG": config_file(
            '[providers.p]\nbase_url = "http://x/v1"\nsend_stream_option = false\n')})


async def test_provider_headers_reach_an_anthropic_upstream_too(anthropic, config_file):
    fake, server = anthropic
    path = config_file(f"""
[providers.claude]
kind = "anthropic"
base_url = "{server.make_url('/v1')}"
api_key = "sk-ant-test"
headers = {{ "anthropic-beta" = "env:CLAUDE_BETA" }}
[models.claude]
provider = "claude"
""")
    settings = Settings.from_env({"GATEWAY_CONFIG": path, "CLAUDE_BETA": "prompt-caching-2024-07-31"})
    async with aiohttp.ClientSession() as session:
        provider = AnthropicProvider(settings.providers["claude"], session)
        events = [e async for batch in provider.stream(settings.models["claude"], ChatRequest(PROMPT)) for e in batch]
    assert events
    assert (fake.headers[0]["anthropic-beta"], fake.headers[0]["x-api-key"]) == ("prompt-caching-2024-07-31",
                                                                                 "sk-ant-test")
