"""`POST /v1/embeddings`: OpenAI's embeddings API, passed through to the model's provider.

Same auth and policy as chat (the input's estimated tokens are reserved against the daily caps,
the request takes a slot in the per-minute windows), stateless like /v1/chat/completions, and
its usage is recorded exactly once through the batched usage writer, settling the whole admission
(token and cost reservations, the stream lease, the quota slice's share), as a chat reply's does:

    the upstream answered       its reported prompt tokens (or the estimate, flagged)
    the upstream refused        nothing counted; the reservation is handed back
    the client left meanwhile   the estimate, flagged (the upstream may have done the work)

A model serves embeddings when its config says `kind = "embedding"` (an OpenAI-compatible or demo
provider, no fallbacks); the built-in demo provider also answers for its chat models, with
deterministic vectors, so a fresh install can be tried with no key.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
from aiohttp import web

from gateway.api.common import caller, read_body
from gateway.api.openai.chat_completions import OpenAIError, openai_errors, provider_error
from gateway.api.openai.ratelimits import RateLimitHeaders
from gateway.config import ModelConfig
from gateway.contract import decoding
from gateway.contract.openai import (
    EMBEDDING_INPUT_MESSAGE,
    MAX_INPUTS,
    TOKEN_MAX,
    EmbeddingList,
    EmbeddingRequest,
    embedding_refusal,
)
from gateway.contract.operations import ok, openai_error_answers, operation
from gateway.errors import BadRequest, GatewayError
from gateway.generation.task import cost_usd
from gateway.policy.admission import Admission
from gateway.providers.base import ProviderError, UsageReport
from gateway.providers.embeddings import DEMO_MAX_DIMENSIONS, Embeddings, EmbeddingsRequest, embed, input_tokens
from gateway.state import HTTP, METRICS, MODELS, POLICY, USAGE
from gateway.store.usage import UsageRecord


def _input(raw: Any) -> tuple[list[str] | list[list[int]], bool]:
    """`input` as a list of items, and whether it was a single item. OpenAI takes a string, an
    array of strings, an array of token ids, or an array of such arrays."""

    def tokens(value: Any) -> bool:
        return (isinstance(value, list) and bool(value)
                and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= TOKEN_MAX for t in value))

    def text(value: Any) -> bool:
        return isinstance(value, str) and bool(value) and "\x00" not in value

    if text(raw):
        return [raw], True
    if tokens(raw):
        return [raw], True
    if isinstance(raw, list) and 0 < len(raw) <= MAX_INPUTS:
        if all(text(item) for item in raw):
            return list(raw), False
        if all(tokens(item) for item in raw):
            return list(raw), False
    raise OpenAIError(400, EMBEDDING_INPUT_MESSAGE, param="input")


def _invalid(message: str, param: str | None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


_refuse = embedding_refusal(_invalid)


def _not_json() -> GatewayError:
    return BadRequest("body is not valid JSON")


def parse_request(raw: bytes, models: dict[str, ModelConfig], demo_providers: set[str]
                  ) -> tuple[ModelConfig, EmbeddingsRequest]:
    """The body, decoded through EmbeddingRequest (OpenAI's error and `param` for a refused field), and
    what the struct cannot say: the model is configured for embeddings, the input's shape."""
    body = decoding.decode(raw, EmbeddingRequest, _refuse, _not_json)
    name = body.model
    model = models.get(name)
    if model is None or not model.enabled:
        raise OpenAIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    if model.kind != "embedding" and model.provider not in demo_providers:
        raise OpenAIError(400, f"The model '{name}' is not an embedding model", param="model",
                          code="model_not_supported")
    inputs, single = _input(body.input)
    dimensions = body.dimensions
    if dimensions is not None and model.provider in demo_providers and dimensions > DEMO_MAX_DIMENSIONS:
        raise OpenAIError(400, f"the demo model's vectors have at most {DEMO_MAX_DIMENSIONS} dimensions",
                          param="dimensions")
    return model, EmbeddingsRequest(inputs=inputs, single=single, dimensions=dimensions,
                                    encoding_format=body.encoding_format or "float", user=body.user)


@operation("OpenAI-compatible embeddings, passed through to the model's provider", "openai",
           {**ok(200, "One vector per input, in order", EmbeddingList),
            **openai_error_answers(400, 401, 403, 404, 413, 429)},
           body=EmbeddingRequest,
           description="Stateless; the input's tokens count against the daily caps and are recorded once. "
                       "With limits configured, a success carries OpenAI's `x-ratelimit-*` headers.")
@openai_errors
async def create_embeddings(request: web.Request) -> web.Response:
    principal = await caller(request, "chat")
    app = request.app
    providers = app[MODELS].configs  # as the last reload left them
    demo = {name for name, p in providers.items() if p.kind == "demo"}
    model, embeddings = parse_request(await read_body(request), app[MODELS].models, demo)
    estimate = input_tokens(embeddings)

    def settle(admission: Admission, usage: UsageReport, estimated: bool) -> None:
        """The whole admission settles here, once: its token and cost reservations, its stream lease,
        and the share of the quota slice it came from (a record that named fewer would strand the rest)."""
        admission.done()
        record = UsageRecord(
            message_id=uuid.uuid4(), user_id=principal.user_id, api_key_id=principal.api_key_id, model=model.name,
            provider=model.provider, prompt_tokens=usage.prompt_tokens, completion_tokens=0, estimated=estimated,
            cost_usd=cost_usd(model, usage), **admission.held())
        if usage.prompt_tokens or admission.holds_anything:
            app[USAGE].add(record)
            app[METRICS].usage(record)

    # max_tokens 1: an embedding has no reply, so the reservation is the input's estimate (+1). The
    # admission is shielded: a client gone while it is decided (its handler cancelled) must not strand
    # what the database granted; it is settled, counting nothing, once decided
    admitting = asyncio.ensure_future(app[POLICY].admit(principal, model.name, estimate, 1))
    try:
        admission = await asyncio.shield(admitting)
    except asyncio.CancelledError:
        admitting.add_done_callback(
            lambda t: None if t.cancelled() or t.exception() is not None else settle(t.result(), UsageReport(0, 0),
                                                                                     False))
        raise
    limits = RateLimitHeaders(request, principal)
    result: Embeddings | None = None
    usage, estimated = UsageReport(0, 0), False  # a refusal upstream counts nothing
    try:
        result = await embed(app[HTTP], providers[model.provider], model, embeddings)
        usage, estimated = UsageReport(result.prompt_tokens, 0), result.estimated
        answer = web.Response(body=orjson.dumps({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(result.vectors)],
            "model": model.name,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}),
            content_type="application/json")
        await limits.apply(answer)
        return answer
    except ProviderError as e:
        raise provider_error(e) from None
    except asyncio.CancelledError:
        if result is None:  # gone while the upstream worked: what it was sent is counted
            usage, estimated = UsageReport(estimate, 0), True
        raise
    finally:
        limits.close()
        settle(admission, usage, estimated)  # exactly once: the only other call is for an admission never returned
