"""A healthy stream is never cut by the whole-request timeout: `timeout_s` bounds
the wait for the first content byte (and a non-streaming call); after it, the idle timeout between
chunks and `max_stream_s` bound the reply. Small values stand in for 45 s and 600 s."""

from __future__ import annotations

import uuid

import orjson

from tests.support.fakes import Reply, openai_stream, parse_sse
from tests.support.providers import model_toml, openai_provider_toml

TEXTS = [f"t{i} " for i in range(10)]


def one_model(url: str, **timeouts: float) -> str:
    return openai_provider_toml("up", url, "sk-up") + model_toml("slow", "up", "up-slow", **timeouts)


async def chat(client, user) -> tuple[list, uuid.UUID]:
    resp = await client.post("/api/chat", json={"content": "Take your time", "model": "slow", "stream": True},
                             headers=user.headers)
    assert resp.status == 200
    events = parse_sse(await resp.read())
    return events, uuid.UUID(orjson.loads(events[0].data)["message_id"])


async def test_a_steady_stream_longer_than_timeout_s_is_saved_complete(upstream, config_file, make_client, user, db):
    # 12 pieces (role, 10 texts, finish, usage, [DONE]) 0.25 s apart: about 3 s against timeout_s = 1
    upstream.queue(Reply(openai_stream(TEXTS), piece_delay_s=0.25))
    toml = one_model(upstream.base_url, timeout_s=1, first_token_timeout_s=1, idle_timeout_s=1)
    client = await make_client(GATEWAY_CONFIG=config_file(toml))
    events, message_id = await chat(client, user)
    assert [e.event for e in events] == ["metadata", *["message"] * 10, "usage", "done", "message"]
    row = await db.fetchrow("SELECT status, content, error, latency_ms FROM messages WHERE id = $1 AND user_id = $2",
                            message_id, user.id)
    assert (row["status"], row["content"], row["error"]) == ("complete", "".join(TEXTS), None)
    assert row["latency_ms"] > 2500  # it really did outlast timeout_s


async def test_a_stream_that_goes_idle_fails_with_the_idle_reason(upstream, config_file, make_client, user, db):
    upstream.queue(Reply(openai_stream(TEXTS), hang_after=4))  # role chunk + 3 texts, then silence
    toml = one_model(upstream.base_url, timeout_s=5, idle_timeout_s=0.3)
    client = await make_client(GATEWAY_CONFIG=config_file(toml))
    events, message_id = await chat(client, user)
    assert [e.event for e in events] == ["metadata", "message", "message", "message", "error", "message"]
    error = {"type": "upstream_timeout", "message": "upstream timed out (idle)", "retryable": True}
    assert orjson.loads(events[4].data) == error
    row = await db.fetchrow("SELECT status, content, error FROM messages WHERE id = $1 AND user_id = $2",
                            message_id, user.id)
    assert (row["status"], row["content"], row["error"]) == ("failed", "t0 t1 t2 ", error)


async def test_a_stream_longer_than_max_stream_s_fails_with_that_reason(upstream, config_file, make_client, user, db):
    # steady (never idle), but past max_stream_s = 0.8 s
    upstream.queue(Reply(openai_stream(TEXTS), piece_delay_s=0.25))
    toml = one_model(upstream.base_url, timeout_s=5, idle_timeout_s=1, max_stream_s=0.8)
    client = await make_client(GATEWAY_CONFIG=config_file(toml))
    events, message_id = await chat(client, user)
    assert [e.event for e in events][-2:] == ["error", "message"]
    error = {"type": "upstream_timeout", "message": "upstream timed out (max_stream)", "retryable": True}
    assert orjson.loads(events[-2].data) == error
    row = await db.fetchrow("SELECT status, content, error, metadata FROM messages WHERE id = $1 AND user_id = $2",
                            message_id, user.id)
    assert row["status"] == "failed" and row["error"] == error
    delivered = [orjson.loads(e.data)["delta"] for e in events if e.event == "message" and e.data != "[DONE]"]
    assert 1 <= len(delivered) < len(TEXTS) and row["content"] == "".join(delivered)
    assert [(a["model"], a["outcome"]) for a in row["metadata"]["attempts"]] == [("slow", "upstream_timeout")]


async def test_max_stream_s_defaults_to_600_and_is_set_per_model(config_file):
    from gateway.config import Settings
    toml = (openai_provider_toml("up", "http://127.0.0.1:9/v1") + model_toml("a", "up", "a")
            + model_toml("b", "up", "b", max_stream_s=1200))
    settings = Settings.from_env({"GATEWAY_CONFIG": config_file(toml)})
    assert (settings.models["a"].max_stream_s, settings.models["b"].max_stream_s) == (600.0, 1200.0)
    assert settings.models["a"].timeout_s == 45.0


async def test_a_non_streaming_call_is_still_bounded_by_timeout_s(upstream, config_file, make_client, user):
    upstream.queue(Reply(openai_stream(TEXTS), piece_delay_s=0.25))
    toml = one_model(upstream.base_url, timeout_s=1, first_token_timeout_s=1, idle_timeout_s=1)
    client = await make_client(GATEWAY_CONFIG=config_file(toml))
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "slow", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 504
    body = await resp.json()
    assert body["error"]["message"] == "upstream timed out (total)"


async def test_a_streaming_openai_call_outlasts_timeout_s(upstream, config_file, make_client, user):
    upstream.queue(Reply(openai_stream(TEXTS), piece_delay_s=0.25))
    toml = one_model(upstream.base_url, timeout_s=1, first_token_timeout_s=1, idle_timeout_s=1)
    client = await make_client(GATEWAY_CONFIG=config_file(toml))
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    chunks = [orjson.loads(e.data) for e in parse_sse(await resp.read()) if e.data != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "".join(TEXTS)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
