"""What every provider adapter speaks: a request in, normalised stream events out, typed errors.

Adapters render the canonical turn (providers/turn.py) into a wire format and turn what comes
back into `TextDelta`, `ToolCallDelta`, `ReasoningDelta`, `UsageReport` and `Finish` events. They never
retry and never touch the database: the chain decides what happens after a failure. What the
chain reports (first upstream call, first event, a streamed reply) goes to a `ChainObserver`.

    ProviderError                 retryable before the first content byte unless noted
    ├── UpstreamHTTPError         non-2xx answer (429 carries retry_after); see `request_at_fault`
    ├── UpstreamTimeout           connect, first token, idle or max_stream
    ├── UpstreamConnectionError   refused, reset, DNS
    ├── UpstreamProtocolError     malformed JSON, stream ended without its terminal marker
    ├── UpstreamStreamError       the upstream reported an error mid-stream
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway.config import ModelConfig, ProviderConfig

if TYPE_CHECKING:
    from gateway.store.usage import UsageRecord


@dataclass(slots=True)
class ChatRequest:
    """A provider-neutral chat request: OpenAI-style messages plus sampling parameters."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | str | None = None
    # passed through untouched to OpenAI-compatible upstreams (tools, tool_choice, ...)
    extra: dict[str, Any] = field(default_factory=dict)
    # the field the client named the limit with: OpenAI's newer `max_completion_tokens` is sent as
    # such to OpenAI-compatible upstreams (unless their provider says it only knows `max_tokens`)
    max_tokens_key: str = "max_tokens"
    # extended thinking asked for, in Anthropic's shape ({"type": "enabled", "budget_tokens": n});
    # an OpenAI-style `reasoning_effort` travels in `extra` (see providers/turn.py)
    thinking: dict[str, Any] | None = None
    # what the request uses beyond plain text (turn.features), worked out once, when first asked
    features: frozenset[str] | None = None


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ToolCallDelta:
    """OpenAI-style `delta.tool_calls` fragments, passed through as the upstream sent them."""

    calls: list[dict[str, Any]]


@dataclass(slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning (`text`), or the signature that closes a reasoning block
    (Anthropic's `signature_delta`: `text` empty, `signature` set), or a whole block of reasoning
    the upstream keeps to itself (Anthropic's `redacted_thinking`: its opaque `redacted` data)."""

    text: str
    signature: str | None = None
    redacted: str | None = None


@dataclass(slots=True)
class UsageReport:
    """A reply's counts. `prompt_tokens` is every prompt token the upstream processed (OpenAI's
    meaning): `cached_tokens` (read from a prompt cache) and `cache_write_tokens` (written to one)
    are parts of it, the rest is uncached input. `reasoning_tokens` are part of `completion_tokens`."""

    prompt_tokens: int
    completion_tokens: int
    # the upstream's counts were out of range or not integers (clamped to fit, or not believed)
    suspect: bool = False
    # the gateway's estimate, not the upstream's counts (see normalise.charged)
    estimated: bool = False
    cached_tokens: int = field(default=0, kw_only=True)
    cache_write_tokens: int = field(default=0, kw_only=True)
    reasoning_tokens: int = field(default=0, kw_only=True)

    @property
    def input_tokens(self) -> int:
        """The prompt tokens neither read from nor written to a cache."""
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens


@dataclass(slots=True)
class Finish:
    reason: str  # stop | length | tool_calls | content_filter | ...


StreamEvent = TextDelta | ToolCallDelta | ReasoningDelta | UsageReport | Finish


Batch = list[StreamEvent]


class Provider(Protocol):
    """One upstream API. `stream` yields the events decoded from each upstream read, as a batch
    (never empty), and ends only after the upstream's terminal marker.

    Batches, not single events: under load one read often holds several events, and everything
    downstream (listeners, socket writes) then runs once per read instead of once per event.
    A generator, not any iterator: the chain `aclose()`s an attempt it abandons, so the adapter's
    `finally` (closing the upstream response) runs at once rather than at garbage collection.
    """

    name: str

    def stream(self, model: ModelConfig, request: ChatRequest) -> AsyncGenerator[Batch, None]: ...


class Translating(Protocol):
    """An adapter that says, before any call, what of a request its wire format cannot express
    (the adapters of real upstreams; the demo provider takes anything and answers with text)."""

    def unsupported(self, model: ModelConfig, request: ChatRequest) -> str | None:
        """The feature of `request` (see providers/turn.py) this upstream cannot take, or None."""


@dataclass(slots=True)
class Attempt:
    model: str
    provider: str
    outcome: str  # ok | circuit_open | cooldown | cancelled | the ProviderError kind
    ms: int
    status: int | None = None  # the upstream's HTTP status, when it answered with an error

    def as_json(self) -> dict[str, object]:
        attempt: dict[str, object] = {"model": self.model, "provider": self.provider, "outcome": self.outcome,
                                      "ms": self.ms}
        if self.status is not None:
            attempt["status"] = self.status
        return attempt


class ChainObserver(Protocol):
    """What a chain reports while it runs one reply, and the reply's usage once it is settled.

    Called a handful of times per reply, never per chunk. `Metrics` implements it; `NO_OBSERVER`
    ignores everything.
    """

    def upstream_call(self, overhead_s: float) -> None:
        """The reply's first upstream call starts, `overhead_s` after its request arrived."""

    def attempt_answered(self, model: ModelConfig, seconds: float, planned: ModelConfig) -> None:
        """An attempt delivered its first event `seconds` after it started; `planned` is the chain's first model."""

    def reply_streamed(self, model: ModelConfig, batches: int, seconds: float) -> None:
        """The reply's batches after its first: `batches` of them over `seconds`."""

    def usage(self, record: UsageRecord) -> None:
        """The reply finished and used this much (reported by whoever writes its usage row)."""


class NoObserver:
    """A `ChainObserver` that ignores everything."""

    def upstream_call(self, overhead_s: float) -> None:
        pass

    def attempt_answered(self, model: ModelConfig, seconds: float, planned: ModelConfig) -> None:
        pass

    def reply_streamed(self, model: ModelConfig, batches: int, seconds: float) -> None:
        pass

    def usage(self, record: UsageRecord) -> None:
        pass


NO_OBSERVER: ChainObserver = NoObserver()


REDACTED = "[redacted]"
MIN_SECRET_CHARS = 8  # shorter header values are names, flags or numbers: scrubbing them would garble text


class Secrets:
    """A provider's configured secrets: its API key and the values of its extra headers.

    An upstream's error body may echo the request's headers (`Bearer sk-...`): every text built
    from what an upstream sent (an error's message) is scrubbed of them before it is logged,
    stored or returned, and before it is cut to length (a cut must not keep a secret's start).
    """

    __slots__ = ("values",)

    def __init__(self, values: Iterable[str]) -> None:
        # longest first: a secret inside a longer one goes with it
        self.values = tuple(sorted({v for v in values if len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True))

    @classmethod
    def of(cls, config: ProviderConfig) -> Secrets:
        values = [v.reveal() for v in config.headers.values()]
        if config.api_key:
            values.append(config.api_key.reveal())
        return cls(values)

    def scrub(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text


NO_SECRETS = Secrets(())


class ProviderError(Exception):
    """An attempt failed; `retryable` says whether another link of the chain may be tried, and
    `model_fault` whether the failure counts against the model's circuit breaker."""

    kind = "provider_error"
    retryable = True
    model_fault = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class UpstreamHTTPError(ProviderError):
    """The upstream answered with a non-2xx status. `blames` is what its error body names:
    "model" (unknown, retired, context too long), "parameter" (a field this model rejects) or None."""

    kind = "upstream_http_error"

    def __init__(self, message: str, *, status: int, retry_after: float | None = None,
                 blames: str | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after
        self.blames = blames
        # Every failure before the first content byte moves on to the next link (an expired key, a
        # retired model, an overloaded or misconfigured upstream), except a request the client got
        # wrong: another provider would refuse it just the same.
        self.retryable = not request_at_fault(status, blames)
        # a parameter this model rejects says nothing about the model's health
        self.model_fault = self.retryable and blames != "parameter"


# the statuses that say "your request's content is wrong" rather than "this upstream cannot serve it"
REQUEST_FAULT_STATUSES = frozenset({400, 413, 422})


def request_at_fault(status: int, blames: str | None) -> bool:
    """Whether a non-2xx answer blames the request itself, so that every provider would refuse it:
    a 400, 413 or 422 that names neither the model nor one of its parameters (malformed messages,
    a body too large, a content-policy refusal). 401/403 (this provider's key), 404/410 (this
    provider's model or URL), 408/409/429, 5xx and the rest are the upstream's, not the request's."""
    return status in REQUEST_FAULT_STATUSES and blames is None


class UpstreamTimeout(ProviderError):
    """No answer in time: `phase` is connect, first_token, idle (between chunks) or max_stream
    (the whole reply ran longer than the model's `max_stream_s`)."""

    kind = "upstream_timeout"

    def __init__(self, phase: str) -> None:
        super().__init__(f"upstream timed out ({phase})")
        self.phase = phase


class UpstreamConnectionError(ProviderError):
    """The connection could not be made or was lost."""

    kind = "upstream_connection_error"


class UpstreamProtocolError(ProviderError):
    """The upstream spoke its wire format wrongly (bad JSON, no terminal marker)."""

    kind = "upstream_protocol_error"


class UpstreamStreamError(ProviderError):
    """The upstream reported an error inside an open stream."""

    kind = "upstream_stream_error"


class Unsupported(ProviderError):
    """The request uses a feature this model's upstream cannot express: never sent. Another link
    of the chain may take it; the doors answer the last one's as a 400 naming feature and model."""

    kind = "unsupported_feature"
    model_fault = False

    def __init__(self, feature: str, model: str) -> None:
        super().__init__(f"model '{model}' cannot take {feature}", status=400)
        self.feature = feature
        self.model = model


def text_of(content: object) -> str:
    """A message's text: its content string, or its text parts joined (OpenAI-style content parts;
    images carry none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters a token) for when the upstream reports none."""
    return tokens_for_chars(len(text))


CHARS_PER_TOKEN = 4


def tokens_for_chars(chars: int) -> int:
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


# An image, whatever its size: what OpenAI bills a 1024x1024 image at high detail (85 tokens, plus
# 170 for each of its four 512-pixel tiles). Anthropic's (width x height / 750) is about the same.
IMAGE_TOKENS = 765
IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})
# the request fields passed upstream that the model reads as part of its prompt (OpenAI-style)
PROMPT_FIELDS = ("tools", "functions", "tool_choice", "function_call", "response_format")


def prompt_estimate(messages: list[dict[str, Any]], extra: Mapping[str, Any] | None = None) -> int:
    """The tokens of everything sent upstream as the prompt: every message's text, its other parts
    (IMAGE_TOKENS an image, any other part by its JSON size) and fields (an assistant's tool_calls,
    a tool message's id), and the request's tools and response format (by their JSON size)."""
    tokens = 0
    for message in messages:
        content = message.get("content")
        tokens += estimate_tokens(text_of(content))
        if content.__class__ is list:
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in IMAGE_PARTS:
                    tokens += IMAGE_TOKENS
                elif kind != "text" or not isinstance(part.get("text"), str):  # not counted by text_of
                    tokens += json_tokens(part)
        for key, value in message.items():
            if key != "role" and key != "content" and value is not None:
                tokens += json_tokens(value)
    if extra:
        tokens += sum(json_tokens(extra[k]) for k in PROMPT_FIELDS if k in extra)
    return tokens


def json_tokens(value: object) -> int:
    return tokens_for_chars(len(orjson.dumps(value, default=str)))
