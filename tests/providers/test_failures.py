"""Every way an upstream fails, through the whole app: each ends in its documented outcome, with
the right row in the database. One fake upstream per case, no fallback, so the failure shows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.config import ModelConfig
from gateway.providers.base import ChatRequest, TextDelta, UpstreamHTTPError, UpstreamProtocolError, UpstreamStreamError
from gateway.state import MODELS
from tests.support.fakes import Reply, openai_chunk, openai_stream, parse_sse, split_every
from tests.support.providers import closed_port, model_toml, openai_provider_toml

OK_EVENTS = openai_stream(["Hel", "lo"], prompt_tokens=7)


def config(base_url: str, **timeouts: float) -> str:
    return openai_provider_toml("up", base_url, "sk-up") + model_toml("solo", "up", "up-solo", **timeouts)


CASES = {
    # name: (reply, timeouts, expected SSE event names, saved status, saved content, error type)
    "http_500": (Reply(status=500, body=b'{"error":{"message":"boom"}}'), {},
                 ["metadata", "error"], "failed", "", "upstream_http_error"),
    "http_429_retry_after_past_the_budget": (
        Reply(status=429, body=b"{}", headers={"Retry-After": "9999"}), {},
        ["metadata", "error"], "failed", "", "upstream_http_error"),
    "hang_before_the_first_byte": (Reply(OK_EVENTS, delay_s=5), {"first_token_timeout_s": 0.3},
                                   ["metadata", "error"], "failed", "", "upstream_timeout"),
    "hang_mid_stream": (Reply(OK_EVENTS, hang_after=2), {"idle_timeout_s": 0.3},
                        ["metadata", "message", "error"], "failed", "Hel", "upstream_timeout"),
    "malformed_json_chunk": (Reply([*OK_EVENTS[:2], b"data: {not json\n\n"]), {},
                             ["metadata", "message", "error"], "failed", "Hel", "upstream_protocol_error"),
    "error_event_mid_stream": (
        Reply([*OK_EVENTS[:2], b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n']), {},
        ["metadata", "message", "error"], "failed", "Hel", "upstream_stream_error"),
    "truncated_without_done": (Reply(OK_EVENTS[:3]), {},
                               ["metadata", "message", "message", "error"], "failed", "Hello",
                               "upstream_protocol_error"),
    "split_at_every_byte": (Reply(split_every(b"".join(OK_EVENTS), 1)), {},
                            ["metadata", "message", "message", "usage", "done"], "complete", "Hello", None),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_upstream_failure_ends_in_its_documented_outcome(case, upstream, make_client, config_file, user, db):
    reply, timeouts, names, status, content, error_type = CASES[case]
    upstream.queue(reply)
    client = await make_client(GATEWAY_CONFIG=config_file(config(upstream.base_url, **timeouts)))
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "stream": True})
    assert resp.status == 200
    events = parse_sse(await resp.read())
    assert [e.event for e in events] == [*names, "message"] and events[-1].data == "[DONE]"
    meta = orjson.loads(events[0].data)
    row = await db.fetchrow("SELECT status, content, error, model FROM messages WHERE id = $1",
                            uuid.UUID(meta["message_id"]))
    assert (row["status"], row["content"], row["model"]) == (status, content, "solo")
    if error_type is None:
        assert row["error"] is None
    else:
        error = orjson.loads(events[-2].data)
        assert error["type"] == error_type and row["error"]["type"] == error_type
        assert set(error) == {"type", "message", "retryable"}
    # whatever happened, one usage row and never a second reply
    assert await db.fetchval("SELECT count(*) FROM usage WHERE message_id = $1", uuid.UUID(meta["message_id"])) == 1
    assert await db.fetchval("SELECT count(*) FROM messages WHERE reply_to = $1 AND role = 'assistant'",
                             uuid.UUID(meta["user_message_id"])) == 1


async def test_connection_refused_is_a_failed_reply(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(config(f"http://127.0.0.1:{closed_port()}/v1")))
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "stream": True})
    events = parse_sse(await resp.read())
    assert [e.event for e in events] == ["metadata", "error", "message"]
    assert orjson.loads(events[1].data)["type"] == "upstream_connection_error"
    row = await db.fetchrow("SELECT status, content FROM messages WHERE id = $1::uuid",
                            orjson.loads(events[0].data)["message_id"])
    assert (row["status"], row["content"]) == ("failed", "")


async def test_usage_chunk_without_choices_is_not_content(upstream, make_client, config_file, user, db):
    upstream.queue(Reply([openai_chunk({"role": "assistant", "content": ""}), openai_chunk({"content": "x"}),
                          openai_chunk({}, "length"), openai_chunk(usage={"prompt_tokens": 3, "completion_tokens": 1,
                                                                         "total_tokens": 4}, choices=False),
                          b"data: [DONE]\n\n"]))
    client = await make_client(GATEWAY_CONFIG=config_file(config(upstream.base_url)))
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "stream": True})
    events = parse_sse(await resp.read())
    assert orjson.loads(events[-2].data)["finish_reason"] == "length"
    assert orjson.loads(events[-3].data) == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


# -- the generation's catch-all: whatever an adapter raises, the reply ends failed, saved, once ---

class Scripted:
    """A provider (registered in a running app in place of a real one) that yields `batches`, then
    raises `error`: a stand-in for a bug in an adapter, or a provider error, at either moment."""

    def __init__(self, name: str, batches: list[list[Any]], error: BaseException) -> None:
        self.name = name
        self.batches = batches
        self.error = error

    async def stream(self, model: ModelConfig, request: ChatRequest) -> AsyncIterator[list[Any]]:
        for batch in self.batches:
            yield batch
        raise self.error


INJECTED: dict[str, tuple[BaseException, str]] = {
    # name: (raised by the provider, error type the client and the row get)
    "protocol_error": (UpstreamProtocolError("bad chunk"), "upstream_protocol_error"),
    "stream_error": (UpstreamStreamError("overloaded"), "upstream_stream_error"),
    "non_retryable_http_error": (UpstreamHTTPError("bad request", status=400), "upstream_http_error"),
    "timeout_error": (TimeoutError(), "upstream_timeout"),
    "runtime_error": (RuntimeError("bug"), "provider_error"),
    "type_error": (TypeError("sequence item 0: expected str instance, int found"), "provider_error"),
    "key_error": (KeyError("choices"), "provider_error"),
    "value_error": (ValueError("invalid literal for int()"), "provider_error"),
    "attribute_error": (AttributeError("'list' object has no attribute 'get'"), "provider_error"),
    "unicode_error": (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "provider_error"),
    "os_error": (OSError("disk"), "provider_error"),
}


@pytest.mark.parametrize("after_content", [False, True], ids=["before_content", "after_content"])
@pytest.mark.parametrize("case", list(INJECTED))
async def test_any_exception_from_the_chain_ends_the_reply_failed_with_one_error_event(
        case, after_content, upstream, make_client, config_file, user, db):
    raised, error_type = INJECTED[case]
    client = await make_client(GATEWAY_CONFIG=config_file(config(upstream.base_url)))
    batches = [[TextDelta("Hel")]] if after_content else []
    client.app[MODELS].providers["up"] = Scripted("up", batches, raised)
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "stream": True})
    events = parse_sse(await resp.read())
    assert [e.event for e in events] == ["metadata", *(["message"] if after_content else []), "error", "message"]
    assert events[-1].data == "[DONE]"
    error = orjson.loads(events[-2].data)
    assert error["type"] == error_type and set(error) == {"type", "message", "retryable"}
    message_id = uuid.UUID(orjson.loads(events[0].data)["message_id"])
    row = await db.fetchrow("SELECT status, content, error FROM messages WHERE id = $1", message_id)
    assert (row["status"], row["content"], row["error"]["type"]) == ("failed", "Hel" if after_content else "",
                                                                     error_type)
    assert await db.fetchval("SELECT count(*) FROM usage WHERE message_id = $1", message_id) == 1
    assert upstream.requests == []  # the scripted provider stood in for the real one


async def test_a_finish_that_breaks_still_saves_the_row_failed_and_ends_the_stream(
        upstream, make_client, config_file, user, db):
    """A bug past the adapters (here: a non-string delta that no adapter would let through) breaks
    the finish itself: the row still ends failed with a zero estimated usage, the client gets one
    error event, and a later reader gets the same outcome from the row — not a 503."""
    client = await make_client(GATEWAY_CONFIG=config_file(config(upstream.base_url)))

    class Broken(Scripted):
        async def stream(self, model: ModelConfig, request: ChatRequest) -> AsyncIterator[list[Any]]:
            yield [TextDelta(42)]  # type: ignore[arg-type]

    client.app[MODELS].providers["up"] = Broken("up", [], RuntimeError())
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "stream": True})
    events = parse_sse(await resp.read())
    assert [e.event for e in events] == ["metadata", "message", "error", "message"]
    assert orjson.loads(events[-2].data) == {"type": "internal_error", "message": "the reply could not be finished",
                                             "retryable": True}
    message_id = uuid.UUID(orjson.loads(events[0].data)["message_id"])
    row = await db.fetchrow("SELECT status, content, error FROM messages WHERE id = $1", message_id)
    assert (row["status"], row["content"], row["error"]["type"]) == ("failed", "", "internal_error")
    usage = await db.fetch("SELECT prompt_tokens, completion_tokens, estimated FROM usage WHERE message_id = $1",
                           message_id)
    assert [tuple(u) for u in usage] == [(0, 0, True)]
    later = await client.get(f"/api/messages/{message_id}/stream", headers=user.headers)
    assert later.status == 200
    assert [e.event for e in parse_sse(await later.read())] == ["metadata", "error", "message"]
