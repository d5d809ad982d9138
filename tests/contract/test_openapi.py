"""GET /openapi.json: a valid OpenAPI 3.1 document for every route, and the running app fuzzed against it.

The fuzz drives the real app (create_app on a real local server) over HTTP with schemathesis,
programmatically: hypothesis runs in a worker thread with requests while the app serves on the
session's event loop. Every operation gets generated (positive) and malformed (negative) requests,
with the fuzz user's API key and without a credential. Each answer must be documented (status,
content type, body schema, headers), never a 5xx; malformed data must be refused; and afterwards
the fuzz user's rows must be exactly the ones that accepted (2xx) requests reported creating.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import jsonschema_rs
import orjson
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import create_app
from gateway.config import Settings
from gateway.contract.openapi import openapi_document, route_table
from gateway.state import MODELS
from tests.support.contract import documented_operations
from tests.support.fakes import parse_sse

# two models, so that the arena's random draw works; limits on, so that admission runs its SQL
FUZZ_CONFIG = """
[models.echo]
provider = "demo"

[limits]
requests_per_minute = 1000000
daily_tokens = 1000000000000
"""
# per operation and mode, with the credential: where the generated input matters (the handler parses
# it, and what it writes is checked); ~45 operations x 2 runs, generation mostly spent in hypothesis
MAX_EXAMPLES = 25
# per operation and mode, without one: a request is refused for want of the credential whatever its
# input (the public routes answer as they do with it), so a few show the refusal is documented; 25 more
# made the fuzz ~75% longer (on a loaded 2-core machine 220-300 s of its 300 s timeout)
ANONYMOUS_EXAMPLES = 5
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]
PUBLIC = {"GET /healthz", "GET /readyz", "GET /openapi.json", "GET /metrics", "GET /", "GET /static/{filename}",
          "GET /docs", "GET /docs/{filename}"}
# a hung request fails the fuzz instead of hanging it
REQUEST_TIMEOUT_S = 10


def nothing_to_negate(document: dict[str, Any]) -> set[str]:
    """Operations without a body or any constrained parameter: no request to them is malformed."""
    return {f"{method.upper()} {path}" for path, item in document["paths"].items() for method, op in item.items()
            if "requestBody" not in op and all(p["schema"] == {"type": "string"} for p in op.get("parameters", []))}


def app_models(client: Any) -> tuple[str, ...]:
    return tuple(client.server.app[MODELS].models)


def served_document(client: Any) -> dict[str, Any]:
    """The document of the app `client` serves: its models, its route table."""
    app = client.server.app
    return openapi_document(tuple(app[MODELS].models), route_table(app.router))


def registered_operations(app: web.Application) -> set[str]:
    """Every (method, path) the app routes; aiohttp's automatic HEAD for each GET is not an operation."""
    return {f"{route.method} {resource.canonical}" for resource in app.router.resources() for route in resource
            if route.method != "HEAD"}


async def test_openapi_json_is_served_without_auth(client: Any) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    document = orjson.loads(await resp.read())
    models = app_models(client)
    assert document == served_document(client)
    assert document["components"]["schemas"]["ChatRequest"]["properties"]["model"]["anyOf"][0] == {
        "enum": ["auto", *models], "description": "Default: auto (the router picks)"}


async def test_openapi_document_is_valid_openapi_3_1(make_settings: Callable[..., Settings]) -> None:
    document = openapi_document(("demo", "echo"), route_table(create_app(make_settings()).router))
    assert document["openapi"] == "3.1.0"
    schema = schemathesis.openapi.from_dict(document, config=schemathesis.Config())
    schema.validate()  # the OpenAPI 3.1 meta-schema
    loaded = [result.ok().label for result in schema.get_all_operations()]
    assert sorted(loaded) == sorted(documented_operations(document))
    for name, component in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(component), name  # each a valid JSON Schema 2020-12


async def test_every_registered_route_is_documented(client: Any) -> None:
    # a route added to create_app without documentation fails here (and so does a stale entry)
    assert registered_operations(client.server.app) == documented_operations(served_document(client))


PROMPT = [{"role": "user", "content": "hi"}]
# bodies where the document and a handler disagreed (or the handler answered 500), by the status each
# must get now: the document's verdict and the handler's agree on every one
AGREEMENT = [
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": "demo", "messages": PROMPT, "stream_options": False},
     400),
    ("/v1/chat/completions", "ChatCompletionRequest",
     {"model": "demo", "messages": PROMPT, "stream_options": {"include_usage": "yes"}}, 400),
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": "demo", "messages": PROMPT, "n": True}, 400),
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": "demo", "messages": PROMPT, "n": None}, 200),
    ("/v1/chat/completions", "ChatCompletionRequest",
     {"model": "demo", "messages": PROMPT, "max_completion_tokens": None, "max_tokens": "many"}, 400),
    ("/v1/chat/completions", "ChatCompletionRequest",  # was a 500: an unhashable role
     {"model": "demo", "messages": [{"role": ["user"], "content": "hi"}]}, 400),
    ("/v1/chat/completions", "ChatCompletionRequest",  # was a 500: bigint overflow in the daily reservation
     {"model": "demo", "messages": PROMPT, "max_tokens": 2**63}, 400),
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": "demo", "messages": PROMPT, "max_tokens": 2**31 - 1},
     200),
    ("/api/chat", "ChatRequest", {"content": "hi", "max_tokens": 2**63 - 1}, 400),  # was a 500, as above
    ("/api/chat", "ChatRequest", {"content": "hi", "max_tokens": 2**31}, 400),
    ("/api/chat", "ChatRequest", {"content": "hi", "max_tokens": 2**31 - 1}, 202),
    ("/api/arena", "ArenaRequest", {"content": "hi", "max_tokens": 2**63 - 1}, 400),  # was a 500, as above
]


def component_validator(document: dict[str, Any], name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                               "components": document["components"]})


@pytest.mark.parametrize(("path", "component", "body", "status"), AGREEMENT)
async def test_document_and_handler_agree_on_bodies_that_once_disagreed(
        make_client: Any, config_file: Callable[[str], str], user: Any, path: str, component: str,
        body: dict[str, Any], status: int) -> None:
    client = await make_client(GATEWAY_CONFIG=config_file(FUZZ_CONFIG), DEMO_CHUNKS="3")
    document = served_document(client)
    assert component_validator(document, component).is_valid(body) == (status < 300)
    resp = await client.post(path, headers=user.headers, data=orjson.dumps(body))
    assert resp.status == status, await resp.text()


async def test_usage_report_ending_in_the_first_days_of_the_calendar_is_answered(client: Any, user: Any) -> None:
    # the default range starts 29 days earlier: once an OverflowError, a 500
    resp = await client.get("/api/usage", params={"to": "0001-01-05"}, headers=user.headers)
    assert resp.status == 200
    body = await resp.json()
    assert (body["from"], body["to"], body["rows"]) == ("0001-01-01", "0001-01-05", [])


async def test_missing_playground_asset_is_a_json_404(client: Any) -> None:
    resp = await client.get("/static/nope.js")
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["type"] == "not_found"


@dataclass
class FuzzReport:
    failures: list[str] = field(default_factory=list)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    # what accepted requests said they created
    threads: set[uuid.UUID] = field(default_factory=set)
    messages: set[uuid.UUID] = field(default_factory=set)
    comparisons: set[uuid.UUID] = field(default_factory=set)
    keys: set[uuid.UUID] = field(default_factory=set)
    responses: set[uuid.UUID] = field(default_factory=set)  # stored responses' assistant message ids
    ai_sdk_replies: set[uuid.UUID] = field(default_factory=set)  # the AI SDK door's assistant message ids
    anonymous_accepted: list[str] = field(default_factory=list)
    unsatisfiable: set[str] = field(default_factory=set)
    document: dict[str, Any] = field(default_factory=dict)  # as served

    def created(self, label: str, response: requests.Response) -> None:
        """Record the rows an accepted request reports (its JSON body, or its SSE metadata)."""
        if label in ("POST /api/threads", "POST /v1/chat/sessions"):
            self.threads.add(uuid.UUID(response.json()["id"]))
        elif label == "POST /v1/responses":
            # schemathesis's headers are lists under lower-case names: a stream is told by its first line
            if response.content.startswith(b"event: "):
                body = orjson.loads(parse_sse(response.content)[0].data)["response"]
            else:
                body = response.json()
            if body["store"]:
                self.responses.add(uuid.UUID(hex=body["id"].removeprefix("resp_")))
        elif label == "POST /api/ai-sdk/chat":
            for line in response.content.splitlines():
                if line.startswith(b'data: {"type":"start"'):
                    self.ai_sdk_replies.add(uuid.UUID(orjson.loads(line[6:])["messageId"]))
        elif label == "POST /api/keys":
            self.keys.add(uuid.UUID(response.json()["id"]))
        elif label in ("POST /api/chat", "POST /api/arena"):
            if response.status_code == 202:
                body = response.json()
                self.threads.add(uuid.UUID(body["thread_id"]))
                self.messages.add(uuid.UUID(body["message"]["id"]))
                replies = [body["assistant_message_id"]] if "assistant_message_id" in body else \
                    list(body["assistant_message_ids"].values())
                self.messages.update(uuid.UUID(r) for r in replies)
                if "comparison_id" in body:
                    self.comparisons.add(uuid.UUID(body["comparison_id"]))
                return
            for event in parse_sse(response.content):
                if event.event == "metadata":
                    meta = orjson.loads(event.data)
                    self.threads.add(uuid.UUID(meta["thread_id"]))
                    self.messages.update({uuid.UUID(meta["user_message_id"]), uuid.UUID(meta["message_id"])})
                    if label == "POST /api/arena":  # ids are <comparison_id>:<seq a>:<seq b>
                        self.comparisons.add(uuid.UUID(event.id.split(":")[0]))


def fuzz(base_url: str, auth: dict[str, str]) -> FuzzReport:
    """Every operation, positive and negative, with and without the credential (runs in a thread)."""
    session = requests.Session()
    # the document the running app serves (its models are in it)
    document = session.get(f"{base_url}/openapi.json", timeout=REQUEST_TIMEOUT_S).json()
    report = FuzzReport(document=document)
    config = schemathesis.Config()
    # the credential is ours to send (or not), never a generated or negated one
    config.projects.default.generation.with_security_parameters = False
    schema = schemathesis.openapi.from_dict(document, config=config)
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    for result in schema.get_all_operations():
        operation = result.ok()
        # boundaries first (min/max and one past, missing and mistyped fields, other methods): deterministic
        coverage = schema.config.generation_for(operation=operation, phase="coverage")
        for case in schema.iter_coverage_cases(operation, generation_modes=modes, generation_config=coverage):
            send(case, base_url, session, auth, report)
        for mode in modes:
            run_operation(operation, mode, base_url, session, auth, report, MAX_EXAMPLES)
            run_operation(operation, mode, base_url, session, {}, report, ANONYMOUS_EXAMPLES)
    return report


def send(case: Any, base_url: str, session: requests.Session, headers: dict[str, str], report: FuzzReport) -> None:
    """One request, its answer checked against the document and its created rows recorded."""
    label, mode = case.operation.label, case.meta.generation.mode.value
    who = "auth" if headers else "anonymous"
    try:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as e:
        report.failures.append(f"{label} ({mode}, {who}): no answer: {e!r}\n{case.as_curl_command()}")
        return
    report.statuses[(label, response.status_code)] += 1
    try:
        case.validate_response(response, checks=CHECKS, headers=headers)
    except (Failure, FailureGroup) as e:
        report.failures.append(f"{label} ({mode}, {who}): {e}")
    if 200 <= response.status_code < 300 and case.method.upper() == case.operation.method.upper():
        if headers:
            report.created(label, response)
        elif label not in PUBLIC:
            report.anonymous_accepted.append(f"{label}: {response.status_code}")


def run_operation(operation: Any, mode: GenerationMode, base_url: str, session: requests.Session,
                  headers: dict[str, str], report: FuzzReport, examples: int) -> None:
    label = operation.label

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case: Any) -> None:
        send(case, base_url, session, headers, report)

    try:
        one()
    except Unsatisfiable:
        report.unsatisfiable.add(label)


async def user_rows(db: asyncpg.Pool, user_id: uuid.UUID) -> dict[str, set[uuid.UUID]]:
    rows = {}
    for table in ("threads", "messages", "comparisons", "api_keys"):
        rows[table] = {r["id"] for r in await db.fetch(f"SELECT id FROM {table} WHERE user_id = $1", user_id)}
    return rows


# ~45 operations, their boundary cases, 2 runs of MAX_EXAMPLES and 2 of ANONYMOUS_EXAMPLES each: ~120 s
# on a 2-core machine at load 6, and its time grows with the load (hypothesis' generation is CPU-bound):
# about twice that at load 8+. A hung request fails on its own (REQUEST_TIMEOUT_S), so this bound only
# stops a fuzz that runs away: 600 s is well past its slowest run
@pytest.mark.timeout(600)
async def test_fuzzed_requests_get_documented_answers_and_refused_ones_write_nothing(
        aiohttp_server: Any, make_settings: Callable[..., Settings], make_user: Any,
        config_file: Callable[[str], str], db: asyncpg.Pool) -> None:
    server = await aiohttp_server(create_app(make_settings(GATEWAY_CONFIG=config_file(FUZZ_CONFIG),
                                                           DEMO_CHUNKS="3")))
    user = await make_user()
    own_key = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)

    report = await asyncio.to_thread(fuzz, str(server.make_url("")).rstrip("/"), user.headers)

    assert not report.failures, f"{len(report.failures)} failures, the first ones:\n\n" + "\n\n".join(
        report.failures[:5])
    # every operation with a constrained input got malformed requests
    assert report.unsatisfiable == nothing_to_negate(report.document)
    assert report.anonymous_accepted == []
    # the fuzz reached the handlers: accepted turns, refused input and refused credentials all happened
    assert report.statuses[("POST /api/chat", 202)] + report.statuses[("POST /api/chat", 200)] > 0
    assert report.statuses[("POST /api/chat", 400)] > 0 and report.statuses[("POST /api/chat", 401)] > 0
    # still serving
    async with aiohttp.ClientSession() as http, http.get(server.make_url("/healthz")) as resp:
        assert resp.status == 200
    # a stored response (and an AI SDK turn) is a turn: its assistant message, the user message it
    # answers, their thread
    for row in await db.fetch("SELECT id, reply_to, thread_id FROM messages WHERE id = ANY($1::uuid[])",
                              list(report.responses | report.ai_sdk_replies)):
        report.messages.update({row["id"], row["reply_to"]})
        report.threads.add(row["thread_id"])
    # exactly the rows accepted requests reported: a refused request wrote none
    assert await user_rows(db, user.id) == {"threads": report.threads, "messages": report.messages,
                                            "comparisons": report.comparisons,
                                            "api_keys": report.keys | {own_key}}
