"""Chains without a config file: the default chain, GROQ_MODEL → Groq's
llama-3.3-70b-versatile → Bytez → nothing, from three environment variables; FALLBACK_MODELS
overrides the order. Base URLs are overridable so local fake upstreams stand in for Groq and Bytez."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from gateway.config import BYTEZ_BASE_URL, GROQ_BASE_URL, Settings
from gateway.errors import ConfigError
from tests.support.fakes import FakeUpstream, Reply, openai_stream, parse_sse
from tests.support.providers import FALLS_BACK

GROQ = {"GROQ_API_KEY": "gsk-env", "BYTEZ_API_KEY": "bytez-env"}


def chains(settings: Settings) -> dict[str, tuple[str, ...]]:
    return {name: m.fallbacks for name, m in settings.models.items()}


def test_three_variables_make_seed_000s_chain():
    s = Settings.from_env(GROQ)
    assert (s.providers["groq"].kind, s.providers["groq"].base_url) == ("openai", GROQ_BASE_URL)
    assert (s.providers["bytez"].kind, s.providers["bytez"].base_url) == ("openai", BYTEZ_BASE_URL)
    assert BYTEZ_BASE_URL == "https://api.bytez.com/models/v2/openai/v1"
    assert s.providers["bytez"].api_key is not None and s.providers["bytez"].api_key.reveal() == "bytez-env"
    assert chains(s) == {
        "demo": (),
        "llama-3.1-8b-instant": ("llama-3.3-70b-versatile", "Qwen/Qwen3-4B"),
        "llama-3.3-70b-versatile": ("Qwen/Qwen3-4B",),
        "Qwen/Qwen3-4B": (),  # → nothing: the demo model is never a silent last resort
    }
    assert [(m.provider, m.upstream) for m in s.models.values()] == [
        ("demo", "demo"), ("groq", "llama-3.1-8b-instant"), ("groq", "llama-3.3-70b-versatile"),
        ("bytez", "Qwen/Qwen3-4B")]
    assert s.default_model == "llama-3.1-8b-instant"


def test_the_other_env_providers_follow_groq_in_order():
    s = Settings.from_env({**GROQ, "GROQ_MODEL": "g1", "GROQ_FALLBACK_MODEL": "g2", "BYTEZ_MODEL": "b1",
                           "OPENAI_API_KEY": "sk", "OPENAI_MODEL": "o1", "ANTHROPIC_API_KEY": "sk-ant",
                           "ANTHROPIC_MODEL": "a1"})
    assert chains(s) == {"demo": (), "g1": ("g2", "b1", "o1", "a1"), "g2": ("b1", "o1", "a1"), "b1": ("o1", "a1"),
                         "o1": ("a1",), "a1": ()}
    assert s.default_model == "g1"


def test_groq_alone_still_falls_back_to_its_second_model_unless_told_not_to():
    assert chains(Settings.from_env({"GROQ_API_KEY": "gsk"})) == {
        "demo": (), "llama-3.1-8b-instant": ("llama-3.3-70b-versatile",), "llama-3.3-70b-versatile": ()}
    assert chains(Settings.from_env({"GROQ_API_KEY": "gsk", "GROQ_FALLBACK_MODEL": ""})) == {
        "demo": (), "llama-3.1-8b-instant": ()}
    # one provider with one model: nothing to fall back to
    assert chains(Settings.from_env({"OPENAI_API_KEY": "sk"})) == {"demo": (), "gpt-4o-mini": ()}


def test_one_model_id_at_two_providers_gets_two_names():
    s = Settings.from_env({**GROQ, "GROQ_FALLBACK_MODEL": "", "GROQ_MODEL": "llama", "BYTEZ_MODEL": "llama"})
    assert chains(s) == {"demo": (), "llama": ("bytez:llama",), "bytez:llama": ()}
    assert (s.models["bytez:llama"].provider, s.models["bytez:llama"].upstream) == ("bytez", "llama")


def test_fallback_models_overrides_the_order():
    s = Settings.from_env({**GROQ, "FALLBACK_MODELS": "Qwen/Qwen3-4B, llama-3.1-8b-instant,demo"})
    assert chains(s) == {
        "demo": (),
        "llama-3.1-8b-instant": ("demo",),
        "llama-3.3-70b-versatile": (),  # not listed: no fallbacks
        "Qwen/Qwen3-4B": ("llama-3.1-8b-instant", "demo"),
    }
    assert s.default_model == "Qwen/Qwen3-4B"  # the chain's head, unless DEFAULT_MODEL says otherwise
    assert Settings.from_env({**GROQ, "FALLBACK_MODELS": "Qwen/Qwen3-4B", "DEFAULT_MODEL": "demo"}).default_model \
        == "demo"


def test_fallback_models_naming_an_unknown_model_stops_the_start():
    with pytest.raises(ConfigError, match="FALLBACK_MODELS: 'llama-9' is not a declared model"):
        Settings.from_env({**GROQ, "FALLBACK_MODELS": "llama-3.1-8b-instant,llama-9"})


# -- the whole chain against local fakes -----------------------------------------------------------

@pytest.fixture
async def bytez(aiohttp_server: Any) -> FakeUpstream:
    fake = FakeUpstream()
    fake.server = await aiohttp_server(fake.app)
    return fake


def env_for(groq: FakeUpstream, bytez: FakeUpstream) -> dict[str, str]:
    return {**GROQ, "GROQ_BASE_URL": groq.base_url, "BYTEZ_BASE_URL": bytez.base_url}


async def chat(client, user) -> tuple[list, dict]:
    resp = await client.post("/api/chat", json={"content": "Say hello", "stream": True}, headers=user.headers)
    assert resp.status == 200
    events = parse_sse(await resp.read())
    return events, orjson.loads(events[0].data)


async def test_groq_failing_twice_falls_to_bytez(upstream, bytez, make_client, user, db):
    upstream.queue(Reply(status=503, body=FALLS_BACK["503"][1]),
                   Reply(status=404, body=FALLS_BACK["404_retired_model"][1]))
    bytez.queue(Reply(openai_stream(["From ", "Bytez"], prompt_tokens=3)))
    client = await make_client(**env_for(upstream, bytez))
    events, meta = await chat(client, user)  # no model named: the default, the chain's head
    assert (meta["model"], meta["provider"], meta["fallback_from"]) == ("Qwen/Qwen3-4B", "bytez",
                                                                        "llama-3.1-8b-instant")
    assert [e.event for e in events] == ["metadata", "message", "message", "usage", "done", "message"]
    assert [r["model"] for r in upstream.requests] == ["llama-3.1-8b-instant", "llama-3.3-70b-versatile"]
    assert [h["Authorization"] for h in upstream.headers] == ["Bearer gsk-env"] * 2
    assert [r["model"] for r in bytez.requests] == ["Qwen/Qwen3-4B"]
    assert bytez.headers[0]["Authorization"] == "Bearer bytez-env"
    row = await db.fetchrow("SELECT status, content, model, provider, metadata FROM messages "
                            "WHERE id = $1 AND user_id = $2", uuid.UUID(meta["message_id"]), user.id)
    assert (row["status"], row["content"], row["model"], row["provider"]) == (
        "complete", "From Bytez", "Qwen/Qwen3-4B", "bytez")
    assert [(a["model"], a["provider"], a["outcome"], a.get("status")) for a in row["metadata"]["attempts"]] == [
        ("llama-3.1-8b-instant", "groq", "upstream_http_error", 503),
        ("llama-3.3-70b-versatile", "groq", "upstream_http_error", 404),
        ("Qwen/Qwen3-4B", "bytez", "ok", None)]


async def test_groq_s_first_model_failing_falls_to_its_second(upstream, bytez, make_client, user):
    upstream.queue(Reply(status=429, body=FALLS_BACK["429_rate_limited"][1]),
                   Reply(openai_stream(["Big ", "llama"])))
    client = await make_client(**env_for(upstream, bytez))
    events, meta = await chat(client, user)
    assert (meta["model"], meta["provider"], meta["fallback_from"]) == ("llama-3.3-70b-versatile", "groq",
                                                                        "llama-3.1-8b-instant")
    assert [orjson.loads(e.data)["delta"] for e in events[1:3]] == ["Big ", "llama"]
    assert bytez.requests == []


async def test_every_link_failing_ends_in_an_error_not_the_demo_model(upstream, bytez, make_client, user, db):
    upstream.queue(Reply(status=500, body=b"{}"), Reply(status=500, body=b"{}"))
    bytez.queue(Reply(status=401, body=FALLS_BACK["401_expired_key"][1]))
    client = await make_client(**env_for(upstream, bytez))
    events, meta = await chat(client, user)
    assert [e.event for e in events] == ["metadata", "error", "message"]
    assert orjson.loads(events[1].data)["message"] == "upstream answered 401: Invalid API Key"
    row = await db.fetchrow("SELECT status, metadata FROM messages WHERE id = $1 AND user_id = $2",
                            uuid.UUID(meta["message_id"]), user.id)
    assert row["status"] == "failed"
    assert [a["model"] for a in row["metadata"]["attempts"]] == [
        "llama-3.1-8b-instant", "llama-3.3-70b-versatile", "Qwen/Qwen3-4B"]


async def test_fallback_models_reorders_the_live_chain(upstream, bytez, make_client, user):
    bytez.queue(Reply(status=503, body=b"{}"))
    upstream.queue(Reply(openai_stream(["Groq"])))
    client = await make_client(**env_for(upstream, bytez), FALLBACK_MODELS="Qwen/Qwen3-4B,llama-3.3-70b-versatile")
    _events, meta = await chat(client, user)
    assert (meta["model"], meta["fallback_from"]) == ("llama-3.3-70b-versatile", "Qwen/Qwen3-4B")
    assert [r["model"] for r in upstream.requests] == ["llama-3.3-70b-versatile"]
