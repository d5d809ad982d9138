"""A corpus of request bodies, each judged twice: by GET /openapi.json's schema for its route, and by the
running app's handler. The verdicts must agree: a body the document calls valid is not refused as
malformed (it may still fail later: an unknown thread is a 404), and a body the document calls invalid
is refused with a 400.

The corpus: valid bodies, wrong types, a thread id that is not a UUID, image URLs that are not ones
(`data:image/!!`, a space, control characters), NUL and other control characters in text, unknown
fields, values past their bounds, missing required fields; for the Responses and Anthropic doors also
input items, content blocks, tools with malformed schemas and tool results for unknown calls. Where
only code can judge (CODE_ONLY) the disagreement itself is asserted. The vendor doors' refusals keep
their vendor's shape, and their answers to valid bodies match the document's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import jsonschema_rs
import orjson
import pytest

PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
         "RU5ErkJggg==")
CONFIG = """
[models.echo]
provider = "demo"
"""
UNKNOWN_THREAD = str(uuid.UUID(int=7))


def image(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def text(value: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


# the turn fields POST /api/chat and POST /api/arena share: (name, body)
TURN = [
    ("valid", {"content": "hi"}),
    ("valid-nulls", {"content": "hi", "thread_id": None, "model": None, "client_message_id": None, "stream": None,
                     "max_tokens": None, "temperature": None}),
    ("valid-all", {"content": "hi", "client_message_id": "x" * 200, "max_tokens": 2**31 - 1, "temperature": 1,
                   "stream": False}),
    ("valid-control-characters", {"content": "a\x01b\x7f\x1bc"}),
    ("valid-unknown-thread", {"content": "hi", "thread_id": UNKNOWN_THREAD}),
    ("valid-uppercase-thread", {"content": "hi", "thread_id": UNKNOWN_THREAD.upper()}),
    ("unknown-field", {"content": "hi", "colour": "blue"}),
    ("missing-content", {}),
    ("content-null", {"content": None}),
    ("content-number", {"content": 5}),
    ("content-object", {"content": {"type": "text", "text": "hi"}}),
    ("content-empty", {"content": ""}),
    ("content-blank", {"content": " \n\t"}),
    ("content-blank-file-separator", {"content": "\x1c\x1f"}),  # Python's whitespace, not a regex's \s
    ("content-blank-nel", {"content": "\x85"}),
    ("content-bom", {"content": "\ufeff"}),  # a regex's \s, not Python's whitespace: not blank
    ("content-nul", {"content": "a\x00b"}),
    ("thread-number", {"content": "hi", "thread_id": 7}),
    ("thread-not-uuid", {"content": "hi", "thread_id": "not-a-uuid"}),
    ("thread-bare-hex", {"content": "hi", "thread_id": uuid.UUID(int=7).hex}),
    ("thread-braces", {"content": "hi", "thread_id": "{%s}" % UNKNOWN_THREAD}),
    ("thread-newline", {"content": "hi", "thread_id": UNKNOWN_THREAD + "\n"}),
    ("stream-string", {"content": "hi", "stream": "yes"}),
    ("stream-number", {"content": "hi", "stream": 1}),
    ("max-tokens-zero", {"content": "hi", "max_tokens": 0}),
    ("max-tokens-string", {"content": "hi", "max_tokens": "5"}),
    ("max-tokens-true", {"content": "hi", "max_tokens": True}),
    ("max-tokens-fraction", {"content": "hi", "max_tokens": 1.5}),
    ("max-tokens-int32-overflow", {"content": "hi", "max_tokens": 2**31}),
    ("max-tokens-int64-overflow", {"content": "hi", "max_tokens": 2**63}),
    ("temperature-string", {"content": "hi", "temperature": "hot"}),
    ("temperature-true", {"content": "hi", "temperature": True}),
    ("client-id-empty", {"content": "hi", "client_message_id": ""}),
    ("client-id-too-long", {"content": "hi", "client_message_id": "x" * 201}),
    ("client-id-number", {"content": "hi", "client_message_id": 7}),
    ("client-id-nul", {"content": "hi", "client_message_id": "a\x00b"}),
]

# content parts (POST /api/chat only: the arena takes a string)
PARTS = [
    ("parts-valid", {"content": [text("look"), image("https://example.com/a.png", detail="low"), image(PIXEL)]}),
    ("parts-image-alone", {"content": [image(PIXEL)]}),
    ("parts-control-characters", {"content": [text("a\x01b")]}),
    ("parts-empty", {"content": []}),
    ("parts-too-many", {"content": [text("hi")] * 101}),
    ("parts-a-string", {"content": ["hi"]}),
    ("parts-blank", {"content": [text(" ")]}),
    ("parts-unknown-type", {"content": [{"type": "audio", "audio": "x"}]}),
    ("parts-missing-type", {"content": [{"text": "hi"}]}),
    ("parts-missing-text", {"content": [{"type": "text"}]}),
    ("parts-text-number", {"content": [text(5)]}),
    ("parts-text-nul", {"content": [text("a\x00b")]}),
    ("parts-text-unknown-field", {"content": [text("hi", extra=1)]}),
    ("parts-image-a-string", {"content": [{"type": "image_url", "image_url": "https://example.com/a.png"}]}),
    ("parts-image-missing-url", {"content": [{"type": "image_url", "image_url": {}}]}),
    ("parts-image-unknown-field", {"content": [image(PIXEL, size=3)]}),
    ("parts-image-detail", {"content": [image(PIXEL, detail="ultra")]}),
    ("parts-data-url-not-base64", {"content": [image("data:image/!!")]}),
    ("parts-data-url-bad-payload", {"content": [image("data:image/png;base64,!!")]}),
    ("parts-data-url-text", {"content": [image("data:text/plain;base64,aGk=")]}),
    ("parts-url-space", {"content": [image("https://example.com/a b.png")]}),
    ("parts-url-tab", {"content": [image("https://example.com/a\tb.png")]}),
    ("parts-url-del", {"content": [image("https://example.com/a\x7fb.png")]}),
    ("parts-url-newline-at-end", {"content": [image("https://example.com/a.png\n")]}),
    ("parts-url-non-ascii", {"content": [image("https://example.com/é.png")]}),
    ("parts-url-nul", {"content": [image("https://example.com/\x00.png")]}),
    ("parts-url-ftp", {"content": [image("ftp://example.com/a.png")]}),
]

ARENA = [
    ("arena-models", {"content": "hi", "models": ["demo", "echo"], "anonymous": False}),
    ("arena-model-ignored", {"content": "hi", "model": 5}),
    ("arena-parts", {"content": [text("hi")]}),
    ("arena-same-models", {"content": "hi", "models": ["demo", "demo"]}),
    ("arena-one-model", {"content": "hi", "models": ["demo"]}),
    ("arena-unknown-model", {"content": "hi", "models": ["demo", "nope"]}),
    ("arena-models-numbers", {"content": "hi", "models": [1, 2]}),
    ("arena-anonymous-string", {"content": "hi", "anonymous": "no"}),
]

THREADS = [
    ("thread-valid", {"title": "t"}),
    ("thread-empty", {}),
    ("thread-null-title", {"title": None}),
    ("thread-unknown-field", {"title": "t", "colour": "blue"}),
    ("thread-control-characters", {"title": "a\x01b"}),
    ("thread-title-number", {"title": 5}),
    ("thread-title-too-long", {"title": "x" * 201}),
    ("thread-title-longest", {"title": "x" * 200}),
    ("thread-title-nul", {"title": "a\x00b"}),
]

HI = [{"role": "user", "content": "hi"}]
COMPLETIONS = [
    ("valid", {"model": "demo", "messages": HI}),
    ("valid-auto", {"model": "auto", "messages": HI, "stream": True, "stream_options": {"include_usage": True}}),
    ("valid-all", {"model": "demo", "messages": [{"role": "system", "content": "be brief"}, *HI], "max_tokens": 5,
                   "max_completion_tokens": 2**31 - 1, "temperature": 1, "top_p": 0.5, "stop": ["x"], "n": 1,
                   "seed": 3, "user": "u"}),
    ("valid-nulls", {"model": "demo", "messages": HI, "max_tokens": None, "temperature": None, "stop": None,
                     "n": None, "stream_options": None}),
    ("valid-control-characters", {"model": "demo", "messages": [{"role": "user", "content": "a\x01\x1bb"}]}),
    ("valid-parts", {"model": "demo", "messages": [{"role": "user", "content": [text("hi")]}]}),
    ("unknown-fields", {"model": "demo", "messages": HI, "metadata": {"a": 1}, "store": False}),
    ("unknown-message-fields", {"model": "demo", "messages": [{"role": "user", "content": "hi", "name": "n"}]}),
    ("unknown-model", {"model": "nope", "messages": HI}),
    ("missing-model", {"messages": HI}),
    ("model-number", {"model": 5, "messages": HI}),
    ("model-empty", {"model": "", "messages": HI}),
    ("missing-messages", {"model": "demo"}),
    ("messages-empty", {"model": "demo", "messages": []}),
    ("messages-object", {"model": "demo", "messages": {"role": "user"}}),
    ("message-a-string", {"model": "demo", "messages": ["hi"]}),
    ("message-role-unknown", {"model": "demo", "messages": [{"role": "wizard", "content": "hi"}]}),
    ("message-role-list", {"model": "demo", "messages": [{"role": ["user"], "content": "hi"}]}),
    ("message-role-missing", {"model": "demo", "messages": [{"content": "hi"}]}),
    ("message-content-number", {"model": "demo", "messages": [{"role": "user", "content": 5}]}),
    ("message-content-nul", {"model": "demo", "messages": [{"role": "user", "content": "a\x00b"}]}),
    ("stream-null", {"model": "demo", "messages": HI, "stream": None}),
    ("stream-string", {"model": "demo", "messages": HI, "stream": "yes"}),
    ("stream-options-false", {"model": "demo", "messages": HI, "stream_options": False}),
    ("include-usage-string", {"model": "demo", "messages": HI, "stream_options": {"include_usage": "yes"}}),
    ("max-tokens-zero", {"model": "demo", "messages": HI, "max_tokens": 0}),
    ("max-tokens-overflow", {"model": "demo", "messages": HI, "max_tokens": 2**63}),
    ("max-completion-tokens-string", {"model": "demo", "messages": HI, "max_completion_tokens": "5"}),
    ("temperature-high", {"model": "demo", "messages": HI, "temperature": 2.5}),
    ("temperature-true", {"model": "demo", "messages": HI, "temperature": True}),
    ("top-p-high", {"model": "demo", "messages": HI, "top_p": 2}),
    ("stop-number", {"model": "demo", "messages": HI, "stop": 5}),
    ("stop-numbers", {"model": "demo", "messages": HI, "stop": [5]}),
    ("n-two", {"model": "demo", "messages": HI, "n": 2}),
    ("n-true", {"model": "demo", "messages": HI, "n": True}),
]



def input_image(url: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "see"},
                                                           {"type": "input_image", "image_url": url}]}


def responses_body(input_: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "demo", "input": input_, "store": False, **extra}


def message(content: Any, role: str = "user", **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


CALL = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
CALL_OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
FUNCTION = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
RESPONSES = [
    ("valid", responses_body("hi")),
    ("valid-stored", {"model": "demo", "input": "hi"}),
    ("valid-image", responses_body([input_image(PIXEL)])),
    ("valid-image-url", responses_body([input_image("https://example.com/a.png")])),
    ("valid-items", responses_body([message("be brief", "developer"), message([{"type": "input_text", "text": "hi"}],
                                                                              type="message"),
                                    message([{"type": "output_text", "text": "hello"}], "assistant"), message("hi")])),
    ("valid-tool-loop", responses_body([message("weather?"), CALL, CALL_OUTPUT], tools=[FUNCTION],
                                       tool_choice={"type": "function", "name": "f"}, parallel_tool_calls=False)),
    ("valid-nulls", responses_body("hi", instructions=None, max_output_tokens=None, temperature=None, top_p=None,
                                   stream=None, previous_response_id=None, metadata=None, tools=None,
                                   tool_choice=None, parallel_tool_calls=None, user=None, reasoning=None)),
    ("valid-all", responses_body("hi", instructions="be brief", max_output_tokens=2**31 - 1, temperature=2, top_p=0.5,
                                 stream=False, metadata={"a": "b"}, tool_choice="none", user="u",
                                 reasoning={"effort": "low"})),
    ("valid-unknown-fields", responses_body("hi", truncation="auto", include=[])),
    ("valid-unknown-item-fields", responses_body([message("hi", id="msg_1", status="completed")])),
    ("valid-control-characters", responses_body("a\x01\x1bb")),
    ("missing-model", {"input": "hi"}),
    ("model-number", responses_body("hi", model=5)),
    ("unknown-model", responses_body("hi", model="nope")),
    ("missing-input", {"model": "demo"}),
    ("input-number", responses_body(5)),
    ("input-empty", responses_body([])),
    ("input-blank", responses_body(" ")),
    ("input-nul", responses_body("a\x00b")),
    ("input-a-string-item", responses_body(["hi"])),
    ("input-unknown-item-type", responses_body([{"type": "web_search_call", "id": "ws_1"}])),
    ("input-item-type-null", responses_body([message("hi", type=None)])),
    ("input-role-unknown", responses_body([message("hi", "wizard")])),
    ("input-content-missing", responses_body([{"role": "user"}])),
    ("input-content-number", responses_body([message(5)])),
    ("input-content-empty", responses_body([message([])])),
    ("input-content-nul", responses_body([message("a\x00b")])),
    ("input-part-unknown-type", responses_body([message([{"type": "input_audio", "data": "x"}])])),
    ("input-part-missing-type", responses_body([message([{"text": "hi"}])])),
    ("input-part-text-number", responses_body([message([{"type": "input_text", "text": 5}])])),
    ("input-part-text-nul", responses_body([message([{"type": "input_text", "text": "a\x00b"}])])),
    ("image-data-url-not-base64", responses_body([input_image("data:image/!!")])),
    ("image-url-space", responses_body([input_image("https://example.com/a b.png")])),
    ("image-url-control", responses_body([input_image("https://example.com/\x01")])),
    ("image-url-nul", responses_body([input_image("https://example.com/\x00")])),
    ("image-url-missing", responses_body([message([{"type": "input_image"}])])),
    ("image-detail-ultra", responses_body([message([{"type": "input_image", "image_url": PIXEL, "detail": "ultra"}])])),
    ("function-call-arguments-object", responses_body([message("hi"), {**CALL, "arguments": {}}, CALL_OUTPUT])),
    ("function-call-name-missing", responses_body([message("hi"), {k: v for k, v in CALL.items() if k != "name"},
                                                   CALL_OUTPUT])),
    ("function-call-output-nul", responses_body([message("hi"), CALL, {**CALL_OUTPUT, "output": "a\x00b"}])),
    ("function-call-output-unknown-id", responses_body([message("hi"), CALL, {**CALL_OUTPUT, "call_id": "call_9"}])),
    ("stored-last-not-user", {"model": "demo", "input": [message("hi", "assistant")]}),
    ("instructions-number", responses_body("hi", instructions=5)),
    ("instructions-nul", responses_body("hi", instructions="a\x00b")),
    ("user-number", responses_body("hi", user=5)),
    ("user-nul", responses_body("hi", user="a\x00b")),
    ("previous-response-id-number", responses_body("hi", previous_response_id=5)),
    ("max-output-tokens-zero", responses_body("hi", max_output_tokens=0)),
    ("max-output-tokens-overflow", responses_body("hi", max_output_tokens=2**31)),
    ("temperature-high", responses_body("hi", temperature=2.5)),
    ("top-p-string", responses_body("hi", top_p="1")),
    ("stream-string", responses_body("hi", stream="yes")),
    ("store-string", {"model": "demo", "input": "hi", "store": "no"}),
    ("metadata-list", responses_body("hi", metadata=[])),
    ("reasoning-string", responses_body("hi", reasoning="high")),
    ("tools-object", responses_body("hi", tools=FUNCTION)),
    ("tools-not-function", responses_body("hi", tools=[{"type": "web_search"}])),
    ("tools-name-number", responses_body("hi", tools=[{**FUNCTION, "name": 5}])),
    ("tools-malformed-schema", responses_body("hi", tools=[{**FUNCTION, "parameters": "not a schema"}])),
    ("tools-schema-not-object", responses_body("hi", tools=[{**FUNCTION, "parameters": {"type": "string"}}])),
    ("tools-name-empty", responses_body("hi", tools=[{**FUNCTION, "name": ""}])),
    ("tools-description-number", responses_body("hi", tools=[{**FUNCTION, "description": 5}])),
    ("tool-choice-unknown", responses_body("hi", tools=[FUNCTION], tool_choice="sometimes")),
    ("tool-choice-function-without-name", responses_body("hi", tools=[FUNCTION], tool_choice={"type": "function"})),
    ("parallel-tool-calls-string", responses_body("hi", parallel_tool_calls="no")),
]


def anthropic_body(messages: Any = None, **extra: Any) -> dict[str, Any]:
    return {"model": "demo", "max_tokens": 5, "messages": HI if messages is None else messages, **extra}


def blocks(*content: Any, role: str = "user") -> list[dict[str, Any]]:
    return [{"role": role, "content": list(content)}]


def url_image(url: str) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "url", "url": url}}


PNG = PIXEL.split(",", 1)[1]
BASE64_IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
TOOL = {"name": "f", "description": "weather", "input_schema": {"type": "object", "properties": {}}}
TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
TOOL_RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
TOOL_LOOP = [*HI, *blocks(TOOL_USE, role="assistant"), *blocks(TOOL_RESULT)]
ANTHROPIC = [
    ("valid", anthropic_body()),
    ("valid-system", anthropic_body(system="be brief")),
    ("valid-system-blocks", anthropic_body(system=[{"type": "text", "text": "be brief"}])),
    ("valid-blocks", anthropic_body(blocks({"type": "text", "text": "see"}, BASE64_IMAGE,
                                           url_image("https://example.com/a.png")))),
    ("valid-tool-loop", anthropic_body(TOOL_LOOP, tools=[TOOL], tool_choice={"type": "tool", "name": "f"})),
    ("valid-nulls", anthropic_body(system=None, tools=None, tool_choice=None, stream=None, stop_sequences=None,
                                   temperature=None, top_p=None, metadata=None, thinking=None)),
    ("valid-all", anthropic_body(stream=False, stop_sequences=["x"], temperature=1, top_p=0.5,
                                 metadata={"user_id": "u"}, tool_choice={"type": "auto"}, tools=[TOOL])),
    ("valid-control-characters", anthropic_body([{"role": "user", "content": "a\x01\x1bb"}])),
    ("valid-unknown-fields", anthropic_body(top_k=3, service_tier="auto")),
    ("valid-unknown-block-fields", anthropic_body(blocks({"type": "text", "text": "hi", "citations": None}))),
    ("valid-wide-integers", anthropic_body([*HI, *blocks({**TOOL_USE, "input": {"n": -(2**65)}}, role="assistant"),
                                            *blocks(TOOL_RESULT)], tools=[{**TOOL, "input_schema": {
                                                "type": "object", "maximum": 2**70}}])),
    ("missing-model", {"max_tokens": 5, "messages": HI}),
    ("model-number", anthropic_body(model=5)),
    ("unknown-model", anthropic_body(model="nope")),
    ("missing-max-tokens", {"model": "demo", "messages": HI}),
    ("max-tokens-zero", anthropic_body(max_tokens=0)),
    ("max-tokens-string", anthropic_body(max_tokens="5")),
    ("max-tokens-null", anthropic_body(max_tokens=None)),
    ("max-tokens-overflow", anthropic_body(max_tokens=2**31)),
    ("missing-messages", {"model": "demo", "max_tokens": 5}),
    ("messages-empty", anthropic_body([])),
    ("messages-object", anthropic_body({"role": "user", "content": "hi"})),
    ("role-system", anthropic_body([{"role": "system", "content": "hi"}])),
    ("content-number", anthropic_body([{"role": "user", "content": 5}])),
    ("content-nul", anthropic_body([{"role": "user", "content": "a\x00b"}])),
    ("block-unknown-type", anthropic_body(blocks({"type": "audio", "data": "x"}))),
    ("block-missing-type", anthropic_body(blocks({"text": "hi"}))),
    ("block-text-number", anthropic_body(blocks({"type": "text", "text": 5}))),
    ("block-text-nul", anthropic_body(blocks({"type": "text", "text": "a\x00b"}))),
    ("image-data-url", anthropic_body(blocks(url_image("data:image/!!")))),
    ("image-url-space", anthropic_body(blocks(url_image("https://example.com/a b.png")))),
    ("image-url-control", anthropic_body(blocks(url_image("https://example.com/\x01")))),
    ("image-base64-not-base64", anthropic_body(blocks({**BASE64_IMAGE, "source": {**BASE64_IMAGE["source"],
                                                                                   "data": "!!"}}))),
    ("image-media-type-words", anthropic_body(blocks({**BASE64_IMAGE, "source": {**BASE64_IMAGE["source"],
                                                                                  "media_type": "a png"}}))),
    ("image-source-unknown", anthropic_body(blocks({"type": "image", "source": {"type": "file", "file_id": "f"}}))),
    ("system-number", anthropic_body(system=5)),
    ("system-nul", anthropic_body(system="a\x00b")),
    ("system-image", anthropic_body(system=[BASE64_IMAGE])),
    ("user-tool-use", anthropic_body(blocks(TOOL_USE))),
    ("assistant-tool-result", anthropic_body([*HI, *blocks(TOOL_RESULT, role="assistant")])),
    ("tool-result-unknown-id", anthropic_body([*TOOL_LOOP[:2], *blocks({**TOOL_RESULT, "tool_use_id": "toolu_9"})],
                                              tools=[TOOL])),
    ("tool-result-content-number", anthropic_body([*TOOL_LOOP[:2], *blocks({**TOOL_RESULT, "content": 5})])),
    ("tool-use-input-string", anthropic_body([*HI, *blocks({**TOOL_USE, "input": "{}"}, role="assistant")])),
    ("tools-object", anthropic_body(tools=TOOL)),
    ("tools-name-empty", anthropic_body(tools=[{**TOOL, "name": ""}])),
    ("tools-malformed-schema", anthropic_body(tools=[{**TOOL, "input_schema": "not a schema"}])),
    ("tools-missing-schema", anthropic_body(tools=[{"name": "f"}])),
    ("tools-schema-not-object", anthropic_body(tools=[{**TOOL, "input_schema": {"type": "array"}}])),
    ("tool-choice-unknown", anthropic_body(tools=[TOOL], tool_choice={"type": "sometimes"})),
    ("tool-choice-tool-without-name", anthropic_body(tools=[TOOL], tool_choice={"type": "tool"})),
    ("tool-choice-string", anthropic_body(tools=[TOOL], tool_choice="auto")),
    ("thinking-budget-low", anthropic_body(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 10})),
    ("stream-string", anthropic_body(stream="yes")),
    ("stop-sequences-string", anthropic_body(stop_sequences="x")),
    ("temperature-high", anthropic_body(temperature=1.5)),
    ("top-p-string", anthropic_body(top_p="1")),
    ("metadata-user-number", anthropic_body(metadata={"user_id": 5})),
]

# What only code can check, so the document calls these valid and the handler refuses them (400): which
# tool call a tool result answers (an earlier assistant message's), that a stored turn ends with the user's
# message, which blocks a role may hold, that the system prompt is text.
CODE_ONLY = {
    ("/v1/responses", "function-call-output-unknown-id"), ("/v1/responses", "stored-last-not-user"),
    ("/v1/messages", "system-image"), ("/v1/messages", "user-tool-use"), ("/v1/messages", "assistant-tool-result"),
    ("/v1/messages", "tool-result-unknown-id"), ("/v1/messages/count_tokens", "system-image"),
    ("/v1/messages/count_tokens", "tool-result-unknown-id"),
}

# count_tokens takes the prompt alone: max_tokens, stream and the sampling fields are not read
COUNT_TOKENS = [
    ("valid", {"model": "demo", "messages": HI}),
    ("valid-tool-loop", {"model": "demo", "messages": TOOL_LOOP, "tools": [TOOL], "system": "be brief"}),
    ("valid-ignored-fields", {"model": "demo", "messages": HI, "max_tokens": "x", "stream": "yes"}),
    ("valid-wide-integer", {"model": "demo", "messages": [*HI, *blocks({**TOOL_USE, "input": {"n": 2**64}},
                                                                       role="assistant"), *blocks(TOOL_RESULT)]}),
    ("missing-model", {"messages": HI}),
    ("missing-messages", {"model": "demo"}),
    ("messages-empty", {"model": "demo", "messages": []}),
    ("content-nul", {"model": "demo", "messages": [{"role": "user", "content": "a\x00b"}]}),
    ("image-data-url", {"model": "demo", "messages": blocks(url_image("data:image/!!"))}),
    ("image-url-space", {"model": "demo", "messages": blocks(url_image("https://example.com/a b.png"))}),
    ("system-image", {"model": "demo", "messages": HI, "system": [BASE64_IMAGE]}),
    ("tools-malformed-schema", {"model": "demo", "messages": HI, "tools": [{**TOOL, "input_schema": []}]}),
    ("tool-result-unknown-id", {"model": "demo", "messages": [*TOOL_LOOP[:2],
                                                              *blocks({**TOOL_RESULT, "tool_use_id": "toolu_9"})]}),
]

KEYS = [
    ("valid", {"name": "k"}),
    ("valid-all", {"name": "k", "scopes": ["chat", "chat"], "expires_at": "2999-01-01T00:00:00+00:00",
                   "limits": {"requests_per_minute": 5, "daily_tokens": 10, "max_concurrent_streams": 1,
                              "max_tokens": 2**31 - 1, "daily_cost_usd": 1.5, "models": ["demo", "demo"]}}),
    ("valid-nulls", {"name": "k", "scopes": None, "expires_at": None, "limits": None, "user_id": None}),
    ("valid-limit-nulls", {"name": "k", "limits": {"daily_tokens": None, "models": None}}),
    ("valid-limits-empty", {"name": "k", "limits": {}}),
    ("valid-cost-integer", {"name": "k", "limits": {"daily_cost_usd": 12}}),
    ("valid-unknown-field", {"name": "k", "colour": "blue"}),
    ("valid-control-characters", {"name": "a\x01b"}),
    ("valid-longest-name", {"name": "x" * 100}),
    ("valid-user-id", {"name": "k", "user_id": str(uuid.UUID(int=9))}),
    ("valid-user-id-bare-hex", {"name": "k", "user_id": uuid.UUID(int=10).hex}),
    ("name-missing", {}),
    ("name-null", {"name": None}),
    ("name-number", {"name": 7}),
    ("name-empty", {"name": ""}),
    ("name-blank", {"name": " \t"}),
    ("name-too-long", {"name": "x" * 101}),
    ("name-nul", {"name": "a\x00b"}),
    ("scopes-empty", {"name": "k", "scopes": []}),
    ("scopes-string", {"name": "k", "scopes": "chat"}),
    ("scopes-unknown", {"name": "k", "scopes": ["chat", "root"]}),
    ("scopes-numbers", {"name": "k", "scopes": [1]}),
    ("expires-no-timezone", {"name": "k", "expires_at": "2999-01-01T00:00:00"}),
    ("expires-words", {"name": "k", "expires_at": "tomorrow"}),
    ("expires-number", {"name": "k", "expires_at": 4102444800}),
    ("limits-list", {"name": "k", "limits": []}),
    ("limits-unknown-field", {"name": "k", "limits": {"burst": 3}}),
    ("limits-rpm-zero", {"name": "k", "limits": {"requests_per_minute": 0}}),
    ("limits-rpm-int32-overflow", {"name": "k", "limits": {"requests_per_minute": 2**31}}),
    ("limits-tokens-true", {"name": "k", "limits": {"daily_tokens": True}}),
    ("limits-max-tokens-fraction", {"name": "k", "limits": {"max_tokens": 1.5}}),
    ("limits-streams-string", {"name": "k", "limits": {"max_concurrent_streams": "2"}}),
    ("limits-cost-zero", {"name": "k", "limits": {"daily_cost_usd": 0}}),
    ("limits-cost-huge", {"name": "k", "limits": {"daily_cost_usd": 1e9}}),
    ("limits-cost-string", {"name": "k", "limits": {"daily_cost_usd": "12"}}),
    ("limits-models-string", {"name": "k", "limits": {"models": "demo"}}),
    ("limits-models-numbers", {"name": "k", "limits": {"models": [1]}}),
    ("limits-models-empty", {"name": "k", "limits": {"models": []}}),
    ("limits-models-empty-name", {"name": "k", "limits": {"models": [""]}}),
    ("limits-models-nul", {"name": "k", "limits": {"models": ["a\x00b"]}}),
    ("limits-models-too-many", {"name": "k", "limits": {"models": ["demo"] * 101}}),
    ("user-id-not-uuid", {"name": "k", "user_id": "not-a-uuid"}),
    ("user-id-braces", {"name": "k", "user_id": "{%s}" % uuid.UUID(int=9)}),
    ("user-id-number", {"name": "k", "user_id": 9}),
]

EMBEDDINGS = [
    ("valid", {"model": "demo", "input": "hi"}),
    ("valid-strings", {"model": "demo", "input": ["a", "b"]}),
    ("valid-tokens", {"model": "demo", "input": [1, 2, 3]}),
    ("valid-largest-token", {"model": "demo", "input": [2**64 - 1]}),
    ("valid-token-arrays", {"model": "demo", "input": [[1], [2, 3]]}),
    ("valid-all", {"model": "demo", "input": "hi", "dimensions": 8, "encoding_format": "base64", "user": "u"}),
    ("valid-nulls", {"model": "demo", "input": "hi", "dimensions": None, "encoding_format": None, "user": None}),
    ("valid-unknown-fields", {"model": "demo", "input": "hi", "colour": "blue"}),
    ("valid-control-characters", {"model": "demo", "input": "a\x01\x1bb"}),
    ("missing-model", {"input": "hi"}),
    ("model-number", {"model": 5, "input": "hi"}),
    ("model-empty", {"model": "", "input": "hi"}),
    ("unknown-model", {"model": "nope", "input": "hi"}),
    ("missing-input", {"model": "demo"}),
    ("input-empty", {"model": "demo", "input": ""}),
    ("input-nul", {"model": "demo", "input": "a\x00b"}),
    ("input-number", {"model": "demo", "input": 5}),
    ("input-object", {"model": "demo", "input": {"text": "hi"}}),
    ("input-empty-list", {"model": "demo", "input": []}),
    ("input-mixed", {"model": "demo", "input": ["a", 1]}),
    ("input-empty-string-item", {"model": "demo", "input": [""]}),
    ("input-nul-item", {"model": "demo", "input": ["a\x00b"]}),
    ("input-too-many", {"model": "demo", "input": ["a"] * 2049}),
    ("input-negative-token", {"model": "demo", "input": [-1]}),
    ("input-token-true", {"model": "demo", "input": [True]}),
    ("input-token-fraction", {"model": "demo", "input": [1.5]}),
    ("input-empty-token-array", {"model": "demo", "input": [[]]}),
    ("dimensions-zero", {"model": "demo", "input": "hi", "dimensions": 0}),
    ("dimensions-string", {"model": "demo", "input": "hi", "dimensions": "8"}),
    ("dimensions-true", {"model": "demo", "input": "hi", "dimensions": True}),
    ("dimensions-too-many", {"model": "demo", "input": "hi", "dimensions": 65537}),
    ("encoding-format-hex", {"model": "demo", "input": "hi", "encoding_format": "hex"}),
    ("encoding-format-number", {"model": "demo", "input": "hi", "encoding_format": 5}),
    ("user-number", {"model": "demo", "input": "hi", "user": 5}),
]

CASES = ([("/api/chat", name, body) for name, body in TURN + PARTS + [("chat-model-unknown", {"content": "hi",
                                                                                            "model": "nope"}),
                                                                   ("chat-model-number", {"content": "hi",
                                                                                          "model": 5})]]
         + [("/api/arena", name, body) for name, body in TURN + ARENA]
         + [("/api/threads", name, body) for name, body in THREADS]
         + [("/v1/chat/completions", name, body) for name, body in COMPLETIONS]
         + [("/v1/responses", name, body) for name, body in RESPONSES]
         + [("/v1/messages", name, body) for name, body in ANTHROPIC]
         + [("/v1/messages/count_tokens", name, body) for name, body in COUNT_TOKENS]
         + [("/api/keys", name, body) for name, body in KEYS]
         + [("/v1/embeddings", name, body) for name, body in EMBEDDINGS])


def body_validator(document: dict[str, Any], path: str) -> jsonschema_rs.Validator:
    """The document's schema for `path`'s JSON request body (found through the path, not by name)."""
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema_rs.Draft202012Validator({**schema, "components": document["components"]},
                                              validate_formats=True)


def encoded(body: dict[str, Any]) -> bytes:
    """The body as JSON (an integer beyond 64 bits, which orjson cannot encode, through the json module)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body).encode()


@pytest.fixture
async def corpus_client(make_client: Any, config_file: Callable[[str], str]) -> Any:
    return await make_client(GATEWAY_CONFIG=config_file(CONFIG), DEMO_CHUNKS="2")


@pytest.mark.parametrize(("path", "name", "body"), CASES, ids=[f"{p}:{n}" for p, n, _ in CASES])
async def test_the_documents_verdict_is_the_handlers(corpus_client: Any, make_user: Any, path: str, name: str,
                                                     body: dict[str, Any]) -> None:
    user = await make_user(("chat", "arena", "admin"))  # admin: POST /api/keys
    document = orjson.loads(await (await corpus_client.get("/openapi.json")).read())
    valid = body_validator(document, path).is_valid(body)
    resp = await corpus_client.post(path, data=encoded(body),
                                    headers={**user.headers, "Content-Type": "application/json"})
    answer = await resp.read()
    assert resp.status != 500, answer
    # what the document cannot know: whether the thread exists (an unknown model is in the document:
    # OpenAI answers it with a 404)
    later = resp.status == 404 and b"model_not_found" not in answer and b'"message":"model: ' not in answer
    if (path, name) in CODE_ONLY:
        assert valid and resp.status == 400, (resp.status, answer)
    else:
        assert (resp.status < 300 or later) == valid, (resp.status, answer)
    if resp.status == 200 and path.startswith("/v1/") and resp.content_type == "application/json":
        # the vendor doors' answers (not streamed) as the document states them
        schema = document["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        validator = jsonschema_rs.Draft202012Validator({**schema, "components": document["components"]})
        assert validator.is_valid(orjson.loads(answer)), answer
    if name.startswith(("valid", "parts-valid", "parts-image-alone", "thread-valid")):
        assert valid
    if path == "/v1/chat/completions" and resp.status >= 400:  # OpenAI's shape, the field named as OpenAI names it
        error = orjson.loads(answer)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == PARAMS.get(name, name.split("-")[0]), error
    if path == "/v1/embeddings" and resp.status >= 400:  # OpenAI's shape, `param` the body's field
        error = orjson.loads(answer)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == EMBEDDING_PARAMS.get(name, name.split("-")[0]), error
    if path == "/v1/responses" and resp.status >= 400:  # OpenAI's shape, `param` naming the field
        error = orjson.loads(answer)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"], error
    if path.startswith("/v1/messages") and resp.status >= 400:  # Anthropic's shape
        error = orjson.loads(answer)
        assert error["type"] == "error" and set(error["error"]) == {"type", "message"}, error
        assert error["error"]["type"] == ("not_found_error" if resp.status == 404 else "invalid_request_error")
    if path == "/api/keys" and resp.status >= 400:  # the native shape, the message naming the field
        error = orjson.loads(answer)["error"]
        assert error["type"] == "invalid_request" and error["message"].split(" ")[0].split(".")[0] in (
            KEY_FIELDS.get(name, name.split("-")[0]), "unknown"), error


# where `param` is not the first word of the case's name
PARAMS = {"unknown-model": "model", "message-a-string": "messages[0]", "message-role-unknown": "messages[0]",
          "message-role-list": "messages[0]", "message-role-missing": "messages[0]",
          "message-content-number": "messages[0]", "message-content-nul": "messages[0]",
          "max-tokens-zero": "max_tokens", "max-tokens-overflow": "max_tokens",
          "max-completion-tokens-string": "max_completion_tokens", "stream-options-false": "stream_options",
          "include-usage-string": "stream_options", "top-p-high": "top_p", "n-two": "n", "n-true": "n",
          "messages-empty": "messages", "messages-object": "messages", "missing-model": "model",
          "missing-messages": "messages"}

EMBEDDING_PARAMS = {"missing-model": "model", "unknown-model": "model", "missing-input": "input",
                    "encoding-format-hex": "encoding_format", "encoding-format-number": "encoding_format"}
KEY_FIELDS = {"user-id-not-uuid": "user_id", "user-id-braces": "user_id", "user-id-number": "user_id",
              "expires-no-timezone": "expires_at", "expires-words": "expires_at", "expires-number": "expires_at"}
