"""Fallback on every failure before the first content byte: an expired key, a
retired model, an overloaded upstream all reach the backup; only a request every provider would
refuse ends the chain. Real local fake upstreams answer each status."""

from __future__ import annotations

import uuid

import orjson
import pytest

from gateway.providers.base import ChatRequest, TextDelta, UpstreamHTTPError
from gateway.providers.chain import Chain
from tests.support.fakes import Reply, openai_stream, parse_sse
from tests.support.providers import FALLS_BACK, PROMPT, chain_toml, closed_port, collect, error_body, trail

BACKUP = [TextDelta("Back"), TextDelta("up")]


# the request itself is wrong: every provider would refuse it, so the chain stops at once
REQUEST_FAULTS = {
    "400_malformed_messages": (400, error_body("Invalid value for 'content': expected a string.",
                                               param="messages[0].content")),
    "400_plain": (400, error_body("bad request")),
    "413_too_large": (413, b"request entity too large"),
    "422_unprocessable": (422, error_body("roles must alternate between user and assistant")),
}


@pytest.mark.parametrize("case", FALLS_BACK)
async def test_every_upstream_failure_before_content_falls_back(upstream, upstream_b, registry, case: str):
    status, body = FALLS_BACK[case]
    upstream.queue(Reply(status=status, body=body, headers={"Retry-After": "30"} if status == 429 else {}))
    upstream_b.queue(Reply(openai_stream(["Back", "up"])))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url))
    chain = Chain(models, models.chain("primary"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None
    assert events[:2] == BACKUP
    assert trail(chain) == [("primary", "upstream_http_error"), ("backup", "ok")]
    assert [a.status for a in chain.attempts] == [status, None]
    assert chain.attempts[0].as_json()["status"] == status and "status" not in chain.attempts[1].as_json()
    assert (chain.used.name, chain.fallback_from) == ("backup", "primary")
    assert len(upstream.requests) == 1 and len(upstream_b.requests) == 1


async def test_a_refused_connection_and_a_timeout_fall_back_too(upstream, upstream_b, registry):
    upstream_b.queue(Reply(openai_stream(["Back", "up"])), Reply(openai_stream(["Back", "up"])))
    refused = f"http://127.0.0.1:{closed_port()}/v1"
    models = registry(chain_toml(refused, upstream_b.base_url))
    chain = Chain(models, models.chain("primary"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None and events[:2] == BACKUP
    assert trail(chain) == [("primary", "upstream_connection_error"), ("backup", "ok")]

    upstream.queue(Reply(openai_stream(["late"]), delay_s=1.0))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url, first_token_timeout_s=0.2))
    chain = Chain(models, models.chain("primary"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None and events[:2] == BACKUP
    assert trail(chain) == [("primary", "upstream_timeout"), ("backup", "ok")]


@pytest.mark.parametrize("case", REQUEST_FAULTS)
async def test_a_request_every_provider_would_refuse_ends_the_chain(upstream, upstream_b, registry, case: str):
    status, body = REQUEST_FAULTS[case]
    upstream.queue(Reply(status=status, body=body))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url), CIRCUIT_FAILURES="1")
    chain = Chain(models, models.chain("primary"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert events == []
    assert type(error) is UpstreamHTTPError and error.status == status and not error.retryable
    assert trail(chain) == [("primary", "upstream_http_error")]
    assert chain.attempts[0].status == status
    assert upstream_b.requests == []  # the backup was never asked
    assert models.circuits.state("primary") == "closed"  # and the model is not blamed


@pytest.mark.parametrize("status, body", [FALLS_BACK["401_expired_key"], FALLS_BACK["403_forbidden"],
                                          FALLS_BACK["404_retired_model"],
                                          FALLS_BACK["400_decommissioned_model"]],
                         ids=["401", "403", "404", "400_model"])
async def test_auth_and_missing_model_failures_open_the_circuit(upstream, upstream_b, registry, status, body):
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url), CIRCUIT_FAILURES="2")
    upstream.queue(Reply(status=status, body=body), Reply(status=status, body=body))
    for _ in range(2):
        chain = Chain(models, models.chain("primary"))
        _events, error = await collect(chain.stream(ChatRequest(PROMPT)))
        assert error is None and trail(chain) == [("primary", "upstream_http_error"), ("backup", "ok")]
    assert models.circuits.state("primary") == "open"
    chain = Chain(models, models.chain("primary"))
    _events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None
    assert trail(chain) == [("primary", "circuit_open"), ("backup", "ok")]
    assert len(upstream.requests) == 2  # the open circuit sent nothing more to the primary


async def test_a_parameter_the_model_rejects_falls_back_without_blaming_the_model(upstream, upstream_b, registry):
    status, body = FALLS_BACK["400_unsupported_parameter"]
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url), CIRCUIT_FAILURES="1")
    upstream.queue(Reply(status=status, body=body))
    chain = Chain(models, models.chain("primary"))
    _events, error = await collect(chain.stream(ChatRequest(PROMPT, extra={"tools": []})))
    assert error is None and trail(chain) == [("primary", "upstream_http_error"), ("backup", "ok")]
    assert models.circuits.state("primary") == "closed"


async def test_every_link_failing_ends_with_the_last_error(upstream, upstream_b, registry):
    upstream.queue(Reply(status=401, body=FALLS_BACK["401_expired_key"][1]))
    upstream_b.queue(Reply(status=404, body=FALLS_BACK["404_retired_model"][1]))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url))
    chain = Chain(models, models.chain("primary"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert events == []
    assert type(error) is UpstreamHTTPError and error.status == 404
    assert [(a.model, a.outcome, a.status) for a in chain.attempts] == [
        ("primary", "upstream_http_error", 401), ("backup", "upstream_http_error", 404)]


# -- through the app -----------------------------------------------------------------------------

async def chat(client, user, model: str = "primary") -> tuple[list, dict]:
    resp = await client.post("/api/chat", json={"content": "Say hello", "model": model, "stream": True},
                             headers=user.headers)
    assert resp.status == 200
    events = parse_sse(await resp.read())
    return events, orjson.loads(events[0].data)


async def test_chat_with_an_expired_primary_key_is_answered_by_the_backup_and_the_trail_is_saved(
        upstream, upstream_b, config_file, make_client, user, db):
    upstream.queue(Reply(status=401, body=FALLS_BACK["401_expired_key"][1]))
    upstream_b.queue(Reply(openai_stream(["Back", "up"], prompt_tokens=4)))
    client = await make_client(GATEWAY_CONFIG=config_file(chain_toml(upstream.base_url, upstream_b.base_url)))
    events, meta = await chat(client, user)
    assert [e.event for e in events] == ["metadata", "message", "message", "usage", "done", "message"]
    assert (meta["model"], meta["provider"], meta["fallback_from"]) == ("backup", "b", "primary")
    done = orjson.loads(events[4].data)
    assert [(a["model"], a["outcome"], a.get("status")) for a in done["attempts"]] == [
        ("primary", "upstream_http_error", 401), ("backup", "ok", None)]
    row = await db.fetchrow("SELECT status, content, model, metadata FROM messages WHERE id = $1 AND user_id = $2",
                            uuid.UUID(meta["message_id"]), user.id)
    assert (row["status"], row["content"], row["model"]) == ("complete", "Backup", "backup")
    assert row["metadata"]["attempts"] == done["attempts"]


async def test_chat_with_a_malformed_request_fails_without_calling_the_backup(
        upstream, upstream_b, config_file, make_client, user, db):
    status, body = REQUEST_FAULTS["400_plain"]
    upstream.queue(Reply(status=status, body=body))
    client = await make_client(GATEWAY_CONFIG=config_file(chain_toml(upstream.base_url, upstream_b.base_url)))
    events, meta = await chat(client, user)
    assert [e.event for e in events] == ["metadata", "error", "message"]
    assert orjson.loads(events[1].data) == {
        "type": "upstream_http_error", "message": "upstream answered 400: bad request", "retryable": False}
    row = await db.fetchrow("SELECT status, metadata FROM messages WHERE id = $1 AND user_id = $2",
                            uuid.UUID(meta["message_id"]), user.id)
    assert row["status"] == "failed"
    assert [(a["model"], a["outcome"], a["status"]) for a in row["metadata"]["attempts"]] == [
        ("primary", "upstream_http_error", 400)]
    assert upstream_b.requests == []
