"""The answers of the running app validate against GET /openapi.json's schemas, which are generated from
the response structs (gateway/contract/replies.py, gateway/contract/openai.py): each answer is checked
against the schema its operation declares for that path, method and status (found through the path).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema_rs
import msgspec
import orjson
import pytest

from gateway.contract import openai, replies
from tests.support.arena import wait_comparison_finished
from tests.support.chat import wait_finished
from tests.support.fakes import parse_sse

CONFIG = """
[models.echo]
provider = "demo"
"""
HI = [{"role": "user", "content": "hi"}]


class Checker:
    """The served document, and how many answers each (path, method, status) had checked."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.checked: list[str] = []

    def schema(self, path: str, method: str, status: int, media: str = "application/json") -> dict[str, Any]:
        answer = self.document["paths"][path][method]["responses"][str(status)]
        if "$ref" in answer:
            answer = self.document["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
        return answer["content"][media]["schema"]  # type: ignore[no-any-return]

    def validator(self, schema: dict[str, Any]) -> jsonschema_rs.Validator:
        return jsonschema_rs.Draft202012Validator({**schema, "components": self.document["components"]},
                                                  validate_formats=True)

    async def check(self, resp: Any, path: str, method: str = "get") -> Any:
        body = orjson.loads(await resp.read())
        errors = [e.message for e in self.validator(self.schema(path, method, resp.status)).iter_errors(body)]
        assert errors == [], (path, method, resp.status, body)
        self.checked.append(f"{method.upper()} {path} {resp.status}")
        return body

    def check_events(self, raw: bytes, path: str, method: str) -> list[str]:
        """Each SSE event (its id, name and data) against the operation's text/event-stream schema."""
        validator = self.validator(self.schema(path, method, 200, "text/event-stream"))
        names = []
        for event in parse_sse(raw):
            item = {"event": event.event or "message", "data": event.data}
            if event.id:
                item["id"] = event.id
            assert validator.is_valid(item), item
            # contentSchema is an annotation: the data's JSON is checked against its struct's schema here
            if event.data != "[DONE]":
                content = self.event_data_schema(path, method, item["event"])
                assert self.validator(content).is_valid(orjson.loads(event.data)), (item["event"], event.data)
            names.append(item["event"])
        self.checked.append(f"{method.upper()} {path} 200 events")
        return names

    def event_data_schema(self, path: str, method: str, name: str) -> dict[str, Any]:
        ref = self.schema(path, method, 200, "text/event-stream")["$ref"].rsplit("/", 1)[1]
        for option in self.document["components"]["schemas"][ref]["anyOf"]:
            props = option["properties"]
            if props["event"].get("const") == name and "contentSchema" in props["data"]:
                return props["data"]["contentSchema"]  # type: ignore[no-any-return]
        raise AssertionError(name)


@pytest.fixture
async def corpus_client(make_client: Any, config_file: Callable[[str], str]) -> Any:
    return await make_client(GATEWAY_CONFIG=config_file(CONFIG), DEMO_CHUNKS="2")


async def test_the_generated_schemas_are_the_structs(corpus_client: Any) -> None:
    document = orjson.loads(await (await corpus_client.get("/openapi.json")).read())
    _, generated = msgspec.json.schema_components((*replies.REPLIES, *openai.ANSWERS),
                                                  ref_template="#/components/schemas/{name}")
    schemas = document["components"]["schemas"]
    for name, schema in generated.items():
        assert schemas[name] == schema, name
    paths = document["paths"]
    assert paths["/api/threads/{thread_id}"]["get"]["responses"]["200"]["content"]["application/json"] == {
        "schema": {"$ref": "#/components/schemas/ThreadWithMessages"}}
    assert document["components"]["responses"]["Error404"]["content"]["application/json"] == {
        "schema": {"$ref": "#/components/schemas/Error"}}


async def test_native_answers_validate_against_the_generated_schemas(
        corpus_client: Any, make_user: Callable[..., Awaitable[Any]], db: Any) -> None:
    client = corpus_client
    user = await make_user(("chat", "arena", "admin"))
    h = user.headers
    c = Checker(orjson.loads(await (await client.get("/openapi.json")).read()))

    accepted = await c.check(await client.post("/api/chat", json={"content": "hi", "stream": False}, headers=h),
                             "/api/chat", "post")
    reply = accepted["assistant_message_id"]
    await wait_finished(db, reply)
    await c.check(await client.get(f"/api/messages/{reply}", headers=h), "/api/messages/{message_id}")
    resp = await client.get(f"/api/messages/{reply}/stream", headers=h)
    assert resp.status == 200
    assert c.check_events(await resp.read(), "/api/messages/{message_id}/stream", "get")[:2] == [
        "metadata", "message"]
    resp = await client.post("/api/chat", json={"content": [{"type": "text", "text": "hi"}], "stream": True},
                             headers=h)
    names = c.check_events(await resp.read(), "/api/chat", "post")
    assert (names[0], names[-3:]) == ("metadata", ["usage", "done", "message"])
    await c.check(await client.post(f"/api/messages/{reply}/cancel", headers=h), "/api/messages/{message_id}/cancel",
                  "post")
    user_message = accepted["message"]["id"]
    regenerated = await c.check(await client.post(f"/api/messages/{user_message}/regenerate",
                                                  json={"stream": False}, headers=h),
                                "/api/messages/{message_id}/regenerate", "post")
    await wait_finished(db, regenerated["assistant_message_id"])

    thread = await c.check(await client.post("/api/threads", json={"title": "t"}, headers=h), "/api/threads",
                           "post")
    await c.check(await client.post("/v1/chat/sessions", headers=h), "/v1/chat/sessions", "post")
    await c.check(await client.get("/api/threads", params={"limit": "1"}, headers=h), "/api/threads")
    with_messages = await c.check(await client.get(f"/api/threads/{accepted['thread_id']}", headers=h),
                                  "/api/threads/{thread_id}")
    assert len(with_messages["messages"]) == 3
    await c.check(await client.get(f"/api/threads/{uuid.uuid4()}", headers=h), "/api/threads/{thread_id}")
    await c.check(await client.get(f"/api/threads/{thread['id']}x", headers=h), "/api/threads/{thread_id}")

    arena = await c.check(await client.post("/api/arena", json={"content": "hi", "stream": False}, headers=h),
                          "/api/arena", "post")
    await wait_comparison_finished(db, arena["comparison_id"])
    comparison = f"/api/comparisons/{arena['comparison_id']}"
    await c.check(await client.get(comparison, headers=h), "/api/comparisons/{comparison_id}")
    resp = await client.get(comparison + "/stream", headers=h)
    assert "metadata" in c.check_events(await resp.read(), "/api/comparisons/{comparison_id}/stream", "get")
    voted = await c.check(await client.post(comparison + "/vote", json={"winner": "a"}, headers=h),
                          "/api/comparisons/{comparison_id}/vote", "post")
    assert voted["winner"] == "a"
    await c.check(await client.post(comparison + "/vote", json={"winner": "b"}, headers=h),
                  "/api/comparisons/{comparison_id}/vote", "post")  # 409
    board = await c.check(await client.get("/api/leaderboard", headers=h), "/api/leaderboard")
    assert board["battles"] >= 1  # the session's database holds other tests' votes too
    resp = await client.post("/api/arena", json={"content": "hi", "stream": True}, headers=h)
    assert "done" in c.check_events(await resp.read(), "/api/arena", "post")

    created = await c.check(await client.post("/api/keys", json={"name": "k", "limits": {"daily_cost_usd": 5}},
                                              headers=h), "/api/keys", "post")
    assert created["limits"] == {"daily_cost_usd": 5}
    await c.check(await client.get("/api/keys", headers=h), "/api/keys")
    await c.check(await client.post("/api/keys", json={"name": 5}, headers=h), "/api/keys", "post")
    await c.check(await client.get("/api/me", headers=h), "/api/me")
    await c.check(await client.get("/api/usage", params={"group_by": "day,model"}, headers=h), "/api/usage")
    await c.check(await client.get("/api/usage", params={"group_by": "model"}, headers=h), "/api/usage")
    await c.check(await client.get("/api/me"), "/api/me")  # 401
    await c.check(await client.get("/healthz"), "/healthz")
    await c.check(await client.get("/readyz"), "/readyz")
    assert len(c.checked) == 28


async def test_openai_answers_validate_against_the_generated_schemas(corpus_client: Any, user: Any) -> None:
    client, h = corpus_client, user.headers
    c = Checker(orjson.loads(await (await client.get("/openapi.json")).read()))
    completion = await c.check(await client.post("/v1/chat/completions", json={"model": "demo", "messages": HI},
                                                 headers=h), "/v1/chat/completions", "post")
    assert completion["object"] == "chat.completion"
    resp = await client.post("/v1/chat/completions", headers=h, json={
        "model": "demo", "messages": HI, "stream": True, "stream_options": {"include_usage": True}})
    events = parse_sse(await resp.read())
    stream_schema = c.validator(c.schema("/v1/chat/completions", "post", 200, "text/event-stream"))
    chunk = c.validator({"$ref": "#/components/schemas/ChatCompletionChunk"})
    for event in events:
        assert stream_schema.is_valid({"event": event.event or "message", "data": event.data}), event
        assert event.data == "[DONE]" or chunk.is_valid(orjson.loads(event.data)), event.data
    assert [e.data for e in events][-1] == "[DONE]" and len(events) >= 4
    await c.check(await client.post("/v1/chat/completions", json={"model": "demo", "messages": [], "n": 2},
                                    headers=h), "/v1/chat/completions", "post")  # 400, OpenAI's shape
    await c.check(await client.post("/v1/chat/completions", json={"model": "nope", "messages": HI}, headers=h),
                  "/v1/chat/completions", "post")  # 404
    models = await c.check(await client.get("/v1/models", headers=h), "/v1/models")
    assert [m["id"] for m in models["data"]] == ["demo", "echo"]
    await c.check(await client.get("/v1/models/demo", headers=h), "/v1/models/{model}")
    await c.check(await client.get("/v1/models/nope", headers=h), "/v1/models/{model}")
    for body in ({"model": "demo", "input": "hi"}, {"model": "demo", "input": ["a", "b"], "encoding_format": "base64"},
                 {"model": "demo", "input": [[1, 2]], "dimensions": 4}):
        vectors = await c.check(await client.post("/v1/embeddings", json=body, headers=h), "/v1/embeddings", "post")
        assert vectors["object"] == "list"
    await c.check(await client.post("/v1/embeddings", json={"model": "demo", "input": ""}, headers=h),
                  "/v1/embeddings", "post")  # 400
    await c.check(await client.get("/v1/models"), "/v1/models")  # 401
