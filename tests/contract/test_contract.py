"""The contract's structs (gateway/contract): bodies decode through them, refusals name the field in
each door's shape, and GET /openapi.json's request schemas are generated from them."""

from __future__ import annotations

from typing import Any

import msgspec
import orjson
import pytest

from gateway.contract import native, openai
from gateway.contract.openapi import openapi_document, route_table
from gateway.state import MODELS

HI = [{"role": "user", "content": "hi"}]


async def test_an_integer_beyond_64_bits_is_read_as_a_float_not_a_500(client: Any, user: Any) -> None:
    # as orjson reads it: msgspec would decode it into a message (typed Any) as an int that orjson
    # cannot encode on its way upstream
    raw = b'{"model": "demo", "messages": [{"role": "user", "content": "hi", "x": %d}]}' % 2**70
    resp = await client.post("/v1/chat/completions", data=raw, headers=user.headers)
    assert resp.status == 200, await resp.text()
    for raw in (b'{"model": "demo", "messages": [{"role": "user", "x": %d}, {"role": "user", "content": "hi"}]}'
                % 2**64, b'{"model": "demo", "messages": %s, "seed": %d}' % (orjson.dumps(HI), -(2**63) - 1),
                b'{"model": "demo", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", '
                b'"n": [%d]}]}]}' % 2**100):
        resp = await client.post("/v1/chat/completions", data=raw, headers=user.headers)
        assert resp.status == 200, await resp.text()
    raw = b'{"model": "demo", "messages": %s, "max_tokens": %d}' % (orjson.dumps(HI), -2**70)
    resp = await client.post("/v1/chat/completions", data=raw, headers=user.headers)
    assert resp.status == 400
    assert orjson.loads(await resp.read()) == {"error": {
        "message": "'max_tokens' must be an integer from 1 to 2147483647", "type": "invalid_request_error",
        "param": "max_tokens", "code": None}}
    resp = await client.post("/api/chat", data=b'{"content": "hi", "x": %d}' % -2**70, headers=user.headers)
    assert resp.status == 202


NATIVE = [
    ({"content": "hi", "max_tokens": "5"}, "max_tokens must be an integer from 1 to 2147483647"),
    ({"content": "hi", "max_tokens": 0}, "max_tokens must be an integer from 1 to 2147483647"),
    ({"content": "hi", "stream": 1}, "stream must be true or false"),
    ({"content": "hi", "temperature": "hot"}, "temperature must be a number"),
    ({"content": "hi", "client_message_id": "x" * 201}, "client_message_id must be 1 to 200 characters"),
    ({"content": "hi", "thread_id": 7}, "thread_id must be a UUID string"),
    ({"content": "hi", "thread_id": "nope"}, "thread_id is not a valid UUID"),
    ({}, "content must be a string or a list of content parts"),
    ({"content": ""}, "content must not be empty"),
    ({"content": [{"type": "text", "text": "hi", "x": 1}]}, 'content[0] must be {"type": "text", "text": string}'),
    ({"content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/!!"}}]},
     "content[1].image_url.url must be an http(s) URL or a base64 data:image/... URL"),
    ({"content": [{"type": "image_url", "image_url": {"url": "https://a/b.png", "detail": "max"}}]},
     "content[0].image_url.detail must be auto, low or high"),
    ([1], "body must be a JSON object"),
]


@pytest.mark.parametrize(("body", "message"), NATIVE, ids=[m for _, m in NATIVE])
async def test_native_refusals_name_the_field(client: Any, user: Any, body: Any, message: str) -> None:
    resp = await client.post("/api/chat", data=orjson.dumps(body), headers=user.headers)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["type"], error["message"]) == ("invalid_request", message)


async def test_the_documents_request_schemas_are_the_structs(client: Any) -> None:
    document = orjson.loads(await (await client.get("/openapi.json")).read())
    _, generated = msgspec.json.schema_components(
        (*native.BODIES, openai.ChatCompletionRequest), ref_template="#/components/schemas/{name}")
    schemas = document["components"]["schemas"]
    for name in ("CreateThread", "Vote", "TextPart", "ImagePart", "ImageURL", "StreamOptions"):
        assert schemas[name] == generated[name], name
    # the model fields name the configured models (what the handler checks against the configuration)
    assert schemas["ChatRequest"]["properties"]["model"]["anyOf"][0]["enum"] == ["auto", "demo", "demo-alt"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["auto", "demo", "demo-alt"]
    # everything else is the struct's
    for name in ("ChatRequest", "ArenaRequest", "RegenerateRequest", "ChatCompletionRequest"):
        assert set(schemas[name]["properties"]) == set(generated[name]["properties"]), name
    table = route_table(client.server.app.router)
    assert openapi_document(("demo",), table) is openapi_document(("demo",), table)  # built once per pair
    assert tuple(client.server.app[MODELS].models) == ("demo", "demo-alt")
    paths = document["paths"]
    for path, name in (("/api/chat", "ChatRequest"), ("/api/arena", "ArenaRequest"),
                       ("/api/threads", "CreateThread"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
