"""GET /openapi.json: the HTTP surface as an OpenAPI 3.1 document, built once as plain data.

The configured model names are part of it (the `model` enums), so it is built per set of models.

The schemas state what the handlers enforce, no more and no less: a request the document calls
valid passes the handler's own checks (apart from what needs the database or the configuration:
a thread that exists, a model that is configured, an expiry in the future), and one it calls
invalid is refused with a 4xx. tests/test_openapi.py fuzzes the running app against this
document and fails on a route that is missing from it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import msgspec
import orjson
from aiohttp import web

from gateway import __version__
from gateway.contract import native, openai
from gateway.contract.native import IMAGE_URL, NO_NUL, NOT_BLANK
from gateway.service.router import AUTO
from gateway.state import MODELS
from gateway.vocabulary import MessageStatus, Winner

Schema = dict[str, Any]

INT32_MAX = 2**31 - 1
MESSAGE_STATUSES = [str(s) for s in MessageStatus]
WINNERS = [str(w) for w in Winner]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """`schema` or JSON null (handlers treat an explicit null like an absent field)."""
    if "type" in schema and "enum" not in schema:
        kind = schema["type"]
        return {**schema, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


UUID: Schema = {"type": "string", "format": "uuid"}
TIME: Schema = {"type": "string", "format": "date-time"}
DATE: Schema = {"type": "string", "format": "date"}
INT: Schema = {"type": "integer"}
STRING: Schema = {"type": "string"}


# -- responses -------------------------------------------------------------------------------

def json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}




def sse_content(event: str) -> dict[str, Any]:
    # OpenAPI 3.1 has no itemSchema (3.2): for text/event-stream the schema describes each event,
    # as {id?, event, data, retry?}, and contentSchema the JSON inside `data`
    return {"text/event-stream": {"schema": ref(event)}}


def json_text(schema: Schema) -> Schema:
    """A string holding JSON that matches `schema` (an SSE event's data)."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def sse_events(slot: bool) -> Schema:
    """The native events (sse.py) of one message, or of an arena comparison when `slot`."""
    tag: dict[str, Schema] = {"slot": {"enum": ["a", "b"]}} if slot else {}
    tagged = ("slot",) if slot else ()
    event_id = {"type": "string", "pattern": "^[0-9a-f-]{36}(:(-1|[0-9]+)){2}$" if slot else "^[0-9a-f-]{36}:[0-9]+$"}

    def event(name: str, data: Schema) -> Schema:
        return obj({"event": {"const": name}, "id": event_id, "data": data}, ("event", "id", "data"))

    return {"anyOf": [
        event("metadata", json_text(obj({
            **tag, "thread_id": UUID, "user_message_id": UUID, "message_id": UUID, "model": nullable(STRING),
            "provider": nullable(STRING), "category": nullable(STRING), "auto": {"type": "boolean"},
            "fallback_from": nullable(STRING),
        }, (*tagged, "thread_id", "user_message_id", "message_id", "model", "provider", "category", "auto",
            "fallback_from")))),
        event("message", json_text(obj({**tag, "delta": STRING}, (*tagged, "delta")))),
        event("usage", json_text(obj({**tag, "prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT,
                                      "estimated": {"type": "boolean"},
                                      # the upstream's counts were out of range and clamped
                                      "usage_suspect": {"type": "boolean"}},
                                     (*tagged, "prompt_tokens", "completion_tokens", "total_tokens")))),
        event("done", json_text(obj({**tag, "finish_reason": STRING, "message_id": UUID,
                                     "attempts": {"type": "array", "items": {"type": "object"}}},
                                    (*tagged, "finish_reason", "message_id")))),
        event("error", json_text(obj({**tag, "type": STRING, "message": STRING, "retryable": {"type": "boolean"},
                                      # a policy stop (type "policy"): which limit, and when it clears
                                      "reason": STRING, "reset_at": nullable(TIME)},
                                     (*tagged, "type", "message", "retryable")))),
        obj({"event": {"const": "message"}, "data": {"const": "[DONE]"}}, ("event", "data")),
    ]}
REQUEST_ID_HEADER = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}

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


def response(description: str, content: dict[str, Any] | None = None,
             headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "headers": {**REQUEST_ID_HEADER, **(headers or {})}}
    if content is not None:
        out["content"] = content
    return out


def error_responses(prefix: str, schema: str) -> dict[str, Any]:
    out = {}
    for status, description in ERRORS.items():
        headers = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}} if status == 429 else None
        out[f"{prefix}{status}"] = response(description, json_content(ref(schema)), headers)
    return out


def errors(*statuses: int, openai: bool = False) -> dict[str, Any]:
    prefix = "OpenAIError" if openai else "Error"
    return {str(s): {"$ref": f"#/components/responses/{prefix}{s}"} for s in statuses}


def anthropic_errors(*statuses: int) -> dict[str, Any]:
    """The Anthropic front door's errors; a database outage still answers the native 503."""
    out = {str(s): {"$ref": f"#/components/responses/AnthropicError{s}"} for s in statuses}
    return {**out, "503": {"$ref": "#/components/responses/Error503"}}


def ok(status: int, description: str, schema: Schema | str | None = None) -> dict[str, Any]:
    if schema is None:
        return {str(status): response(description)}
    return {str(status): response(description, json_content(ref(schema) if isinstance(schema, str) else schema))}


# -- parameters ------------------------------------------------------------------------------

def path_id(name: str, what: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": f"The {what}'s id",
            "schema": UUID}


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


RESUME_PARAMETERS = [
    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": STRING,
     "description": "Resume after this event id (a foreign or malformed id replays from the start)"},
    query("lastEventId", STRING, "Last-Event-ID for clients that cannot send headers"),
]


def json_body(schema: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": json_content(ref(schema))}


# -- schemas ---------------------------------------------------------------------------------

def _schemas(models: tuple[str, ...]) -> dict[str, Schema]:
    message_row = obj({
        "id": UUID, "thread_id": UUID, "role": {"enum": ["user", "assistant", "system"]}, "content": STRING,
        "status": {"enum": MESSAGE_STATUSES}, "reply_to": nullable(UUID), "slot": {"enum": ["a", "b", None]},
        "client_message_id": nullable(STRING), "model": nullable(STRING), "provider": nullable(STRING),
        "prompt_tokens": nullable(INT), "completion_tokens": nullable(INT), "ttft_ms": nullable(INT),
        "latency_ms": nullable(INT), "error": nullable({"type": "object"}), "metadata": {"type": "object"},
        "created_at": TIME, "finished_at": nullable(TIME),
        "parts": nullable({"type": "array", "items": {"type": "object"},
                           "description": "A user message's content parts exactly as sent (content holds their "
                                          "text); null for a plain-text message"}),
    }, ("id", "thread_id", "role", "content", "status", "reply_to", "slot", "client_message_id", "model",
        "provider", "prompt_tokens", "completion_tokens", "ttft_ms", "latency_ms", "error", "metadata",
        "created_at", "finished_at"))
    thread = obj({"id": UUID, "title": nullable(STRING), "created_at": TIME, "updated_at": TIME},
                 ("id", "title", "created_at", "updated_at"))
    key_limits = obj({
        **{name: nullable({"type": "integer", "minimum": 1, "maximum": INT32_MAX})
           for name in ("requests_per_minute", "daily_tokens", "max_concurrent_streams", "max_tokens")},
        "daily_cost_usd": nullable({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100000000}),
        # budgets by UTC month and for life (docs/budgets.md)
        **{name: nullable({"type": "integer", "minimum": 1, "maximum": INT32_MAX})
           for name in ("monthly_tokens", "total_tokens")},
        **{name: nullable({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100000000})
           for name in ("monthly_cost_usd", "total_cost_usd")},
        "models": nullable({"type": "array", "minItems": 1, "maxItems": 100,
                            "items": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": NO_NUL}}),
    }, additionalProperties=False)
    key_info = obj({
        "id": UUID, "user_id": UUID,
        "parent_id": nullable({**UUID, "description": "The key that created it (null: made by the CLI, the "
                                                      "bootstrap or a signed-in user); revoked with it"}),
        "name": STRING, "prefix": STRING,
        "scopes": {"type": "array", "items": {"enum": ["chat", "arena", "admin"]}},
        "limits": nullable({"type": "object"}), "expires_at": nullable(TIME), "revoked_at": nullable(TIME),
        "last_used_at": nullable(TIME), "created_at": TIME,
        # what the key (with its descendants) has spent: GET /api/keys (docs/budgets.md)
        "spend": obj({period: obj({"tokens": INT, "cost_usd": {"type": "number"}}, ("tokens", "cost_usd"))
                      for period in ("today", "month", "total")}, ("today", "month", "total")),
    }, ("id", "user_id", "name", "prefix", "scopes", "limits", "expires_at", "revoked_at", "last_used_at",
        "created_at"))
    slot = obj({"message_id": UUID, "status": {"enum": MESSAGE_STATUSES}, "model": nullable(STRING),
                "provider": nullable(STRING)}, ("message_id", "status", "model", "provider"))
    usage = obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT},
                ("prompt_tokens", "completion_tokens", "total_tokens"))
    usage_counts = {"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT,
                    "cost_usd": {"type": "number"}, "requests": INT}
    return {
        "Error": obj({"error": obj({
            "type": {"type": "string", "description": "invalid_request, unauthorized, forbidden, not_found, "
                                                      "conflict, rate_limited, payload_too_large, unavailable, ..."},
            "message": STRING, "request_id": STRING,
            "retry_after": {"type": "integer", "description": "429 only: seconds to wait"},
            "reset_at": {**nullable(TIME), "description": "429 only: when the limit resets"},
        }, ("type", "message", "request_id"))}, ("error",)),
        "OpenAIError": obj({"error": obj({
            "message": STRING, "type": STRING, "param": nullable(STRING), "code": nullable(STRING),
        }, ("message", "type", "param", "code"))}, ("error",)),
        "ChatAccepted": obj({
            "status": {"const": "accepted"}, "message": ref("Message"), "duplicate": {"type": "boolean"},
            "thread_id": UUID, "assistant_message_id": UUID,
            "stream_url": {"type": "string", "description": "Follow the reply with EventSource (token included)"},
        }, ("status", "message", "duplicate", "thread_id", "assistant_message_id", "stream_url")),
        "Message": message_row,
        "Thread": thread,
        "ThreadWithMessages": {"allOf": [thread, obj({"messages": {"type": "array", "items": ref("Message")}},
                                                     ("messages",))]},
        "ThreadPage": obj({"threads": {"type": "array", "items": ref("Thread")}, "next_cursor": nullable(STRING)},
                          ("threads", "next_cursor")),
        "EmbeddingRequest": obj({
            "model": {"enum": list(models), "description": "A model with kind = \"embedding\" (or one of the "
                                                            "demo provider's)"},
            "input": {"anyOf": [
                {"type": "string", "minLength": 1, "pattern": NO_NUL},
                {"type": "array", "minItems": 1, "maxItems": 2048,
                 "items": {"type": "string", "minLength": 1, "pattern": NO_NUL}},
                {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                {"type": "array", "minItems": 1, "maxItems": 2048,
                 "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}]},
            "dimensions": nullable({"type": "integer", "minimum": 1, "maximum": 65536}),
            "encoding_format": nullable({"enum": ["float", "base64"]}),
            "user": nullable(STRING),
        }, ("model", "input"), additionalProperties=True),
        "EmbeddingList": obj({
            "object": {"const": "list"}, "model": STRING,
            "data": {"type": "array", "items": obj({
                "object": {"const": "embedding"}, "index": INT,
                "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                        {"type": "string", "description": "base64 of little-endian float32"}]},
            }, ("object", "index", "embedding"))},
            "usage": obj({"prompt_tokens": INT, "total_tokens": INT}, ("prompt_tokens", "total_tokens")),
        }, ("object", "data", "model", "usage")),
        "ChatCompletion": obj({
            "id": STRING, "object": {"const": "chat.completion"}, "created": INT, "model": STRING,
            "choices": {"type": "array", "items": obj({
                "index": INT,
                "message": obj({"role": {"const": "assistant"}, "content": nullable(STRING),
                                "refusal": {"type": "null"},
                                "tool_calls": {"type": "array", "items": {"type": "object"}}},
                               ("role", "content", "refusal")),
                "logprobs": {"type": "null"}, "finish_reason": STRING,
            }, ("index", "message", "finish_reason"))},
            "usage": usage,
        }, ("id", "object", "created", "model", "choices", "usage")),
        "ChatCompletionEvent": obj({"event": {"const": "message"}, "data": {"anyOf": [
            json_text(obj({
                "id": STRING, "object": {"const": "chat.completion.chunk"}, "created": INT, "model": STRING,
                "choices": {"type": "array", "items": obj({
                    "index": INT, "delta": {"type": "object"}, "logprobs": {"type": "null"},
                    "finish_reason": nullable(STRING)}, ("index", "delta", "finish_reason"))},
                "usage": nullable(usage),
            }, ("id", "object", "created", "model", "choices"))),
            json_text(ref("OpenAIError")),  # the upstream failed mid-stream
            {"const": "[DONE]"},
        ]}}, ("event", "data")),
        "ResponseRequest": obj({
            "model": {"enum": [AUTO, *models], "description": "A configured model, or auto (the router picks)"},
            "input": {"anyOf": [
                {"type": "string", "minLength": 1, "pattern": NOT_BLANK, "description": "One user message"},
                {"type": "array", "minItems": 1, "items": {"anyOf": [obj({
                    "type": {"const": "message"},
                    "role": {"enum": ["user", "assistant", "system", "developer"]},
                    "content": {"anyOf": [{"type": "string", "pattern": NO_NUL}, {
                        "type": "array", "minItems": 1, "items": {"anyOf": [
                            obj({"type": {"enum": ["input_text", "output_text"]},
                                 "text": {"type": "string", "pattern": NO_NUL}}, ("type", "text"),
                                additionalProperties=True),
                            obj({"type": {"const": "input_image"},
                                 "image_url": {"type": "string", "pattern": IMAGE_URL},
                                 "detail": nullable({"enum": ["auto", "low", "high"]})}, ("type", "image_url"),
                                additionalProperties=True)]}}]},
                }, ("role", "content"), additionalProperties=True),
                    obj({"type": {"const": "function_call"}, "call_id": {"type": "string", "pattern": NO_NUL},
                         "name": {"type": "string", "pattern": NO_NUL},
                         "arguments": {"type": "string", "pattern": NO_NUL}},
                        ("type", "call_id", "name", "arguments"), additionalProperties=True),
                    obj({"type": {"const": "function_call_output"}, "call_id": {"type": "string", "pattern": NO_NUL},
                         "output": {"type": "string", "pattern": NO_NUL}},
                        ("type", "call_id", "output"), additionalProperties=True)]},
                 "description": "Message items and the tool loop's function_call / function_call_output items; "
                                "with store: true the last must be a user message (it is stored; the others are "
                                "sent for this turn only)"}]},
            "instructions": nullable({"type": "string", "pattern": NO_NUL,
                                      "description": "A system message for this turn only (never stored)"}),
            "max_output_tokens": nullable({"type": "integer", "minimum": 1, "maximum": INT32_MAX}),
            "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
            "top_p": nullable({"type": "number", "minimum": 0, "maximum": 1}),
            "stream": nullable({"type": "boolean"}),
            "store": nullable({"type": "boolean", "description": "Default true: the turn is kept in a thread"}),
            "previous_response_id": nullable({"type": "string", "pattern": NO_NUL,
                                              "description": "Continue that stored response's thread"}),
            "tools": nullable({"type": "array", "items": obj({"type": {"const": "function"}, "name": STRING},
                                                             ("type", "name"), additionalProperties=True),
                               "description": "Function tools, translated and passed through"}),
            "tool_choice": {"anyOf": [{"enum": ["auto", "none", "required"]},
                                      obj({"type": {"const": "function"}, "name": STRING}, ("type", "name"),
                                          additionalProperties=True), {"type": "null"}]},
            "parallel_tool_calls": nullable({"type": "boolean"}),
            "metadata": nullable({"type": "object", "description": "Echoed in the response, not stored"}),
            "user": {"description": "Passed through to OpenAI-compatible upstreams unchecked"},
        }, ("model", "input"), additionalProperties=True),
        "Response": obj({
            "id": {"type": "string", "description": "resp_<hex>: a stored response's id is its assistant "
                                                   "message's"},
            "object": {"const": "response"}, "created_at": INT,
            "status": {"enum": ["completed", "failed", "in_progress", "cancelled", "incomplete"]},
            "model": STRING, "output": {"type": "array", "items": {"type": "object"}},
            "output_text": {"type": "string", "description": "The output's text, joined (as the SDKs compute it)"},
            "usage": nullable(obj({"input_tokens": INT, "output_tokens": INT, "total_tokens": INT},
                                  ("input_tokens", "output_tokens", "total_tokens"), additionalProperties=True)),
            "error": nullable(obj({"code": STRING, "message": STRING}, ("code", "message"))),
            "previous_response_id": nullable(STRING), "store": {"type": "boolean"},
        }, ("id", "object", "created_at", "status", "model", "output", "usage", "error"),
            additionalProperties=True),
        "ResponseEvent": obj({"event": STRING, "data": json_text(obj(
            {"type": STRING, "sequence_number": INT}, ("type", "sequence_number"), additionalProperties=True))},
            ("event", "data"), description="response.created, response.in_progress, response.output_item.added, "
                                           "response.content_part.added, response.output_text.delta..., "
                                           "response.output_text.done, response.content_part.done, "
                                           "response.output_item.done, response.completed (or "
                                           "response.incomplete; response.failed after a failure)"),
        "ResponseItemList": obj({
            "object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}},
            "first_id": nullable(STRING), "last_id": nullable(STRING), "has_more": {"type": "boolean"},
        }, ("object", "data", "first_id", "last_id", "has_more")),
        "ResponseDeleted": obj({"id": STRING, "object": {"const": "response.deleted"}, "deleted": {"const": True}},
                               ("id", "object", "deleted")),
        **_anthropic_schemas(models),
        "MessageEvent": sse_events(slot=False),
        "ArenaEvent": sse_events(slot=True),
        "Model": obj({"id": STRING, "object": {"const": "model"}, "created": INT, "owned_by": STRING},
                     ("id", "object", "created", "owned_by")),
        "ModelList": obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}},
                         ("object", "data")),
        "CreateKey": obj({
            "name": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": NOT_BLANK},
            "scopes": nullable({"type": "array", "minItems": 1, "items": {"enum": ["chat", "arena", "admin"]},
                                "description": "Default: chat and arena (within the creating key's own)"}),
            "expires_at": nullable({**TIME, "description": "In the future, with a timezone"}),
            "limits": nullable(key_limits),
            "user_id": nullable({**UUID, "description": "Admin only: the key's owner (created if new)"}),
        }, ("name",), additionalProperties=True),
        "KeyInfo": key_info,
        "CreatedKey": {"allOf": [key_info, obj({"key": {"type": "string", "description": "Shown this once"}},
                                               ("key",))]},
        "KeyList": obj({"keys": {"type": "array", "items": ref("KeyInfo")}}, ("keys",)),
        "ArenaAccepted": obj({
            "status": {"const": "accepted"}, "comparison_id": UUID, "message": ref("Message"),
            "duplicate": {"type": "boolean"}, "thread_id": UUID,
            "assistant_message_ids": obj({"a": UUID, "b": UUID}, ("a", "b")), "stream_url": STRING,
        }, ("status", "comparison_id", "message", "duplicate", "thread_id", "assistant_message_ids",
            "stream_url")),
        "Comparison": obj({
            "id": UUID, "thread_id": UUID, "user_message_id": UUID, "anonymous": {"type": "boolean"},
            "winner": {"enum": [*WINNERS, None]}, "voted_at": nullable(TIME), "created_at": TIME,
            "slots": obj({"a": slot, "b": slot}, ("a", "b")),
        }, ("id", "thread_id", "user_message_id", "anonymous", "winner", "voted_at", "created_at", "slots")),
        "Leaderboard": obj({
            "models": {"type": "array", "items": obj({
                "model": STRING, "rating": {"type": "number"}, "ci_low": {"type": "number"},
                "ci_high": {"type": "number"}, "battles": INT, "wins": {"type": "number"},
                "win_rate": {"type": "number"},
                "provisional": {"type": "boolean", "description": "Fewer battles than `provisional_below`"},
                "rating_lc": {"type": "number", "description": "Length-controlled rating"},
                "lc_ci_low": {"type": "number"}, "lc_ci_high": {"type": "number"},
            }, ("model", "rating", "ci_low", "ci_high", "battles", "wins", "win_rate", "provisional", "rating_lc",
                "lc_ci_low", "lc_ci_high"))},
            "pairs": {"type": "array", "items": obj({
                "a": STRING, "b": STRING, "battles": INT,
                "a_wins": {"type": "number", "description": "Wins of `a` over `b`, ties counting half"},
            }, ("a", "b", "battles", "a_wins"))},
            "length_effect": {"type": "number", "description": "Rating points a reply gains against one half "
                                                               "its length"},
            "provisional_below": INT,
            "battles": INT, "anonymous_only": {"type": "boolean"}, "fit_ms": {"type": "number"},
        }, ("models", "pairs", "length_effect", "provisional_below", "battles", "anonymous_only", "fit_ms")),
        "Me": obj({
            "user": obj({"id": UUID, "email": nullable(STRING)}, ("id", "email")),
            "key": nullable(obj({"id": UUID, "scopes": {"type": "array", "items": STRING}}, ("id", "scopes"))),
            "limits": obj({
                **{name: nullable(INT) for name in ("requests_per_minute", "key_requests_per_minute",
                                                    "daily_tokens", "key_daily_tokens", "max_concurrent_streams",
                                                    "max_tokens")},
                "models": nullable({"type": "array", "items": STRING}),
            }),
            "today": obj({"day": DATE, "tokens": INT, "reserved": INT, "requests": INT,
                          "cost_usd": {"type": "number"}, "active_streams": INT},
                         ("day", "tokens", "reserved", "requests", "cost_usd", "active_streams")),
            "remaining": obj({"daily_tokens": nullable(INT)}, ("daily_tokens",)),
        }, ("user", "key", "limits", "today", "remaining")),
        "UsageReport": obj({
            "from": DATE, "to": DATE, "group_by": {"enum": ["day", "model", "day,model", "key", "day,key"]},
            "rows": {"type": "array", "items": obj({"day": DATE, "model": STRING, "key": nullable(UUID),
                                                    **usage_counts},
                                                   tuple(usage_counts))},
            "totals": obj(usage_counts, tuple(usage_counts)),
        }, ("from", "to", "group_by", "rows", "totals")),
        "Status": obj({"status": {"enum": ["ok", "unavailable"]}, "database": STRING,
                       "pending_migrations": {"type": "array", "items": STRING},
                       "redis": {"enum": ["ok", "degraded"]}}, ("status",)),  # with REDIS_URL only
    }


def _anthropic_schemas(models: tuple[str, ...]) -> dict[str, Schema]:
    """The Anthropic Messages front door (api/anthropic/messages.py): what its parser enforces."""
    text = {"type": "string", "pattern": NO_NUL}
    text_block = obj({"type": {"const": "text"}, "text": text}, ("type", "text"), additionalProperties=True)
    texts = {"anyOf": [text, {"type": "array", "items": text_block}]}
    tool_use = obj({"type": {"const": "tool_use"}, "id": text, "name": text, "input": {"type": "object"}},
                   ("type", "id", "name", "input"), additionalProperties=True)
    tool_result = obj({"type": {"const": "tool_result"}, "tool_use_id": text, "content": texts},
                      ("type", "tool_use_id"), additionalProperties=True)

    def message(role: str, block: Schema) -> Schema:
        return obj({"role": {"const": role}, "content": {"anyOf": [text, {"type": "array", "items": {
            "anyOf": [text_block, block]}}]}}, ("role", "content"), additionalProperties=True)

    parallel = {"disable_parallel_tool_use": nullable({"type": "boolean"})}
    prompt: dict[str, Schema] = {
        "model": {"enum": [AUTO, *models], "description": "A configured model, or auto (the router picks)"},
        "messages": {"type": "array", "minItems": 1,
                     "items": {"anyOf": [message("user", tool_result), message("assistant", tool_use)]}},
        "system": {"anyOf": [*texts["anyOf"], {"type": "null"}], "description": "Text blocks are joined by a "
                                                                                 "blank line"},
        "tools": {**nullable({"type": "array", "items": obj({
            "name": text, "description": nullable(text), "input_schema": {"type": "object"},
        }, ("name", "input_schema"), additionalProperties=True)}),
            "description": "Passed to OpenAI-compatible upstreams as functions; other upstreams answer in text"},
        "tool_choice": {"anyOf": [
            obj({"type": {"enum": ["auto", "any", "none"]}, **parallel}, ("type",), additionalProperties=True),
            obj({"type": {"const": "tool"}, "name": text, **parallel}, ("type", "name"), additionalProperties=True),
            {"type": "null"},
        ]},
    }
    unit = nullable({"type": "number", "minimum": 0, "maximum": 1})
    usage = obj({"input_tokens": INT, "output_tokens": INT}, ("output_tokens",))
    return {
        "AnthropicError": obj({"type": {"const": "error"}, "error": obj({"type": STRING, "message": STRING},
                                                                         ("type", "message"))}, ("type", "error")),
        "AnthropicMessagesRequest": obj({
            **prompt,
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": INT32_MAX},
            "stream": nullable({"type": "boolean"}),
            "temperature": unit, "top_p": unit,
            "stop_sequences": nullable({"type": "array", "items": STRING}),
        }, ("model", "max_tokens", "messages"), additionalProperties=True,
            description="Unknown fields (metadata, top_k, ...) are ignored"),
        "AnthropicCountTokensRequest": obj(prompt, ("model", "messages"), additionalProperties=True,
                                           description="Other fields (max_tokens, ...) are ignored"),
        "AnthropicMessage": obj({
            "id": {"type": "string", "pattern": "^msg_"}, "type": {"const": "message"},
            "role": {"const": "assistant"}, "model": STRING,
            "content": {"type": "array", "items": {"anyOf": [
                obj({"type": {"const": "text"}, "text": STRING}, ("type", "text")),
                obj({"type": {"const": "tool_use"}, "id": STRING, "name": STRING, "input": {"type": "object"}},
                    ("type", "id", "name", "input"))]}},
            "stop_reason": {"enum": ["end_turn", "max_tokens", "tool_use", "refusal"]},
            "stop_sequence": {"type": "null"},
            "usage": obj({"input_tokens": INT, "output_tokens": INT}, ("input_tokens", "output_tokens")),
        }, ("id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage")),
        "AnthropicTokenCount": obj({"input_tokens": INT}, ("input_tokens",)),
        "AnthropicStreamEvent": {"anyOf": [
            obj({"event": {"const": name}, "data": json_text(obj({"type": {"const": name}, **data}, ("type",
                                                                                                     *data)))},
                ("event", "data"))
            for name, data in (
                ("message_start", {"message": {"type": "object"}}),
                ("content_block_start", {"index": INT, "content_block": {"type": "object"}}),
                ("ping", {}),
                ("content_block_delta", {"index": INT, "delta": {"type": "object"}}),
                ("content_block_stop", {"index": INT}),
                ("message_delta", {"delta": {"type": "object"}, "usage": usage}),
                ("message_stop", {}),
                ("error", {"error": obj({"type": STRING, "message": STRING}, ("type", "message"))}),
            )]},
    }


# -- operations ------------------------------------------------------------------------------

def op(summary: str, tag: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "tags": [tag], "responses": responses, **extra}


STREAM_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"streamToken": []}]
ANTHROPIC_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"anthropicApiKey": []}]
PUBLIC: list[Any] = []

SSE_DESCRIPTION = ("Server-Sent Events: `metadata` (its block opens with the `retry:` line), deltas "
                   "(`data: {\"delta\": ...}`), `usage`, "
                   "`done` (or `error`) events with ids `<message_id>:<seq>`, and a final `data: [DONE]`")


def _paths() -> dict[str, Any]:
    turn_errors = errors(400, 401, 403, 404, 409, 413, 429, 503)
    message_id = path_id("message_id", "assistant message")
    comparison_id = path_id("comparison_id", "comparison")
    thread_id = path_id("thread_id", "thread")
    response_id = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"},
                   "description": "The response's id (resp_<hex>)"}
    create_thread = op("Create a thread", "threads", {**ok(201, "The new thread", "Thread"),
                                                      **errors(400, 401, 403, 413, 503)},
                       requestBody=json_body("CreateThread", required=False))
    return {
        "/api/chat": {"post": op(
            "Send a user message; the reply streams (SSE) or runs on in the background", "chat",
            {"200": response(SSE_DESCRIPTION, sse_content("MessageEvent")),
             **ok(202, "Accepted: the user message is stored and the reply is generating", "ChatAccepted"),
             **turn_errors},
            requestBody=json_body("ChatRequest"),
            description="Streams when `stream` is true, or when it is absent and `Accept` includes "
                        "`text/event-stream`. A malformed request or a per-minute limit (429) stores nothing; "
                        "once the message is stored, a policy stop (daily cap, a model the key may not use, "
                        "too many concurrent streams) is the reply: status `refused`, an `error` event of "
                        "type `policy` with `reason` and `reset_at`.")},
        "/api/messages/{message_id}/regenerate": {"post": op(
            "A new reply to a saved user message (its last one refused, failed, interrupted, cancelled, "
            "or complete: every reply is kept)", "chat",
            {"200": response(SSE_DESCRIPTION, sse_content("MessageEvent")),
             **ok(202, "Accepted: the new reply is generating (or was refused)", "ChatAccepted"),
             **turn_errors},
            parameters=[path_id("message_id", "user message")], requestBody=json_body("RegenerateRequest",
                                                                                      required=False),
            description="Runs like POST /api/chat on the thread up to that message (the policy decides, the "
                        "reply streams and resumes alike). 409 while its last reply is still generating, "
                        "or for an arena turn.")},
        "/api/messages/{message_id}": {"get": op(
            "A message's status and content (the polling fallback)", "chat",
            {**ok(200, "The message", "Message"), **errors(400, 401, 403, 404, 503)},
            parameters=[path_id("message_id", "message")])},
        "/api/messages/{message_id}/stream": {"get": op(
            "Follow an assistant message's events (EventSource-compatible)", "chat",
            {"200": response(SSE_DESCRIPTION, sse_content("MessageEvent")),
             **ok(204, "Nothing after Last-Event-ID: the message has finished"),
             **errors(400, 401, 403, 404, 503)},
            parameters=[message_id, *RESUME_PARAMETERS], security=STREAM_SECURITY,
            description="Replays the events after Last-Event-ID and follows the generation live. "
                        "Authenticated by the bearer header or by the `token` of `stream_url`.")},
        "/api/messages/{message_id}/cancel": {"post": op(
            "Stop a reply; the partial content is saved as cancelled", "chat",
            {**ok(200, "The saved assistant message", "Message"), **errors(400, 401, 403, 404, 503)},
            parameters=[message_id])},
        "/api/threads": {
            "post": create_thread,
            "get": op("The caller's threads, newest first (keyset pages)", "threads",
                      {**ok(200, "A page of threads", "ThreadPage"), **errors(400, 401, 403, 503)},
                      parameters=[query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                                        "Page size"),
                                  query("cursor", STRING, "`next_cursor` of the previous page")]),
        },
        "/api/threads/{thread_id}": {
            "get": op("A thread with its messages", "threads",
                      {**ok(200, "The thread", "ThreadWithMessages"), **errors(400, 401, 403, 404, 503)},
                      parameters=[thread_id]),
            "delete": op("Delete a thread and its messages (usage is kept)", "threads",
                         {**ok(204, "Deleted"), **errors(400, 401, 403, 404, 503)}, parameters=[thread_id]),
        },
        "/v1/chat/sessions": {"post": {**create_thread, "summary": "Create a thread (alias of POST /api/threads)"}},
        "/v1/chat/completions": {"post": op(
            "OpenAI-compatible chat completion (stream and non-stream)", "openai",
            {"200": response("The completion; `chat.completion.chunk` events when `stream` is true",
                             {**json_content(ref("ChatCompletion")), **sse_content("ChatCompletionEvent")}),
             **errors(400, 401, 403, 404, 413, 429, openai=True),
             "502": {"$ref": "#/components/responses/OpenAIError502"},
             "503": {"$ref": "#/components/responses/Error503"},
             "504": {"$ref": "#/components/responses/OpenAIError504"}},
            requestBody=json_body("ChatCompletionRequest"),
            description="Stateless like OpenAI's endpoint: no thread or message rows; usage is recorded. "
                        "Errors are in OpenAI's shape (a database outage answers the native 503).")},
        "/v1/embeddings": {"post": op(
            "OpenAI-compatible embeddings, passed through to the model's provider", "openai",
            {**ok(200, "One vector per input, in order", "EmbeddingList"),
             **errors(400, 401, 403, 404, 413, 429, openai=True),
             "502": {"$ref": "#/components/responses/OpenAIError502"},
             "503": {"$ref": "#/components/responses/Error503"},
             "504": {"$ref": "#/components/responses/OpenAIError504"}},
            requestBody=json_body("EmbeddingRequest"),
            description="Stateless; the input's tokens count against the daily caps and are recorded once. "
                        "With limits configured, a success carries OpenAI's `x-ratelimit-*` headers.")},
        "/v1/models": {"get": op(
            "The enabled models, OpenAI-style", "openai",
            {**ok(200, "The models", "ModelList"), **errors(401, openai=True),
             "503": {"$ref": "#/components/responses/Error503"}})},
        "/v1/models/{model}": {"get": op(
            "One enabled model, OpenAI-style", "openai",
            {**ok(200, "The model", "Model"), **errors(401, 404, openai=True),
             "503": {"$ref": "#/components/responses/Error503"}},
            parameters=[{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}])},
        "/v1/responses": {"post": op(
            "OpenAI Responses API: create a response (stream and non-stream)", "openai",
            {"200": response("The response; its semantic events when `stream` is true",
                             {**json_content(ref("Response")), **sse_content("ResponseEvent")}),
             **errors(400, 401, 403, 404, 413, 429, openai=True),
             "502": {"$ref": "#/components/responses/OpenAIError502"},
             "503": {"$ref": "#/components/responses/Error503"},
             "504": {"$ref": "#/components/responses/OpenAIError504"}},
            requestBody=json_body("ResponseRequest"),
            description="With store: true (the default) the turn is persisted in a thread like POST /api/chat's; "
                        "previous_response_id continues it. With store: false it is stateless like "
                        "/v1/chat/completions. Errors are in OpenAI's shape.")},
        "/v1/responses/{response_id}": {
            "get": op("A stored response, rebuilt from its reply; with stream=true its semantic events",
                      "openai",
                      {"200": response("The response; with `stream=true` its semantic events, replayed (or "
                                       "followed live) after `starting_after`",
                                       {**json_content(ref("Response")), **sse_content("ResponseEvent")}),
                       **errors(400, 401, 403, 404, openai=True),
                       "503": {"$ref": "#/components/responses/Error503"}},
                      parameters=[response_id,
                                  query("stream", {"enum": ["true", "false", "1", "0"]}, "Stream the events"),
                                  query("starting_after", {"type": "integer", "minimum": -1,
                                                           "maximum": INT32_MAX},
                                        "Resume after this sequence_number")]),
            "delete": op("Delete a stored response's turn (and its thread when nothing else is left; usage is "
                         "kept)", "openai",
                         {**ok(200, "Deleted", "ResponseDeleted"), **errors(401, 403, 404, openai=True),
                          "503": {"$ref": "#/components/responses/Error503"}},
                         parameters=[response_id]),
        },
        "/v1/responses/{response_id}/input_items": {"get": op(
            "A stored response's input items (its user message; other items were for the turn only)", "openai",
            {**ok(200, "A cursor page of input items", "ResponseItemList"), **errors(400, 401, 403, 404, openai=True),
             "503": {"$ref": "#/components/responses/Error503"}},
            parameters=[response_id,
                        query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}, "Page size"),
                        query("order", {"enum": ["asc", "desc"], "default": "desc"}, "Order"),
                        query("after", STRING, "List the items after this item id")])},
        "/v1/messages": {"post": op(
            "Anthropic Messages API (stream and non-stream)", "anthropic",
            {"200": response("The message; Anthropic's stream events when `stream` is true: `message_start`, "
                             "`content_block_start`, `ping`, `content_block_delta`..., `content_block_stop`, "
                             "`message_delta` (stop reason, usage), `message_stop`; or an `error` event",
                             {**json_content(ref("AnthropicMessage")), **sse_content("AnthropicStreamEvent")}),
             **anthropic_errors(400, 401, 403, 404, 413, 429, 502, 504, 529)},
            requestBody=json_body("AnthropicMessagesRequest"), security=ANTHROPIC_SECURITY,
            description="Stateless: no thread or message rows; usage is recorded once. The key goes in "
                        "`x-api-key` or `Authorization: Bearer`; `anthropic-version` is accepted, whatever "
                        "its value. Any configured model answers (OpenAI-compatible ones are translated). "
                        "Errors are in Anthropic's shape (a database outage answers the native 503).")},
        "/v1/messages/count_tokens": {"post": op(
            "The gateway's estimate of a Messages request's input tokens (what the policy reserves)", "anthropic",
            {**ok(200, "The estimate", "AnthropicTokenCount"), **anthropic_errors(400, 401, 403, 404, 413)},
            requestBody=json_body("AnthropicCountTokensRequest"), security=ANTHROPIC_SECURITY)},
        "/ws": {"get": op(
            "WebSocket chat: the same turns and events as POST /api/chat, as JSON text frames", "chat",
            {"101": response("Switching Protocols: the socket is open"), **errors(400, 401, 403, 503)},
            security=[{"bearerAuth": []}, {"queryToken": []}],
            description="Client frames: `{\"type\": \"chat\", ...}` (the fields of POST /api/chat), "
                        "`{\"type\": \"resume\", \"message_id\", \"last_event_id\"?}`, "
                        "`{\"type\": \"cancel\", \"message_id\"}`. A request that is not a WebSocket upgrade "
                        "answers 400 after authentication.")},
        "/api/keys": {
            "post": op("Create an API key (shown once)", "keys",
                       {**ok(201, "The key, with its secret", "CreatedKey"), **errors(400, 401, 403, 413, 503)},
                       requestBody=json_body("CreateKey"),
                       description="With an API key, needs the `admin` scope; the new key is the caller's "
                                   "child: its scopes, limits and expiry are within the caller's (403 otherwise), "
                                   "its usage counts against the caller's and every ancestor's limits, and "
                                   "revoking the caller revokes it. A signed-in user (JWT) creates keys of "
                                   "their own, with no parent."),
            "get": op("The caller's keys (admin: `all=true` for everybody's; a key without admin: itself "
                      "alone)", "keys",
                      {**ok(200, "The keys, newest first", "KeyList"), **errors(400, 401, 403, 503)},
                      parameters=[query("all", {"enum": ["true", "false"], "default": "false"},
                                        "Every user's keys (admin only)")]),
        },
        "/api/keys/{key_id}": {"delete": op(
            "Revoke a key and all its descendants (every instance stops accepting them within a second)", "keys",
            {**ok(204, "Revoked (also when it already was)"), **errors(400, 401, 403, 404, 503)},
            description="An API key without `admin` may revoke only itself (403 for any other id).",
            parameters=[path_id("key_id", "key")])},
        "/api/arena": {"post": op(
            "Dual chat: two models answer the same message side by side", "arena",
            {"200": response(SSE_DESCRIPTION + "; every data object carries `slot` a or b, ids are "
                             "`<comparison_id>:<seq a>:<seq b>`", sse_content("ArenaEvent")),
             **ok(202, "Accepted: both replies are generating", "ArenaAccepted"), **turn_errors},
            requestBody=json_body("ArenaRequest"),
            description="503 when fewer than two models are available for a random draw.")},
        "/api/comparisons/{comparison_id}": {"get": op(
            "A comparison (models named once voted, or when not anonymous)", "arena",
            {**ok(200, "The comparison", "Comparison"), **errors(400, 401, 403, 404, 503)},
            parameters=[comparison_id])},
        "/api/comparisons/{comparison_id}/stream": {"get": op(
            "Follow both slots of a comparison", "arena",
            {"200": response("Both slots' events (see POST /api/arena)", sse_content("ArenaEvent")),
             **ok(204, "Nothing after Last-Event-ID in either slot"), **errors(400, 401, 403, 404, 503)},
            parameters=[comparison_id, *RESUME_PARAMETERS], security=STREAM_SECURITY)},
        "/api/comparisons/{comparison_id}/vote": {"post": op(
            "Vote once, after both replies finished", "arena",
            {**ok(200, "The comparison with its vote", "Comparison"),
             **errors(400, 401, 403, 404, 409, 413, 503)},
            parameters=[comparison_id], requestBody=json_body("Vote"),
            description="The same vote again is a no-op; a different one, or one before both finished, is 409.")},
        "/api/leaderboard": {"get": op(
            "Bradley-Terry ratings from the votes (weak prior; raw and length-controlled), with 95% intervals",
            "arena",
            {**ok(200, "The ratings, best first", "Leaderboard"), **errors(400, 401, 503)},
            parameters=[query("include_named", {"type": "string", "default": "false",
                                                "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0)$"},
                              "Count votes on comparisons that were not anonymous")])},
        "/api/me": {"get": op(
            "The caller: user, key, limits in force, today's usage", "account",
            {**ok(200, "The caller", "Me"), **errors(401, 503)})},
        "/api/usage": {"get": op(
            "Tokens, cost and requests per day or per model (UTC days)", "account",
            {**ok(200, "The report", "UsageReport"), **errors(400, 401, 503)},
            parameters=[query("from", DATE, "First day (default: 29 days before `to`)"),
                        query("to", DATE, "Last day (default: today); the range spans at most 366 days"),
                        query("group_by", {"enum": ["day", "model", "day,model", "key", "day,key"],
                                           "default": "day"},
                              "Grouping (day,model: a row per model and day; key, day,key: per API key)")])},
        # -- budgets and spend: the usage export (added with the month and lifetime budgets) --------------
        "/api/usage/export": {"get": op(
            "Every reply's usage, one line each (CSV or NDJSON), streamed; admin: every user's", "account",
            {"200": response("The lines, oldest first", {"text/csv": {"schema": STRING},
                                                          "application/x-ndjson": {"schema": STRING}}),
             **errors(400, 401, 503)},
            parameters=[query("from", DATE, "First UTC day (default: 29 days before `to`)"),
                        query("to", DATE, "Last UTC day (default: today)"),
                        query("format", {"enum": ["csv", "ndjson"], "default": "csv"}, "Line format")])},
        # -- end of the budgets block ------------------------------------------------------------------------
        "/healthz": {"get": op("Liveness", "ops", ok(200, "The process answers", "Status"), security=PUBLIC)},
        "/readyz": {"get": op(
            "Readiness: the database answers and every migration is applied", "ops",
            {**ok(200, "Ready", "Status"), "503": response("Not ready", json_content(ref("Status")))},
            security=PUBLIC)},
        "/metrics": {"get": op(
            "Prometheus metrics (text exposition format)", "ops",
            {"200": response("The metrics", {"text/plain": {"schema": STRING}}), **errors(401)},
            security=[{}, {"metricsToken": []}],
            description="Open unless METRICS_TOKEN is set; absent from the public port when METRICS_PORT "
                        "serves it on a listener of its own.")},
        "/": {"get": op("The playground page (plain HTML and JS)", "ops",
                        {"200": response("The page", {"text/html": {"schema": STRING}})}, security=PUBLIC)},
        "/static/{filename}": {"get": op(
            "The playground's assets", "ops",
            {"200": response("The file", {"*/*": {"schema": {}}}), **errors(404)},
            parameters=[{"name": "filename", "in": "path", "required": True, "schema": STRING}],
            security=PUBLIC)},
        "/openapi.json": {"get": op(
            "This document", "ops", {"200": response("OpenAPI 3.1", json_content({"type": "object"}))},
            security=PUBLIC)},
        "/docs": {"get": op("Interactive API docs for this document (Swagger UI, served locally)", "ops",
                            {"200": response("The page", {"text/html": {"schema": STRING}})}, security=PUBLIC)},
        "/docs/{filename}": {"get": op(
            "The docs page's assets (Swagger UI's bundled script and stylesheet)", "ops",
            {"200": response("The file", {"*/*": {"schema": {}}}), **errors(404)},
            parameters=[{"name": "filename", "in": "path", "required": True, "schema": STRING}],
            security=PUBLIC)},
    }


# the request bodies defined as structs: their schemas are generated (with the structs they refer to)
BODIES: tuple[type[msgspec.Struct], ...] = (*native.BODIES, openai.ChatCompletionRequest)


def _generated(models: tuple[str, ...]) -> dict[str, Schema]:
    """The structs' JSON schemas for an app serving `models`: a model field names a configured model
    (or auto), which the handler checks against the configuration."""
    _, schemas = msgspec.json.schema_components(BODIES, ref_template="#/components/schemas/{name}")

    def models_enum(schema: Schema, names: list[str]) -> Schema:
        return {"enum": names, **{k: v for k, v in schema.items() if k not in ("type", "minLength")}}

    for name in ("ChatRequest", "RegenerateRequest"):
        field = schemas[name]["properties"]["model"]["anyOf"]
        field[0] = models_enum(field[0], [AUTO, *models])
    completion = schemas["ChatCompletionRequest"]["properties"]
    completion["model"] = models_enum(completion["model"], [AUTO, *models])
    schemas["ArenaRequest"]["properties"]["models"]["anyOf"][0]["items"] = {"enum": list(models)}
    for name in ("ChatRequest", "ArenaRequest"):  # the pattern says which forms (not the format's one alone)
        del schemas[name]["properties"]["thread_id"]["anyOf"][0]["format"]
    return schemas


@lru_cache(maxsize=8)
def openapi_document(models: tuple[str, ...]) -> dict[str, Any]:
    """The whole document for an app serving `models` (built once per set; callers must not mutate it)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Chat gateway", "version": __version__,
                 "description": "A streaming chat gateway: SSE chat over LLM providers, every message persisted."},
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "schemas": {**_schemas(models), **_generated(models)},
            "responses": {**error_responses("Error", "Error"), **error_responses("OpenAIError", "OpenAIError"),
                          **error_responses("AnthropicError", "AnthropicError"),
                          "AnthropicError502": response("The upstream failed before any output",
                                                        json_content(ref("AnthropicError"))),
                          "AnthropicError504": response("The upstream timed out before any output",
                                                        json_content(ref("AnthropicError"))),
                          "AnthropicError529": response("The upstream is overloaded (its 529, passed on)",
                                                        json_content(ref("AnthropicError"))),
                          "OpenAIError502": response("The upstream failed before any output",
                                                     json_content(ref("OpenAIError"))),
                          "OpenAIError504": response("The upstream timed out before any output",
                                                     json_content(ref("OpenAIError")))},
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
def _encoded(models: tuple[str, ...]) -> bytes:
    return orjson.dumps(openapi_document(models))


async def get_openapi(request: web.Request) -> web.Response:
    """Served without auth: the document describes the API, it grants nothing."""
    return web.Response(body=_encoded(tuple(request.app[MODELS].models)), content_type="application/json")
