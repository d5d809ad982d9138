"""GET /openapi.json: the HTTP surface as an OpenAPI 3.1 document, built once as plain data.

Its paths are the app's route table, each route's operation as its handler declares it
(gateway.contract.operations); its schemas are generated from the structs the operations name.
The configured model names are part of it (the `model` enums), so it is built per set of models.

The schemas state what the handlers enforce, no more and no less: a request the document calls
valid passes the handler's own checks (apart from what needs the database or the configuration:
a thread that exists, a model that is configured, an expiry in the future), and one it calls
invalid is refused with a 4xx. tests/contract/test_openapi.py fuzzes the running app against this
document.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import msgspec
import orjson
from aiohttp import web

from gateway import __version__
from gateway.contract import anthropic, openai, replies
from gateway.contract import responses as responses_door
from gateway.contract.native import UUID_PATTERN
from gateway.contract.operations import (
    PUBLIC,
    Body,
    Handler,
    json_content,
    operation,
    operation_of,
    path_string,
    ref,
    response,
)
from gateway.service.router import AUTO
from gateway.state import MODELS

Schema = dict[str, Any]


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


INT: Schema = {"type": "integer"}
STRING: Schema = {"type": "string"}


# -- responses -------------------------------------------------------------------------------

def json_text(schema: Body) -> Schema:
    """A string holding JSON that matches `schema` (an SSE event's data)."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def sse_events(events: dict[str, type[msgspec.Struct]], slot: bool) -> Schema:
    """The native events (edge/sse.py) of one message, or of an arena comparison when `slot`: each
    event's data is its struct's JSON."""
    event_id = {"type": "string", "pattern": "^[0-9a-f-]{36}(:(-1|[0-9]+)){2}$" if slot else "^[0-9a-f-]{36}:[0-9]+$"}
    return {"anyOf": [
        *(obj({"event": {"const": name}, "id": event_id, "data": json_text(data)}, ("event", "id", "data"))
          for name, data in events.items()),
        obj({"event": {"const": "message"}, "data": {"const": "[DONE]"}}, ("event", "data")),
    ]}


# the native error bodies (middleware.errors), by status
ERRORS = {
    400: "Malformed JSON, a wrong type, a value out of range, or an id that is not a UUID",
    401: "Missing, invalid, expired or revoked credential",
    403: "The credential lacks the scope, or the model or action is not allowed for it",
    404: "No such resource for this caller (somebody else's is not found either)",
    409: "The resource is in a state that does not allow this",
    413: "The body is larger than the configured limit",
    429: "A rate limit or daily token cap refused the request; nothing was persisted",
    503: "The database is unreachable",
}


def error_responses(prefix: str, schema: Body) -> dict[str, Any]:
    out = {}
    for status, description in ERRORS.items():
        headers = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}} if status == 429 else None
        out[f"{prefix}{status}"] = response(description, json_content(schema), headers)
    return out


# -- schemas ---------------------------------------------------------------------------------

def _schemas() -> dict[str, Schema]:
    """The schemas no struct generates: the SSE events' envelopes (OpenAPI 3.1 describes a stream by
    its events: event, id, and data holding a struct's JSON)."""
    usage = obj({"input_tokens": INT, "output_tokens": INT}, ("output_tokens",))
    anthropic_events: tuple[tuple[str, dict[str, Any]], ...] = (
        ("message_start", {"message": {"type": "object"}}),
        ("content_block_start", {"index": INT, "content_block": {"type": "object"}}),
        ("ping", {}),
        ("content_block_delta", {"index": INT, "delta": {"type": "object"}}),
        ("content_block_stop", {"index": INT}),
        ("message_delta", {"delta": {"type": "object"}, "usage": usage}),
        ("message_stop", {}),
        ("error", {"error": anthropic.AnthropicErrorDetail}),
    )
    return {
        "ChatCompletionEvent": obj({"event": {"const": "message"}, "data": {"anyOf": [
            json_text(openai.ChatCompletionChunk),
            json_text(openai.OpenAIError),  # the upstream failed mid-stream
            {"const": "[DONE]"},
        ]}}, ("event", "data")),
        "ResponseEvent": obj({"event": STRING, "data": json_text(obj(
            {"type": STRING, "sequence_number": INT}, ("type", "sequence_number"), additionalProperties=True))},
            ("event", "data"), description="response.created, response.in_progress, response.output_item.added, "
                                           "response.content_part.added, response.output_text.delta..., "
                                           "response.output_text.done, response.content_part.done, "
                                           "response.output_item.done, response.completed (or "
                                           "response.incomplete; response.failed after a failure)"),
        "AnthropicStreamEvent": {"anyOf": [
            obj({"event": {"const": name}, "data": json_text(obj({"type": {"const": name}, **data},
                                                                 ("type", *data)))}, ("event", "data"))
            for name, data in anthropic_events]},
        "MessageEvent": sse_events(replies.MESSAGE_EVENTS, slot=False),
        "ArenaEvent": sse_events(replies.ARENA_EVENTS, slot=True),
    }


# -- paths, from the route table ----------------------------------------------------------------

Route = tuple[str, str, Handler]  # method, path, handler


def route_table(router: web.UrlDispatcher) -> tuple[Route, ...]:
    """The app's routes as the document lists them (aiohttp's automatic HEAD of a GET is not one)."""
    return tuple((route.method, route.resource.canonical, route.handler) for route in router.routes()
                 if route.method != "HEAD" and route.resource is not None)


def _paths(table: tuple[Route, ...], structs: dict[str, type[msgspec.Struct]]) -> dict[str, Any]:
    """Each route's operation, as its handler declares it (gateway.contract.operations)."""
    paths: dict[str, dict[str, Any]] = {}
    first: dict[Handler, str] = {}  # a handler served at a second path is an alias of the first
    for method, path, handler in table:
        declared = operation_of(handler)
        if declared is None:
            raise LookupError(f"{method} {path}: {handler.__module__}.{handler.__qualname__} declares no "
                              "operation (gateway.contract.operations)")
        summary = declared.summary
        if handler in first:
            summary = f"{summary} (alias of {first[handler]})"
        else:
            first[handler] = f"{method} {path}"
        item: dict[str, Any] = {"summary": summary, "tags": [declared.tag], "responses": declared.responses}
        if declared.description is not None:
            item["description"] = declared.description
        parameters = list(declared.parameters)
        named = {p["name"] for p in parameters if p["in"] == "path"}
        parameters += [path_string(name) for name in _PATH_PARAMETER.findall(path) if name not in named]
        if parameters:
            item["parameters"] = parameters
        if declared.body is not None:
            item["requestBody"] = {"required": declared.body_required, "content": json_content(declared.body)}
        if declared.security is not None:
            item["security"] = declared.security
        paths.setdefault(path, {})[method.lower()] = _resolved(item, structs)
    return paths


_PATH_PARAMETER = re.compile(r"\{([^}:]+)")


def _resolved(value: Any, structs: dict[str, type[msgspec.Struct]]) -> Any:
    """`value` as JSON: a struct becomes a reference to its generated schema (and is collected)."""
    if isinstance(value, type) and issubclass(value, msgspec.Struct):
        known = structs.setdefault(value.__name__, value)
        if known is not value:
            raise ValueError(f"two structs named {value.__name__}: {known!r}, {value!r}")
        return ref(value.__name__)
    if isinstance(value, dict):
        return {k: _resolved(v, structs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolved(v, structs) for v in value]
    return value


def _generated(structs: dict[str, type[msgspec.Struct]], models: tuple[str, ...]) -> dict[str, Schema]:
    """The structs' JSON schemas for an app serving `models`: a model field names a configured model
    (or auto), which the handler checks against the configuration."""
    _, schemas = msgspec.json.schema_components(tuple(structs.values()),
                                                ref_template="#/components/schemas/{name}")

    def models_enum(schema: Schema, names: list[str]) -> Schema:
        return {"enum": names, **{k: v for k, v in schema.items() if k not in ("type", "minLength")}}

    for name in ("ChatRequest", "RegenerateRequest"):
        if name in schemas:
            field = schemas[name]["properties"]["model"]["anyOf"]
            field[0] = models_enum(field[0], [AUTO, *models])
    if "ChatCompletionRequest" in schemas:
        completion = schemas["ChatCompletionRequest"]["properties"]
        completion["model"] = models_enum(completion["model"], [AUTO, *models])
    for name in ("CreateResponse", "MessagesRequest", "CountTokensRequest"):
        if name in schemas:
            fields = schemas[name]["properties"]
            fields["model"] = models_enum(fields["model"], [AUTO, *models])
    if "MessagesRequest" in schemas:  # 0, its default, stands for "not given": refused as required
        schemas["MessagesRequest"]["properties"]["max_tokens"].pop("default")
        schemas["MessagesRequest"]["required"].append("max_tokens")
    if "EmbeddingRequest" in schemas:  # no auto: an embedding model is named
        embedding = schemas["EmbeddingRequest"]["properties"]
        embedding["model"] = models_enum(embedding["model"], list(models))
    if "ArenaRequest" in schemas:
        schemas["ArenaRequest"]["properties"]["models"]["anyOf"][0]["items"] = {"enum": list(models)}
    for schema in schemas.values():
        for field in schema.get("properties", {}).values():
            for option in field.get("anyOf", [field]):
                # a UUID the pattern describes: the forms msgspec decodes (not the format's one alone)
                if option.get("pattern") == UUID_PATTERN:
                    option.pop("format", None)
    return schemas


@lru_cache(maxsize=8)
def openapi_document(models: tuple[str, ...], table: tuple[Route, ...]) -> dict[str, Any]:
    """The whole document for an app serving `models` on the routes of `table` (built once per pair;
    callers must not mutate it)."""
    structs: dict[str, type[msgspec.Struct]] = {s.__name__: s for s in (
        *replies.REPLIES, *openai.ANSWERS, *responses_door.ANSWERS, *responses_door.DOCUMENTED, *anthropic.ANSWERS)}
    paths = _paths(table, structs)
    written = _resolved(_schemas(), structs)
    responses = _resolved({
        **error_responses("Error", replies.Error), **error_responses("OpenAIError", openai.OpenAIError),
        **error_responses("AnthropicError", anthropic.AnthropicError),
        "AnthropicError502": response("The upstream failed before any output", json_content(anthropic.AnthropicError)),
        "AnthropicError504": response("The upstream timed out before any output",
                                      json_content(anthropic.AnthropicError)),
        "AnthropicError529": response("The upstream is overloaded (its 529, passed on)",
                                      json_content(anthropic.AnthropicError)),
        "OpenAIError502": response("The upstream failed before any output", json_content(openai.OpenAIError)),
        "OpenAIError504": response("The upstream timed out before any output", json_content(openai.OpenAIError)),
    }, structs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Chat gateway", "version": __version__,
                 "description": "A streaming chat gateway: SSE chat over LLM providers, every message persisted."},
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": {**written, **_generated(structs, models)},
            "responses": responses,
            "headers": {
                "X-Request-Id": {"description": "The request's id (echoed when the client sent a safe one)",
                                 "required": True, "schema": STRING},
                "Retry-After": {"description": "Seconds until the request may succeed", "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}},
            },
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "A gateway API key (`gwk_...`) or a JWT"},
                "streamToken": {"type": "apiKey", "in": "query", "name": "token",
                                "description": "The short-lived token of a `stream_url` (EventSource cannot "
                                               "send headers), bound to one user and one message"},
                "metricsToken": {"type": "http", "scheme": "bearer",
                                 "description": "METRICS_TOKEN, when the deployment sets one"},
                "anthropicApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                    "description": "A gateway API key as Anthropic's SDKs send it (read "
                                                   "when no Authorization header is sent)"},
                "queryToken": {"type": "apiKey", "in": "query", "name": "token",
                               "description": "An API key or JWT in the query, for browsers' WebSockets"},
            },
        },
    }


@lru_cache(maxsize=8)
def _encoded(models: tuple[str, ...], table: tuple[Route, ...]) -> bytes:
    return orjson.dumps(openapi_document(models, table))


@operation("This document", "ops", {"200": response("OpenAPI 3.1", json_content({"type": "object"}))},
           security=PUBLIC)
async def get_openapi(request: web.Request) -> web.Response:
    """Served without auth: the document describes the API, it grants nothing."""
    return web.Response(body=_encoded(tuple(request.app[MODELS].models), route_table(request.app.router)),
                        content_type="application/json")
