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

from gateway.api.common import caller, read_json
from gateway.api.openai.chat_completions import OpenAIError, openai_errors, provider_error
from gateway.api.openai.ratelimits import RateLimitHeaders
from gateway.config import ModelConfig
from gateway.generation.task import cost_usd
from gateway.policy.admission import Admission
from gateway.providers.base import ProviderError, UsageReport
from gateway.providers.embeddings import DEMO_MAX_DIMENSIONS, Embeddings, EmbeddingsRequest, embed, input_tokens
from gateway.state import HTTP, METRICS, MODELS, POLICY, USAGE
from gateway.store.usage import UsageRecord

MAX_INPUTS = 2048  # OpenAI's limit on items per request
MAX_DIMENSIONS = 1 << 16
ENCODINGS = ("float", "base64")


def _input(raw: Any) -> tuple[list[str] | list[list[int]], bool]:
    """`input` as a list of items, and whether it was a single item. OpenAI takes a string, an
    array of strings, an array of token ids, or an array of such arrays."""

    def tokens(value: Any) -> bool:
        return (isinstance(value, list) and bool(value)
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value))

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
    raise OpenAIError(400, "'input' must be a non-empty string, an array of 1 to 2048 non-empty strings, or "
                           "token arrays", param="input")


def parse_request(body: dict[str, Any], models: dict[str, ModelConfig], demo_providers: set[str]
                  ) -> tuple[ModelConfig, EmbeddingsRequest]:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise OpenAIError(400, "'model' is required and must be a string", param="model")
    model = models.get(name)
    if model is None or not model.enabled:
        raise OpenAIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    if model.kind != "embedding" and model.provider not in demo_providers:
        raise OpenAIError(400, f"The model '{name}' is not an embedding model", param="model",
                          code="model_not_supported")
    inputs, single = _input(body.get("input"))
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                   or not 1 <= dimensions <= MAX_DIMENSIONS):
        raise OpenAIError(400, f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}", param="dimensions")
    if dimensions is not None and model.provider in demo_providers and dimensions > DEMO_MAX_DIMENSIONS:
        raise OpenAIError(400, f"the demo model's vectors have at most {DEMO_MAX_DIMENSIONS} dimensions",
                          param="dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise OpenAIError(400, "'encoding_format' must be float or base64", param="encoding_format")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise OpenAIError(400, "'user' must be a string", param="user")
    return model, EmbeddingsRequest(inputs=inputs, single=single, dimensions=dimensions, encoding_format=encoding,
                                    user=user)


@openai_errors
async def create_embeddings(request: web.Request) -> web.Response:
    principal = await caller(request, "chat")
    app = request.app
    providers = app[MODELS].configs  # as the last reload left them
    demo = {name for name, p in providers.items() if p.kind == "demo"}
    model, embeddings = parse_request(await read_json(request), app[MODELS].models, demo)
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
