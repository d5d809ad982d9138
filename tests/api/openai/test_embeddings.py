"""POST /v1/embeddings, driven by the official `openai` SDK's `embeddings.create`
against a real local fake upstream that answers in OpenAI's exact embeddings format."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import uuid
from datetime import UTC, datetime
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.providers.base import estimate_tokens
from gateway.providers.embeddings import DEMO_DIMENSIONS, demo_vector
from gateway.state import USAGE
from tests.support.common import MakeClient, User, wait_for

# vectors of exactly representable float32 values: float and base64 answers agree to the bit
VECTORS = {"hello": [0.5, -0.25, 3.0, 0.125], "world": [-1.0, 2.5, 0.0, 0.75]}


def b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


class FakeEmbeddings:
    """An OpenAI-compatible `/v1/embeddings`: vectors from VECTORS (cut to `dimensions`), usage as
    the upstream counts it (3 tokens per input), base64 when asked unless `ignore_encoding`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.status = 200
        self.ignore_encoding = False
        self.report_usage = True
        self.hold: asyncio.Event | None = None  # answer only once it is set
        self.app = web.Application()
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.server: Any = None

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.hold is not None:
            await self.hold.wait()
        if self.status != 200:
            return web.json_response({"error": {"message": "upstream is down", "type": "server_error"}},
                                     status=self.status)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for i, text in enumerate(inputs):
            vector = VECTORS[text][:body.get("dimensions") or 4]
            encoded = b64(vector) if body.get("encoding_format") == "base64" and not self.ignore_encoding else vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        answer: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
        if self.report_usage:
            answer["usage"] = {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)}
        return web.json_response(answer)


CONFIG = """
[providers.up]
kind = "openai"
base_url = "{url}"
api_key = "sk-up"

[models.embed]
provider = "up"
upstream = "text-embedding-3-small"
kind = "embedding"
input_price_per_mtok = 20

[models.chatty]
provider = "up"
upstream = "gpt-4o-mini"
{limits}
"""


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeEmbeddings:
    fake = FakeEmbeddings()
    fake.server = await aiohttp_server(fake.app)
    return fake


async def gateway(make_client: MakeClient, config_file: Any, fake: FakeEmbeddings, limits: str = "") -> Any:
    return await make_client(GATEWAY_CONFIG=config_file(CONFIG.format(url=fake.base_url, limits=limits)))


async def usage_rows(client: Any, db: Any, user_id: uuid.UUID) -> list[dict[str, Any]]:
    await client.app[USAGE].flush()
    rows = await db.fetch("SELECT model, provider, prompt_tokens, completion_tokens, total_tokens, estimated, "
                          "cost_usd FROM usage WHERE user_id = $1 ORDER BY created_at", user_id)
    return [dict(r) for r in rows]


async def day_row(db: Any, user_id: uuid.UUID) -> dict[str, Any] | None:
    row = await db.fetchrow("SELECT tokens, reserved, requests FROM daily_usage WHERE user_id = $1 AND day = $2",
                            user_id, datetime.now(UTC).date())
    return dict(row) if row else None


async def test_sdk_float_embeddings_pass_through_and_are_counted_once(openai_sdk, make_client, config_file, fake, user,
                                                                     db):
    client = await gateway(make_client, config_file, fake)
    answer = await openai_sdk(client, user.key).embeddings.create(model="embed", input=["hello", "world"],
                                                           encoding_format="float", dimensions=3)
    assert [d.embedding for d in answer.data] == [VECTORS["hello"][:3], VECTORS["world"][:3]]
    assert [d.index for d in answer.data] == [0, 1] and answer.model == "embed"
    assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (6, 6)
    assert fake.requests == [{"model": "text-embedding-3-small", "input": ["hello", "world"],
                              "encoding_format": "float", "dimensions": 3}]
    assert fake.headers[0]["Authorization"] == "Bearer sk-up"
    rows = await usage_rows(client, db, user.id)
    assert [{k: v for k, v in r.items() if k != "cost_usd"} for r in rows] == [
        {"model": "embed", "provider": "up", "prompt_tokens": 6, "completion_tokens": 0, "total_tokens": 6,
         "estimated": False}]
    assert float(rows[0]["cost_usd"]) == 6 * 20 / 1_000_000


async def test_sdk_default_base64_is_decoded_to_the_same_floats(openai_sdk, make_client, config_file, fake, user):
    client = await gateway(make_client, config_file, fake)
    # the SDK asks for base64 when the caller names no encoding, and decodes it itself
    answer = await openai_sdk(client, user.key).embeddings.create(model="embed", input="hello")
    assert answer.data[0].embedding == VECTORS["hello"]
    assert fake.requests[0] == {"model": "text-embedding-3-small", "input": "hello", "encoding_format": "base64"}

    resp = await client.post("/v1/embeddings", headers=user.headers,
                             json={"model": "embed", "input": ["world"], "encoding_format": "base64"})
    assert resp.status == 200
    assert await resp.json() == {
        "object": "list", "model": "embed", "usage": {"prompt_tokens": 3, "total_tokens": 3},
        "data": [{"object": "embedding", "index": 0, "embedding": b64(VECTORS["world"])}]}


async def test_an_upstream_that_ignores_the_encoding_is_converted(make_client, config_file, fake, user):
    fake.ignore_encoding = True  # answers floats even when asked for base64
    client = await gateway(make_client, config_file, fake)
    resp = await client.post("/v1/embeddings", headers=user.headers,
                             json={"model": "embed", "input": "hello", "encoding_format": "base64"})
    assert (await resp.json())["data"][0]["embedding"] == b64(VECTORS["hello"])


async def test_an_upstream_without_usage_is_estimated_and_flagged(make_client, config_file, fake, user, db):
    fake.report_usage = False
    client = await gateway(make_client, config_file, fake)
    resp = await client.post("/v1/embeddings", headers=user.headers, json={"model": "embed", "input": "hello"})
    assert (await resp.json())["usage"] == {"prompt_tokens": estimate_tokens("hello"),
                                            "total_tokens": estimate_tokens("hello")}
    rows = await usage_rows(client, db, user.id)
    assert [(r["prompt_tokens"], r["estimated"]) for r in rows] == [(estimate_tokens("hello"), True)]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "embed", "input": []}, 400, "input"),
    ({"model": "embed", "input": ""}, 400, "input"),
    ({"model": "embed", "input": ["hello", ""]}, 400, "input"),
    ({"model": "embed", "input": ["hello", 5]}, 400, "input"),
    ({"model": "embed", "input": 5}, 400, "input"),
    ({"model": "embed", "input": {"text": "hello"}}, 400, "input"),
    ({"model": "embed", "input": [[1, 2], "hello"]}, 400, "input"),
    ({"model": "embed", "input": ["a"] * 2049}, 400, "input"),
    ({"model": "embed"}, 400, "input"),
    ({"input": "hello"}, 400, "model"),
    ({"model": "nope", "input": "hello"}, 404, "model"),
    ({"model": "chatty", "input": "hello"}, 400, "model"),  # a chat model of a real provider
    ({"model": "embed", "input": "hello", "dimensions": 0}, 400, "dimensions"),
    ({"model": "embed", "input": "hello", "dimensions": True}, 400, "dimensions"),
    ({"model": "embed", "input": "hello", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "embed", "input": "hello", "user": 7}, 400, "user"),
], ids=lambda v: str(v)[:40])
async def test_bad_requests_are_openai_errors_and_count_nothing(make_client, config_file, fake, user, db, body,
                                                                status, param):
    client = await gateway(make_client, config_file, fake, limits="[limits]\ndaily_tokens = 1000\n")
    resp = await client.post("/v1/embeddings", headers=user.headers, json=body)
    assert resp.status == status
    error = (await resp.json())["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error") and error["message"]
    assert fake.requests == []
    assert await usage_rows(client, db, user.id) == [] and await day_row(db, user.id) is None


async def test_an_embedding_model_is_no_chat_model(make_client, config_file, fake, user):
    client = await gateway(make_client, config_file, fake)
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "embed", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "model": "embed"})
    assert resp.status == 400


async def test_the_daily_cap_reserves_the_input_and_refuses_past_it(make_client, config_file, fake, user, db):
    client = await gateway(make_client, config_file, fake, limits="[limits]\ndaily_tokens = 8\n")
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=user.key, max_retries=0)
    async with api:
        await api.embeddings.create(model="embed", input=["hello", "world"], encoding_format="float")
        await client.app[USAGE].flush()
        # settled to the upstream's count: 6 of 8 used, nothing left reserved
        assert await day_row(db, user.id) == {"tokens": 6, "reserved": 0, "requests": 1}
        with pytest.raises(openai.RateLimitError) as info:  # 2 left: less than "hello" + "world" reserve
            await api.embeddings.create(model="embed", input=["hello", "world"], encoding_format="float")
        assert info.value.body["code"] == "rate_limit_exceeded"
    assert len(fake.requests) == 1
    assert await day_row(db, user.id) == {"tokens": 6, "reserved": 0, "requests": 1}
    assert len(await usage_rows(client, db, user.id)) == 1


async def test_an_upstream_failure_is_a_502_and_hands_the_reservation_back(make_client, config_file, fake, user,
                                                                            db):
    fake.status = 500
    client = await gateway(make_client, config_file, fake, limits="[limits]\ndaily_tokens = 1000\n")
    resp = await client.post("/v1/embeddings", headers=user.headers, json={"model": "embed", "input": "hello"})
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["type"] == "upstream_error" and "upstream is down" in error["message"]
    rows = await usage_rows(client, db, user.id)
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(0, 0)]  # the zero settlement
    assert (await day_row(db, user.id))["tokens"] == 0 and (await day_row(db, user.id))["reserved"] == 0


async def test_the_demo_model_embeds_deterministically_out_of_the_box(openai_sdk, make_client: MakeClient, user: User):
    client = await make_client()
    api = openai_sdk(client, user.key)
    first = await api.embeddings.create(model="demo", input=["hello", "world"], encoding_format="float")
    again = await api.embeddings.create(model="demo", input="hello")  # base64, decoded by the SDK
    assert [d.embedding for d in first.data] == [demo_vector("demo", "hello", DEMO_DIMENSIONS),
                                                 demo_vector("demo", "world", DEMO_DIMENSIONS)]
    assert again.data[0].embedding == first.data[0].embedding
    assert first.data[0].embedding != first.data[1].embedding
    assert math.isclose(sum(x * x for x in first.data[0].embedding), 1.0, rel_tol=1e-5)
    short = await api.embeddings.create(model="demo", input="hello", dimensions=3, encoding_format="float")
    assert len(short.data[0].embedding) == 3
    with pytest.raises(openai.BadRequestError) as info:  # the demo's work is bounded
        await api.embeddings.create(model="demo", input="hello", dimensions=1025)
    assert info.value.body["param"] == "dimensions"
    assert first.usage.prompt_tokens == estimate_tokens("hello") + estimate_tokens("world")


async def test_no_key_is_a_401_in_openai_shape(make_client: MakeClient):
    client = await make_client()
    resp = await client.post("/v1/embeddings", json={"model": "demo", "input": "hello"})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_a_client_that_leaves_mid_call_is_counted_once(make_client, config_file, fake, user, db):
    """The server cancels a handler whose client left (handler_cancellation, as `serve` runs it): the
    upstream was sent the input, so its estimate is counted, flagged; one record, the reservation settled."""
    fake.hold = asyncio.Event()
    client = await gateway(make_client, config_file, fake, limits="[limits]\ndaily_tokens = 1000\n")
    call = asyncio.ensure_future(client.post("/v1/embeddings", headers=user.headers,
                                             json={"model": "embed", "input": ["hello", "world"]}))

    async def upstream_called() -> bool:
        return len(fake.requests) == 1

    await wait_for(upstream_called)
    call.cancel()  # the client hangs up while the upstream works
    await asyncio.gather(call, return_exceptions=True)
    fake.hold.set()

    async def settled() -> bool:
        await client.app[USAGE].flush()
        row = await day_row(db, user.id)
        return row is not None and row["reserved"] == 0 and row["requests"] == 1

    await wait_for(settled)
    estimate = estimate_tokens("hello") + estimate_tokens("world")
    assert [(r["prompt_tokens"], r["estimated"]) for r in await usage_rows(client, db, user.id)] == [(estimate, True)]
    assert (await day_row(db, user.id))["tokens"] == estimate
