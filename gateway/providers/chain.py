"""The fallback chain: try each model in turn until one starts streaming.

Per attempt: connect and idle timeouts live in the adapter's HTTP client; the chain bounds the
wait for the first content byte (`first_token_timeout_s`, within `timeout_s`) and then the
reply's whole length (`max_stream_s`): a slow but steady stream is never cut at `timeout_s`.
A non-streaming caller (`stream(whole=True)`) bounds the whole call by `timeout_s` instead.

Before the first content byte, every failure moves on to the next link (timeouts, connection
errors, 429, 5xx, 401/403 of an expired key, 404 of a retired model, a 400 naming the model or
a parameter) except a request the client got wrong, which every provider would refuse
(`base.request_at_fault`): that ends the chain. After the first content byte the failure is
final (the client already has text). A 429 on the last link is retried once after its
Retry-After when that fits in the budget. Models whose circuit is open are skipped, and so are
deployments cooling down after a 429/5xx (their model's other deployments serve meanwhile), and
links whose upstream cannot express the turn (`base.Unsupported`: never sent; when no link can,
that is the chain's failure, which the doors answer as a 400 naming the feature and the model).
The doors ask first (`refused_by_chain`), for the whole prompt: a thread's history included, which
they read for it only when the chain could refuse some of what a history holds
(`history_may_be_refused`).

A request with a bound (`max_tokens`, which the policy sets whenever a cap reserves for the reply)
is relayed up to `relay_chars` of it, by the gateway's estimate: past that the upstream ignored
its max_tokens, and the reply is cut there and ends with finish reason "length" (what is charged
for it stops at the bound: normalise.charged).

What happens is reported to the chain's `observer` (a `ChainObserver`: the app's `Metrics`, or
nothing, or a `TracingObserver` around the metrics when the app traces): the gateway's own time
before the first upstream call (measured from `started`, the request's arrival on the
`time.monotonic()` clock), each answering attempt, each streamed reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config import ModelConfig
from gateway.observability import tracing
from gateway.providers import turn
from gateway.providers.base import (
    CHARS_PER_TOKEN,
    NO_OBSERVER,
    Attempt,
    Batch,
    ChainObserver,
    ChatRequest,
    Finish,
    ProviderError,
    TextDelta,
    ToolCallDelta,
    Unsupported,
    UpstreamTimeout,
)
from gateway.providers.deadlines import Timeout
from gateway.providers.registry import ModelRegistry

if TYPE_CHECKING:
    from gateway.store.usage import UsageRecord

log = logging.getLogger(__name__)

# A bounded reply is relayed up to RELAY_SLACK times its bound by the estimate (about four characters
# a token), plus RELAY_EXTRA_CHARS: a compliant upstream's tokens seldom average more than five
# characters, so only an upstream that ignores max_tokens is cut, never a compliant one's last words.
RELAY_SLACK = 2
RELAY_EXTRA_CHARS = 64
CUT = -1  # the room left once a reply was cut


def relay_chars(max_tokens: int) -> int:
    """The characters of reply (text and tool calls) relayed for a bound of `max_tokens`."""
    return RELAY_SLACK * CHARS_PER_TOKEN * max_tokens + RELAY_EXTRA_CHARS


def within(batch: Batch, room: int) -> tuple[Batch, int]:
    """`batch` within `room` characters of reply, and the room left; once they run out, the batch
    ends with the text that fits and Finish("length"), and the room left is CUT."""
    for i, event in enumerate(batch):
        if type(event) is TextDelta:
            n = len(event.text)
        elif type(event) is ToolCallDelta:
            n = sum(len(call_text(call)) for call in event.calls)
        else:
            continue
        if n <= room:
            room -= n
            continue
        kept = batch[:i]
        if type(event) is TextDelta and room:
            kept.append(TextDelta(event.text[:room]))
        kept.append(Finish("length"))
        return kept, CUT
    return batch, room


def call_text(call: dict[str, object]) -> str:
    """A tool call fragment's text: its name and arguments."""
    function = call.get("function")
    if not isinstance(function, dict):
        return ""
    return f"{function.get('name') or ''}{function.get('arguments') or ''}"


def refused_by_chain(registry: ModelRegistry, name: str, request: ChatRequest) -> Unsupported | None:
    """The refusal of a turn no link of model `name`'s chain can express (the first link's, naming
    its feature and model), or None when a link can: the doors answer it before anything is
    reserved or written."""
    if not turn.features(request):
        return None
    first: Unsupported | None = None
    for model in registry.chain(name):
        check = getattr(registry.provider(model), "unsupported", None)
        feature = check(model, request) if check is not None else None
        if feature is None:
            return None
        first = first or Unsupported(feature, model.name)
    return first


# Content parts as a thread's stored messages can hold them (the doors store text and images, by
# URL or inline, of any image type): what a turn continuing a thread may carry besides its own message
_STORED_PARTS: list[dict[str, Any]] = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "https://history.invalid/image"}},
    {"type": "image_url", "image_url": {"url": "data:image/x-any;base64,AA=="}}]}]


def history_may_be_refused(registry: ModelRegistry, name: str, request: ChatRequest) -> bool:
    """Whether model `name`'s chain could refuse `request` (a new turn) for what a thread's history
    holds before it: False when a link takes the turn after any content parts a history can hold (an
    OpenAI-compatible link takes every turn as it comes), so a door need not read the history to know."""
    probe = ChatRequest([*_STORED_PARTS, *request.messages], extra=request.extra, thinking=request.thinking)
    return refused_by_chain(registry, name, probe) is not None


@dataclass(slots=True)  # no attribute dict: a held stream keeps its chain
class Chain:
    registry: ModelRegistry
    models: list[ModelConfig]
    attempts: list[Attempt] = field(default_factory=list)
    model: ModelConfig | None = None  # the link that is streaming, once one is
    observer: ChainObserver = field(default=NO_OBSERVER, kw_only=True)
    started: float | None = field(default=None, kw_only=True)  # the request's arrival (time.monotonic())
    _last: ModelConfig | None = field(default=None, init=False, repr=False)  # the last link tried

    @property
    def used(self) -> ModelConfig:
        """The model that streamed, else the last one tried, else the first planned."""
        return self.model or self._last or self.models[0]

    @property
    def fallback_from(self) -> str | None:
        # another deployment of the planned model is the same model, not a fallback
        return self.models[0].name if self.used.name != self.models[0].name else None

    async def stream(self, request: ChatRequest, *, whole: bool = False) -> AsyncGenerator[Batch, None]:
        """The reply's batches. `whole`: the caller waits for the complete reply (not streaming),
        so `timeout_s` bounds all of it rather than the wait for its first byte."""
        circuits, observer = self.registry.circuits, self.observer
        loop = asyncio.get_running_loop()
        budget_end = loop.time() + self.models[0].timeout_s  # bounds waits on Retry-After
        last_error: ProviderError | None = None
        links = list(self.models)
        retried: tuple[str, ...] = ()  # links retried after their Retry-After (not a set: 216 B a held stream)
        while links:
            model = links.pop(0)
            key = model.circuit_key
            provider = self.registry.provider(model)
            check = getattr(provider, "unsupported", None)  # base.Translating
            feature = check(model, request) if check is not None else None
            if feature is not None:  # never sent: another link may take it
                self._record(model, Unsupported.kind, time.monotonic())
                last_error = Unsupported(feature, model.name)
                continue
            if not circuits.allow(key):
                self._record(model, "cooldown" if circuits.cooling(key) else "circuit_open", time.monotonic())
                last_error = last_error or ProviderError(f"model {model.name} is unavailable (circuit open)")
                continue
            if not self.attempts and self.started is not None:
                observer.upstream_call(time.monotonic() - self.started)
            started = time.monotonic()
            tracing.attempt_started(model)  # a span when traced: the upstream call carries it
            deadline = loop.time() + (model.timeout_s if whole else model.max_stream_s)
            events = provider.stream(model, request)
            try:
                # wait for the first batch (content, or usage/finish alone: an empty reply also commits)
                async with asyncio.timeout(min(model.first_token_timeout_s, model.timeout_s)):
                    first = await anext(events)
            except (ProviderError, TimeoutError, StopAsyncIteration) as e:
                await events.aclose()
                if isinstance(e, TimeoutError):
                    e = UpstreamTimeout("first_token")
                elif isinstance(e, StopAsyncIteration):
                    e = ProviderError("upstream ended without a reply")
                self._record(model, e.kind, started, e.status)
                log.warning("model %s (%s) failed before its first token: %s", model.name, model.provider, e.message)
                last_error = e
                if not e.retryable:
                    circuits.release(key)  # the request's fault: every provider would refuse it
                    break
                if not e.model_fault:
                    circuits.release(key)  # a parameter this model rejects: the next link may take it
                    continue
                circuits.failure(key)
                wait = getattr(e, "retry_after", None)
                if model.deployment is not None:
                    # one deployment of several: rest it for a while, its siblings serve meanwhile
                    circuits.cool(key, wait if wait is not None else self.registry.deployment_cooldown_s)
                elif not links and wait is not None and key not in retried and loop.time() + wait < budget_end:
                    # the last link asked us to come back shortly: within the budget, do so once
                    retried += (key,)
                    await asyncio.sleep(wait)
                    links.append(model)
                continue
            except BaseException:
                circuits.release(key)
                await events.aclose()
                raise
            self.model = model
            first_at = time.monotonic()
            observer.attempt_answered(model, first_at - started, self.models[0])
            batches = 0  # a local count, not an observer call: nothing is reported per chunk
            del links  # committed: no other link is tried
            # the reply's characters still relayed, when it has a bound
            room = relay_chars(request.max_tokens) if request.max_tokens is not None else None
            try:
                if room is not None:
                    first, room = within(first, room)
                yield first
                del first  # while a stream waits for its upstream, this frame keeps no batch it passed on
                if room != CUT:
                    async with Timeout(deadline):  # a shared coarse timer: a held stream keeps no timer of its own
                        async for event in events:
                            batches += 1
                            if room is not None:
                                event, room = within(event, room)
                            yield event
                            del event
                            if room == CUT:  # the upstream ignored its max_tokens: no more of it
                                break
            except TimeoutError:
                self._record(model, "upstream_timeout", started)
                circuits.failure(key)
                raise UpstreamTimeout("total" if whole else "max_stream") from None
            except ProviderError as e:
                self._record(model, e.kind, started)
                circuits.failure(key)
                raise
            except BaseException:
                self._record(model, "cancelled", started)
                circuits.release(key)
                raise
            finally:
                await events.aclose()
            self._record(model, "ok", started)
            circuits.success(key)
            observer.reply_streamed(model, batches, time.monotonic() - first_at)
            return
        assert last_error is not None
        raise last_error

    def _record(self, model: ModelConfig, outcome: str, started: float, status: int | None = None) -> None:
        tracing.attempt_ended(model, outcome)
        self.observer.attempt_ended(model, outcome)
        self._last = model
        self.attempts.append(Attempt(model.name, model.provider, outcome, round((time.monotonic() - started) * 1000),
                                     status))


class TracingObserver:
    """A `ChainObserver` that reports to `inner` (the metrics) and notes on the current spans what the
    chain says: an attempt's first chunk, the reply's usage (each a no-op for an untraced reply)."""

    __slots__ = ("inner",)

    def __init__(self, inner: ChainObserver) -> None:
        self.inner = inner

    def upstream_call(self, overhead_s: float) -> None:
        self.inner.upstream_call(overhead_s)

    def attempt_answered(self, model: ModelConfig, seconds: float, planned: ModelConfig) -> None:
        self.inner.attempt_answered(model, seconds, planned)
        tracing.first_chunk(seconds)

    def attempt_ended(self, model: ModelConfig, outcome: str) -> None:
        self.inner.attempt_ended(model, outcome)

    def reply_streamed(self, model: ModelConfig, batches: int, seconds: float) -> None:
        self.inner.reply_streamed(model, batches, seconds)

    def usage(self, record: UsageRecord) -> None:
        self.inner.usage(record)
        tracing.usage(record.prompt_tokens, record.completion_tokens, estimated=record.estimated,
                      cost_usd=record.cost_usd)
