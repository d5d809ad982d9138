"""The Gemini adapter against a real local server speaking Google AI's exact stream format; the
fake checks every request body against the official SDK's types (tests/support/gemini.py)."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from gateway.config import GEMINI_BASE_URL, ConfigError, Settings
from gateway.providers.base import (
    ChatRequest,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Unsupported,
    UpstreamConnectionError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamStreamError,
    UsageReport,
)
from gateway.providers.chain import Chain
from gateway.providers.gemini import GeminiProvider, unsupported
from tests.support.fakes import FakeUpstream, Reply, openai_stream
from tests.support.gemini import FakeGemini, GeminiReply, error_body, response, sse, text_stream, usage
from tests.support.providers import collect, trail

HI = [{"role": "user", "content": "Hi"}]
KEY = "AIza-test-key-0123456789"
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def toml(fake: FakeGemini, upstream: str = "gemini-2.5-flash") -> str:
    return f"""
[providers.google]
kind = "gemini"
base_url = "{fake.base_url}"
api_key = "{KEY}"
[models.gem]
provider = "google"
upstream = "{upstream}"
"""


async def run(fake: FakeGemini, config_file: Any, request: ChatRequest,
              upstream: str = "gemini-2.5-flash") -> tuple[list[Any], Any]:
    settings = Settings.from_env({"GATEWAY_CONFIG": config_file(toml(fake, upstream))})
    async with aiohttp.ClientSession() as session:
        provider = GeminiProvider(settings.providers["google"], session)
        try:
            return await collect(provider.stream(settings.models["gem"], request))
        finally:
            provider.close()


async def test_gemini_text_stream_normalised_with_its_usage(gemini, config_file):
    request = ChatRequest([{"role": "system", "content": "Be brief."}, *HI], max_tokens=50, temperature=0.2,
                          top_p=0.9, stop="END")
    events, error = await run(gemini, config_file, request)
    assert error is None
    assert events == [TextDelta("Hello"), TextDelta(" world"), Finish("stop"), UsageReport(12, 2)]
    seen = gemini.seen[0]
    assert (seen.model, seen.method, seen.query) == ("gemini-2.5-flash", "streamGenerateContent", "alt=sse")
    assert seen.headers["x-goog-api-key"] == KEY and "Authorization" not in seen.headers
    assert seen.body == {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"maxOutputTokens": 50, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"]},
    }
    assert seen.problems == []


async def test_gemini_events_split_at_every_byte(gemini, config_file):
    gemini.default.piece = 1
    events, error = await run(gemini, config_file, ChatRequest(HI))
    assert error is None
    assert events == [TextDelta("Hello"), TextDelta(" world"), Finish("stop"), UsageReport(12, 2)]


async def test_cached_and_thinking_tokens_are_read_and_thoughts_stream_as_reasoning(gemini, config_file):
    gemini.queue(GeminiReply(sse(
        response([{"text": "Weighing it up", "thought": True}], usage=usage(prompt=170, cached=150, thoughts=30)),
        response([{"text": "Yes.", "thoughtSignature": "c2lnbmF0dXJl"}], "STOP",
                 usage(prompt=170, output=2, cached=150, thoughts=30)))))
    events, error = await run(gemini, config_file, ChatRequest(HI, thinking={"type": "enabled",
                                                                             "budget_tokens": 2048}))
    assert error is None
    # the prompt count includes the cached tokens; thinking is billed as output
    assert events == [ReasoningDelta("Weighing it up"), ReasoningDelta("", "c2lnbmF0dXJl"), TextDelta("Yes."),
                      Finish("stop"), UsageReport(170, 32, cached_tokens=150, reasoning_tokens=30)]
    assert gemini.requests[0]["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 2048,
                                                                         "includeThoughts": True}}
    assert gemini.seen[0].problems == []


@pytest.mark.parametrize(("effort", "budget"), [("low", 1024), ("medium", 8192), ("high", 24576)])
async def test_reasoning_effort_is_a_thinking_budget(gemini, config_file, effort, budget):
    await run(gemini, config_file, ChatRequest(HI, extra={"reasoning_effort": effort}))
    assert gemini.requests[0]["generationConfig"] == {"thinkingConfig": {"thinkingBudget": budget,
                                                                         "includeThoughts": True}}


async def test_suspect_counts_keep_no_cache_or_reasoning_split(gemini, config_file):
    gemini.queue(GeminiReply(sse(response([{"text": "x"}], "STOP", {
        "promptTokenCount": -4, "candidatesTokenCount": 1, "cachedContentTokenCount": 3, "thoughtsTokenCount": 1,
        "totalTokenCount": 1}))))
    events, _ = await run(gemini, config_file, ChatRequest(HI))
    assert events[-1] == UsageReport(0, 2, suspect=True)


@pytest.mark.parametrize(("reason", "finish"), [
    ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("PROHIBITED_CONTENT", "content_filter"), ("OTHER", "other"),
    ("MALFORMED_FUNCTION_CALL", "malformed_function_call")])
async def test_finish_reasons_are_mapped(gemini, config_file, reason, finish):
    gemini.queue(GeminiReply(text_stream(["Cut"], finish=reason)))
    events, error = await run(gemini, config_file, ChatRequest(HI))
    assert error is None and events == [TextDelta("Cut"), Finish(finish), UsageReport(12, 1)]


async def test_a_blocked_prompt_ends_as_content_filter(gemini, config_file):
    gemini.queue(GeminiReply(sse(response(promptFeedback={"blockReason": "SAFETY"}, usage={
        "promptTokenCount": 9, "totalTokenCount": 9}))))
    events, error = await run(gemini, config_file, ChatRequest(HI))
    assert error is None and events == [Finish("content_filter"), UsageReport(9, 0)]


async def test_a_stream_without_a_finish_reason_is_truncated(gemini, config_file):
    gemini.queue(GeminiReply(sse(response([{"text": "Hel"}], usage=usage(output=1)))))
    events, error = await run(gemini, config_file, ChatRequest(HI))
    assert events == [TextDelta("Hel")]
    assert isinstance(error, UpstreamProtocolError) and error.message == "upstream stream ended without a finishReason"


async def test_a_connection_cut_mid_stream_keeps_what_came_and_fails(gemini, config_file):
    body = text_stream(["One", " two", " three"])
    first = body.index(b"\r\n\r\n") + 4
    gemini.queue(GeminiReply(body, piece=first, cut_after=1))
    events, error = await run(gemini, config_file, ChatRequest(HI))
    assert events == [TextDelta("One")]
    assert isinstance(error, UpstreamConnectionError)


async def test_an_error_mid_stream_is_a_stream_error_scrubbed_of_the_key(gemini, config_file):
    gemini.queue(GeminiReply(sse(response([{"text": "Hel"}]),
                                 {"error": {"code": 503, "message": f"overloaded (key {KEY})",
                                            "status": "UNAVAILABLE"}})))
    events, error = await run(gemini, config_file, ChatRequest(HI))
    assert events == [TextDelta("Hel")]
    assert isinstance(error, UpstreamStreamError)
    assert error.message == "upstream error mid-stream: UNAVAILABLE: overloaded (key [redacted])"


@pytest.mark.parametrize(("status", "retryable"), [(429, True), (403, True), (503, True), (400, False)])
async def test_an_error_answer_is_an_http_error_with_googles_message(gemini, config_file, status, retryable):
    gemini.queue(GeminiReply(error_body(status, "Request had a problem", "SOME_STATUS"), status=status))
    events, error = await run(gemini, config_file, ChatRequest(HI))
    assert events == []
    assert isinstance(error, UpstreamHTTPError)
    assert (error.status, error.message, error.retryable) == (
        status, f"upstream answered {status}: Request had a problem", retryable)


async def test_the_model_path_and_a_models_prefix(gemini, config_file):
    await run(gemini, config_file, ChatRequest(HI), upstream="models/gemini-2.0-flash-001")
    assert gemini.seen[0].model == "gemini-2.0-flash-001"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}


async def test_tools_calls_and_results_are_rendered_as_gemini_parts(gemini, config_file):
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": [
            {"type": "reasoning", "text": "Two cities: two calls.", "signature": "c2ln"}], "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp_c":18}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "sunny"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_c", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Nowhere"}'}}]},
        {"role": "tool", "tool_call_id": "call_c", "content": "no such city", "is_error": True},
    ]
    request = ChatRequest(messages, extra={"tools": [WEATHER], "tool_choice": "required",
                                           "parallel_tool_calls": True, "user": "u-1"})
    _, error = await run(gemini, config_file, request)
    assert error is None
    assert gemini.seen[0].problems == []
    assert gemini.requests[0] == {
        "contents": [
            {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
            # the signature goes back on the turn's first call, where Gemini put it
            {"role": "model", "parts": [{"text": "Two cities: two calls.", "thought": True},
                                        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                                         "thoughtSignature": "c2ln"},
                                        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]},
            # the results of parallel calls go back together, named by their function
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp_c": 18}}},
                {"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Nowhere"}},
                                         "thoughtSignature": "skip_thought_signature_validator"}]},
            # a result marked as an error goes back under `error`
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"error": "no such city"}}}]},
        ],
        "tools": [{"functionDeclarations": [{"name": "get_weather", "description": "The weather in a city",
                                             "parametersJsonSchema": WEATHER["function"]["parameters"]}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
    }


async def test_a_call_whose_signature_was_not_kept_carries_the_value_google_documents_for_it(gemini, config_file):
    # a call made by another model, or through a door with no place for Gemini's signature
    messages = [*HI, {"role": "assistant", "content": "Looking.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
                {"role": "tool", "tool_call_id": "call_a", "content": "-2C"},
                {"role": "tool", "tool_call_id": "call_b", "content": "19C"}]
    await run(gemini, config_file, ChatRequest(messages, extra={"tools": [WEATHER]}))
    assert gemini.requests[0]["contents"][1] == {"role": "model", "parts": [
        {"text": "Looking."},
        {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
         "thoughtSignature": "skip_thought_signature_validator"},  # the first call of a turn only
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]}
    assert gemini.seen[0].problems == []


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}), ("none", {"mode": "NONE"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"mode": "ANY",
                                                                 "allowedFunctionNames": ["get_weather"]})])
async def test_tool_choice_is_a_function_calling_mode(gemini, config_file, choice, config):
    await run(gemini, config_file, ChatRequest(HI, extra={"tools": [WEATHER], "tool_choice": choice}))
    assert gemini.requests[0]["toolConfig"] == {"functionCallingConfig": config}
    assert gemini.seen[0].problems == []


async def test_function_calls_stream_as_tool_call_deltas_with_ids_made_here(gemini, config_file):
    gemini.queue(GeminiReply(sse(
        response([{"text": "Checking."}]),
        response([{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
                  {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}], "STOP",
                 usage(prompt=30, output=20)))))
    events, error = await run(gemini, config_file, ChatRequest(HI, extra={"tools": [WEATHER]}))
    assert error is None
    assert events[:2] == [TextDelta("Checking."), ReasoningDelta("", "c2ln")]
    assert events[3:] == [Finish("tool_calls"), UsageReport(30, 20)]
    calls = events[2]
    assert isinstance(calls, ToolCallDelta)
    ids = [c.pop("id") for c in calls.calls]
    assert all(CALL_ID.fullmatch(i) for i in ids) and ids[0] != ids[1]
    assert calls.calls == [
        {"index": 0, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"index": 1, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]


async def test_a_call_id_given_by_gemini_is_kept(gemini, config_file):
    gemini.queue(GeminiReply(sse(response([{"functionCall": {"id": "fc-7", "name": "get_weather", "args": {}}}],
                                          "STOP", usage()))))
    events, _ = await run(gemini, config_file, ChatRequest(HI, extra={"tools": [WEATHER]}))
    assert isinstance(events[0], ToolCallDelta) and events[0].calls[0]["id"] == "fc-7"


PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


async def test_an_inline_image_is_inline_data(gemini, config_file):
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]
    _, error = await run(gemini, config_file, ChatRequest([{"role": "user", "content": content}]))
    assert error is None and gemini.seen[0].problems == []
    assert gemini.requests[0]["contents"] == [{"role": "user", "parts": [
        {"text": "What is this?"}, {"inlineData": {"mimeType": "image/png", "data": PIXEL}}]}]


async def test_structured_output_is_a_response_schema(gemini, config_file):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    await run(gemini, config_file, ChatRequest(HI, extra={
        "response_format": {"type": "json_schema", "json_schema": {"name": "count", "schema": schema}}, "seed": 7}))
    assert gemini.requests[0]["generationConfig"] == {"responseMimeType": "application/json",
                                                      "responseJsonSchema": schema, "seed": 7}
    assert gemini.seen[0].problems == []


def model(config_file: Any) -> Any:
    settings = Settings.from_env({"GATEWAY_CONFIG": config_file(
        '[providers.google]\nkind = "gemini"\nbase_url = "http://127.0.0.1:9/v1beta"\n'
        '[models.gem]\nprovider = "google"\nupstream = "gemini-2.5-flash"\n')})
    return settings.models["gem"]


@pytest.mark.parametrize(("request_", "feature"), [
    (ChatRequest([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}]),
     "images by URL"),
    (ChatRequest([{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": f"data:image/gif;base64,{PIXEL}"}}]}]), "images of type image/gif"),
    (ChatRequest(HI, extra={"logit_bias": {"50256": -100}}), "logit_bias"),
    (ChatRequest(HI, extra={"logprobs": True}), "logprobs"),
    (ChatRequest([*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": [
                      {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]}]),
     "images in tool results"),
])
def test_what_gemini_cannot_take_is_named_before_any_call(config_file, request_, feature):
    assert unsupported(model(config_file), request_) == feature


def test_a_text_turn_and_everything_gemini_expresses_pass(config_file):
    assert unsupported(model(config_file), ChatRequest(HI)) is None
    assert unsupported(model(config_file), ChatRequest(HI, extra={
        "tools": [WEATHER], "tool_choice": "auto", "seed": 1, "user": "u", "parallel_tool_calls": True,
        "response_format": {"type": "json_object"}, "reasoning_effort": "low"})) is None


async def test_a_turn_gemini_cannot_take_is_never_sent_and_fails_as_a_400_naming_it(gemini, registry):
    models = registry(toml(gemini))
    chain = Chain(models, models.chain("gem"))
    events, error = await collect(chain.stream(ChatRequest(HI, extra={"logit_bias": {"1": 1}})))
    assert events == [] and isinstance(error, Unsupported)
    assert (error.status, error.message) == (400, "model 'gem' cannot take logit_bias")
    assert trail(chain) == [("gem", "unsupported_feature")]
    assert gemini.seen == []


# -- configuration -------------------------------------------------------------------------------

def test_the_gemini_key_in_the_environment_registers_a_provider_and_its_model():
    s = Settings.from_env({"GEMINI_API_KEY": "AIza-env"})
    google = s.providers["gemini"]
    assert (google.kind, google.base_url) == ("gemini", GEMINI_BASE_URL)
    assert GEMINI_BASE_URL == "https://generativelanguage.googleapis.com/v1beta"
    assert google.api_key is not None and google.api_key.reveal() == "AIza-env"
    assert (s.models["gemini-2.5-flash"].provider, s.default_model) == ("gemini", "gemini-2.5-flash")
    s = Settings.from_env({"GEMINI_API_KEY": "k", "GEMINI_MODEL": "gemini-2.0-flash",
                           "GEMINI_BASE_URL": "http://127.0.0.1:1/v1beta/"})
    assert s.providers["gemini"].base_url == "http://127.0.0.1:1/v1beta"
    assert s.models["gemini-2.0-flash"].upstream == "gemini-2.0-flash"


def test_gemini_follows_anthropic_in_the_environment_chain():
    s = Settings.from_env({"OPENAI_API_KEY": "sk", "ANTHROPIC_API_KEY": "sk-ant", "GEMINI_API_KEY": "AIza"})
    assert {n: m.fallbacks for n, m in s.models.items()} == {
        "demo": (), "gpt-4o-mini": ("claude-3-5-haiku-latest", "gemini-2.5-flash"),
        "claude-3-5-haiku-latest": ("gemini-2.5-flash",), "gemini-2.5-flash": ()}


def test_config_names_the_kinds_and_refuses_a_gemini_embedding_model(config_file):
    with pytest.raises(ConfigError, match="kind must be openai, anthropic, gemini or demo, got 'vertex'"):
        Settings.from_env({"GATEWAY_CONFIG": config_file('[providers.g]\nkind = "vertex"\nbase_url = "http://x"\n')})
    with pytest.raises(ConfigError, match="an embedding model needs an openai or demo provider"):
        Settings.from_env({"GATEWAY_CONFIG": config_file(
            '[providers.g]\nkind = "gemini"\nbase_url = "http://x"\n'
            '[models.e]\nprovider = "g"\nkind = "embedding"\n')})


# -- fallback chains across kinds --------------------------------------------------------------

def cross_toml(fake: FakeGemini, openai: FakeUpstream, first: str) -> str:
    providers = (f'[providers.google]\nkind = "gemini"\nbase_url = "{fake.base_url}"\napi_key = "{KEY}"\n'
                 f'[providers.compat]\nkind = "openai"\nbase_url = "{openai.base_url}"\napi_key = "sk-compat"\n')
    gem = '[models.gem]\nprovider = "google"\nupstream = "gemini-2.5-flash"\n'
    oai = '[models.oai]\nprovider = "compat"\nupstream = "up-oai"\n'
    if first == "gem":
        return providers + gem + 'fallbacks = ["oai"]\n' + oai
    return providers + oai + 'fallbacks = ["gem"]\n' + gem


@pytest.mark.parametrize("status", [429, 500, 503, 403])
async def test_a_failing_gemini_falls_back_to_an_openai_compatible_model(gemini, upstream, registry, status):
    gemini.queue(GeminiReply(error_body(status, "Resource has been exhausted", "RESOURCE_EXHAUSTED"), status=status))
    upstream.queue(Reply(openai_stream(["Back", "up"])))
    models = registry(cross_toml(gemini, upstream, "gem"))
    chain = Chain(models, models.chain("gem"))
    events, error = await collect(chain.stream(ChatRequest(HI)))
    assert error is None and events[:2] == [TextDelta("Back"), TextDelta("up")]
    assert trail(chain) == [("gem", "upstream_http_error"), ("oai", "ok")]
    assert len(gemini.seen) == 1 and upstream.requests[0]["messages"] == HI


async def test_what_gemini_cannot_take_goes_to_the_next_kind_without_blaming_gemini(gemini, upstream, registry):
    upstream.queue(Reply(openai_stream(["Seen"])))
    models = registry(cross_toml(gemini, upstream, "gem"))
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}]
    chain = Chain(models, models.chain("gem"))
    events, error = await collect(chain.stream(ChatRequest(image)))
    assert error is None and events[0] == TextDelta("Seen")
    assert trail(chain) == [("gem", "unsupported_feature"), ("oai", "ok")]
    assert gemini.seen == [] and models.circuits.available("gem")


async def test_a_failing_openai_compatible_model_falls_back_to_gemini(gemini, upstream, registry):
    upstream.queue(Reply(status=503, body=b'{"error":{"message":"overloaded"}}'))
    models = registry(cross_toml(gemini, upstream, "oai"))
    chain = Chain(models, models.chain("oai"))
    events, error = await collect(chain.stream(ChatRequest(HI, max_tokens=20)))
    assert error is None
    assert events == [TextDelta("Hello"), TextDelta(" world"), Finish("stop"), UsageReport(12, 2)]
    assert trail(chain) == [("oai", "upstream_http_error"), ("gem", "ok")]
    assert gemini.requests[0]["generationConfig"] == {"maxOutputTokens": 20}


async def test_gemini_cut_after_content_ends_the_reply_without_a_fallback(gemini, upstream, registry):
    body = text_stream(["One", " two"])
    gemini.queue(GeminiReply(body, piece=body.index(b"\r\n\r\n") + 4, cut_after=1))
    models = registry(cross_toml(gemini, upstream, "gem"))
    chain = Chain(models, models.chain("gem"))
    events, error = await collect(chain.stream(ChatRequest(HI)))
    assert events == [TextDelta("One")] and isinstance(error, UpstreamConnectionError)
    assert upstream.requests == []



# -- what a hostile or broken upstream sends -------------------------------------------------------

@pytest.mark.parametrize(("event", "message"), [
    (b'data: {"candidates": [{"content": {"parts": [{"text": 7}]}}]}\r\n\r\n',
     "upstream sent a part's `text` that is not a string (int)"),
    (b'data: {"candidates": {"x": 1}}\r\n\r\n', "upstream sent `candidates` that is not a list"),
    (b'data: {"candidates": [{"content": {"parts": "text"}}]}\r\n\r\n', "upstream sent `parts` that is not a list"),
    (b'data: {"usageMetadata": [1]}\r\n\r\n', "upstream sent `usageMetadata` that is not a JSON object (list)"),
    (b"data: {not json\r\n\r\n", "upstream sent an event that is not JSON"),
    (b'data: {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": "x"}}]}}]}\r\n\r\n',
     "upstream sent a function call's `args` that is not a JSON object (str)"),
])
async def test_an_event_that_breaks_the_format_is_a_protocol_error(gemini, config_file, event, message):
    gemini.queue(GeminiReply(event))
    events, error = await run(gemini, config_file, ChatRequest(HI))
    assert events == [] and isinstance(error, UpstreamProtocolError) and error.message == message


async def test_nul_is_replaced_and_counts_out_of_range_are_clamped_and_flagged(gemini, config_file):
    gemini.queue(GeminiReply(sse(response([{"text": "a\x00b"}], "STOP", {
        "promptTokenCount": 2**40, "candidatesTokenCount": 3, "totalTokenCount": 3}))))
    events, error = await run(gemini, config_file, ChatRequest(HI))
    assert error is None
    assert events == [TextDelta("a\ufffdb"), Finish("stop"), UsageReport(2**31 - 1, 0, suspect=True)]


async def test_tool_use_prompt_tokens_count_as_prompt(gemini, config_file):
    gemini.queue(GeminiReply(sse(response([{"text": "ok"}], "STOP", {
        "promptTokenCount": 40, "toolUsePromptTokenCount": 25, "candidatesTokenCount": 1, "totalTokenCount": 66}))))
    events, _ = await run(gemini, config_file, ChatRequest(HI))
    assert events[-1] == UsageReport(65, 1)


async def test_cache_breakpoints_are_not_sent_gemini_caches_by_itself(gemini, config_file):
    system = [{"type": "text", "text": "Long rules.", "cache_control": {"type": "ephemeral"}}]
    user = [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]
    tool = {**WEATHER, "cache_control": {"type": "ephemeral"}}
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    await run(gemini, config_file, ChatRequest(messages, extra={"tools": [tool]}))
    body = gemini.requests[0]
    assert (body["systemInstruction"], body["contents"]) == ({"parts": [{"text": "Long rules."}]},
                                                             [{"role": "user", "parts": [{"text": "Hi"}]}])
    assert "cache_control" not in str(body) and gemini.seen[0].problems == []
