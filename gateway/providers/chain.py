"""The fallback chain: try each model in turn until one starts streaming.

Per attempt: connect and idle timeouts live in the adapter's HTTP client; the chain bounds
the first token and the whole attempt. Before the first content byte, a retryable failure
(429, 5xx, timeout, connection error) moves on to the next link; after it, the failure is
final (the client already has text). A 429 on the last link is retried once after its
Retry-After when that fits in the budget. Models whose circuit is open are skipped.

What happens is reported to the chain's `observer` (a `ChainObserver`: the app's `Metrics`, or
nothing): the gateway's own time before the first upstream call (measured from `started`, the
request's arrival on the `time.monotonic()` clock), each answering attempt, each streamed reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from .. import tracing
from ..config import ModelConfig
from .base import NO_OBSERVER, Batch, ChainObserver, ChatRequest, ProviderError, UpstreamTimeout
from .registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Attempt:
    model: str
    provider: str
    outcome: str  # ok | the ProviderError kind
    ms: int

    def as_json(self) -> dict[str, object]:
        return {"model": self.model, "provider": self.provider, "outcome": self.outcome, "ms": self.ms}


@dataclass
class Chain:
    registry: ModelRegistry
    models: list[ModelConfig]
    attempts: list[Attempt] = field(default_factory=list)
    model: ModelConfig | None = None  # the link that is streaming, once one is
    observer: ChainObserver = field(default=NO_OBSERVER, kw_only=True)
    started: float | None = field(default=None, kw_only=True)  # the request's arrival (time.monotonic())

    @property
    def used(self) -> ModelConfig:
        """The model that streamed, else the last one tried, else the first planned."""
        if self.model is not None:
            return self.model
        if self.attempts:
            return next(m for m in self.models if m.name == self.attempts[-1].model)
        return self.models[0]

    @property
    def fallback_from(self) -> str | None:
        return self.models[0].name if self.used is not self.models[0] else None

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Batch, None]:
        circuits, observer = self.registry.circuits, self.observer
        loop = asyncio.get_running_loop()
        budget_end = loop.time() + self.models[0].timeout_s  # bounds waits on Retry-After
        last_error: ProviderError | None = None
        links = list(self.models)
        retried: set[str] = set()
        while links:
            model = links.pop(0)
            if not circuits.allow(model.name):
                self._record(model, "circuit_open", time.monotonic())
                last_error = last_error or ProviderError(f"model {model.name} is unavailable (circuit open)")
                continue
            provider = self.registry.provider(model)
            if not self.attempts and self.started is not None:
                observer.upstream_call(time.monotonic() - self.started)
            started = time.monotonic()
            tracing.attempt_started(model)  # a span when traced: the upstream call carries it
            deadline = loop.time() + model.timeout_s
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
                self._record(model, e.kind, started)
                log.warning("model %s failed before its first token: %s", model.name, e.message)
                last_error = e
                if not e.retryable:
                    circuits.release(model.name)  # our request's fault, not the model's
                    break
                circuits.failure(model.name)
                wait = getattr(e, "retry_after", None)
                if not links and wait is not None and model.name not in retried and loop.time() + wait < budget_end:
                    # the last link asked us to come back shortly: within the budget, do so once
                    retried.add(model.name)
                    await asyncio.sleep(wait)
                    links.append(model)
                continue
            except BaseException:
                circuits.release(model.name)
                await events.aclose()
                raise
            self.model = model
            first_at = time.monotonic()
            observer.attempt_answered(model, first_at - started, self.models[0])
            batches = 0  # a local count, not an observer call: nothing is reported per chunk
            try:
                yield first
                async with asyncio.timeout_at(deadline):
                    async for event in events:
                        batches += 1
                        yield event
            except TimeoutError:
                self._record(model, "upstream_timeout", started)
                circuits.failure(model.name)
                raise UpstreamTimeout("total") from None
            except ProviderError as e:
                self._record(model, e.kind, started)
                circuits.failure(model.name)
                raise
            except BaseException:
                self._record(model, "cancelled", started)
                circuits.release(model.name)
                raise
            finally:
                await events.aclose()
            self._record(model, "ok", started)
            circuits.success(model.name)
            observer.reply_streamed(model, batches, time.monotonic() - first_at)
            return
        assert last_error is not None
        raise last_error

    def _record(self, model: ModelConfig, outcome: str, started: float) -> None:
        tracing.attempt_ended(model, outcome)
        self.attempts.append(Attempt(model.name, model.provider, outcome, round((time.monotonic() - started) * 1000)))
