"""Each handler's operation: what GET /openapi.json says of it (summary, tag, request body, parameters,
answers, auth), declared next to the handler with `@operation(...)`.

The document's paths are built from the app's route table: every route's handler is looked up here,
so a route without an operation fails the document (and its test), and no path is listed by hand.

A schema anywhere in an operation (a request body, an answer's content) is a msgspec Struct (its
schema is generated into the document's components, with the structs it refers to) or a ready
JSON schema (a `ref(...)` to a component, or inline: an SSE event's envelope).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from msgspec import Struct

Schema = dict[str, Any]
# a struct (its schema generated) or a ready schema
Body = type[Struct] | Schema
Handler = Callable[..., Any]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True, slots=True, eq=False)
class Operation:
    summary: str
    tag: str
    responses: Mapping[str, Any]  # status -> an OpenAPI response object (`ok`, `reply`, `errors`)
    body: Body | None = None
    body_required: bool = True
    parameters: Sequence[Schema] = ()  # path parameters not listed here are plain strings
    security: Sequence[Mapping[str, Sequence[str]]] | None = None  # None: the document's default (bearer)
    description: str | None = None


OPERATIONS: dict[Handler, Operation] = {}


def operation(summary: str, tag: str, responses: Mapping[str, Any], **extra: Any) -> Callable[[H], H]:
    """Declare a handler's operation (the fields of Operation); the handler itself is unchanged."""
    declared = Operation(summary, tag, responses, **extra)

    def mark(handler: H) -> H:
        OPERATIONS.setdefault(handler, declared)
        return handler
    return mark


def operation_of(handler: Handler) -> Operation | None:
    return OPERATIONS.get(handler)


# -- building blocks --------------------------------------------------------------------------

def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: Body) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def sse_content(event: Body | str) -> dict[str, Any]:
    # OpenAPI 3.1 has no itemSchema (3.2): for text/event-stream the schema describes each event,
    # as {id?, event, data, retry?}, and contentSchema the JSON inside `data`
    return {"text/event-stream": {"schema": ref(event) if isinstance(event, str) else event}}


REQUEST_ID_HEADER = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}


def response(description: str, content: dict[str, Any] | None = None,
             headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "headers": {**REQUEST_ID_HEADER, **(headers or {})}}
    if content is not None:
        out["content"] = content
    return out


def ok(status: int, description: str, schema: Body | str | None = None) -> dict[str, Any]:
    """A JSON answer (`schema`: a struct, a component's name or a schema), or one without a body."""
    if schema is None:
        return {str(status): response(description)}
    return {str(status): response(description, json_content(ref(schema) if isinstance(schema, str) else schema))}


def errors(*statuses: int, openai: bool = False) -> dict[str, Any]:
    """The native error answers (or OpenAI's shape) for `statuses`."""
    prefix = "OpenAIError" if openai else "Error"
    return {str(s): {"$ref": f"#/components/responses/{prefix}{s}"} for s in statuses}


def openai_error_answers(*statuses: int) -> dict[str, Any]:
    """The OpenAI door's errors; a database outage still answers the native 503, an upstream's
    failure a 502 or 504."""
    return {**errors(*statuses, openai=True), "502": {"$ref": "#/components/responses/OpenAIError502"},
            "503": {"$ref": "#/components/responses/Error503"},
            "504": {"$ref": "#/components/responses/OpenAIError504"}}


def anthropic_error_answers(*statuses: int) -> dict[str, Any]:
    """The Anthropic front door's errors; a database outage still answers the native 503."""
    out = {str(s): {"$ref": f"#/components/responses/AnthropicError{s}"} for s in statuses}
    return {**out, "503": {"$ref": "#/components/responses/Error503"}}


def path_id(name: str, what: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": f"The {what}'s id",
            "schema": {"type": "string", "format": "uuid"}}


def path_string(name: str, description: str | None = None) -> Schema:
    out: Schema = {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
    if description:
        out["description"] = description
    return out


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


RESUME_PARAMETERS = (
    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "Resume after this event id (a foreign or malformed id replays from the start)"},
    query("lastEventId", {"type": "string"}, "Last-Event-ID for clients that cannot send headers"),
)

BEARER: tuple[dict[str, list[str]], ...] = ({"bearerAuth": []},)
STREAM_SECURITY: tuple[dict[str, list[str]], ...] = ({"bearerAuth": []}, {"streamToken": []})
ANTHROPIC_SECURITY: tuple[dict[str, list[str]], ...] = ({"bearerAuth": []}, {"anthropicApiKey": []})
PUBLIC: tuple[dict[str, list[str]], ...] = ()

SSE_DESCRIPTION = ("Server-Sent Events: `metadata` (its block opens with the `retry:` line), deltas "
                   "(`data: {\"delta\": ...}`) and `reasoning` events when the upstream streams its "
                   "reasoning, `usage`, "
                   "`done` (or `error`) events with ids `<message_id>:<seq>`, and a final `data: [DONE]`")
