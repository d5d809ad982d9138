"""Whatever a hostile upstream sends (NUL, text that is not a string, usage of 2^63 or
below zero, invalid UTF-8, one 10 MB event, empty deltas forever), through the whole app the
client gets exactly one terminal event, the row is terminal, and usage is counted once, in range;
counts out of range are not believed: the estimate is charged, flagged."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from gateway.providers import normalise
from gateway.providers.base import Finish, TextDelta, UpstreamProtocolError, UpstreamStreamError, UsageReport
from gateway.providers.normalise import MAX_COUNT
from gateway.providers.openai import parse_chunk
from gateway.providers.sse_decoder import SSEDecoder
from tests.support.fakes import parse_sse
from tests.support.hostile import ANTHROPIC, OPENAI, HostileUpstream

# the endless streams: data every 5 ms, so the idle timeout never fires; the attempt's own bounds must
# (max_stream_s once content has come, timeout_s only before)
ENDLESS_TIMEOUTS = {"timeout_s": 1.0, "first_token_timeout_s": 0.5, "idle_timeout_s": 0.3, "max_stream_s": 1.0}

PROTOCOL, TIMEOUT = "upstream_protocol_error", "upstream_timeout"
REPLACED_UTF8 = "caf\ufffd \ufffd\ufffdok"  # b"caf\xc3 \xff\xfeok" decoded with replacement

# model -> (status, content, error type or None, (prompt, completion) or None when estimated, suspect);
# a suspect report is not believed: the estimate of "hi" and "Hel" is charged instead, flagged estimated
EXPECTED: dict[str, tuple[str, str, str | None, tuple[int, int] | None, bool]] = {
    "o_nul": ("complete", "Hel\ufffdlo", None, (5, 2), False),
    "o_number": ("failed", "", PROTOCOL, None, False),
    "o_object": ("failed", "", PROTOCOL, None, False),
    "o_list": ("failed", "", PROTOCOL, None, False),
    "o_bool": ("failed", "", PROTOCOL, None, False),
    "o_null": ("complete", "Hel", None, (5, 2), False),
    "o_number_after_content": ("failed", "Hel", PROTOCOL, None, False),
    "o_object_after_content": ("failed", "Hel", PROTOCOL, None, False),
    "o_usage_2_31": ("complete", "Hel", None, (1, 1), True),
    "o_usage_2_63": ("complete", "Hel", None, (1, 1), True),
    "o_usage_sum_2_31": ("complete", "Hel", None, (1, 1), True),
    "o_usage_negative": ("complete", "Hel", None, (1, 1), True),
    "o_usage_not_integers": ("complete", "Hel", None, (1, 1), True),
    "o_invalid_utf8": ("complete", REPLACED_UTF8, None, (5, 2), False),
    "o_ten_mb_chunk": ("failed", "", PROTOCOL, None, False),
    "o_ten_mb_after_content": ("failed", "Hel", PROTOCOL, None, False),
    "o_ten_mb_line": ("failed", "", PROTOCOL, None, False),
    "o_ten_mb_after_done": ("complete", "Hel", None, (5, 2), False),
    "o_ten_mb_error_body": ("failed", "", "upstream_http_error", None, False),
    "o_endless_empty_deltas": ("failed", "", TIMEOUT, None, False),
    "o_endless_after_content": ("failed", "Hel", TIMEOUT, None, False),
    "a_nul": ("complete", "Hel\ufffdlo", None, (5, 2), False),
    "a_number": ("failed", "", PROTOCOL, None, False),
    "a_object": ("failed", "", PROTOCOL, None, False),
    "a_number_after_content": ("failed", "Hel", PROTOCOL, None, False),
    "a_usage_2_63": ("complete", "Hel", None, (1, 1), True),
    "a_usage_negative": ("complete", "Hel", None, (1, 1), True),
    "a_invalid_utf8": ("complete", REPLACED_UTF8, None, (5, 2), False),
    "a_ten_mb_chunk": ("failed", "", PROTOCOL, None, False),
}


def hostile_toml(base_url: str) -> str:
    """A model per payload: `o_<name>` through the OpenAI adapter, `a_<name>` through Anthropic's.
    No fallbacks, so each outcome shows."""
    text = (f'[providers.hostile]\nkind = "openai"\nbase_url = "{base_url}"\napi_key = "sk-h"\n\n'
            f'[providers.hostile_ant]\nkind = "anthropic"\nbase_url = "{base_url}"\napi_key = "sk-a"\n\n')
    for prefix, provider, payloads in (("o", "hostile", OPENAI), ("a", "hostile_ant", ANTHROPIC)):
        for name in payloads:
            text += f'[models.{prefix}_{name}]\nprovider = "{provider}"\nupstream = "{name}"\n'
            if name.startswith("endless"):
                text += "".join(f"{k} = {v}\n" for k, v in ENDLESS_TIMEOUTS.items())
            text += "\n"
    return text


@pytest.fixture
async def hostile(aiohttp_server: Any) -> HostileUpstream:
    fake = HostileUpstream()
    fake.server = await aiohttp_server(fake.app)
    return fake


def test_every_payload_has_an_expected_outcome() -> None:
    assert set(EXPECTED) == {f"o_{n}" for n in OPENAI} | {f"a_{n}" for n in ANTHROPIC}


@pytest.mark.parametrize("model", list(EXPECTED))
async def test_hostile_payload_ends_in_one_terminal_event_and_one_usage_row(
        model, hostile, make_client, config_file, user, db):
    status, content, error_type, counts, suspect = EXPECTED[model]
    client = await make_client(GATEWAY_CONFIG=config_file(hostile_toml(hostile.base_url)))
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "hi", "model": model, "stream": True})
    assert resp.status == 200
    events = parse_sse(await resp.read())
    names = [e.event for e in events]
    # exactly one terminal event, last before the closing [DONE]
    assert events[-1].data == "[DONE]" and names.count("done") + names.count("error") == 1
    assert names[-2] == ("error" if error_type else "done")
    assert "".join(orjson.loads(e.data)["delta"] for e in events[:-1] if e.event == "message") == content
    message_id = uuid.UUID(orjson.loads(events[0].data)["message_id"])
    row = await db.fetchrow("SELECT status, content, error, metadata, prompt_tokens, completion_tokens "
                            "FROM messages WHERE id = $1", message_id)
    assert (row["status"], row["content"]) == (status, content)
    metadata = row["metadata"]
    if error_type:
        error = orjson.loads(events[-2].data)
        assert error["type"] == error_type and row["error"]["type"] == error_type
        if error_type == TIMEOUT:  # data kept coming: the attempt's bounds ended it, not the idle timeout
            phase = "max_stream" if content else "first_token"
            assert error["message"] == f"upstream timed out ({phase})"
    else:
        usage_event = orjson.loads(events[-3].data)
        assert names[-3] == "usage"
        assert (usage_event["prompt_tokens"], usage_event["completion_tokens"]) == counts
        assert usage_event.get("usage_suspect", False) is suspect
        assert usage_event.get("estimated", False) is suspect
    assert metadata.get("usage_suspect", False) is suspect
    assert metadata["estimated"] is (suspect or counts is None)
    usage = await db.fetch("SELECT prompt_tokens, completion_tokens, total_tokens, estimated FROM usage "
                           "WHERE message_id = $1", message_id)
    assert len(usage) == 1
    prompt, completion, total, estimated = usage[0]
    assert 0 <= prompt < 2**31 and 0 <= completion < 2**31 and total == prompt + completion < 2**31
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    if counts is not None:
        assert (prompt, completion, estimated) == (*counts, suspect)
    else:
        assert estimated is True
    assert hostile.requests == {model[2:]: 1}  # no retry by the adapter; no fallback configured


# -- the pieces, one rule each ------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    (None, (0, False)), (0, (0, False)), (7, (7, False)), (MAX_COUNT, (MAX_COUNT, False)), (7.0, (7, False)),
    (2**31, (MAX_COUNT, True)), (2**63, (MAX_COUNT, True)), (1.8e19, (MAX_COUNT, True)),
    (float("inf"), (MAX_COUNT, True)), (-1, (0, True)), (-(2**63), (0, True)), (float("-inf"), (0, True)),
    (2.6, (3, True)), (-0.4, (0, True)), (float("nan"), (0, True)), ("12", (0, True)), (True, (0, True)),
    ([1], (0, True)), ({"n": 1}, (0, True)),
])
def test_token_counts_are_clamped_into_the_integer_column_and_flagged(raw, expected):
    assert normalise.count(raw) == expected


def test_a_usage_whose_sum_overflows_the_total_column_is_cut_and_flagged():
    assert normalise.usage(MAX_COUNT, 1) == UsageReport(MAX_COUNT, 0, True)
    assert normalise.usage(2**30, 2**30) == UsageReport(2**30, 2**30 - 1, True)
    assert normalise.usage(2**30, 2**30 - 1) == UsageReport(2**30, 2**30 - 1, False)


CHUNK = b'{"choices":[{"index":0,"delta":%s,"finish_reason":%s}]}'


@pytest.mark.parametrize(("data", "message"), [
    (b'{"choices":{"0":{}}}', "`choices` that is not a list"),
    (b'{"choices":["x"]}', "a choice that is not a JSON object (str)"),
    (CHUNK % (b'"hi"', b"null"), "`delta` that is not a JSON object (str)"),
    (CHUNK % (b'{"content":42}', b"null"), "`delta.content` that is not a string (int)"),
    (CHUNK % (b'{"content":1.5}', b"null"), "`delta.content` that is not a string (float)"),
    (CHUNK % (b'{"content":false}', b"null"), "`delta.content` that is not a string (bool)"),
    (CHUNK % (b'{"content":["a"]}', b"null"), "`delta.content` that is not a string (list)"),
    (CHUNK % (b"{}", b"7"), "`finish_reason` that is not a string (int)"),
    (CHUNK % (b'{"tool_calls":"x"}', b"null"), "`delta.tool_calls` that is not a list"),
    (CHUNK % (b'{"tool_calls":[1]}', b"null"), "a tool call that is not a JSON object (int)"),
    (CHUNK % (b'{"tool_calls":[{"index":[0]}]}', b"null"), "a tool call whose `index` is not an integer"),
    (CHUNK % (b'{"tool_calls":[{"index":0,"function":{"arguments":{}}}]}', b"null"),
     "a tool call's arguments that is not a string (dict)"),
    (b'{"choices":[],"usage":[1,2]}', "`usage` that is not a JSON object (list)"),
])
def test_a_chunk_that_breaks_the_format_is_a_protocol_error(data, message):
    with pytest.raises(UpstreamProtocolError) as info:
        parse_chunk("message", data, [])
    assert info.value.message == "upstream sent " + message and info.value.retryable


def test_text_is_normalised_before_it_is_streamed():
    assert parse_chunk("message", CHUNK % (b'{"content":"a\\u0000b"}', b'"st\\u0000op"'), []) == [
        TextDelta("a\ufffdb"), Finish("st\ufffdop")]
    assert parse_chunk("message", CHUNK % (b'{"content":"caf\xc3"}', b"null"), []) == [TextDelta("caf\ufffd")]
    assert parse_chunk("message", CHUNK % (b'{"content":null}', b"null"), []) == []
    assert parse_chunk("message", b'{"choices":[],"usage":{"prompt_tokens":-3,"completion_tokens":2}}', []) == [
        UsageReport(0, 2, True)]


def test_an_error_message_with_nul_is_cleaned():
    with pytest.raises(UpstreamStreamError) as info:
        parse_chunk("message", b'{"error":{"message":"bo\\u0000om"}}', [])
    assert info.value.message == "upstream error mid-stream: bo\ufffdom"


def test_sse_decoder_fails_a_line_longer_than_its_bound_on_the_next_read():
    decoder = SSEDecoder(max_event_bytes=100)
    # the read that overflows still hands over the events it completed
    assert [e.data for e in decoder.feed(b"data: ok\n\ndata: " + b"x" * 95)] == [b"ok"]
    with pytest.raises(UpstreamProtocolError, match="longer than 100 bytes"):
        decoder.feed(b"x\n\n")
    with pytest.raises(UpstreamProtocolError):  # and stays failed
        decoder.feed(b"data: [DONE]\n\n")


def test_sse_decoder_bounds_an_event_of_many_data_lines():
    decoder = SSEDecoder(max_event_bytes=100)
    assert decoder.feed(b"data: " + b"x" * 60 + b"\n") == []
    assert decoder.feed(b"data: " + b"x" * 60 + b"\n") == []  # 122 bytes held: over the bound
    with pytest.raises(UpstreamProtocolError):
        decoder.feed(b"\n")


def test_sse_decoder_accepts_an_event_at_its_bound():
    decoder = SSEDecoder(max_event_bytes=100)
    assert [len(e.data) for e in decoder.feed(b"data: " + b"x" * 99 + b"\n\n")] == [99]
    assert [len(e.data) for e in decoder.feed(b"data: " + b"x" * 99 + b"\n\n")] == [99]  # the bound is per event


# -- the OpenAI-compatible route: the same payloads end in a clean answer, usage counted once ----

ESTIMATED = (1, 1)  # "hi" and "Hel"
ROUTE_EXPECTED: dict[str, tuple[int, str | None, tuple[int, int] | None, int]] = {
    # model: (HTTP status, content or the error code, usage counts (None: estimated), usage rows)
    # (a reply that failed before any text, with nothing reserved, has nothing to count; counts out of
    # range are not believed: the estimate is charged, as ESTIMATED)
    "o_nul": (200, "Hel\ufffdlo", (5, 2), 1),
    "o_number": (502, PROTOCOL, None, 0),
    "o_object_after_content": (502, PROTOCOL, None, 1),
    "o_usage_2_63": (200, "Hel", ESTIMATED, 1),
    "o_usage_negative": (200, "Hel", ESTIMATED, 1),
    "o_invalid_utf8": (200, REPLACED_UTF8, (5, 2), 1),
    "o_ten_mb_chunk": (502, PROTOCOL, None, 0),
    "o_endless_after_content": (504, TIMEOUT, None, 1),
}


@pytest.mark.parametrize("model", list(ROUTE_EXPECTED))
async def test_hostile_payload_through_the_openai_route(model, hostile, make_client, config_file, user, db):
    status, content, counts, row_count = ROUTE_EXPECTED[model]
    client = await make_client(GATEWAY_CONFIG=config_file(hostile_toml(hostile.base_url)))
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    body = await resp.json()
    assert resp.status == status
    if status == 200:
        assert body["choices"][0]["message"]["content"] == content
        assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == counts
    else:
        assert body["error"]["code"] == content
    await client.close()  # drains the batched usage writer
    rows = await db.fetch("SELECT prompt_tokens, completion_tokens, total_tokens, estimated FROM usage "
                          "WHERE user_id = $1", user.id)
    assert len(rows) == row_count
    for prompt, completion, total, estimated in rows:
        assert 0 <= prompt < 2**31 and 0 <= completion < 2**31 and total == prompt + completion < 2**31
        if counts is None:
            assert estimated is True
        else:
            assert (prompt, completion, estimated) == (*counts, counts is ESTIMATED)


async def test_a_suspect_usage_is_replayed_as_it_was_streamed(hostile, make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(hostile_toml(hostile.base_url)))
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "hi", "model": "o_usage_2_63", "stream": True})
    live = parse_sse(await resp.read())
    assert orjson.loads(live[-3].data) == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                                           "estimated": True, "usage_suspect": True}
    message_id = orjson.loads(live[0].data)["message_id"]
    replay = await client.get(f"/api/messages/{message_id}/stream", headers=user.headers)
    assert parse_sse(await replay.read()) == live
