"""What the gateway sends to and takes from upstream providers: the bound a cap reserved
for is sent upstream and held to, the prompt estimate counts everything sent, a provider's secrets
never come back from its upstream's text, and usage counts out of range are not charged."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.policy.admission import DEFAULT_RESERVE_TOKENS
from gateway.providers import normalise
from gateway.providers.base import IMAGE_TOKENS, ChatRequest, Secrets, UsageReport, prompt_estimate
from gateway.providers.chain import relay_chars
from gateway.providers.openai import http_error
from tests.support.common import User, wait_for
from tests.support.fakes import openai_chunk, parse_sse

KEY = "sk-live-4f9c2a7e1b3d5f6a8c0e"  # the provider's API key
HEADER = "hdr-secret-9d8c7b6a5f4e"  # the value of its configured extra header
SECRETS = (KEY, HEADER)
TOKEN = "abcd"  # one token of the fake upstream's replies, by the gateway's estimate too
WRITES = 3000  # tokens an upstream writes when nothing bounds it (or when it ignores the bound)
PER_CHUNK = 100  # tokens a chunk


class Upstream:
    """An OpenAI- and Anthropic-compatible upstream; what it does is named by the model id asked for:

    obeys           writes max_tokens (max_completion_tokens) tokens, else WRITES, and reports them
    ignores         writes WRITES tokens whatever it was told, and reports them
    echo_401        answers 401 with an error message that echoes the request's headers
    echo_midstream  streams "Hel", then an error event that echoes the request's headers
    usage:P:C       streams "Hel" and reports P prompt and C completion tokens (as JSON values)

    Its prompt count is the gateway's own estimate of what it got: a tokenizer that agrees."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.server: Any = None
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.openai)
        self.app.router.add_post("/v1/messages", self.anthropic)
        self.app.router.add_post("/v1/embeddings", self.embeddings)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))

    @staticmethod
    def echo(request: web.Request) -> str:
        # the extra headers first: the log's own redaction takes an Authorization line to its end
        return "invalid credentials; you sent " + ", ".join(f"{k}: {v}" for k, v in
                                                             reversed(request.headers.items()))

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        mode = body["model"]
        if mode == "echo_401":
            return web.json_response({"error": {"message": self.echo(request), "type": "invalid_request_error"}},
                                     status=401)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        pieces = [openai_chunk({"role": "assistant", "content": ""})]
        if mode == "echo_midstream":
            pieces += [openai_chunk({"content": "Hel"}),
                       b"data: " + orjson.dumps({"error": {"message": self.echo(request)}}) + b"\n\n"]
        elif mode.startswith("usage:"):
            _, prompt, completion = mode.split(":")
            pieces += [openai_chunk({"content": "Hel"}), openai_chunk({}, "stop"),
                       b'data: {"choices":[],"usage":{"prompt_tokens":%s,"completion_tokens":%s}}\n\n'
                       % (prompt.encode(), completion.encode()), b"data: [DONE]\n\n"]
        else:
            bound = body.get("max_tokens") or body.get("max_completion_tokens")
            n = bound if mode == "obeys" and bound is not None else WRITES
            pieces += [openai_chunk({"content": TOKEN * min(PER_CHUNK, n - i)}) for i in range(0, n, PER_CHUNK)]
            pieces += [openai_chunk({}, "length" if bound == n else "stop"),
                       openai_chunk(usage={"prompt_tokens": prompt_estimate(body["messages"], body),
                                           "completion_tokens": n, "total_tokens": 0}, choices=False),
                       b"data: [DONE]\n\n"]
        try:
            for piece in pieces:
                await resp.write(piece)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the gateway hung up: it had what it relays
        return resp

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if body["model"] == "echo_401":
            return web.json_response({"type": "error", "error": {"type": "authentication_error",
                                                                 "message": self.echo(request)}}, status=401)
        n = body["max_tokens"]
        events = [("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-x",
            "usage": {"input_tokens": 1, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}})]
        events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": TOKEN * min(PER_CHUNK, n - i)}})
                   for i in range(0, n, PER_CHUNK)]
        events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                                      "usage": {"output_tokens": n}}),
                   ("message_stop", {"type": "message_stop"})]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data))
                                  for name, data in events))
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.json_response({"error": {"message": self.echo(request)}}, status=401)


@pytest.fixture
async def up(aiohttp_server: Any) -> Upstream:
    fake = Upstream()
    fake.server = await aiohttp_server(fake.app)
    return fake


def config(url: str) -> str:
    return f"""
[providers.up]
kind = "openai"
base_url = "{url}"
api_key = "{KEY}"
headers = {{ X-Tenant-Token = "{HEADER}", X-Title = "chat" }}

[providers.ant]
kind = "anthropic"
base_url = "{url}"
api_key = "{KEY}"
headers = {{ X-Tenant-Token = "{HEADER}" }}

[models.obeys]
provider = "up"
upstream = "obeys"

[models.ignores]
provider = "up"
upstream = "ignores"

[models.echo_401]
provider = "up"
upstream = "echo_401"

[models.echo_midstream]
provider = "up"
upstream = "echo_midstream"

[models.ant_obeys]
provider = "ant"
upstream = "obeys"

[models.ant_echo_401]
provider = "ant"
upstream = "echo_401"

[models.embed_echo]
provider = "up"
upstream = "echo_401"
kind = "embedding"

[models.usage_2_62]
provider = "up"
upstream = "usage:5:4611686018427387904"

[models.usage_completion_past_bound]
provider = "up"
upstream = "usage:5:1000000"

[models.usage_prompt_absurd]
provider = "up"
upstream = "usage:1000000000:1"

[models.usage_float]
provider = "up"
upstream = "usage:5.5:1"

[models.usage_string]
provider = "up"
upstream = "usage:5:\\"1\\""

[models.usage_fine]
provider = "up"
upstream = "usage:5:1"
"""


async def capped_key(db: asyncpg.Pool, user: User, daily_tokens: int) -> uuid.UUID:
    key_id: uuid.UUID = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    await db.execute("UPDATE api_keys SET limits = $2 WHERE id = $1", key_id, {"daily_tokens": daily_tokens})
    return key_id


async def gateway(make_client: Any, config_file: Any, up: Upstream) -> TestClient:
    client: TestClient = await make_client(GATEWAY_CONFIG=config_file(config(up.base_url)))
    return client


async def charged(db: asyncpg.Pool, user: User, key_id: uuid.UUID) -> tuple[int, int, int]:
    """(the usage rows' total tokens, the key's day: tokens spent, tokens still reserved)."""
    total = await db.fetchval("SELECT coalesce(sum(total_tokens), 0) FROM usage WHERE user_id = $1", user.id)
    day = await db.fetchrow("SELECT tokens, reserved FROM key_daily_usage WHERE api_key_id = $1 AND day = $2",
                            key_id, datetime.now(UTC).date())
    return total, day["tokens"], day["reserved"]


async def settled(db: asyncpg.Pool, user: User) -> bool:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND status IN ('pending', 'streaming')",
                             user.id) == 0


async def chat(client: TestClient, user: User, model: str, **body: Any) -> tuple[list[Any], dict[str, Any]]:
    """A streamed native turn: its events, and its reply's row once saved."""
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "hi", "model": model, "stream": True, **body})
    assert resp.status == 200
    raw = await resp.read()
    events = parse_sse(raw)
    message_id = uuid.UUID(orjson.loads(events[0].data)["message_id"])
    return events, {"raw": raw, "id": message_id}


async def reply_row(db: asyncpg.Pool, message_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchrow("SELECT status, content, error, metadata, prompt_tokens, completion_tokens FROM messages "
                            "WHERE id = $1", message_id)
    return dict(row)


# -- the bound a cap reserved for is sent upstream, and held to ------------------------------------

@pytest.mark.parametrize("model", ["obeys", "ignores"])
async def test_six_concurrent_requests_without_max_tokens_never_charge_past_a_keys_token_cap(
        model, make_client, config_file, up, user, db):
    key_id = await capped_key(db, user, 5000)
    client = await gateway(make_client, config_file, up)

    async def one() -> tuple[int, dict[str, Any]]:
        resp = await client.post("/v1/chat/completions", headers=user.headers,
                                 json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        return resp.status, await resp.json()

    answers = await asyncio.gather(*(one() for _ in range(6)))
    await client.close()  # drains the batched usage writer and gives the quota slices back
    served = [body for status, body in answers if status == 200]
    assert {status for status, _ in answers} <= {200, 429} and len(served) == len(up.bodies) >= 4
    # every upstream call was told the bound its reservation assumed: the default, or what was left
    bounds = [body["max_tokens"] for body in up.bodies]
    assert max(bounds) == DEFAULT_RESERVE_TOKENS and sum(b + 1 for b in bounds) <= 5000
    total, spent, reserved = await charged(db, user, key_id)
    assert total == spent <= 5000 and reserved == 0
    rows = await db.fetch("SELECT prompt_tokens, completion_tokens, estimated FROM usage WHERE user_id = $1 "
                          "ORDER BY completion_tokens", user.id)
    # an upstream that ignores its bound is cut at the relay's margin and charged at most the bound
    assert [tuple(r) for r in rows] == [(1, b, model == "ignores") for b in sorted(bounds)]
    for body in served:
        choice = body["choices"][0]
        assert choice["finish_reason"] == "length"
        bound = body["usage"]["completion_tokens"]
        relayed = relay_chars(bound) if model == "ignores" else bound * len(TOKEN)
        assert len(choice["message"]["content"]) == relayed


PRICED = """
[models.priced_{mode}]
provider = "up"
upstream = "{mode}"
input_price_per_mtok = 1000000
output_price_per_mtok = 1000000

[limits]
daily_cost_usd = 3000
"""


@pytest.mark.parametrize("mode", ["obeys", "ignores"])
async def test_six_concurrent_requests_without_max_tokens_never_charge_past_a_daily_cost_cap(
        mode, make_client, config_file, up, user, db):
    # $1 a token either way: a request reserves $1 + $1024, so three fit in $3000 and the rest are clamped
    client = await make_client(GATEWAY_CONFIG=config_file(config(up.base_url) + PRICED.format(mode=mode)))

    async def one() -> int:
        resp = await client.post("/v1/chat/completions", headers=user.headers,
                                 json={"model": f"priced_{mode}", "messages": [{"role": "user", "content": "hi"}]})
        await resp.read()
        return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(6)))
    await client.close()
    assert set(statuses) <= {200, 429} and statuses.count(200) == len(up.bodies) >= 3
    assert max(body["max_tokens"] for body in up.bodies) == DEFAULT_RESERVE_TOKENS
    cost = await db.fetchval("SELECT sum(cost_usd)::float8 FROM usage WHERE user_id = $1", user.id)
    day = await db.fetchrow("SELECT cost_usd::float8 AS spent, cost_reserved::float8 AS held FROM daily_usage "
                            "WHERE user_id = $1", user.id)
    assert cost == day["spent"] <= 3000 and day["held"] == 0
    assert cost == sum(1 + body["max_tokens"] for body in up.bodies)


async def test_a_native_reply_from_an_upstream_that_ignores_its_bound_is_cut_and_not_marked_downgraded(
        make_client, config_file, up, user, db):
    key_id = await capped_key(db, user, 5000)
    client = await gateway(make_client, config_file, up)
    events, reply = await chat(client, user, "ignores")
    assert up.bodies[0]["max_tokens"] == DEFAULT_RESERVE_TOKENS
    text = "".join(orjson.loads(e.data)["delta"] for e in events[:-1] if e.event == "message")
    assert text == (TOKEN * WRITES)[:relay_chars(DEFAULT_RESERVE_TOKENS)]
    assert [e.event for e in events[-3:-1]] == ["usage", "done"] and events[-1].data == "[DONE]"
    assert orjson.loads(events[-3].data) == {"prompt_tokens": 1, "completion_tokens": DEFAULT_RESERVE_TOKENS,
                                             "total_tokens": 1 + DEFAULT_RESERVE_TOKENS, "estimated": True}
    assert orjson.loads(events[-2].data)["finish_reason"] == "length"
    await wait_for(lambda: settled(db, user))
    row = await reply_row(db, reply["id"])
    assert (row["status"], row["content"]) == ("complete", text)
    assert row["metadata"]["finish_reason"] == "length" and row["metadata"]["estimated"] is True
    assert "policy" not in row["metadata"]  # the default bound sent is no downgrade
    assert await charged(db, user, key_id) == (1 + DEFAULT_RESERVE_TOKENS, 1 + DEFAULT_RESERVE_TOKENS, 0)


async def test_a_client_bound_under_the_cap_is_sent_as_is_and_an_uncapped_request_gets_none(
        make_client, config_file, up, make_user, db):
    capped, free = await make_user(), await make_user()
    await capped_key(db, capped, 5000)
    client = await gateway(make_client, config_file, up)
    events, _ = await chat(client, capped, "obeys", max_tokens=7)
    assert orjson.loads(events[-2].data)["finish_reason"] == "length"
    events, _ = await chat(client, free, "obeys")
    assert orjson.loads(events[-2].data)["finish_reason"] == "stop"
    assert [b.get("max_tokens") for b in up.bodies] == [7, None]  # nothing reserved: the upstream ends it
    text = "".join(orjson.loads(e.data)["delta"] for e in events[:-1] if e.event == "message")
    assert text == TOKEN * WRITES


async def test_an_anthropic_upstream_is_told_the_reserved_bound_not_its_adapters_default(
        make_client, config_file, up, user, db):
    await capped_key(db, user, 5000)
    client = await gateway(make_client, config_file, up)
    events, _ = await chat(client, user, "ant_obeys")
    assert up.bodies[0]["max_tokens"] == DEFAULT_RESERVE_TOKENS  # was 4096, past the 1024 reserved
    assert orjson.loads(events[-3].data) == {"prompt_tokens": 1, "completion_tokens": DEFAULT_RESERVE_TOKENS,
                                             "total_tokens": 1 + DEFAULT_RESERVE_TOKENS}


# -- the estimate counts everything sent upstream ---------------------------------------------------

BIG_TOOLS = [{"type": "function", "function": {"name": f"tool_{i}", "description": "d" * 900,
                                               "parameters": {"type": "object", "properties": {}}}}
             for i in range(230)]


def test_the_big_tools_array_is_224_kb():
    assert 224_000 <= len(orjson.dumps(BIG_TOOLS)) < 234_000


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "obeys", "messages": [{"role": "user", "content": "hi"}], "tools": BIG_TOOLS}),
    ("/v1/responses", {"model": "obeys", "input": "hi", "store": False, "tools": [
        {"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
         "parameters": t["function"]["parameters"]} for t in BIG_TOOLS]}),
    ("/v1/responses", {"model": "obeys", "input": "hi", "tools": [
        {"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
         "parameters": t["function"]["parameters"]} for t in BIG_TOOLS]}),
    ("/v1/messages", {"model": "obeys", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": t["function"]["name"], "description": t["function"]["description"],
                                 "input_schema": t["function"]["parameters"]} for t in BIG_TOOLS]}),
])
async def test_a_224_kb_tools_array_with_hi_is_refused_under_a_5000_token_cap_and_never_sent(
        path, body, make_client, config_file, up, user, db):
    key_id = await capped_key(db, user, 5000)
    client = await gateway(make_client, config_file, up)
    resp = await client.post(path, headers=user.headers, json=body)
    assert resp.status == 429
    assert up.bodies == []
    await client.close()
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 0
    day = await db.fetchrow("SELECT tokens, reserved FROM key_daily_usage WHERE api_key_id = $1", key_id)
    assert day is None or tuple(day) == (0, 0)


def test_the_prompt_estimate_counts_system_history_tool_calls_images_tools_and_response_format():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [{"role": "system", "content": "x" * 40},
                {"role": "user", "content": [{"type": "text", "text": "y" * 8}, image, image]},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "z" * 4}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}
    extra = {"tools": tools, "response_format": fmt, "seed": 1}

    def json4(value: object) -> int:
        return (len(orjson.dumps(value)) + 3) // 4

    assert prompt_estimate(messages) == 10 + 2 + 2 * IMAGE_TOKENS + json4(calls) + 1 + json4("call_1")
    assert prompt_estimate(messages, extra) == prompt_estimate(messages) + json4(tools) + json4(fmt)
    assert IMAGE_TOKENS == 765  # OpenAI's bill for a 1024x1024 image at high detail


async def test_count_tokens_counts_the_tools_it_would_send(make_client, config_file, up, user):
    client = await gateway(make_client, config_file, up)
    message = {"model": "obeys", "messages": [{"role": "user", "content": "hi"}]}
    tool = {"name": "lookup", "description": "find a thing", "input_schema": {"type": "object"}}
    bare = await client.post("/v1/messages/count_tokens", headers=user.headers, json=message)
    tooled = await client.post("/v1/messages/count_tokens", headers=user.headers, json={**message, "tools": [tool]})
    sent = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"},
                                              "description": "find a thing"}}]
    assert (await bare.json())["input_tokens"] == 1
    assert (await tooled.json())["input_tokens"] == 1 + (len(orjson.dumps(sent)) + 3) // 4


# -- a provider's secrets never come back from its upstream's text ---------------------------------

def assert_scrubbed(text: str | bytes) -> None:
    data = text.decode() if isinstance(text, bytes) else text
    for secret in SECRETS:
        assert secret not in data
    assert "[redacted]" in data


@pytest.mark.parametrize("model", ["echo_401", "ant_echo_401"])
async def test_an_upstream_401_echoing_the_request_headers_leaks_no_secret_to_sse_row_or_log(
        model, make_client, config_file, up, user, db, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.providers.chain")
    client = await gateway(make_client, config_file, up)
    events, reply = await chat(client, user, model)
    assert events[-2].event == "error"
    error = orjson.loads(events[-2].data)
    assert error["type"] == "upstream_http_error"
    assert error["message"].startswith("upstream answered 401: invalid credentials; you sent ")
    assert_scrubbed(reply["raw"])
    await wait_for(lambda: settled(db, user))
    row = await reply_row(db, reply["id"])
    assert row["status"] == "failed"
    assert_scrubbed(orjson.dumps(row["error"]))
    assert_scrubbed(caplog.text)  # the chain's warning names the failure
    assert "X-Tenant-Token: [redacted]" in caplog.text


async def test_the_v1_error_body_and_a_mid_stream_error_event_leak_no_secret(make_client, config_file, up, user):
    client = await gateway(make_client, config_file, up)
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "echo_401", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 502
    assert_scrubbed(await resp.read())
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "echo_midstream", "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    raw = await resp.read()
    assert b"upstream error mid-stream: invalid credentials" in raw
    assert_scrubbed(raw)
    resp = await client.post("/v1/messages", headers=user.headers,
                             json={"model": "ant_echo_401", "max_tokens": 10,
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 502
    assert_scrubbed(await resp.read())
    resp = await client.post("/v1/embeddings", headers=user.headers, json={"model": "embed_echo", "input": "hi"})
    assert resp.status == 502
    body = await resp.read()
    assert KEY not in body.decode() and b"[redacted]" in body


def test_a_secret_across_the_error_texts_cut_leaves_no_part_of_it():
    secrets = Secrets([KEY, HEADER, "short"])
    assert secrets.values == (KEY, HEADER)  # "short" would garble text, not hide a secret
    message = "m" * (normalise.ERROR_CHARS - len("upstream answered 401: ") - 10) + KEY
    body = orjson.dumps({"error": {"message": message}})
    assert KEY[:10] in http_error(401, body, {}).message  # unscrubbed, the cut keeps the key's start
    scrubbed = http_error(401, body, {}, secrets).message
    assert scrubbed.endswith("m[redacted]") and KEY[:4] not in scrubbed


# -- usage counts out of range are not charged -------------------------------------------------------

@pytest.mark.parametrize("model", ["usage_2_62", "usage_completion_past_bound", "usage_prompt_absurd",
                                   "usage_float", "usage_string"])
async def test_usage_out_of_range_is_charged_as_the_estimate_and_the_row_says_so(
        model, make_client, config_file, up, user, db):
    key_id = await capped_key(db, user, 5000)
    client = await gateway(make_client, config_file, up)
    events, reply = await chat(client, user, model, max_tokens=10)
    assert orjson.loads(events[-3].data) == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                                             "estimated": True, "usage_suspect": True}
    await wait_for(lambda: settled(db, user))
    row = await reply_row(db, reply["id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1, 1)
    assert row["metadata"]["estimated"] is True and row["metadata"]["usage_suspect"] is True
    usage = await db.fetchrow("SELECT prompt_tokens, completion_tokens, estimated FROM usage WHERE message_id = $1",
                              reply["id"])
    assert tuple(usage) == (1, 1, True)
    assert await charged(db, user, key_id) == (2, 2, 0)


async def test_usage_in_range_is_charged_as_reported(make_client, config_file, up, user, db):
    key_id = await capped_key(db, user, 5000)
    client = await gateway(make_client, config_file, up)
    events, _ = await chat(client, user, "usage_fine", max_tokens=10)
    assert orjson.loads(events[-3].data) == {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    await wait_for(lambda: settled(db, user))
    assert await charged(db, user, key_id) == (6, 6, 0)


async def test_the_openai_route_reports_and_charges_the_estimate_for_absurd_usage(
        make_client, config_file, up, user, db):
    client = await gateway(make_client, config_file, up)
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "usage_2_62", "messages": [{"role": "user", "content": "hi"}]})
    assert (await resp.json())["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    await client.close()
    usage = await db.fetchrow("SELECT prompt_tokens, completion_tokens, estimated FROM usage WHERE user_id = $1",
                              user.id)
    assert tuple(usage) == (1, 1, True)


def test_what_is_believed_of_an_upstreams_counts():
    request = ChatRequest([{"role": "user", "content": "hi"}], max_tokens=10)
    prompt_limit = normalise.PROMPT_SLACK * 1 + normalise.PROMPT_ALLOWANCE
    assert normalise.charged(request, UsageReport(prompt_limit, 10), 4) == UsageReport(prompt_limit, 10)
    for reported in (UsageReport(5, 11), UsageReport(prompt_limit + 1, 1), UsageReport(5, 1, suspect=True)):
        assert normalise.charged(request, reported, 4) == UsageReport(1, 1, suspect=True, estimated=True)
    # none came: the estimate, its completion at most the bound the upstream was told
    assert normalise.charged(request, None, 4000) == UsageReport(1, 10, estimated=True)
    assert normalise.charged(request, None, 0, consumed=False) == UsageReport(0, 0, estimated=True)
    # no bound: any completion count in range is believed
    unbounded = ChatRequest([{"role": "user", "content": "hi"}])
    assert normalise.charged(unbounded, UsageReport(5, 100_000), 4) == UsageReport(5, 100_000)
