"""The execute step's adapters: SSE decoding, the OpenAI-compatible provider, the demo provider
and the fallback chain, against real local fake upstreams (and through the app where it shows)."""

from __future__ import annotations

import uuid

import orjson
import pytest

from gateway.providers.base import (
    ChatRequest,
    Finish,
    ProviderError,
    StreamEvent,
    TextDelta,
    UpstreamConnectionError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamStreamError,
    UpstreamTimeout,
    UsageReport,
)
from gateway.providers.chain import Chain
from gateway.providers.registry import ModelRegistry
from gateway.providers.sse_decoder import SSEDecoder
from tests.support.fakes import FakeUpstream, Reply, openai_chunk, openai_stream, parse_sse, split_every
from tests.support.providers import (
    ERROR_BODY,
    PROMPT,
    chain_toml,
    closed_port,
    collect,
    model_toml,
    openai_provider_toml,
    trail,
)

BOM = b"\xef\xbb\xbf"
HELLO = openai_stream(["Hel", "lo"])
HELLO_EVENTS: list[StreamEvent] = [TextDelta("Hel"), TextDelta("lo"), Finish("stop"), UsageReport(9, 2)]
STREAM_ERROR = b'data: {"error":{"message":"Overloaded","type":"overloaded_error","param":null,"code":null}}\n\n'


# -- helpers --------------------------------------------------------------------------------------

def decoded(*chunks: bytes) -> list[tuple[str, bytes]]:
    """Feed the chunks, in order, to one fresh decoder: the (event, data) pairs it emitted."""
    decoder = SSEDecoder()
    return [(e.event, e.data) for chunk in chunks for e in decoder.feed(chunk)]


def wire_data(pieces: list[bytes]) -> list[tuple[str, bytes]]:
    """What a decoder must emit for `openai_stream` pieces: each `data: X\\n\\n` as ("message", X)."""
    assert all(p.startswith(b"data: ") and p.endswith(b"\n\n") for p in pieces)
    return [("message", p[len(b"data: "):-2]) for p in pieces]


async def run_model(registry: ModelRegistry, name: str,
                    request: ChatRequest | None = None) -> tuple[list[StreamEvent], ProviderError | None]:
    model = registry.models[name]
    return await collect(registry.provider(model).stream(model, request or ChatRequest(PROMPT)))


# -- SSEDecoder ----------------------------------------------------------------------------------

def test_decoder_emits_every_openai_event_in_one_feed():
    assert decoded(b"".join(HELLO)) == wire_data(HELLO)
    assert len(wire_data(HELLO)) == 6 and wire_data(HELLO)[-1] == ("message", b"[DONE]")


# multi-line data and a named event too: a line end split badly would show as an extra event
MIXED_HEAD = b": OPENROUTER PROCESSING\n\nevent: error\ndata: a\ndata: b\n\n"


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_decoder_gives_the_same_events_whatever_the_split_points(line_end: bytes):
    data = (MIXED_HEAD + b"".join(HELLO)).replace(b"\n", line_end)
    expected = [("error", b"a\nb"), *wire_data(HELLO)]
    assert decoded(data) == expected
    for i in range(len(data) + 1):
        assert decoded(data[:i], data[i:]) == expected, f"split at byte {i}"
    assert decoded(*split_every(data, 1)) == expected


def test_decoder_joins_a_crlf_cut_between_its_cr_and_lf():
    # a line end split across reads is one line end, not a line end plus a blank line
    assert decoded(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [("message", b"a\nb")]


def test_decoder_keeps_a_pending_cr_across_an_empty_read():
    assert decoded(b"data: a\r", b"", b"\ndata: b\r\n\r\n") == [("message", b"a\nb")]


def test_decoder_accepts_mixed_line_ends_in_one_stream():
    assert decoded(b"data: a\r\n\rdata: b\n\r\ndata: c\r\r") == [("message", b"a"), ("message", b"b"),
                                                                 ("message", b"c")]


def test_decoder_ignores_comment_lines():
    raw = (b": OPENROUTER PROCESSING\n\n: OPENROUTER PROCESSING\n\n"
           b"data: one\n: a comment inside an event\ndata: two\n\n:\n\n")
    assert decoded(raw) == [("message", b"one\ntwo")]


def test_decoder_names_error_events_and_resets_the_name_after_dispatch():
    raw = b'event: error\ndata: {"error":{"message":"x"}}\n\ndata: after\n\n'
    assert decoded(raw) == [("error", b'{"error":{"message":"x"}}'), ("message", b"after")]


def test_decoder_joins_multi_line_data_with_lf():
    assert decoded(b"data: a\ndata:\ndata: c\n\n") == [("message", b"a\n\nc")]


def test_decoder_drops_a_leading_bom_even_split_across_reads():
    data = b"".join(HELLO)
    expected = wire_data(HELLO)
    assert decoded(BOM + data) == expected
    assert decoded(BOM[:1], BOM[1:2], BOM[2:], data) == expected
    for i in range(len(BOM) + 8):
        assert decoded((BOM + data)[:i], (BOM + data)[i:]) == expected, f"split at byte {i}"


def test_decoder_drops_only_one_leading_bom():
    # a second BOM is part of the field name "\ufeffdata", an unknown field
    assert decoded(BOM + BOM + b"data: x\n\ndata: y\n\n") == [("message", b"y")]
    # bytes that merely start like a BOM are content
    assert decoded(b"\xef", b"x: 1\ndata: z\n\n") == [("message", b"z")]


def test_decoder_does_not_emit_an_incomplete_event():
    decoder = SSEDecoder()
    assert [e.data for e in decoder.feed(b"data: a\n\ndata: b\n")] == [b"a"]
    assert decoder.feed(b"data: c") == []
    assert [e.data for e in decoder.feed(b"\n\n")] == [b"b\nc"]


def test_decoder_reads_data_without_a_space_after_the_colon():
    # only one leading space is dropped; a field with no colon has an empty value
    assert decoded(b"data:x\n\ndata:  y\n\ndata\ndata: z\n\n") == [("message", b"x"), ("message", b" y"),
                                                                   ("message", b"\nz")]


def test_decoder_dispatches_nothing_for_empty_data_or_unknown_fields():
    assert decoded(b"event: ping\n\nid: 7\nretry: 10\nfoo: bar\n\n") == []


# -- OpenAIProvider ------------------------------------------------------------------------------

def one_openai_model(upstream: FakeUpstream, key: str | None = "sk-test-key", **timeouts: float) -> str:
    return (openai_provider_toml("up", upstream.base_url, key)
            + model_toml("m", "up", "fake-up-1", **timeouts))


async def test_openai_request_asks_for_a_usage_stream_with_the_upstream_model_id(upstream, registry):
    models = registry(one_openai_model(upstream))
    await run_model(models, "m", ChatRequest(PROMPT, max_tokens=7, temperature=0.5))
    await run_model(models, "m")
    assert upstream.requests == [
        {"model": "fake-up-1", "messages": PROMPT, "stream": True, "stream_options": {"include_usage": True},
         "max_tokens": 7, "temperature": 0.5},
        {"model": "fake-up-1", "messages": PROMPT, "stream": True, "stream_options": {"include_usage": True}},
    ]
    assert upstream.headers[0]["Authorization"] == "Bearer sk-test-key"
    assert upstream.headers[0]["Content-Type"] == "application/json"


async def test_openai_request_without_a_key_sends_no_authorization(upstream, registry):
    await run_model(registry(one_openai_model(upstream, key=None)), "m")
    assert "Authorization" not in upstream.headers[0]


async def test_openai_stream_yields_deltas_finish_and_usage(upstream, registry):
    upstream.queue(Reply(HELLO))
    assert await run_model(registry(one_openai_model(upstream)), "m") == (HELLO_EVENTS, None)


async def test_openai_stream_written_one_byte_at_a_time_yields_the_same_events(upstream, registry):
    upstream.queue(Reply(split_every(b"".join(HELLO), 1)))
    assert await run_model(registry(one_openai_model(upstream)), "m") == (HELLO_EVENTS, None)


async def test_openai_stream_skips_comments_and_empty_deltas(upstream, registry):
    pieces = [b": OPENROUTER PROCESSING\n\n", *HELLO[:2], openai_chunk({"content": ""}), *HELLO[2:]]
    upstream.queue(Reply(pieces))
    assert await run_model(registry(one_openai_model(upstream)), "m") == (HELLO_EVENTS, None)


async def test_openai_mid_stream_error_object_raises_a_stream_error(upstream, registry):
    upstream.queue(Reply([*HELLO[:2], STREAM_ERROR, *HELLO[2:]]))
    events, error = await run_model(registry(one_openai_model(upstream)), "m")
    assert events == [TextDelta("Hel")]
    assert type(error) is UpstreamStreamError
    assert error.message == "upstream error mid-stream: Overloaded"


@pytest.mark.parametrize("data", [b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
                                  b'{"message":"Overloaded"}', b'"Overloaded"'], ids=["wrapped", "bare", "string"])
async def test_openai_sse_error_event_raises_a_stream_error(upstream, registry, data: bytes):
    upstream.queue(Reply([*HELLO[:2], b"event: error\ndata: " + data + b"\n\n", *HELLO[2:]]))
    events, error = await run_model(registry(one_openai_model(upstream)), "m")
    assert events == [TextDelta("Hel")]
    assert type(error) is UpstreamStreamError
    assert error.message == "upstream error mid-stream: Overloaded"


async def test_openai_sse_error_event_with_plain_text_data_is_still_a_stream_error(upstream, registry):
    # `event: error` is the upstream reporting a failure, whatever its data looks like
    upstream.queue(Reply([*HELLO[:2], b"event: error\ndata: Overloaded\n\n"]))
    events, error = await run_model(registry(one_openai_model(upstream)), "m")
    assert events == [TextDelta("Hel")]
    assert type(error) is UpstreamStreamError
    assert error.message == "upstream error mid-stream: Overloaded"


@pytest.mark.parametrize("chunk", [b'data: {"id":"chatcmpl-1","choices":[\n\n', b"data: [1, 2]\n\n"],
                         ids=["truncated_json", "not_an_object"])
async def test_openai_malformed_chunk_raises_a_protocol_error(upstream, registry, chunk: bytes):
    upstream.queue(Reply([*HELLO[:2], chunk, *HELLO[2:]]))
    events, error = await run_model(registry(one_openai_model(upstream)), "m")
    assert events == [TextDelta("Hel")]
    assert type(error) is UpstreamProtocolError


async def test_openai_stream_without_done_is_a_protocol_error_not_a_clean_end(upstream, registry):
    upstream.queue(Reply(openai_stream(["Hel", "lo"], done=False)))
    events, error = await run_model(registry(one_openai_model(upstream)), "m")
    assert events == HELLO_EVENTS
    assert type(error) is UpstreamProtocolError
    assert error.message == "upstream stream ended without [DONE]"


async def test_openai_500_raises_a_retryable_http_error_with_the_upstream_message(upstream, registry):
    upstream.queue(Reply(status=500, body=ERROR_BODY))
    events, error = await run_model(registry(one_openai_model(upstream)), "m")
    assert events == []
    assert type(error) is UpstreamHTTPError
    assert (error.status, error.retryable, error.retry_after) == (500, True, None)
    assert error.message == "upstream answered 500: The server had an error"


async def test_openai_429_carries_retry_after(upstream, registry):
    body = b'{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}'
    upstream.queue(Reply(status=429, body=body, headers={"Retry-After": "2"}))
    events, error = await run_model(registry(one_openai_model(upstream)), "m")
    assert events == []
    assert type(error) is UpstreamHTTPError
    assert (error.status, error.retryable, error.retry_after) == (429, True, 2.0)
    assert error.message == "upstream answered 429: Rate limit reached"


async def test_openai_400_is_not_retryable(upstream, registry):
    upstream.queue(Reply(status=400, body=b'{"error":{"message":"bad","type":"invalid_request_error"}}'))
    _, error = await run_model(registry(one_openai_model(upstream)), "m")
    assert type(error) is UpstreamHTTPError
    assert (error.status, error.retryable) == (400, False)


async def test_openai_refused_connection_raises_a_connection_error(registry):
    toml = openai_provider_toml("up", f"http://127.0.0.1:{closed_port()}/v1") + model_toml("m", "up", "x")
    events, error = await run_model(registry(toml), "m")
    assert events == []
    assert type(error) is UpstreamConnectionError


async def test_openai_silence_between_chunks_raises_an_idle_timeout(upstream, registry):
    upstream.queue(Reply(HELLO, hang_after=2))
    events, error = await run_model(registry(one_openai_model(upstream, idle_timeout_s=0.2)), "m")
    assert events == [TextDelta("Hel")]
    assert type(error) is UpstreamTimeout
    assert error.phase == "idle"


# -- DemoProvider --------------------------------------------------------------------------------

def demo_request(text: str, max_tokens: int | None = None) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], max_tokens=max_tokens)


async def test_demo_reply_is_deterministic_per_prompt(registry):
    models = registry(DEMO_CHUNKS="6")
    first, _ = await run_model(models, "demo", demo_request("Hello there"))
    again, _ = await run_model(models, "demo", demo_request("Hello there"))
    other, _ = await run_model(models, "demo", demo_request("Something else"))
    assert first == again
    texts = [e.text for e in first if isinstance(e, TextDelta)]
    other_texts = [e.text for e in other if isinstance(e, TextDelta)]
    assert texts[0] == 'Demo reply to "Hello there":' and other_texts[0] == 'Demo reply to "Something else":'
    assert texts != other_texts


async def test_demo_sends_demo_chunks_deltas_then_stop_and_usage(registry):
    events, error = await run_model(registry(DEMO_CHUNKS="5"), "demo", demo_request("Hello there"))
    assert error is None
    assert [type(e) for e in events] == [TextDelta] * 5 + [Finish, UsageReport]
    assert events[-2:] == [Finish("stop"), UsageReport(3, 5)]  # "Hello there": 11 chars ≈ 3 tokens
    assert events[4].text.endswith(".") and all(e.text.startswith(" ") for e in events[1:5])


async def test_demo_max_tokens_truncates_with_finish_length(registry):
    models = registry(DEMO_CHUNKS="5")
    full, _ = await run_model(models, "demo", demo_request("Hello there"))
    cut, error = await run_model(models, "demo", demo_request("Hello there", max_tokens=2))
    assert error is None
    assert cut == [*full[:2], Finish("length"), UsageReport(3, 2)]
    # a limit the reply fits in is not a truncation
    fits, _ = await run_model(models, "demo", demo_request("Hello there", max_tokens=5))
    assert fits == full


# -- Chain ---------------------------------------------------------------------------------------

FAILURES = ["http_500", "http_429", "refused", "first_token_timeout", "stream_error"]


def fail_primary(upstream: FakeUpstream, failure: str) -> tuple[str, str]:
    """Script `failure` on the primary: (its base URL, the outcome the chain must record)."""
    if failure == "refused":
        return f"http://127.0.0.1:{closed_port()}/v1", "upstream_connection_error"
    reply, outcome = {
        "http_500": (Reply(status=500, body=ERROR_BODY), "upstream_http_error"),
        "http_429": (Reply(status=429, body=b"{}", headers={"Retry-After": "2"}), "upstream_http_error"),
        # the upstream answers only after the first-token timeout (0.2 s)
        "first_token_timeout": (Reply(HELLO, delay_s=0.6), "upstream_timeout"),
        "stream_error": (Reply([HELLO[0], STREAM_ERROR]), "upstream_stream_error"),
    }[failure]
    upstream.queue(reply)
    return upstream.base_url, outcome


@pytest.mark.parametrize("failure", FAILURES)
async def test_chain_falls_back_before_the_first_content(upstream, upstream_b, registry, failure: str):
    primary_url, outcome = fail_primary(upstream, failure)
    upstream_b.queue(Reply(openai_stream(["Back", "up"])))
    models = registry(chain_toml(primary_url, upstream_b.base_url, first_token_timeout_s=0.2))
    chain = Chain(models, models.chain("primary"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert error is None
    assert events == [TextDelta("Back"), TextDelta("up"), Finish("stop"), UsageReport(9, 2)]
    assert trail(chain) == [("primary", outcome), ("backup", "ok")]
    assert [a.provider for a in chain.attempts] == ["a", "b"]
    assert chain.model is not None and chain.model.name == "backup"
    assert chain.fallback_from == "primary"
    assert upstream_b.requests[0]["model"] == "up-backup"
    assert upstream_b.headers[0]["Authorization"] == "Bearer sk-b"


async def test_chain_falls_back_to_the_demo_model(upstream, registry):
    upstream.queue(Reply(status=503, body=ERROR_BODY))
    models = registry(chain_toml(upstream.base_url, None), DEMO_CHUNKS="3")
    chain = Chain(models, models.chain("primary"))
    events, error = await collect(chain.stream(demo_request("Hi")))
    assert error is None
    assert [type(e) for e in events] == [TextDelta] * 3 + [Finish, UsageReport]
    assert trail(chain) == [("primary", "upstream_http_error"), ("demo", "ok")]
    assert (chain.used.name, chain.used.provider, chain.fallback_from) == ("demo", "demo", "primary")


async def test_chain_with_a_healthy_primary_never_calls_the_fallback(upstream, upstream_b, registry):
    upstream.queue(Reply(HELLO))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url))
    chain = Chain(models, models.chain("primary"))
    assert await collect(chain.stream(ChatRequest(PROMPT))) == (HELLO_EVENTS, None)
    assert trail(chain) == [("primary", "ok")]
    assert chain.fallback_from is None
    assert upstream_b.requests == []


@pytest.mark.parametrize("tail, error_type, texts", [
    ([STREAM_ERROR], UpstreamStreamError, ["Hel"]),
    ([b"data: not json\n\n"], UpstreamProtocolError, ["Hel"]),
    ([openai_chunk({"content": "lo"})], UpstreamProtocolError, ["Hel", "lo"]),  # ends without [DONE]
], ids=["stream_error", "malformed", "no_done"])
async def test_chain_never_switches_after_the_first_content(upstream, upstream_b, registry, tail, error_type, texts):
    upstream.queue(Reply([*HELLO[:2], *tail]))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url))
    chain = Chain(models, models.chain("primary"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert type(error) is error_type
    assert events == [TextDelta(t) for t in texts]
    assert trail(chain) == [("primary", error_type.kind)]
    assert chain.model is not None and chain.model.name == "primary" and chain.fallback_from is None
    assert upstream_b.requests == []


async def test_chain_idle_timeout_after_the_first_content_is_final(upstream, upstream_b, registry):
    upstream.queue(Reply(HELLO, hang_after=2))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url, idle_timeout_s=0.2))
    chain = Chain(models, models.chain("primary"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert events == [TextDelta("Hel")]
    assert type(error) is UpstreamTimeout and error.phase == "idle"
    assert trail(chain) == [("primary", "upstream_timeout")]
    assert upstream_b.requests == []


async def test_chain_raises_the_last_error_when_every_link_fails(upstream, upstream_b, registry):
    upstream.queue(Reply(status=500, body=ERROR_BODY))
    upstream_b.queue(Reply(status=429, body=b"{}", headers={"Retry-After": "1000"}))
    models = registry(chain_toml(upstream.base_url, upstream_b.base_url))
    chain = Chain(models, models.chain("primary"))
    events, error = await collect(chain.stream(ChatRequest(PROMPT)))
    assert events == []
    assert type(error) is UpstreamHTTPError and error.status == 429
    assert trail(chain) == [("primary", "upstream_http_error"), ("backup", "upstream_http_error")]
    assert chain.model is None and chain.used.name == "backup" and chain.fallback_from == "primary"


# -- through the app -----------------------------------------------------------------------------

async def test_chat_fallback_names_the_fallback_model_and_saves_the_attempts(
        upstream, upstream_b, config_file, make_client, user, db):
    upstream.queue(Reply(status=500, body=ERROR_BODY))
    upstream_b.queue(Reply(openai_stream(["Back", "up"], prompt_tokens=4)))
    client = await make_client(GATEWAY_CONFIG=config_file(chain_toml(upstream.base_url, upstream_b.base_url)))
    resp = await client.post("/api/chat", json={"content": "Say hello", "model": "primary", "stream": True},
                             headers=user.headers)
    assert resp.status == 200
    events = parse_sse(await resp.read())
    assert [e.event for e in events] == ["metadata", "message", "message", "usage", "done", "message"]
    meta = orjson.loads(events[0].data)
    assert (meta["model"], meta["provider"], meta["fallback_from"]) == ("backup", "b", "primary")
    assert [orjson.loads(e.data)["delta"] for e in events[1:3]] == ["Back", "up"]
    assert orjson.loads(events[3].data) == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    done = orjson.loads(events[4].data)
    expected_attempts = [("primary", "a", "upstream_http_error"), ("backup", "b", "ok")]
    assert [(a["model"], a["provider"], a["outcome"]) for a in done["attempts"]] == expected_attempts
    assert upstream.requests[0]["model"] == "up-primary" and upstream_b.requests[0]["model"] == "up-backup"

    row = await db.fetchrow("SELECT status, content, model, provider, metadata FROM messages "
                            "WHERE id = $1 AND user_id = $2", uuid.UUID(meta["message_id"]), user.id)
    assert (row["status"], row["content"], row["model"], row["provider"]) == ("complete", "Backup", "backup", "b")
    assert row["metadata"]["fallback_from"] == "primary"
    assert [(a["model"], a["provider"], a["outcome"]) for a in row["metadata"]["attempts"]] == expected_attempts
    assert row["metadata"]["attempts"] == done["attempts"]
