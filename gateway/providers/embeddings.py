"""Execute, for embeddings: one call to the model's provider (`POST {base_url}/embeddings`).

OpenAI-compatible upstreams get the request as OpenAI's API takes it; the built-in demo provider
answers with deterministic unit vectors seeded by a hash of the text (so the quickstart answers
with no key, and tests know every number). No fallback and no retry: another model's vectors
live in another space, so a failure is the caller's to see.

The vectors come back as the client asked: `float` arrays, or `base64` (little-endian float32,
as OpenAI encodes them). An upstream that answers the other encoding is converted, so a server
that ignores `encoding_format` still gives the client what it asked for.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from array import array
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.config import ModelConfig, ProviderConfig
from gateway.providers import normalise
from gateway.providers.base import Secrets, UpstreamProtocolError, estimate_tokens
from gateway.providers.openai import raise_for_status, read_at_most, transport_error

DEMO_DIMENSIONS = 16
DEMO_MAX_DIMENSIONS = 1024  # the demo's vectors cost CPU here: bounded like a real model's size
BODY_LIMIT = 256 << 20  # an upstream answer larger than this is refused, not held in memory


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingsRequest:
    inputs: list[str] | list[list[int]]  # texts, or token arrays (passed to the upstream as they are)
    single: bool  # `input` was one item, not a list (the upstream gets it the same way)
    dimensions: int | None
    encoding_format: str  # "float" | "base64"
    user: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Embeddings:
    vectors: list[list[float] | str]  # by input index, in the requested encoding
    prompt_tokens: int
    estimated: bool  # the upstream reported no usage: counted from the input


def encode(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def decode(raw: str) -> list[float]:
    data = base64.b64decode(raw)
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def input_tokens(request: EmbeddingsRequest) -> int:
    """The gateway's estimate of the input (what the policy reserves; the usage when none is reported)."""
    return sum(len(item) if isinstance(item, list) else estimate_tokens(item) for item in request.inputs)


def demo_vector(upstream: str, item: str | list[int], dimensions: int) -> list[float]:
    """A unit vector drawn from the SHA-256 of (model, input): the same input, the same vector."""
    seed = upstream.encode() + b"\0" + (item.encode() if isinstance(item, str) else orjson.dumps(item))
    raw: list[float] = []
    counter = 0
    while len(raw) < dimensions:
        digest = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        raw.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    raw = raw[:dimensions]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    # rounded through float32, as any real API's vectors are: base64 and float agree exactly
    return list(array("f", (x / norm for x in raw)))


def _demo(model: ModelConfig, request: EmbeddingsRequest) -> Embeddings:
    dims = request.dimensions or DEMO_DIMENSIONS
    vectors = [demo_vector(model.upstream, item, dims) for item in request.inputs]
    return Embeddings(vectors=[encode(v) if request.encoding_format == "base64" else v for v in vectors],
                      prompt_tokens=input_tokens(request), estimated=False)


async def embed(session: aiohttp.ClientSession, provider: ProviderConfig, model: ModelConfig,
                request: EmbeddingsRequest) -> Embeddings:
    """The vectors for `request`, or a ProviderError (HTTP status, timeout, connection, protocol)."""
    if provider.kind == "demo":
        return _demo(model, request)
    body: dict[str, Any] = {"model": model.upstream, "input": request.inputs[0] if request.single else request.inputs,
                            "encoding_format": request.encoding_format}
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    if request.user is not None:
        body["user"] = request.user
    headers = {"Content-Type": "application/json"}
    if provider.api_key:
        headers["Authorization"] = "Bearer " + provider.api_key.reveal()
    timeout = aiohttp.ClientTimeout(total=model.timeout_s, sock_connect=model.connect_timeout_s)
    try:
        async with session.post(provider.base_url + "/embeddings", data=orjson.dumps(body), headers=headers,
                                timeout=timeout) as resp:
            if resp.status >= 300:  # an error body may echo the request's key: scrubbed of it
                await raise_for_status(resp, Secrets.of(provider))
            raw = await read_at_most(resp, BODY_LIMIT + 1)
    except (TimeoutError, aiohttp.ClientError) as e:
        raise transport_error(e) from None
    if len(raw) > BODY_LIMIT:
        raise UpstreamProtocolError("upstream embeddings answer too large")
    return _parse(raw, request)


def _parse(raw: bytes, request: EmbeddingsRequest) -> Embeddings:
    """OpenAI's `{"data": [{"index", "embedding"}...], "usage": {"prompt_tokens"}}`, checked: one
    vector per input, each a list of numbers or a base64 string."""
    try:
        answer = normalise.loads(raw)
        data = answer["data"]
        vectors: list[list[float] | str | None] = [None] * len(request.inputs)
        for item in data:
            index, vector = item["index"], item["embedding"]
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(vectors):
                raise ValueError("index out of range")
            if isinstance(vector, str):
                floats = decode(vector)
            elif isinstance(vector, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  for x in vector):
                floats = [float(x) for x in vector]
            else:
                raise ValueError("embedding is neither numbers nor base64")
            if request.encoding_format == "base64":
                vectors[index] = vector if isinstance(vector, str) else encode(floats)
            else:
                vectors[index] = floats
        if any(v is None for v in vectors):
            raise ValueError("a vector is missing")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, struct.error) as e:
        raise UpstreamProtocolError(f"malformed embeddings answer from upstream: {type(e).__name__}") from None
    usage = answer.get("usage") if isinstance(answer, dict) else None
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        return Embeddings(vectors=[v for v in vectors if v is not None], prompt_tokens=input_tokens(request),
                          estimated=True)
    return Embeddings(vectors=[v for v in vectors if v is not None], prompt_tokens=tokens, estimated=False)
