"""A Gemini model behind the real app, driven by the official `openai` SDK: reasoning, cache and
thinking tokens reach the client and the usage row priced by kind; a failing Gemini model falls
back to an OpenAI-compatible one."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import openai
import pytest

from gateway.state import USAGE
from tests.support.fakes import FakeUpstream, Reply, openai_stream
from tests.support.gemini import FakeGemini, GeminiReply, error_body, response, sse, usage


@pytest.fixture
async def app(make_client: Any, config_file: Any, gemini: FakeGemini, upstream: FakeUpstream) -> Any:
    return await make_client(GATEWAY_CONFIG=config_file(f"""
[providers.google]
kind = "gemini"
base_url = "{gemini.base_url}"
api_key = "AIza-e2e-0123456789"
[providers.compat]
kind = "openai"
base_url = "{upstream.base_url}"
api_key = "sk-compat-0123456789"
[models.gem]
provider = "google"
upstream = "gemini-2.5-flash"
fallbacks = ["oai"]
input_price_per_mtok = 1.25
cached_input_price_per_mtok = 0.31
output_price_per_mtok = 10.0
[models.oai]
provider = "compat"
upstream = "gpt-up"
"""))


async def usage_rows(client: Any, db: Any, user_id: uuid.UUID) -> list[dict[str, Any]]:
    await client.app[USAGE].flush()
    rows = await db.fetch("SELECT model, provider, prompt_tokens, input_tokens, cached_tokens, completion_tokens, "
                          "reasoning_tokens, estimated, cost_usd FROM usage WHERE user_id = $1", user_id)
    return [dict(r) for r in rows]


async def test_reasoning_cache_and_thinking_tokens_reach_the_client_and_the_priced_usage_row(app, gemini, user, db):
    gemini.queue(GeminiReply(sse(
        response([{"text": "Short answer.", "thought": True}], usage=usage(prompt=170, output=0, cached=150,
                                                                           thoughts=30)),
        response([{"text": "Hel", "thoughtSignature": "c2ln"}], usage=usage(prompt=170, output=5, cached=150,
                                                                            thoughts=30)),
        response([{"text": "lo"}], "STOP", usage(prompt=170, output=12, cached=150, thoughts=30))), piece=9))
    api = openai.AsyncOpenAI(base_url=str(app.make_url("/v1")), api_key=user.key, max_retries=0)
    try:
        stream = await api.chat.completions.create(
            model="gem", messages=[{"role": "user", "content": "Hi"}], reasoning_effort="low", stream=True,
            stream_options={"include_usage": True})
        reasoning, text, finish, used = "", "", None, None
        async for chunk in stream:
            for choice in chunk.choices:
                reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            used = chunk.usage or used
    finally:
        await api.close()
    assert (reasoning, text, finish) == ("Short answer.", "Hello", "stop")
    assert used is not None and used.model_dump(exclude_none=True) == {
        "prompt_tokens": 170, "completion_tokens": 42, "total_tokens": 212,
        "prompt_tokens_details": {"cached_tokens": 150, "cache_write_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 30}}
    assert gemini.requests[0]["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 1024,
                                                                         "includeThoughts": True}}
    assert gemini.seen[0].problems == []
    # priced by kind: 20 input at 1.25, 150 cached at 0.31, 42 output (30 of them thinking) at 10, per million
    assert await usage_rows(app, db, user.id) == [{
        "model": "gem", "provider": "google", "prompt_tokens": 170, "input_tokens": 20, "cached_tokens": 150,
        "completion_tokens": 42, "reasoning_tokens": 30, "estimated": False, "cost_usd": Decimal("0.00049150")}]


async def test_a_gemini_model_out_of_quota_is_answered_by_its_openai_compatible_fallback(app, gemini, upstream,
                                                                                         user, db):
    gemini.queue(GeminiReply(error_body(429, "Resource has been exhausted (e.g. check quota).",
                                        "RESOURCE_EXHAUSTED"), status=429))
    upstream.queue(Reply(openai_stream(["Back", "up"], prompt_tokens=9, completion_tokens=2)))
    api = openai.AsyncOpenAI(base_url=str(app.make_url("/v1")), api_key=user.key, max_retries=0)
    try:
        answer = await api.chat.completions.create(model="gem", messages=[{"role": "user", "content": "Hi"}])
    finally:
        await api.close()
    assert answer.choices[0].message.content == "Backup"
    assert len(gemini.seen) == 1 and upstream.requests[0]["messages"] == [{"role": "user", "content": "Hi"}]
    rows = await usage_rows(app, db, user.id)
    assert [(r["model"], r["provider"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        ("oai", "compat", 9, 2)]
